"""Per-update overhead of the Flower deployment runtime, Flower defaults vs our settings.

    python bench/deployment_overhead.py                      # 2 SuperNodes, 12 updates per profile
    python bench/deployment_overhead.py --nodes 1 --updates 8 --profiles tuned --breakdown

In deployment every task message starts a fresh `flwr-clientapp` process, and the SuperNode,
its SuperExec and the reply path poll on fixed intervals. This runs the real local deployment
(asyncfl/deploy/local.py: TLS SuperLink, authenticated SuperNodes, tiny preset on CPU) once
per settings profile and reads the server's events.jsonl:

    overhead = service_s - client_s

per applied update, where `service_s` is the server's wall time from the moment the node could
start the task (its dispatch, or the node's previous reply when the task was queued behind
that one) to its reply -- the time each update costs that node -- and `client_s` the time the
ClientApp's train handler reported for itself (data, training, encoding). The first update of
each node also pays FAB install, first imports and data caches; it is reported apart, the rest are the steady state.

Profiles: settings Flower exposes, and asyncfl's own SuperExec (`forked-log`, `forked`:
`asyncfl-superexec` runs Flower's SuperExec code with its executor swapped for one that forks
ClientApp processes, through `run_superexec.get_executor`). The one timing knob flwr 1.41/1.42
exposes for this path is the SuperExec's task poll interval (env
FLWR_SUPEREXEC_TASK_POLL_INTERVAL, 0.01..60 s); the SuperNode's idle poll (3 s) and its reply
poll (0.5 s) are constants in flwr/supernode/start_client_internal.py. The server can hide the
idle poll by queueing a node's next task before the running one ends (`prefetch`).
* `default`: Flower's default, task poll 1.0 s, one task per node at a time.
* `tuned`: what scripts/local-deployment.sh and the docker images set, task poll 0.1 s.
* `prefetch`: tuned + `prefetch="on"` (what a deployment gets by default, `prefetch="auto"`).
* `prefetch-fp16`: prefetch + `download-dtype="fp16"` (global weights sent in half precision).
* `prefetch-log`: prefetch + `downlink="log"` (tasks carry the payloads a node missed; needs
  `--run-config 'rule="asgd"'` or fedbuff). The other profiles set `downlink="full"`.
* `packed`, `packed-fp16`, `packed-log`: the three above with `pack="on"` (the full weights as
  one Flower Array too). The profiles before them set `pack="off"`: the weights as one Flower
  Array per tensor (payloads and update logs are one Array either way, `asyncfl/wire.py`).
  All profiles up to here run the SuperNodes in Flower's default subprocess isolation.
* `process-log`: packed-log with the SuperNodes in process isolation, each next to a
  `flower-superexec` (Flower's executor: a fresh `flwr-clientapp` process per message).
* `forked-log`, `forked`: packed-log / packed in process isolation next to `asyncfl-superexec`
  (asyncfl/deploy/launcher.py: ClientApp processes forked from a zygote that imported Flower's runtime
  once); `forked-log` is what `scripts/local-deployment.sh` runs by default with rule asgd.
`--breakdown` repeats the `tuned` run with FLWR_LOG_LEVEL=DEBUG (timestamped Flower logs) and
splits each SuperNode cycle into: idle poll (reply sent -> next task pulled), process start
(task pulled -> flwr-clientapp running), app (ClientApp load + handler), reply wait (task
finished -> reply sent).

Separately (no deployment), medians of `--repeats` fresh interpreters: Python start, Flower's
ClientApp process imports, `import asyncfl.client.app`, and building the model in a fresh
process -- where a new ClientApp process spends its time before the handler runs.

Results: printed as markdown and written as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
from asyncfl.deploy import local as ld  # noqa: E402

_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": ld.DEFAULT_TASK_POLL_INTERVAL}
# name -> (environment, run-config overrides, how SuperNodes run ClientApps, the SuperNode's idle
# poll: 0 = Flower's flower-supernode, 3 s; else asyncfl-supernode's); each isolates one
# mechanism. Executors (asyncfl/deploy/local.py): "subprocess" = Flower's default isolation,
# "flower" = process isolation with flower-superexec, "asyncfl" = process isolation with
# asyncfl-superexec (ClientApp processes forked from a warm zygote).
PROFILES = {
    "default": (
        {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0"},
        'prefetch="off" downlink="full" pack="off"',
        "subprocess",
        0.0,
    ),
    "tuned": (_POLL, 'prefetch="off" downlink="full" pack="off"', "subprocess", 0.0),
    "prefetch": (_POLL, 'prefetch="on" downlink="full" pack="off"', "subprocess", 0.0),
    "prefetch-fp16": (_POLL, 'prefetch="on" downlink="full" download-dtype="fp16" pack="off"', "subprocess", 0.0),
    "prefetch-log": (_POLL, 'prefetch="on" downlink="log" pack="off"', "subprocess", 0.0),  # needs rule asgd or fedbuff
    "packed": (_POLL, 'prefetch="on" downlink="full" pack="on"', "subprocess", 0.0),
    "packed-fp16": (_POLL, 'prefetch="on" downlink="full" download-dtype="fp16" pack="on"', "subprocess", 0.0),
    "packed-log": (_POLL, 'prefetch="on" downlink="log" pack="on"', "subprocess", 0.0),
    "process-log": (_POLL, 'prefetch="on" downlink="log" pack="on"', "flower", 0.0),
    "forked-log": (_POLL, 'prefetch="on" downlink="log" pack="on"', "asyncfl", 0.0),  # the deployment default (asgd)
    "forked": (_POLL, 'prefetch="on" downlink="full" pack="on"', "asyncfl", 0.0),
    # asyncfl-supernode: the SuperNode's idle poll 0.1 s instead of Flower's 3 s
    "forked-log-noqueue": (_POLL, 'prefetch="off" downlink="log" pack="on"', "asyncfl", 0.0),
    "shortpoll-log": (_POLL, 'prefetch="on" downlink="log" pack="on"', "asyncfl", 0.1),
    "shortpoll-noqueue": (_POLL, 'prefetch="off" downlink="log" pack="on"', "asyncfl", 0.1),
}


def bench_run_config(results: Path, args, *extra: str) -> list[str]:
    """The measured job: tiny preset (32-token blocks, 2 steps) or the 124M shape (1024-token
    blocks, batch 8, `--local-steps`); PCA rank 10 uploads for the 124M shape."""
    cfg = {
        "model-preset": args.preset,
        "tokenizer": str(args.data / "gpt2"),
        "data-dir": str(args.data / "wikitext-2-raw"),
        "eval-max-blocks": 8,
        "mode": "async",
        "device": args.device,
        "max-updates": args.updates,
        "min-nodes": args.nodes,
        "eval-every": 100_000,
        "save-model": False,
        "results-dir": str(results),
        "run-name": "bench",
    }
    if args.preset == "tiny":
        cfg.update({"block-size": 32, "max-train-blocks": 8, "local-steps": args.local_steps or 2})
    else:
        cfg.update(
            {
                "block-size": 1024,
                "batch-size": 8,
                "max-train-blocks": 64,
                "local-steps": args.local_steps or 10,
                "compressor": "pca",
            }
        )
    items = [" ".join(f"{k}={json.dumps(v)}" for k, v in cfg.items())]
    return items + [e for e in extra if e]


def stats(xs: list[float]) -> dict[str, float | int | None]:
    if not xs:
        return {"n": 0, "median": None, "mean": None, "p90": None, "min": None, "max": None}
    s = sorted(xs)
    return {
        "n": len(s),
        "median": round(statistics.median(s), 3),
        "mean": round(statistics.mean(s), 3),
        "p90": round(s[min(len(s) - 1, int(0.9 * len(s)))], 3),
        "min": round(s[0], 3),
        "max": round(s[-1], 3),
    }


def run_profile(name: str, args, debug: bool = False) -> dict:
    env, profile_config, executor, idle_poll_s = PROFILES[name]
    work = Path(tempfile.mkdtemp(prefix=f"asyncfl-bench-{name}-"))
    results = work / "results"
    base = free_ports(args.nodes + 1)
    saved = {k: os.environ.get(k) for k in [*env, "FLWR_LOG_LEVEL"]}
    os.environ.update(env)
    if debug:
        os.environ["FLWR_LOG_LEVEL"] = "DEBUG"
    dep = ld.Deployment(
        work / "work",
        args.nodes,
        superlink_port=base,
        node_port=base + 1,
        gpus=[g for g in args.gpus.split(",") if g],
        executor=executor,
        idle_poll_s=idle_poll_s,
    )
    gpu_mem = GpuMemory() if args.device == "cuda" else None
    t0 = time.monotonic()
    try:
        dep.prepare()
        dep.start_superlink()
        for i in range(1, args.nodes + 1):
            dep.register(i)
        for i in range(1, args.nodes + 1):
            dep.start_supernode(i, partition_id=i - 1)
        dep.wait_nodes_online(list(range(1, args.nodes + 1)))
        dep.run_app(args.app, bench_run_config(results, args, profile_config, args.run_config), args.timeout)
    except ld.DeploymentError:
        dep.stop_all()
        dep.print_log_tails(60)
        raise
    finally:
        if gpu_mem is not None:
            gpu_mem.stop()
        dep.stop_all()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    total_s = time.monotonic() - t0
    events = [json.loads(line) for line in (results / "bench" / "events.jsonl").read_text().splitlines()]
    updates = [e for e in events if e.get("event") == "update"]
    seen, first, steady = set(), [], []
    for u in updates:
        (steady if u["node"] in seen else first).append(u)
        seen.add(u["node"])

    def overhead(us):
        return [u.get("service_s", u["round_trip_s"]) - u["client_s"] for u in us if u.get("client_s") is not None]

    out = {
        "profile": name,
        "env": env,
        "run_config": profile_config,
        "executor": executor,
        "idle_poll_s": idle_poll_s,
        "prefetched": sum(1 for u in updates if u.get("prefetched")),
        "updates": len(updates),
        "total_s": round(total_s, 1),
        "overhead_s": stats(overhead(steady)),
        "first_update_overhead_s": stats(overhead(first)),
        "overhead_queued_s": stats(overhead([u for u in steady if u.get("prefetched")])),
        "overhead_not_queued_s": stats(overhead([u for u in steady if not u.get("prefetched")])),
        "round_trip_s": stats([u["round_trip_s"] for u in steady]),
        "service_s": stats([u.get("service_s", u["round_trip_s"]) for u in steady]),
        "client_s": stats([u["client_s"] for u in steady if u.get("client_s") is not None]),
        "train_s": stats([u["train_s"] for u in steady if u.get("train_s") is not None]),
        "tokens_per_s": stats([u["tokens_per_s"] for u in steady if u.get("tokens_per_s")]),
    }
    if gpu_mem is not None:
        out["gpu_mem_mib"] = gpu_mem.result()
    if debug:
        # in process isolation the ClientApp processes log to their SuperExec's file
        out["breakdown_s"] = breakdown(
            [[dep.logs / f"{kind}-{i}.log" for kind in ("supernode", "superexec")] for i in range(1, args.nodes + 1)]
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return out


_TS = re.compile(r"(?:DEBUG|INFO|WARNING) (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
_MARKS = {
    "Receiving:": "received",
    "Start `flwr-clientapp` process": "process_up",
    "Loading ClientApp": "loading",
    "Finished task": "finished",
    "Sent successfully": "sent",
}


def breakdown(nodes: list[list[Path]]) -> dict:
    """Phases of each SuperNode cycle from timestamped (DEBUG) logs: per node, the SuperNode's
    log and (process isolation) its SuperExec's, merged by time."""
    phases: dict[str, list[float]] = {"idle_poll": [], "process_start": [], "app": [], "reply_wait": []}
    for paths in nodes:
        marks: list[tuple[str, float]] = []
        for path in paths:
            if not path.is_file():
                continue
            for line in path.read_text(errors="replace").splitlines():
                m = _TS.search(line)
                if not m:
                    continue
                for text, mark in _MARKS.items():
                    if text in line:
                        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                        marks.append((mark, t))
        marks.sort(key=lambda mt: mt[1])
        last: dict[str, float] = {}
        for mark, t in marks:
            if mark == "received" and "sent" in last:
                phases["idle_poll"].append(t - last["sent"])
            if mark == "process_up" and "received" in last:
                phases["process_start"].append(t - last["received"])
            if mark == "finished" and "process_up" in last:
                phases["app"].append(t - last["process_up"])
            if mark == "sent" and "finished" in last:
                phases["reply_wait"].append(t - last["finished"])
            last[mark] = t
    return {k: stats(v) for k, v in phases.items()}


def fresh_process_times(repeats: int) -> dict:
    """Medians over fresh interpreters: where a new ClientApp process spends its start-up."""
    py = sys.executable
    probes = {
        "python_start": [py, "-c", "pass"],
        "flwr_clientapp_imports": [py, "-c", "import flwr.supernode.cli.flwr_clientapp"],
        "import_asyncfl_client_app": [py, "-c", "import asyncfl.client.app"],
        "import_and_build_tiny_model": [
            py,
            "-c",
            (
                "from asyncfl.config import AppConfig; from asyncfl.model import build_model; "
                "build_model(AppConfig.from_run_config({'model-preset': 'tiny', 'device': 'cpu'}))"
            ),
        ],
    }
    out = {}
    for name, cmd in probes.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, cwd=ROOT)
            times.append(time.perf_counter() - t0)
            if res.returncode != 0:
                raise RuntimeError(f"{name} failed: {res.stderr.decode()[-2000:]}")
        out[name] = stats(times)
    return out


class GpuMemory:
    """Polls nvidia-smi every second; keeps each GPU process's peak memory and what it is
    (the ServerApp, a node worker, or other), read from its command line."""

    def __init__(self) -> None:
        import threading

        self.peak: dict[int, int] = {}
        self.kind: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            for line in out.strip().splitlines():
                try:
                    pid, mib = (int(x) for x in line.split(","))
                except ValueError:
                    continue
                self.peak[pid] = max(self.peak.get(pid, 0), mib)
                if pid not in self.kind:
                    try:
                        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    except OSError:
                        cmd = ""
                    self.kind[pid] = (
                        "node worker"
                        if "asyncfl.client.node_worker" in cmd
                        else "serverapp"
                        if "serverapp" in cmd or "flwr-simulation" in cmd
                        else "clientapp"
                        if "clientapp" in cmd
                        else "other"
                    )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def result(self) -> list[dict]:
        return [{"pid": p, "kind": self.kind.get(p, "?"), "peak_mib": m} for p, m in sorted(self.peak.items())]


def free_ports(size: int) -> int:
    import random

    for _ in range(200):
        base = random.randrange(20000, 60000 - size)
        if all(ld.port_is_free(base + k) for k in range(size)):
            return base
    raise RuntimeError("no free ports")


def markdown(result: dict) -> str:
    rows = [
        "| profile | executor | task poll | queued ahead | steady overhead median (mean, p90) | "
        "queued ahead: overhead median (n) | not queued: overhead median (n) | "
        "first update overhead | service median | round trip median | client_s median | "
        "train_s median |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["profiles"]:
        o, f = r["overhead_s"], r["first_update_overhead_s"]
        rows.append(
            f"| {r['profile']} | {r['executor']} | {r['env']['FLWR_SUPEREXEC_TASK_POLL_INTERVAL']} s | "
            f"{r['prefetched']}/{r['updates']} | {o['median']} s ({o['mean']}, {o['p90']}; n={o['n']}) | "
            f"{r['overhead_queued_s']['median']} s ({r['overhead_queued_s']['n']}) | "
            f"{r['overhead_not_queued_s']['median']} s ({r['overhead_not_queued_s']['n']}) | "
            f"{f['median']} s | {r['service_s']['median']} s | {r['round_trip_s']['median']} s | "
            f"{r['client_s']['median']} s | {r['train_s']['median']} s |"
        )
    for r in result["profiles"]:
        if r["tokens_per_s"]["n"]:
            rows.append(
                f"\n{r['profile']}: client tokens/s median {r['tokens_per_s']['median']:,.0f} "
                f"(min {r['tokens_per_s']['min']:,.0f}, max {r['tokens_per_s']['max']:,.0f})"
            )
        for g in r.get("gpu_mem_mib", []):
            rows.append(f"{r['profile']}: GPU memory peak {g['peak_mib']} MiB, pid {g['pid']} ({g['kind']})")
    if result.get("breakdown"):
        phase = f"SuperNode cycle phase ({result.get('breakdown_profile', 'tuned')}, DEBUG logs)"
        rows += ["", f"| {phase} | median | mean | n |", "|---|---|---|---|"]
        for k, v in result["breakdown"].items():
            rows.append(f"| {k} | {v['median']} s | {v['mean']} s | {v['n']} |")
    if result["fresh_process"]:
        rows += ["", "| fresh process | median | min |", "|---|---|---|"]
    for k, v in result["fresh_process"].items():
        rows.append(f"| {k} | {v['median']} s | {v['min']} s |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--updates", type=int, default=12, help="max-updates per run")
    p.add_argument("--profiles", default="default,tuned,prefetch", help=f"comma list of {', '.join(PROFILES)}")
    p.add_argument("--breakdown", action="store_true", help="extra run with DEBUG logs, phase split")
    p.add_argument(
        "--breakdown-profile", default="tuned", choices=list(PROFILES), help="settings of the --breakdown run"
    )
    p.add_argument("--repeats", type=int, default=5, help="fresh-process probes per measurement")
    p.add_argument("--app", type=Path, default=ROOT)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="small = GPT-2 124M shape")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--gpus", default="", help="comma list: SuperNode i gets CUDA_VISIBLE_DEVICES=gpus[i %% len]")
    p.add_argument("--local-steps", type=int, default=0, help="per task (0: 2 for tiny, 10 for small)")
    p.add_argument("--data", type=Path, default=SHARED_DATA, help="folder with gpt2/ and wikitext-2-raw/")
    p.add_argument("--no-fresh", action="store_true", help="skip the fresh-process probes")
    p.add_argument("--run-config", default="", help="extra run-config overrides (appended)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--keep", action="store_true", help="keep the work dirs (logs)")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "asyncfl-deployment-overhead.json")
    args = p.parse_args()
    args.app = args.app.resolve()

    args.data = args.data.resolve()
    result = {
        "nodes": args.nodes,
        "updates": args.updates,
        "cpus": os.cpu_count(),
        "preset": args.preset,
        "device": args.device,
        "profiles": [],
        "fresh_process": {},
    }
    for name in [n for n in args.profiles.split(",") if n]:
        try:
            result["profiles"].append(run_profile(name, args))
        except ld.DeploymentError as exc:
            result.setdefault("failed", {})[name] = str(exc)
            print(f"profile {name} failed: {exc}", flush=True)
        args.out.write_text(json.dumps(result, indent=2))  # partial results survive a time limit
        print(markdown(result), flush=True)
    if args.breakdown:
        result["breakdown"] = run_profile(args.breakdown_profile, args, debug=True)["breakdown_s"]
        result["breakdown_profile"] = args.breakdown_profile
    result["fresh_process"] = {} if args.no_fresh else fresh_process_times(args.repeats)
    args.out.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"\n(JSON: {args.out})")


if __name__ == "__main__":
    main()
