"""Async vs sync: wall-clock to the perplexity sync reaches, and perplexity at equal wall-clock.

Same data, model, compressor, local work and time budget for every run; 4 clients with speed
factors 1,1,2,4 (`client-speeds`: a client with factor f sleeps (f - 1) x its compute time, or
with `--set task-s=T` until its task has lasted f x T).
Sync (FedAvg, optionally with server momentum) waits for the slowest client every round; async
applies every update on arrival and hands the client that just finished its next task at once.

Protocol: every run gets the whole budget. The sync baseline is the sync configuration with
the lowest mean perplexity at the budget over the seeds (give `--sync` several to tune it); per
seed, the *target* is the baseline's perplexity at the budget (its last evaluation within it:
a round that ends after the budget does not count), and each configuration's time to target
is its first evaluation at or below it (the baseline's own is when it first got there).
Speed-up = baseline time / configuration time; ppl at equal wall-clock compares the last
evaluations within the budget. Mean and spread (std, min-max) over `--seeds`.

Backends (`--backend`):
* `simulation`: `flwr run .` in local simulation (a private FLWR_HOME, 4 SuperNodes,
  `client-resources-num-cpus=1 init-args-num-cpus=4` so Ray starts all 4 actors at once);
* `deployment`: `scripts/local-deployment.sh 4 --run-config ...` (TLS SuperLink + 4 SuperNodes;
  `--gpus 0` puts them on GPU 0);
* `emulate`: `python -m asyncfl.emulate` -- the real loop and real training on a virtual clock
  with a timing model (`--emulate-args "--task-s ... --overhead-s ... --poll-s 3"`): fast
  and reproducible, for sweeping rules and hyperparameters; real claims need the other two.

    # CPU, tiny preset, flwr simulation, 3 seeds: FedAvg vs asgd
    python bench/async_vs_sync.py --preset tiny --seeds 11,23,37 --time-budget-s 150 --rules asgd
    # tune both sides in the emulator (GPU), 3 runs at a time
    python bench/async_vs_sync.py --backend emulate --preset small --device cuda --jobs 3 \
        --sync "sync,sync:server-lr=2.0" --rules "asgd:server-lr=0.25,dn:server-lr=0.7" \
        --emulate-args "--task-s 1.2 --overhead-s 1.3 --poll-s 3 --jitter 0.15"
    # GPU machine, real deployment
    python bench/async_vs_sync.py --backend deployment --preset small --device cuda --gpus 0

Times are the recorder's `t`: the ServerApp's own clock, restarted after the warm-up (every node
has built its model and loaded its data), so start-up is not in it; `startup_s` (when the first
task began on that clock) is reported too. Outputs in `--out`: runs/<name>-s<seed>/ (the run
folders), `table.md`, `results.json` (every number, the configs, the environment), `plot.png`
(perplexity vs wall-clock of the baseline and the best async configuration: each seed thin,
their geometric mean bold) and `compare-<name>/` (`asyncfl.results compare` of seed 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from asyncfl.results import compare, load_run, ppl_at, time_to_ppl  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
NUM_CLIENTS = 4
SPEEDS = "1,1,2,4"

# Model, data and local work per preset (both modes). "tiny" is sized for a 2-core CPU: a task
# is 4 AdamW steps of 4 blocks drawn from the client's 48 (about 1.5 s of one core), so there are
# many updates; "small" (GPU) is one pass over 256 blocks of 256 tokens per task.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model-preset": "tiny",
        "block-size": 64,
        "max-train-blocks": 48,
        "batch-size": 4,
        "local-steps": 4,
        "lr": 1e-3,
        "eval-max-blocks": 16,
        "eval-batch-size": 16,
    },
    "small": {
        "model-preset": "small",
        "block-size": 256,
        "max-train-blocks": 256,
        "batch-size": 16,
        "local-steps": 16,
        "lr": 5e-4,
        "eval-max-blocks": 64,
        "eval-batch-size": 32,
    },
}
# Per mode, only what tells the modes apart; everything else is the app's defaults (which are
# what the benchmark is meant to measure) or a spec's own keys. Sync evaluates every round.
ASYNC_DEFAULTS: dict[str, Any] = {"mode": "async"}
SYNC_DEFAULTS: dict[str, Any] = {"mode": "sync", "eval-every": 1}


def log(msg: str) -> None:
    print(f"[async_vs_sync] {msg}", file=sys.stderr, flush=True)


def parse_kv(items: list[str]) -> dict[str, Any]:
    """`k=v` strings -> dict; values parsed as JSON when possible (numbers, true/false)."""
    out: dict[str, Any] = {}
    for item in items:
        for part in shlex.split(item):
            key, sep, value = part.partition("=")
            if not sep:
                raise SystemExit(f"error: expected key=value, got {part!r}")
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError:
                out[key] = value
    return out


def run_config_str(cfg: dict[str, Any]) -> str:
    """A dict -> one `--run-config` string (TOML values)."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return json.dumps(str(v))

    return " ".join(f"{k}={val(v)}" for k, v in cfg.items())


# ---------------------------------------------------------------------------------------------
# Running one configuration
# ---------------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _pids_of_home(home: Path) -> list[int]:
    """Processes started for this FLWR_HOME: the environment (or command line) names it."""
    env_tag = f"FLWR_HOME={home}".encode()
    me, out = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            env = (d / "environ").read_bytes()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if b"\0" + env_tag + b"\0" in b"\0" + env + b"\0" or str(home).encode() in cmd:
            out.append(int(d.name))
    return out


def stop_local_superlink(home: Path, grace_s: float = 8.0) -> None:
    """Stop, by process id, everything `flwr run` started for this private FLWR_HOME.

    `flwr run` starts a background SuperLink; it starts a SuperExec in a session of its own,
    which starts flwr-simulation, Ray (GCS, raylet, dashboard) and the ClientApp actors. All of
    them inherit our FLWR_HOME, which no other process on the machine has, so they are found by
    it in their environment and sent SIGTERM, then SIGKILL if still there after `grace_s`.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for p in _pids_of_home(home) if _alive(p)]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.25)
    left = [p for p in _pids_of_home(home) if _alive(p)]
    if left:
        log(f"warning: processes {left} started for {home} did not exit")


def _flwr_status(env: dict[str, str], run_id: str) -> str:
    """The run's status from `flwr ls` ("" if the SuperLink does not answer)."""
    try:
        res = subprocess.run(
            ["flwr", "ls", "--run-id", run_id, "--format", "json"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return json.loads(res.stdout)["runs"][0]["status"]
    except (subprocess.TimeoutExpired, json.JSONDecodeError, KeyError, IndexError, OSError):
        return ""


def thread_env(threads: int) -> dict[str, str]:
    """Intra-op threads of every process of the run (0: leave the environment alone).

    Ray gives each ClientApp actor OMP_NUM_THREADS = its num-cpus (1) unless the variable is
    set; the ServerApp would use one thread per core. On a small machine where 4 clients and the
    server share the cores, OpenMP threads that spin-wait on busy cores slow the server's
    decode/apply and evaluation many times over, so the default pins every process to 1.
    """
    if threads <= 0:
        return {}
    return {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def run_simulation(
    cfg: dict[str, Any], work: Path, timeout_s: float, run_dir: Path, threads: int = 1, num_clients: int = NUM_CLIENTS
) -> str:
    """`flwr run .` in local simulation with a private FLWR_HOME; returns its output.

    `flwr run --stream` can return before the run ends (a log stream that breaks off on a busy
    machine), so the run is followed with `flwr ls` until it is finished (or its summary.json
    is written), then the background SuperLink and its simulation are stopped.
    """
    home = work / "flwr-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_DEDUP_LOGS": "0",
        **thread_env(threads),
    }
    fed = f"num-supernodes={num_clients} client-resources-num-cpus=1 init-args-num-cpus={num_clients}"
    cmd = ["flwr", "run", str(ROOT), "--stream", "--run-config", run_config_str(cfg), "--federation-config", fed]
    log("$ " + shlex.join(cmd))
    deadline = time.monotonic() + timeout_s
    text = ""
    try:
        try:
            out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
            text = out.stdout + out.stderr
        except subprocess.TimeoutExpired as exc:
            text = f"{_text(exc.stdout)}{_text(exc.stderr)}\n[flwr run timed out after {timeout_s:.0f} s]"
        m = re.search(r"started run (\d+)", text)
        while m and time.monotonic() < deadline:
            status = _flwr_status(env, m.group(1))
            if status.startswith("finished") or (not status and (run_dir / "summary.json").exists()):
                text += f"\n[run {m.group(1)}: {status or 'summary written'}]"
                break
            time.sleep(5)
        else:
            if m:
                text += f"\n[run {m.group(1)} not finished after {timeout_s:.0f} s]"
    finally:
        stop_local_superlink(home)
    return text


def _text(b: Any) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def free_port_block(n: int, start: int = 19100, stop: int = 29000) -> int:
    """First port p >= start with p .. p + n - 1 all free on 127.0.0.1."""
    import socket

    def free(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    for p in range(start, stop, n):
        if all(free(p + i) for i in range(n)):
            return p
    raise SystemExit(f"error: no {n} free consecutive ports in {start}..{stop}")


def deployment_command(
    cfg: dict[str, Any], work: Path, timeout_s: float, extra: list[str], num_clients: int = NUM_CLIENTS
) -> list[str]:
    """The `scripts/local-deployment.sh` call for one run (SuperLink + 4 SuperNodes).

    Shape: `scripts/local-deployment.sh 4 --run-config "k=v ..." --work-dir DIR --timeout S
    --port P --node-port P+1 [extra...]`; it prints `RUN_DIR=...` and exits 0 only when the run
    finished with a summary.json. Free ports are picked unless `extra` names --port.
    """
    cmd = [
        str(ROOT / "scripts" / "local-deployment.sh"),
        str(num_clients),
        "--run-config",
        run_config_str(cfg),
        "--work-dir",
        str(work / "deployment"),
        "--timeout",
        str(int(timeout_s)),
    ]
    if "--port" not in extra:
        port = free_port_block(num_clients + 1)
        cmd += ["--port", str(port), "--node-port", str(port + 1)]
    return cmd + extra


def run_deployment(
    cfg: dict[str, Any],
    work: Path,
    timeout_s: float,
    extra: list[str],
    threads: int = 1,
    num_clients: int = NUM_CLIENTS,
) -> str:
    """One run through scripts/local-deployment.sh (which stops its own processes)."""
    cmd = deployment_command(cfg, work, timeout_s, extra, num_clients)
    log("$ " + shlex.join(cmd))
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable), **thread_env(threads)}
    try:
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s + 180)
        return out.stdout + out.stderr
    except subprocess.TimeoutExpired as exc:
        return f"{_text(exc.stdout)}{_text(exc.stderr)}\n[timed out]"


def run_deployment_batch(
    named: list[tuple[str, dict[str, Any]]],
    work: Path,
    timeout_s: float,
    extra: list[str],
    threads: int = 1,
    num_clients: int = NUM_CLIENTS,
) -> str:
    """Several runs, one after another, on one `scripts/local-deployment.sh` deployment (`--run`
    per configuration): the deployment's start-up and the node workers' warm-up are paid once.
    The configurations must share the model and seed (the workers are kept per model)."""
    cmd = [
        str(ROOT / "scripts" / "local-deployment.sh"),
        str(num_clients),
        "--work-dir",
        str(work / "deployment"),
        "--timeout",
        str(int(timeout_s)),
    ]
    for _, cfg in named:
        cmd += ["--run", run_config_str(cfg)]
    if "--port" not in extra:
        port = free_port_block(num_clients + 1)
        cmd += ["--port", str(port), "--node-port", str(port + 1)]
    cmd += extra
    log("$ " + shlex.join(cmd))
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable), **thread_env(threads)}
    try:
        out = subprocess.run(
            cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=len(named) * (timeout_s + 120) + 60
        )
        return out.stdout + out.stderr
    except subprocess.TimeoutExpired as exc:
        return f"{_text(exc.stdout)}{_text(exc.stderr)}\n[timed out]"


def run_emulation(
    cfg: dict[str, Any],
    work: Path,
    timeout_s: float,
    extra: list[str],
    threads: int = 0,
    num_clients: int = NUM_CLIENTS,
) -> str:
    """One run of `python -m asyncfl.emulate` (`num_clients` nodes, default 4) in a subprocess of its own."""
    cmd = [
        sys.executable,
        "-m",
        "asyncfl.emulate",
        "--nodes",
        str(num_clients),
        "--run-config",
        run_config_str(cfg),
        *extra,
    ]
    log("$ " + shlex.join(cmd))
    env = {**os.environ, **thread_env(threads)}
    try:
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        return out.stdout + out.stderr
    except subprocess.TimeoutExpired as exc:
        return f"{_text(exc.stdout)}{_text(exc.stderr)}\n[timed out]"


def finished_run(run_dir: Path, text: str, t0: float) -> Path:
    """The run folder of a finished run (raises with the output's tail if it wrote no summary)."""
    if not (run_dir / "summary.json").is_file():
        raise RuntimeError(f"run {run_dir.name!r} wrote no summary.json; output tail:\n{text[-5000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    log(
        f"{run_dir.name}: {summary['stop_reason']}; {summary['updates_applied']} updates, ppl "
        f"{summary['initial_eval_ppl']:.1f} -> {summary['final_eval_ppl']:.1f} in "
        f"{summary['wall_clock_s']:.1f} s (process {time.monotonic() - t0:.0f} s)"
    )
    return run_dir


def run_seed_in_one_deployment(
    seed: int, specs: list[str], args: argparse.Namespace, order: int = 0
) -> dict[str, Path | RuntimeError]:
    """`--share-deployment`: every configuration of one seed on one deployment, in the order of
    `specs` (reversed for odd `order`, so over the seeds each configuration runs first as often
    as it runs second). Returns each spec's run folder, or the error of a run that failed."""
    runs = args.out / "runs"
    todo = [s for s in specs if not (args.reuse and (runs / f"{spec_name(s)}-s{seed}" / "summary.json").is_file())]
    if order % 2:
        todo.reverse()
    named = [
        (
            f"{spec_name(s)}-s{seed}",
            {**config_for(args, s, seed), "results-dir": str(runs.resolve()), "run-name": f"{spec_name(s)}-s{seed}"},
        )
        for s in todo
    ]
    out: dict[str, Path | RuntimeError] = {}
    for s in specs:
        if s not in todo:
            log(f"{spec_name(s)}-s{seed}: reusing the finished run in {runs / f'{spec_name(s)}-s{seed}'}")
            out[s] = runs / f"{spec_name(s)}-s{seed}"
    if not named:
        return out
    work = args.out / "work" / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    log(f"seed {seed}: {', '.join(n for n, _ in named)} on one deployment")
    text = run_deployment_batch(
        named, work, args.timeout_s, shlex.split(args.deployment_args), args.threads, NUM_CLIENTS
    )
    (work / "output.log").write_text(text)
    for s, (name, _) in zip(todo, named):
        try:
            out[s] = finished_run(runs / name, text, t0)
        except RuntimeError as exc:
            out[s] = exc
    return out


def run_one(
    name: str, cfg: dict[str, Any], args: argparse.Namespace, slot: int = 0, num_clients: int = NUM_CLIENTS
) -> Path:
    """Run one configuration to completion; returns its run folder (raises if it failed).
    `slot` (0..jobs-1) keeps concurrent deployments on separate ports."""
    runs = args.out / "runs"
    run_dir = runs / name
    if (run_dir / "summary.json").is_file() and args.reuse:
        log(f"{name}: reusing the finished run in {run_dir}")
        return run_dir
    cfg = {**cfg, "results-dir": str(runs.resolve()), "run-name": name}
    work = args.out / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if args.backend == "deployment":
        extra = shlex.split(args.deployment_args)
        if "--port" not in extra:
            port = free_port_block(num_clients + 1, start=19100 + 200 * slot)
            extra += ["--port", str(port), "--node-port", str(port + 1)]
        text = run_deployment(cfg, work, args.timeout_s, extra, args.threads, num_clients)
    elif args.backend == "emulate":
        text = run_emulation(cfg, work, args.timeout_s, shlex.split(args.emulate_args), args.threads, num_clients)
    else:
        text = run_simulation(cfg, work, args.timeout_s, run_dir, args.threads, num_clients)
    (work / "output.log").write_text(text)
    return finished_run(run_dir, text, t0)


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------
def base_config(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(PRESETS[args.preset])
    cfg.update(
        {
            "device": args.device,
            "compressor": args.compressor,
            "rank": args.rank,
            "client-speeds": SPEEDS,
            "min-nodes": NUM_CLIENTS,
            "save-model": False,
            "seed": seed,
            "time-budget-s": args.time_budget_s,
        }
    )
    if args.tokenizer:
        cfg["tokenizer"] = args.tokenizer
    if args.data_dir:
        cfg["data-dir"] = args.data_dir
    cfg.update(parse_kv(args.set))
    return cfg


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """ "asgd:server-lr=1.0:delay-adaptive=true" -> ("asgd", {"server-lr": 1.0, ...})."""
    name, *kvs = spec.split(":")
    return name, parse_kv(kvs)


def spec_name(spec: str) -> str:
    """A folder-safe name for a spec: "dn:server-lr=0.7" -> "dn_server-lr=0.7"."""
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in spec.replace(":", "_"))


def config_for(args: argparse.Namespace, spec: str, seed: int) -> dict[str, Any]:
    """Run config of a spec: "sync[:k=v...]" (FedAvg) or "<rule>[:k=v...]" (async)."""
    name, overrides = parse_spec(spec)
    if name == "sync":
        return {**base_config(args, seed), **SYNC_DEFAULTS, **parse_kv(args.sync_set), **overrides}
    cfg = {**base_config(args, seed), **ASYNC_DEFAULTS, "rule": name, "eval-every": args.eval_every}
    return {**cfg, **parse_kv(args.async_set), **overrides}


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def startup_s(events: list[dict]) -> float:
    """When the first task began, on the run clock: per applied update, `t - client_s` is when
    its task's work began (client_s: the client's own time, emulated slowness included); the
    minimum over the updates is the first start. The clock starts after the warm-up, so this
    is the initial evaluation and the first dispatch. In sync mode updates are logged at the
    round's end, so this is never earlier than the true start (conservative for async)."""
    starts = [e["t"] - e["client_s"] for e in events if e.get("event") == "update" and e.get("client_s") is not None]
    return max(0.0, min(starts, default=0.0))


def evals_of(events: list[dict]) -> list[tuple[float, float]]:
    return [(float(e["t"]), float(e["ppl"])) for e in events if e.get("event") == "eval" and e.get("ppl") is not None]


def run_metrics(run_dir: Path, target: float, t_equal: float) -> dict[str, Any]:
    summary, events = load_run(run_dir)
    return {
        "dir": str(run_dir),
        "time_to_target_s": time_to_ppl(events, target),
        "ppl_at_equal": ppl_at(events, t_equal),
        "final_ppl": summary["final_eval_ppl"],
        "best_ppl": summary["best_eval_ppl"],
        "initial_ppl": summary["initial_eval_ppl"],
        "wall_clock_s": summary["wall_clock_s"],
        "updates": summary["updates_applied"],
        "rounds": summary["extra"].get("rounds"),
        "mean_staleness": summary["mean_staleness"],
        "startup_s": startup_s(events),
        "bytes_uploaded": summary["bytes_uploaded"],
        "mean_decode_apply_ms": summary["mean_decode_apply_ms"],
        "stop_reason": summary["stop_reason"],
    }


def spread(values: list[float | None]) -> dict[str, Any]:
    """mean, std (sample), min, max of the values that exist, and how many exist."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "of": len(values)}
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(xs), "max": max(xs), "n": len(xs), "of": len(values)}


def analyse(dirs: dict[str, dict[int, Path]], sync_specs: list[str], seeds: list[int], budget: float) -> dict[str, Any]:
    """Pick the baseline, then per seed each configuration's time to its target and ppl at
    equal wall-clock; aggregate over seeds."""
    finals = {spec: spread([ppl_at(load_run(dirs[spec][s])[1], budget) for s in seeds])["mean"] for spec in sync_specs}
    baseline = min(sync_specs, key=lambda spec: finals[spec] if finals[spec] is not None else math.inf)
    per_seed: dict[str, list[dict[str, Any]]] = {spec: [] for spec in dirs}
    for seed in seeds:
        # the budget is the equal wall-clock: a sync round that started before it and ended
        # after it is not counted (an async run stops at the budget itself)
        _, base_events = load_run(dirs[baseline][seed])
        t_equal = budget
        target = float(ppl_at(base_events, t_equal))
        base = run_metrics(dirs[baseline][seed], target, t_equal)
        for spec in dirs:
            m = run_metrics(dirs[spec][seed], target, t_equal)
            t_base, t_cfg = base["time_to_target_s"], m["time_to_target_s"]
            m.update(
                seed=seed,
                target_ppl=target,
                t_equal_s=t_equal,
                speedup=t_base / t_cfg if t_base and t_cfg else None,
                speedup_excl_startup=(
                    (t_base - base["startup_s"]) / (t_cfg - m["startup_s"])
                    if t_base and t_cfg and t_cfg > m["startup_s"]
                    else None
                ),
                ppl_gap_at_equal_pct=(
                    100 * (m["ppl_at_equal"] / base["ppl_at_equal"] - 1)
                    if m["ppl_at_equal"] and base["ppl_at_equal"]
                    else None
                ),
            )
            per_seed[spec].append(m)
    rows = []
    for spec, ms in per_seed.items():
        rows.append(
            {
                "spec": spec,
                "mode": "sync" if spec.split(":")[0] == "sync" else "async",
                "baseline": spec == baseline,
                "per_seed": ms,
                **{
                    k: spread([m[k] for m in ms])
                    for k in (
                        "speedup",
                        "speedup_excl_startup",
                        "time_to_target_s",
                        "ppl_at_equal",
                        "ppl_gap_at_equal_pct",
                        "final_ppl",
                        "updates",
                        "mean_staleness",
                    )
                },
            }
        )
    best_async = max(
        (r for r in rows if r["mode"] == "async"),
        key=lambda r: (r["speedup"]["n"], r["speedup"]["mean"] or 0.0),
        default=None,
    )
    return {"baseline": baseline, "best_async": best_async["spec"] if best_async else None, "rows": rows}


def _f(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _ms(s: dict[str, Any], spec: str = ".2f", unit: str = "") -> str:
    """ "mean ± std (min-max)" of a spread, with how many seeds had a value if not all."""
    if s["mean"] is None:
        return f"- (0/{s['of']})"
    out = f"{format(s['mean'], spec)}{unit} ± {format(s['std'], spec)}"
    if s["of"] > 1:
        out += f" ({format(s['min'], spec)}-{format(s['max'], spec)})"
    return out + (f" [{s['n']}/{s['of']}]" if s["n"] < s["of"] else "")


def markdown_table(result: dict[str, Any]) -> str:
    head = [
        "configuration",
        "speed-up to target",
        "speed-up, start-up excl.",
        "time to target s",
        "ppl @ equal wall-clock",
        "gap vs baseline",
        "final ppl",
        "updates",
        "mean staleness",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in sorted(result["rows"], key=lambda r: (r["mode"] != "sync", -(r["speedup"]["mean"] or 0))):
        name = f"**{r['spec']}** (baseline)" if r["baseline"] else r["spec"]
        cells = [
            name,
            _ms(r["speedup"], unit="x"),
            _ms(r["speedup_excl_startup"], unit="x"),
            _ms(r["time_to_target_s"], ".1f"),
            _ms(r["ppl_at_equal"], ".1f"),
            _ms(r["ppl_gap_at_equal_pct"], "+.1f", "%"),
            _ms(r["final_ppl"], ".1f"),
            _ms(r["updates"], ".0f"),
            _ms(r["mean_staleness"], ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_seeds(
    path: Path, curves: dict[str, list[list[tuple[float, float]]]], title: str, target: float | None = None
) -> None:
    """Perplexity vs wall-clock: each seed a thin line, the geometric mean over seeds bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for (label, runs), color in zip(curves.items(), ("tab:blue", "tab:red", "tab:green", "tab:purple")):
        for pts in runs:
            ax.step([t for t, _ in pts], [p for _, p in pts], where="post", color=color, lw=0.6, alpha=0.45)
        end = min(pts[-1][0] for pts in runs if pts)
        grid = [end * i / 200 for i in range(201)]
        mean = []
        for t in grid:
            vals = [next((p for tt, p in reversed(pts) if tt <= t), None) for pts in runs]
            vals = [v for v in vals if v]
            mean.append(math.exp(sum(math.log(v) for v in vals) / len(vals)) if len(vals) == len(runs) else math.nan)
        ax.plot(grid, mean, color=color, lw=2.4, label=f"{label} (mean of {len(runs)})")
    if target:
        ax.axhline(target, color="grey", ls="--", lw=0.8, label="target: the baseline's ppl at the budget (mean)")
    ax.set_yscale("log")
    ax.set_xlabel("wall-clock s (run clock, after the warm-up)")
    ax.set_ylabel("eval perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment() -> dict[str, Any]:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    import flwr
    import torch

    return {
        "git_sha": sha,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "cpu_count": os.cpu_count(),
        "loadavg_end": load,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--backend", default="simulation", choices=["simulation", "deployment", "emulate"])
    p.add_argument("--deployment", action="store_true", help="same as --backend deployment")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--seeds", default="42", help="comma list of seeds; every configuration runs each")
    p.add_argument("--time-budget-s", type=float, default=150.0, help="wall-clock budget of every run")
    p.add_argument(
        "--sync",
        default="sync",
        help="comma list of sync specs, the baseline candidates: sync[:key=value...], "
        "e.g. sync,sync:server-lr=2.0,sync:server-lr=0.7:server-momentum=0.9",
    )
    p.add_argument(
        "--rules",
        default="asgd",
        help="comma list of async specs: <rule>[:key=value...], e.g. asgd:server-lr=0.25,fedbuff:buffer-size=4",
    )
    p.add_argument("--compressor", default="pca", choices=["none", "pca", "qrcp", "cur"])
    p.add_argument("--rank", type=int, default=10)
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="async: evaluate every N updates (default 0, the app's auto: every C updates, C "
        "the nodes working at once, as often per update as sync's evaluation every round; 1 "
        "makes the time to target exact to one update, at the cost of C times the evaluations)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP/MKL threads per process of the run (0: leave the environment alone; "
        "default 1 with --device cpu, else 0)",
    )
    p.add_argument("--tokenizer", default=str(SHARED / "gpt2") if SHARED.is_dir() else "")
    p.add_argument("--data-dir", default=str(SHARED / "wikitext-2-raw") if SHARED.is_dir() else "")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar='"k=v ..."',
        help="run-config overrides for every run (repeatable)",
    )
    p.add_argument(
        "--async-set",
        action="append",
        default=[],
        metavar='"k=v ..."',
        help="run-config overrides for the async runs only",
    )
    p.add_argument(
        "--sync-set",
        action="append",
        default=[],
        metavar='"k=v ..."',
        help="run-config overrides for the sync runs only",
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="runs at a time (emulate; deployments on separate ports share the machine)"
    )
    p.add_argument("--reuse", action="store_true", help="keep runs already finished in --out/runs")
    p.add_argument(
        "--deployment-args", default="", help='extra arguments for local-deployment.sh, e.g. "--insecure --gpus 0,1"'
    )
    p.add_argument("--gpus", default="", help="deployment: GPU ids for the SuperNodes")
    p.add_argument(
        "--share-deployment",
        action="store_true",
        help="deployment: run every configuration of a seed on one deployment, one after "
        "another (start-up and worker warm-up paid once per seed; the order is "
        "reversed every other seed); default: a fresh deployment per run",
    )
    p.add_argument(
        "--emulate-args",
        default="",
        help='arguments for python -m asyncfl.emulate, e.g. "--task-s 1.2 --overhead-s 1.3 --poll-s 3"',
    )
    p.add_argument("--timeout-s", type=float, default=0.0, help="kill a run after this long (default: budget + 600)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "async_vs_sync")
    args = p.parse_args(argv)
    if args.deployment:
        args.backend = "deployment"
    if args.gpus:
        args.deployment_args += f" --gpus {args.gpus}"
    args.out = args.out.resolve()
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    args.timeout_s = args.timeout_s or args.time_budget_s + 600
    return args


def main(argv: list[str] | None = None) -> int:
    from concurrent.futures import ThreadPoolExecutor

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    sync_specs = [s for s in args.sync.split(",") if s]
    async_specs = [r for r in args.rules.split(",") if r]
    if any(parse_spec(s)[0] != "sync" for s in sync_specs):
        raise SystemExit(f"error: --sync specs must start with 'sync', got {sync_specs}")
    specs = sync_specs + async_specs
    log(
        f"{len(specs)} configurations x {len(seeds)} seeds, budget {args.time_budget_s:g} s, "
        f"backend {args.backend}, {args.jobs} at a time"
    )
    jobs = [(spec, seed) for seed in seeds for spec in specs]
    dirs: dict[str, dict[int, Path]] = {spec: {} for spec in specs}
    slots = list(range(max(args.jobs, 1)))

    def work(job: tuple[str, int]) -> tuple[str, int, Path]:
        spec, seed = job
        slot = slots.pop()
        try:
            return spec, seed, run_one(f"{spec_name(spec)}-s{seed}", config_for(args, spec, seed), args, slot)
        finally:
            slots.append(slot)

    failed = []
    if args.backend == "deployment" and args.share_deployment:
        for i, seed in enumerate(seeds):
            for spec, got in run_seed_in_one_deployment(seed, specs, args, order=i).items():
                if isinstance(got, RuntimeError):
                    failed.append(str(got)[:300])
                    log(f"error: {got}")
                else:
                    dirs[spec][seed] = got
    else:
        with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
            for future in [pool.submit(work, j) for j in jobs]:
                try:
                    spec, seed, run_dir = future.result()
                    dirs[spec][seed] = run_dir
                except RuntimeError as exc:
                    failed.append(str(exc)[:300])
                    log(f"error: {exc}")
    complete = [spec for spec in specs if len(dirs[spec]) == len(seeds)]
    if not any(s in complete for s in sync_specs):
        raise SystemExit("error: no sync configuration finished every seed; see the errors above")
    dirs = {spec: dirs[spec] for spec in complete}
    result = analyse(dirs, [s for s in sync_specs if s in complete], seeds, args.time_budget_s)
    table = markdown_table(result)
    (args.out / "table.md").write_text(table)
    baseline, best = result["baseline"], result["best_async"]
    curves = {f"sync: {baseline}": [evals_of(load_run(dirs[baseline][s])[1]) for s in seeds]}
    if best:
        curves[f"async: {best}"] = [evals_of(load_run(dirs[best][s])[1]) for s in seeds]
        compare([dirs[baseline][seeds[0]], dirs[best][seeds[0]]], args.out / f"compare-{spec_name(best)}")
    targets = [m["target_ppl"] for r in result["rows"] if r["baseline"] for m in r["per_seed"]]
    plot_seeds(
        args.out / "plot.png",
        curves,
        f"{args.preset}, {args.backend}, {len(seeds)} seed(s), budget {args.time_budget_s:g} s",
        target=math.exp(sum(map(math.log, targets)) / len(targets)) if targets else None,
    )
    out = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **result,
        "failed": failed,
        "configs": {spec: config_for(args, spec, seeds[0]) for spec in specs},
        "env": environment(),
    }
    (args.out / "results.json").write_text(json.dumps(out, indent=2, default=str))
    print(table, end="")
    print(f"\nbaseline: {baseline}; best async: {best}; outputs in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
