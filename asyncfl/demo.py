"""`asyncfl-demo`: the README's quick start. Async and sync FedAvg side by side, one plot.

Two `flwr run` simulations of the offline tiny config (configs/offline-tiny.toml), one after
the other, with the same wall-clock budget (`time-budget-s`, the limit that stops each run) and
heterogeneous clients (`client-speeds`, default "1,1,2,4": the case async is for): first async
(the defaults: rule asgd), then sync FedAvg (`mode="sync"`, evaluating every round). Then
`asyncfl.results.compare` writes one table and one plot, and the headline is printed: final
perplexity of each, and when async reached sync's final perplexity.

It runs Flower in the environment the user installed: `flwr run` starts a background local
SuperLink, and that SuperLink re-installs the app's dependencies into a per-run environment
(a CUDA torch, gigabytes under FLWR_HOME) unless FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
is in its environment when it starts; a SuperLink left running by an earlier `flwr run` is
reused as it is, found by its port alone. So every `flwr run` here gets that variable, a
FLWR_HOME of its own (<out>/flwr-home: never ~/.flwr) and local SuperLink / Control API ports
picked free (FLWR_LOCAL_SUPERLINK_HTTP_API_PORT, FLWR_LOCAL_CONTROL_API_PORT), so a fresh
SuperLink starts with them; the two runs share it, and at the end (also on failure or Ctrl-C)
every process carrying that FLWR_HOME (SuperLink, SuperExec, simulation, Ray, app processes)
is stopped by id.

Files under `--out` (default results/quickstart): async.toml and sync.toml (the run configs:
the base file plus the overrides, as `python -m asyncfl.config --merge` writes them), async/
and sync/ (the run folders), compare/ (comparison.md, comparison.png), async.log / sync.log
(what `flwr run --stream` printed) and flwr-home/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from asyncfl.config import ConfigError, merged_toml, parse_overrides

DEFAULT_BUDGET_S = 30.0
DEFAULT_SPEEDS = "1,1,2,4"
DEFAULT_SUPERNODES = 4
# On top of the base file, for both runs: a task 4x cheaper than the base file's (4 steps of
# batch 4), so a 30 s budget holds two sync rounds (12 s each, the speed-4 client's) and some
# 25 async updates on 2 cores; every client
# keeps its whole share of the training split (the base file's 64 blocks per client are
# overfitted within a minute: test perplexity then drifts up); 16 eval blocks (the server
# evaluates every 4 updates). A task lasts factor x 3 s (`task-s`, compute included: about a
# speed-1 task's compute with four clients on 2 cores), not factor x its measured compute: that
# would multiply a node's first, cold task (twice the compute of later ones) by 4 on the speed-4
# client and push sync's first round past the budget. `--set` goes after these, so it can change them.
DEMO_OVERRIDES = "local-steps=4 batch-size=4 max-train-blocks=0 eval-max-blocks=16 task-s=3"
# What tells the two runs apart; everything else is the base file, the budget and the speeds.
# The base file's `max-updates` is reset in both: an explicit max-updates would stop async
# before the budget. Sync evaluates every round (= every `supernodes` updates, async's cadence).
MODE_OVERRIDES = {"async": 'mode="async"', "sync": 'mode="sync" eval-every=1'}
# Keys whose relative paths are made absolute (against the app folder), so that the run does
# not depend on the directory the SuperLink was started from.
PATH_KEYS = ("tokenizer", "data-dir", "model")
NO_DEP_INSTALL = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"
PORT_VARS = ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class DemoError(RuntimeError):
    """The demo cannot go on; the message says what and where to look."""


def say(msg: str) -> None:
    print(f"asyncfl-demo: {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Arguments and run configs
# ---------------------------------------------------------------------------------------------
def default_app() -> Path:
    """The Flower app folder: this package's source checkout (an editable install), else the
    current directory."""
    here = Path(__file__).resolve().parents[1]
    return here if _is_app(here) else Path.cwd()


def _is_app(folder: Path) -> bool:
    try:
        return "[tool.flwr.app" in (folder / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="asyncfl-demo",
        description="Quick start: async (asgd) and sync FedAvg on the offline tiny config, "
        "each for the same wall-clock budget with heterogeneous clients, then one "
        "comparison table and plot.",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"time-budget-s of each run (default {DEFAULT_BUDGET_S:g})",
    )
    p.add_argument(
        "--speeds",
        default=DEFAULT_SPEEDS,
        help=f'client-speeds: slow-down factor by partition (default "{DEFAULT_SPEEDS}")',
    )
    p.add_argument(
        "--supernodes", type=int, default=DEFAULT_SUPERNODES, help=f"simulated clients (default {DEFAULT_SUPERNODES})"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        default="",
        metavar="'K=V ...'",
        help="more run-config overrides for both runs, e.g. 'compressor=\"qrcp\"'",
    )
    p.add_argument(
        "--base", type=Path, default=None, help="base run-config TOML (default: <app>/configs/offline-tiny.toml)"
    )
    p.add_argument(
        "--app",
        type=Path,
        default=None,
        help="the Flower app folder (default: this checkout, else the current directory)",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <app>/results/quickstart)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP/MKL/OpenBLAS threads of every process when not set in the environment "
        "(default 1: 4 clients and the server share the cores; 0 = leave as is)",
    )
    p.add_argument(
        "--timeout-s", type=float, default=300.0, help="seconds each run may take beyond its budget (default 300)"
    )
    p.add_argument("--dry-run", action="store_true", help="write the run configs and print the commands, run nothing")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.budget_s > 0 and math.isfinite(args.budget_s)):
        parser.error(f"--budget-s must be a number > 0, got {args.budget_s:g}")
    if args.supernodes < 2:
        parser.error(f"--supernodes must be at least 2 (async vs sync needs several clients), got {args.supernodes}")
    if args.timeout_s <= 0:
        parser.error(f"--timeout-s must be > 0, got {args.timeout_s:g}")
    args.app = (args.app or default_app()).resolve()
    if not _is_app(args.app):
        parser.error(
            f"{args.app} is not the asyncfl Flower app (no pyproject.toml with [tool.flwr.app]); "
            "run from the repository root or pass --app"
        )
    args.base = (args.base or args.app / "configs" / "offline-tiny.toml").resolve()
    args.out = (args.out or args.app / "results" / "quickstart").resolve()
    return args


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


def run_overrides(mode: str, args: argparse.Namespace) -> str:
    """The `k=v ...` overrides of one run. Later items win: DEMO_OVERRIDES, then the user's
    `--set`, then the keys that make the two runs what they are."""
    return " ".join(
        [
            DEMO_OVERRIDES,
            args.overrides,
            f"time-budget-s={float(args.budget_s)!r} max-updates=0",
            f"client-speeds={_toml_str(args.speeds)} min-nodes={args.supernodes}",
            f"results-dir={_toml_str(str(args.out))} run-name={_toml_str(mode)}",
            MODE_OVERRIDES[mode],
        ]
    ).strip()


def absolute_paths(toml_text: str, app: Path) -> str:
    """Rewrite relative local paths of PATH_KEYS (ones that exist under `app`) as absolute."""
    import tomllib

    values = tomllib.loads(toml_text)
    lines = toml_text.splitlines()
    for i, line in enumerate(lines):
        key = line.split("=", 1)[0].strip()
        value = values.get(key)
        if key in PATH_KEYS and isinstance(value, str) and value and not Path(value).is_absolute():
            if (app / value).exists():
                lines[i] = f"{key} = {_toml_str(str((app / value).resolve()))}"
    return "\n".join(lines) + "\n"


def write_run_configs(args: argparse.Namespace) -> dict[str, Path]:
    """Write <out>/async.toml and <out>/sync.toml; ConfigError names a bad key or value."""
    args.out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for mode in MODE_OVERRIDES:
        text = merged_toml(str(args.base), run_overrides(mode, args))
        paths[mode] = args.out / f"{mode}.toml"
        paths[mode].write_text(absolute_paths(text, args.app), encoding="utf-8")
    return paths


def federation_config(supernodes: int) -> str:
    """Every client its own Ray actor (virtual CPUs), so all run at once in both modes."""
    return f"num-supernodes={supernodes} client-resources-num-cpus=1 init-args-num-cpus={supernodes}"


def flwr_command(app: Path, run_config: Path, supernodes: int) -> list[str]:
    return [
        "flwr",
        "run",
        str(app),
        "--stream",
        "--run-config",
        str(run_config),
        "--federation-config",
        federation_config(supernodes),
    ]


# ---------------------------------------------------------------------------------------------
# Flower's environment: private FLWR_HOME and ports, no runtime dependency installation
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_env(
    home: Path, threads: int, base: Mapping[str, str] | None = None, ports: Sequence[int] | None = None
) -> dict[str, str]:
    """The environment of `flwr run` (and so of the SuperLink it starts and all below it)."""
    env = dict(os.environ if base is None else base)
    ports = list(ports) if ports is not None else [free_port(), free_port()]
    while ports[1] == ports[0]:
        ports[1] = free_port()
    env.update(
        {
            "FLWR_HOME": str(home),
            NO_DEP_INSTALL: "1",
            "RAY_DEDUP_LOGS": "0",
            **{var: str(p) for var, p in zip(PORT_VARS, ports)},
        }
    )
    # Flower's commands (flwr, flower-superlink, flwr-simulation, ...) of this interpreter's
    # environment first, so a virtual environment works without being activated
    bindir = str(Path(sys.executable).parent)
    if (Path(bindir) / "flwr").exists() and env.get("PATH", "").split(os.pathsep)[0] != bindir:
        env["PATH"] = os.pathsep.join(p for p in (bindir, env.get("PATH", "")) if p)
    if threads > 0:
        for var in THREAD_VARS:
            env.setdefault(var, str(threads))
    return env


def _start_time(pid: int) -> str | None:
    """Start time of `pid` (tells it from a later process given the same id); None once it
    has exited (a zombie counts as exited)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def processes_of(home: Path) -> dict[int, str]:
    """pid -> start time of the live processes started with FLWR_HOME=`home` in their
    environment or naming it on their command line (no other process has this folder)."""
    marker, path = f"FLWR_HOME={home}".encode(), str(home).encode()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if marker in environ or path in cmdline:
            start = _start_time(int(proc.name))
            if start is not None:
                found[int(proc.name)] = start
    return found


def stop_processes_of(home: Path, grace_s: float = 15.0) -> list[int]:
    """SIGTERM every process of `home`, SIGKILL what is left after `grace_s`; returns the ids
    still alive after that (normally none)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        procs = processes_of(home)
        if not procs:
            return []
        for pid, start in procs.items():
            if _start_time(pid) == start:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while any(_start_time(p) == s for p, s in procs.items()) and time.monotonic() < deadline:
            time.sleep(0.05)
    return sorted(processes_of(home))


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
def _tee(src: TextIO, sinks: Sequence[TextIO]) -> None:
    for line in src:
        for sink in sinks:
            with contextlib.suppress(OSError, ValueError):
                sink.write(line)
                sink.flush()


def run_streamed(cmd: Sequence[str], env: Mapping[str, str], cwd: Path, log_path: Path, timeout_s: float) -> str:
    """Run `cmd`, copying its output to stdout and `log_path`; return the output. A command
    still running after `timeout_s` is killed (DemoError)."""
    with log_path.open("w", encoding="utf-8") as log_fh:
        proc = subprocess.Popen(
            list(cmd),
            env=dict(env),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        copier = threading.Thread(target=_tee, args=(proc.stdout, [sys.stdout, log_fh]), daemon=True)
        copier.start()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise DemoError(
                f"`{shlex.join(cmd)}` still running after {timeout_s:.0f} s; output in {log_path}"
            ) from None
        finally:
            copier.join(timeout=5)
    return log_path.read_text(encoding="utf-8", errors="replace")


def run_status(env: Mapping[str, str], cwd: Path, run_id: str) -> str:
    """The run's status from `flwr ls` ("" when the SuperLink does not answer)."""
    try:
        res = subprocess.run(
            ["flwr", "ls", "--run-id", run_id, "--format", "json"],
            env=dict(env),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return str(json.loads(res.stdout)["runs"][0]["status"])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, KeyError, IndexError, TypeError, OSError):
        return ""


def wait_for_summary(
    run_dir: Path, since: float, output: str, env: Mapping[str, str], cwd: Path, timeout_s: float, poll_s: float = 2.0
) -> Path:
    """`flwr run` exits 0 even when the ServerApp fails, and `--stream` may return before the
    run ends: the run succeeded when its summary.json is written (after `since`). Until then
    follow the run with `flwr ls`; DemoError if it finished without one, or timed out."""
    summary = run_dir / "summary.json"
    match = re.search(r"started run (\d+)", output)
    deadline = time.monotonic() + timeout_s
    while True:
        if summary.exists() and summary.stat().st_mtime >= since:
            return summary
        status = run_status(env, cwd, match.group(1)) if match else "not started"
        if status.startswith("finished") or status == "not started" or time.monotonic() > deadline:
            # the summary may land between the check above and the status
            if summary.exists() and summary.stat().st_mtime >= since:
                return summary
            raise DemoError(
                f"the run wrote no {summary} (run status: {status or 'unknown'}); see the Flower output above"
            )
        time.sleep(poll_s)


def run_one(mode: str, run_config: Path, args: argparse.Namespace, env: Mapping[str, str]) -> Path:
    cmd = flwr_command(args.app, run_config, args.supernodes)
    say(f"{mode} run: {shlex.join(cmd)}")
    since = time.time() - 1.0  # mtime granularity
    limit = args.budget_s + args.timeout_s
    t0 = time.monotonic()
    output = run_streamed(cmd, env, args.app, args.out / f"{mode}.log", limit)
    wait_for_summary(args.out / mode, since, output, env, args.app, max(limit - (time.monotonic() - t0), 10.0))
    say(f"{mode} run done in {time.monotonic() - t0:.0f} s: {args.out / mode}")
    return args.out / mode


# ---------------------------------------------------------------------------------------------
# The headline
# ---------------------------------------------------------------------------------------------
def headline(async_dir: Path, sync_dir: Path) -> list[str]:
    """Final perplexity of each run (and sync's when async stopped), and when async reached
    sync's final perplexity."""
    from asyncfl.results import load_run, ppl_at, time_to_ppl

    (a, a_ev), (s, s_ev) = load_run(async_dir), load_run(sync_dir)
    lines = [
        f"async ({a['rule']}): final ppl {_ppl(a['final_eval_ppl'])} after {a['updates_applied']} "
        f"updates in {a['wall_clock_s']:.1f} s",
        f"sync (FedAvg): final ppl {_ppl(s['final_eval_ppl'])} after {s['updates_applied']} "
        f"updates in {s['wall_clock_s']:.1f} s",
    ]
    if s["wall_clock_s"] > a["wall_clock_s"]:  # async stopped first (max-updates, target-ppl)
        lines[-1] += f" (ppl {_ppl(ppl_at(s_ev, a['wall_clock_s']))} at {a['wall_clock_s']:.1f} s)"
    if not s["updates_applied"]:  # a round lasts as long as its slowest client's task
        return lines + [
            f"sync completed no round within {s['wall_clock_s']:.1f} s (its first round "
            "waits for the slowest client): nothing to compare; raise --budget-s"
        ]
    target = s["final_eval_ppl"]
    if target is None:
        return lines + ["sync logged no evaluation: nothing to compare"]
    t_async, t_sync = time_to_ppl(a_ev, target), time_to_ppl(s_ev, target)
    if t_async is None or t_sync is None:  # (sync reaches its own final ppl: t_sync is set)
        lines.append(f"async did not reach sync's final ppl {target:.1f} within its budget")
    else:
        lines.append(
            f"async reached sync's final ppl {target:.1f} at {t_async:.1f} s, sync at "
            f"{t_sync:.1f} s" + (f": {t_sync / t_async:.1f}x sooner" if t_async > 0 else "")
        )
    return lines


def _ppl(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        parse_overrides(args.overrides)
        configs = write_run_configs(args)
    except ConfigError as exc:
        print(f"asyncfl-demo: error: {exc}", file=sys.stderr)
        return 2
    home = args.out / "flwr-home"
    env = flwr_env(home, args.threads)
    say(
        f"async (the defaults) and sync FedAvg, {args.supernodes} clients with speeds "
        f"{args.speeds}, {args.budget_s:g} s each; run configs {configs['async']}, {configs['sync']}"
    )
    say(
        f"Flower: FLWR_HOME={home}, {NO_DEP_INSTALL}=1 (the installed environment is used), local "
        f"SuperLink on 127.0.0.1:{env[PORT_VARS[0]]}"
    )
    if args.dry_run:
        prefix = [f"{var}={env[var]}" for var in ("FLWR_HOME", NO_DEP_INSTALL, *PORT_VARS)]
        for path in configs.values():
            print(shlex.join(prefix + flwr_command(args.app, path, args.supernodes)))
        return 0
    t0 = time.monotonic()
    left = stop_processes_of(home)  # a SuperLink of an interrupted earlier demo: not reused
    try:
        if left:
            raise DemoError(f"processes {left} of an earlier demo (FLWR_HOME={home}) did not stop")
        run_dirs = [run_one(mode, path, args, env) for mode, path in configs.items()]
    except DemoError as exc:
        print(f"asyncfl-demo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("asyncfl-demo: interrupted", file=sys.stderr)
        return 130
    finally:
        left = stop_processes_of(home)  # the local SuperLink and everything below it
        if left:
            print(f"asyncfl-demo: warning: processes {left} (FLWR_HOME={home}) did not stop", file=sys.stderr)
    from asyncfl.results import compare

    out = args.out / "compare"
    print(compare(run_dirs, out), end="")
    for line in headline(*run_dirs):
        say(line)
    say(f"plot: {out / 'comparison.png'}; table: {out / 'comparison.md'} (total {time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
