"""Async vs sync: wall-clock to a target perplexity and perplexity at equal wall-clock.

Same data, model, compressor, local work and target for both modes; 4 clients with speed
factors 1,1,2,4 (`client-speeds`: a client with factor f sleeps (f - 1) x its compute time).
Sync (FedAvg) waits for the slowest client every round; async applies every update on arrival
and hands the client that just finished its next task at once (`selection=same`).

Each run is a real Flower run: `flwr run .` in local simulation (default; a private FLWR_HOME,
4 SuperNodes, `client-resources-num-cpus=1 init-args-num-cpus=4` so Ray starts all 4 actors at
once whatever the real core count), or `scripts/local-deployment.sh 4 --run-config ...`
(`--deployment`: a real SuperLink + 4 SuperNodes on 127.0.0.1, e.g. on a GPU machine).

    # CPU, tiny preset: calibrate the target with a sync run, then run both modes to it
    python bench/async_vs_sync.py --preset tiny --device cpu
    # fixed target, several async rules against one sync run
    python bench/async_vs_sync.py --target-ppl 3300 --time-budget-s 150 --rules fedasync,fedbuff,asgd
    # both modes for the whole budget (final ppl at equal wall-clock), an async rule variant
    python bench/async_vs_sync.py --equal-budget --target-ppl 3300 --time-budget-s 150 \
        --rules fedasync,fedbuff:buffer-size=4:server-lr=1.5
    # GPU machine, real deployment (SuperNode i on GPU i % #gpus)
    python bench/async_vs_sync.py --deployment --preset small --device cuda --gpus 0

Target: `--target-ppl` if given, else calibrated: a sync run of `--calib-rounds` rounds, and
the perplexity it reached after `--calib-frac` (2/3) of them becomes the target. Then each mode
runs with `target-ppl` and `time-budget-s` (it stops at whichever comes first), or with
`--equal-budget` for the whole budget (time to target then comes from the event log).

Times are the recorder's `t`: the ServerApp's own clock, started when its RunRecorder is built,
so the SuperLink start, `flwr run`'s FAB build and Ray's start before the ServerApp are not in
it. In simulation, though, Flower starts the ServerApp beside the Ray actor pool, so the first
tasks also wait for the actors (ClientApp import, model build): 10-50 s on a 2-core machine,
equally in both modes. The table therefore also gives the speed-up with that start-up removed
(each run's clock restarted when its first client began its first task; see `startup_s`).

Outputs in `--out`: one run folder per run under runs/ (events.jsonl, summary.json, results.md,
plot.png), `comparison.md` / `comparison.png` per async rule (`asyncfl.results.compare`, i.e.
`python -m asyncfl.results compare`), `results.json` (all metrics, configs, environment) and
`table.md`.
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
    "tiny": {"model-preset": "tiny", "block-size": 64, "max-train-blocks": 48, "batch-size": 4,
             "local-steps": 4, "lr": 1e-3, "eval-max-blocks": 16, "eval-batch-size": 16},
    "small": {"model-preset": "small", "block-size": 256, "max-train-blocks": 256,
              "batch-size": 16, "local-steps": 16, "lr": 5e-4, "eval-max-blocks": 64,
              "eval-batch-size": 32},
}
# Per-mode defaults. Async: the finished client gets its next task at once; staleness-weighted.
ASYNC_DEFAULTS = {"mode": "async", "selection": "same", "max-updates": 1_000_000,
                  "staleness": "polynomial", "staleness-a": 0.5}
RULE_DEFAULTS = {"fedasync": {"alpha": 0.6}, "fedbuff": {"buffer-size": 2, "server-lr": 1.0},
                 "asgd": {"server-lr": 0.5}, "saga": {"server-lr": 1.0},
                 "shifted": {"server-lr": 0.5}}
SYNC_DEFAULTS = {"mode": "sync", "num-rounds": 1_000_000, "eval-every": 1, "server-lr": 1.0}


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
        res = subprocess.run(["flwr", "ls", "--run-id", run_id, "--format", "json"], env=env,
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
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


def run_simulation(cfg: dict[str, Any], work: Path, timeout_s: float, run_dir: Path,
                   threads: int = 1) -> str:
    """`flwr run .` in local simulation with a private FLWR_HOME; returns its output.

    `flwr run --stream` can return before the run ends (a log stream that breaks off on a busy
    machine), so the run is followed with `flwr ls` until it is finished (or its summary.json
    is written), then the background SuperLink and its simulation are stopped.
    """
    home = work / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "RAY_DEDUP_LOGS": "0", **thread_env(threads)}
    fed = (f"num-supernodes={NUM_CLIENTS} client-resources-num-cpus=1 "
           f"init-args-num-cpus={NUM_CLIENTS}")
    cmd = ["flwr", "run", str(ROOT), "--stream", "--run-config", run_config_str(cfg),
           "--federation-config", fed]
    log("$ " + shlex.join(cmd))
    deadline = time.monotonic() + timeout_s
    text = ""
    try:
        try:
            out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                                 timeout=timeout_s)
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


def deployment_command(cfg: dict[str, Any], work: Path, timeout_s: float,
                       extra: list[str]) -> list[str]:
    """The `scripts/local-deployment.sh` call for one run (SuperLink + 4 SuperNodes).

    Shape: `scripts/local-deployment.sh 4 --run-config "k=v ..." --work-dir DIR --timeout S
    --port P --node-port P+1 [extra...]`; it prints `RUN_DIR=...` and exits 0 only when the run
    finished with a summary.json. Free ports are picked unless `extra` names --port.
    """
    cmd = [str(ROOT / "scripts" / "local-deployment.sh"), str(NUM_CLIENTS),
           "--run-config", run_config_str(cfg), "--work-dir", str(work / "deployment"),
           "--timeout", str(int(timeout_s))]
    if "--port" not in extra:
        port = free_port_block(NUM_CLIENTS + 1)
        cmd += ["--port", str(port), "--node-port", str(port + 1)]
    return cmd + extra


def run_deployment(cfg: dict[str, Any], work: Path, timeout_s: float, extra: list[str],
                   threads: int = 1) -> str:
    """One run through scripts/local-deployment.sh (which stops its own processes)."""
    cmd = deployment_command(cfg, work, timeout_s, extra)
    log("$ " + shlex.join(cmd))
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable), **thread_env(threads)}
    try:
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=timeout_s + 180)
        return out.stdout + out.stderr
    except subprocess.TimeoutExpired as exc:
        return f"{_text(exc.stdout)}{_text(exc.stderr)}\n[timed out]"


def run_one(name: str, cfg: dict[str, Any], args: argparse.Namespace) -> Path:
    """Run one configuration to completion; returns its run folder (raises if it failed)."""
    runs = args.out / "runs"
    run_dir = runs / name
    cfg = {**cfg, "results-dir": str(runs.resolve()), "run-name": name}
    work = args.out / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if args.deployment:
        text = run_deployment(cfg, work, args.timeout_s, shlex.split(args.deployment_args),
                              args.threads)
    else:
        text = run_simulation(cfg, work, args.timeout_s, run_dir, args.threads)
    (work / "output.log").write_text(text)
    if not (run_dir / "summary.json").is_file():
        raise SystemExit(f"error: run {name!r} wrote no summary.json; output tail:\n{text[-5000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    log(f"{name}: {summary['stop_reason']}; {summary['updates_applied']} updates, ppl "
        f"{summary['initial_eval_ppl']:.1f} -> {summary['final_eval_ppl']:.1f} in "
        f"{summary['wall_clock_s']:.1f} s (process {time.monotonic() - t0:.0f} s)")
    return run_dir


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------
def base_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(PRESETS[args.preset])
    cfg.update({"device": args.device, "compressor": args.compressor, "rank": args.rank,
                "client-speeds": SPEEDS, "min-nodes": NUM_CLIENTS, "save-model": False,
                "seed": args.seed})
    if args.tokenizer:
        cfg["tokenizer"] = args.tokenizer
    if args.data_dir:
        cfg["data-dir"] = args.data_dir
    cfg.update(parse_kv(args.set))
    return cfg


def sync_config(args: argparse.Namespace) -> dict[str, Any]:
    return {**base_config(args), **SYNC_DEFAULTS, **parse_kv(args.sync_set)}


def parse_rule(spec: str) -> tuple[str, dict[str, Any]]:
    """"asgd:server-lr=1.0:delay-adaptive=true" -> ("asgd", {"server-lr": 1.0, ...})."""
    name, *kvs = spec.split(":")
    return name, parse_kv(kvs)


def run_name(spec: str) -> str:
    return "async-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.replace(":", "_"))


def async_config(args: argparse.Namespace, spec: str) -> dict[str, Any]:
    """Async run config for a rule spec: defaults, the rule's defaults, --async-set, the spec."""
    rule, overrides = parse_rule(spec)
    cfg = {**base_config(args), **ASYNC_DEFAULTS, "rule": rule, "eval-every": args.eval_every,
           **RULE_DEFAULTS.get(rule, {})}
    return {**cfg, **parse_kv(args.async_set), **overrides}


def stop_keys(args: argparse.Namespace, target: float, budget: float) -> dict[str, Any]:
    keys: dict[str, Any] = {"time-budget-s": budget}
    if not args.equal_budget:
        keys["target-ppl"] = target
    return keys


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def tt_target(summary: dict, events: list[dict], target: float) -> float | None:
    """Time to target: summary's `time_to_target_s` (same target), else from the events."""
    if summary.get("target_ppl") == target and summary.get("time_to_target_s") is not None:
        return summary["time_to_target_s"]
    return time_to_ppl(events, target)


def startup_s(events: list[dict]) -> float:
    """When the first client began its first task, on the recorder's clock.

    The recorder's clock starts in the ServerApp, which Flower's simulation runs beside the Ray
    start-up (actor pool, ClientApp import, model build in each actor), so the first tasks wait
    for it. Per applied update, `t - client_s` is when that task's work began (client_s: the
    client's own time for the task, sleep included); the minimum over the updates is the first
    start. In sync mode updates are logged at the round's end, so this is the start of the last
    client to reply in round 1 -- never earlier than the true start (conservative for async).
    """
    starts = [e["t"] - e["client_s"] for e in events
              if e.get("event") == "update" and e.get("client_s") is not None]
    return max(0.0, min(starts, default=0.0))


def shifted(events: list[dict], offset: float) -> list[dict]:
    """Events with `t` measured from `offset` (earlier evaluations clamped to 0)."""
    return [{**e, "t": max(0.0, e["t"] - offset)} if e.get("t") is not None else e for e in events]


def pair_metrics(sync_dir: Path, async_dir: Path, target: float) -> dict[str, Any]:
    (s_sum, s_ev), (a_sum, a_ev) = load_run(sync_dir), load_run(async_dir)
    s_up, a_up = startup_s(s_ev), startup_s(a_ev)
    s_t0, a_t0 = time_to_ppl(shifted(s_ev, s_up), target), time_to_ppl(shifted(a_ev, a_up), target)
    t_equal = min(s_sum["wall_clock_s"], a_sum["wall_clock_s"])
    s_t, a_t = tt_target(s_sum, s_ev, target), tt_target(a_sum, a_ev, target)
    s_eq, a_eq = ppl_at(s_ev, t_equal), ppl_at(a_ev, t_equal)
    speedup = s_t / a_t if s_t and a_t else None
    # sync never reached the target: its budget is a lower bound on its time to target
    speedup_lb = s_sum["wall_clock_s"] / a_t if s_t is None and a_t else None
    gap = 100 * (a_eq / s_eq - 1) if a_eq and s_eq else None
    final_gap = (100 * (a_sum["final_eval_ppl"] / s_sum["final_eval_ppl"] - 1)
                 if a_sum["final_eval_ppl"] and s_sum["final_eval_ppl"] else None)
    return {
        "rule": a_sum["rule"], "target_ppl": target, "t_equal_s": t_equal,
        "startup_s": {"sync": s_up, "async": a_up},
        "time_to_target_excl_startup_s": {"sync": s_t0, "async": a_t0},
        "speedup_excl_startup": s_t0 / a_t0 if s_t0 and a_t0 else None,
        "sync": _side(s_sum, s_t, s_eq), "async": _side(a_sum, a_t, a_eq),
        "speedup": speedup, "speedup_lower_bound": speedup_lb,
        "ppl_gap_at_equal_pct": gap, "final_ppl_gap_pct": final_gap,
    }


def _side(summary: dict, t_target: float | None, ppl_equal: float | None) -> dict[str, Any]:
    return {"time_to_target_s": t_target, "wall_clock_s": summary["wall_clock_s"],
            "updates": summary["updates_applied"], "rounds": summary["extra"].get("rounds"),
            "initial_ppl": summary["initial_eval_ppl"], "final_ppl": summary["final_eval_ppl"],
            "best_ppl": summary["best_eval_ppl"], "ppl_at_equal": ppl_equal,
            "mean_staleness": summary["mean_staleness"], "stop_reason": summary["stop_reason"],
            "bytes_uploaded": summary["bytes_uploaded"],
            "mean_decode_apply_ms": summary["mean_decode_apply_ms"]}


def _f(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ["rule", "target ppl", "sync time to target s", "async time to target s",
            "speed-up", "speed-up, start-up excluded", "T (equal wall-clock) s", "sync ppl @ T", "async ppl @ T",
            "ppl gap @ T", "sync final ppl", "async final ppl", "final ppl gap",
            "sync updates / rounds", "async updates", "async mean staleness"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in rows:
        s, a = r["sync"], r["async"]
        speed = (f"{r['speedup']:.2f}x" if r["speedup"] is not None else
                 f">= {r['speedup_lower_bound']:.2f}x (sync missed)"
                 if r["speedup_lower_bound"] is not None else "-")
        cells = [r["rule"], f"{r['target_ppl']:.1f}", _f(s["time_to_target_s"]),
                 _f(a["time_to_target_s"]), speed,
                 _f(r["speedup_excl_startup"], ".2f") + ("x" if r["speedup_excl_startup"] else ""),
                 _f(r["t_equal_s"]), _f(s["ppl_at_equal"], ".2f"),
                 _f(a["ppl_at_equal"], ".2f"), _f(r["ppl_gap_at_equal_pct"], "+.1f") + "%",
                 _f(s["final_ppl"], ".2f"), _f(a["final_ppl"], ".2f"),
                 _f(r["final_ppl_gap_pct"], "+.1f") + "%", f"{s['updates']} / {s['rounds']}",
                 str(a["updates"]), _f(a["mean_staleness"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def calibrate(args: argparse.Namespace) -> tuple[float, float, Path]:
    """Sync run of `calib-rounds` rounds; target = ppl after `calib-frac` of them."""
    cfg = {**sync_config(args), "num-rounds": args.calib_rounds}
    if args.time_budget_s:
        cfg["time-budget-s"] = args.time_budget_s
    run_dir = run_one("sync-calibration", cfg, args)
    summary, events = load_run(run_dir)
    evals = [e for e in events if e["event"] == "eval" and e.get("ppl") is not None]
    want = max(1, round(args.calib_frac * args.calib_rounds))
    at = [e for e in evals if (e.get("round") or 0) >= want] or evals[-1:]
    target = float(at[0]["ppl"]) * (1 + args.calib_margin)
    log(f"calibration: sync ppl after round {at[0].get('round')} of {args.calib_rounds} is "
        f"{at[0]['ppl']:.2f} at t={at[0]['t']:.1f} s (target {target:.2f} with the "
        f"{100 * args.calib_margin:g}% margin); run took {summary['wall_clock_s']:.1f} s")
    return target, float(summary["wall_clock_s"]), run_dir


def environment() -> dict[str, Any]:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    import torch
    import flwr

    return {"git_sha": sha, "python": platform.python_version(), "torch": torch.__version__,
            "flwr": flwr.__version__, "cpu_count": os.cpu_count(), "loadavg_end": load,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--target-ppl", type=float, default=0.0,
                   help="target perplexity (0: calibrate with a sync run, see --calib-rounds)")
    p.add_argument("--calib-rounds", type=int, default=12, help="sync rounds of the calibration run")
    p.add_argument("--calib-frac", type=float, default=2 / 3,
                   help="target = sync ppl after this fraction of the calibration rounds")
    p.add_argument("--calib-margin", type=float, default=0.01,
                   help="target = that ppl x (1 + margin), so run-to-run noise (threads, "
                        "randomized sketches) does not push sync one round past it")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="time budget of each run (0: 1.25 x the calibration run's wall-clock, or 600)")
    p.add_argument("--equal-budget", action="store_true",
                   help="do not stop at the target: both modes run the whole budget")
    p.add_argument("--rule", default="fedasync", help="async rule (fedasync|fedbuff|asgd|...)")
    p.add_argument("--rules", default="",
                   help="comma list of async rule specs (overrides --rule); a spec may carry "
                        "run-config keys: fedasync:alpha=0.9,asgd:server-lr=1.0")
    p.add_argument("--compressor", default="pca", choices=["none", "pca", "qrcp", "cur"])
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=6, help="async: evaluate every N updates")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None,
                   help="OMP/MKL threads per process of the run (0: leave the environment alone; "
                        "default 1 with --device cpu, else 0)")
    p.add_argument("--tokenizer", default=str(SHARED / "gpt2") if SHARED.is_dir() else "")
    p.add_argument("--data-dir", default=str(SHARED / "wikitext-2-raw") if SHARED.is_dir() else "")
    p.add_argument("--set", action="append", default=[], metavar='"k=v ..."',
                   help="run-config overrides for both modes (repeatable)")
    p.add_argument("--async-set", action="append", default=[], metavar='"k=v ..."',
                   help="run-config overrides for the async runs only")
    p.add_argument("--sync-set", action="append", default=[], metavar='"k=v ..."',
                   help="run-config overrides for the sync runs only")
    p.add_argument("--skip-sync", default="", metavar="RUN_DIR",
                   help="reuse a finished sync run (same target and budget) instead of running one")
    p.add_argument("--deployment", action="store_true",
                   help="run through scripts/local-deployment.sh instead of simulation")
    p.add_argument("--deployment-args", default="",
                   help='extra arguments for local-deployment.sh, e.g. "--insecure --gpus 0,1"')
    p.add_argument("--gpus", default="", help="deployment: GPU ids for the SuperNodes")
    p.add_argument("--timeout-s", type=float, default=0.0,
                   help="kill a run after this long (default: budget + 600)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "async_vs_sync")
    args = p.parse_args(argv)
    if args.gpus:
        args.deployment_args += f" --gpus {args.gpus}"
    args.out = args.out.resolve()
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rules = [r for r in (args.rules or args.rule).split(",") if r]
    args.timeout_s = args.timeout_s or (args.time_budget_s or 600) + 600
    calib_dir = None
    if args.target_ppl > 0:
        target, budget = args.target_ppl, args.time_budget_s or 600.0
    else:
        target, calib_wall, calib_dir = calibrate(args)
        budget = args.time_budget_s or math.ceil(1.25 * calib_wall)
    args.timeout_s = max(args.timeout_s, budget + 600)
    log(f"target ppl {target:.2f}, time budget {budget:.0f} s per run, rules {rules}")

    stop = stop_keys(args, target, budget)
    async_dirs = {rule: run_one(run_name(rule), {**async_config(args, rule), **stop}, args)
                  for rule in rules}
    sync_dir = Path(args.skip_sync) if args.skip_sync else run_one("sync", {**sync_config(args), **stop}, args)
    rows = [{**pair_metrics(sync_dir, async_dirs[r], target), "rule": r} for r in rules]
    table = markdown_table(rows)
    for rule in rules:
        compare([sync_dir, async_dirs[rule]], args.out / f"compare-{run_name(rule)[6:]}")
    if calib_dir is not None:
        compare([calib_dir, sync_dir, *async_dirs.values()], args.out / "compare-all")
    (args.out / "table.md").write_text(table)
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "target_ppl": target, "time_budget_s": budget, "rows": rows,
              "sync_config": {**sync_config(args), **stop},
              "async_configs": {r: {**async_config(args, r), **stop} for r in rules},
              "runs": {"sync": str(sync_dir), **{run_name(r): str(d) for r, d in async_dirs.items()},
                       **({"calibration": str(calib_dir)} if calib_dir else {})},
              "env": environment()}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(table, end="")
    print(f"\noutputs: {args.out} (table.md, results.json, compare-*/comparison.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
