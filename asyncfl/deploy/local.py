"""Run the whole asyncfl Flower deployment on 127.0.0.1 as real processes.

One `flower-superlink` (TLS, SuperNode authentication, no runtime dependency installation),
N `flower-supernode`s (each with its own key pair, registered with `flwr supernode register`, its
own Runtime API port and `partition-id=i num-partitions=N` node config), then
`flwr run <app> <connection> --stream` to completion. How the SuperNodes run ClientApps
(`--executor`): `asyncfl` (default) runs each SuperNode in process isolation next to its own
`asyncfl-superexec` (ClientApp processes forked from a warm zygote, see asyncfl/deploy/launcher.py),
over TLS with a SuperExec shared secret; `flower` does the same with Flower's
`flower-superexec`; `subprocess` leaves the SuperNode in Flower's default subprocess isolation
(it starts its own SuperExec). Certificates, keys, one private FLWR_HOME
per process (the CLI's holds the connection in config.toml; ~/.flwr is never read or written)
and one log file per process live in a work directory. Every process this script starts runs
in its own process group (so the SuperExec and flwr-clientapp/-serverapp processes Flower
spawns under it go with it) and is stopped by that id on exit, failure, Ctrl-C or SIGTERM;
processes the app started in a session of their own (asyncfl's node-local model worker) are
found by our private FLWR_HOME in their environment and stopped too.

Usage (`scripts/local-deployment.sh` runs `python -m asyncfl.deploy.local` with its arguments):

    scripts/local-deployment.sh N [--run-config "k=v ..."] [--insecure] [--work-dir DIR] ...
    scripts/local-deployment.sh N --run "mode=\"sync\" run-name=\"a\"" --run "run-name=\"b\"" ...

With `--run` (repeatable) the runs follow each other on the one deployment: start-up, SuperNode
registration and the node-local model workers (warm when the runs share the model and seed)
are paid once.

Exit status 0 only when the run finished with status `finished:completed` and its run
directory (under the run config's `results-dir`) holds a summary.json. On failure the tails of
all logs are printed.

Ports: the SuperLink listens on $ASYNCFL_SUPERLINK_PORT (default 9100), SuperNode i's Runtime
API on $ASYNCFL_SUPERNODE_PORT + i - 1 (default 9101...). The `--port`/`--node-port` flags win
over the environment.

The module is also a small library: tests drive `Deployment` directly (start the SuperLink,
start a SuperNode with an unregistered key, kill a node mid-run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the source checkout this module lies in
MAKE_CERTS = REPO / "scripts" / "make-certs.sh"
CONNECTION = "asyncfl-local"
HOST = "127.0.0.1"
DEFAULT_SUPERLINK_PORT = 9100
DEFAULT_IDLE_POLL_S = 0.1  # asyncfl-supernode's idle poll (Flower's flower-supernode: 3 s)
DEFAULT_TASK_POLL_INTERVAL = "0.1"  # FLWR_SUPEREXEC_TASK_POLL_INTERVAL (Flower's default: 1.0 s)
# How SuperNodes run ClientApps: our forking SuperExec, Flower's SuperExec (both in process
# isolation), or Flower's subprocess isolation (the SuperNode starts its own SuperExec).
EXECUTORS = ("asyncfl", "flower", "subprocess")


class DeploymentError(RuntimeError):
    """Something in the local deployment failed; the message says what and where to look."""


def log(msg: str) -> None:
    try:
        print(f"[local-deployment] {msg}", file=sys.stderr, flush=True)
    except OSError:  # a closed pipe must not stop the cleanup
        pass


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_accepts(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


@dataclass
class Proc:
    """A process this script started, in its own process group, logging to one file."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        # The group id is the pid (start_new_session=True): Flower's own children go too.
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace_s: float = 10.0) -> None:
        if self.alive():
            self.signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        # Anything left in the group (the process itself or its SuperExec/app children).
        self.signal_group(signal.SIGKILL)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log(f"{self.name} (pid {self.pid}) did not exit after SIGKILL")


class Deployment:
    """The local topology: certificates, FLWR_HOMEs, processes, and their cleanup."""

    def __init__(
        self,
        work_dir: Path,
        num_nodes: int,
        *,
        insecure: bool = False,
        superlink_port: int | None = None,
        node_port: int | None = None,
        gpus: list[str] | None = None,
        server_gpu: str | None = None,
        extra_keys: int = 0,
        sans: tuple[str, ...] = ("localhost", HOST),
        executor: str = "asyncfl",
        idle_poll_s: float = DEFAULT_IDLE_POLL_S,
    ) -> None:
        if executor not in EXECUTORS:
            raise DeploymentError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
        self.work = work_dir.resolve()
        self.n = num_nodes
        self.insecure = insecure
        env_port = os.environ.get("ASYNCFL_SUPERLINK_PORT")
        self.port = superlink_port or int(env_port or DEFAULT_SUPERLINK_PORT)
        env_node_port = os.environ.get("ASYNCFL_SUPERNODE_PORT")
        self.node_port = node_port or int(env_node_port or self.port + 1)
        self.gpus = gpus or []
        self.server_gpu = server_gpu  # the SuperLink (and the ServerApp it starts) sees only this GPU
        self.extra_keys = extra_keys  # key pairs made but never registered (auth tests)
        self.sans = sans  # names in the server certificate
        self.executor = executor
        if idle_poll_s and not 0.01 <= idle_poll_s <= 60:
            raise DeploymentError(
                f"idle poll must be 0 (Flower's flower-supernode, 3 s) or in [0.01, 60] s, got {idle_poll_s!r}"
            )
        self.idle_poll_s = idle_poll_s  # 0: Flower's flower-supernode (idle poll 3 s)
        self.certs = self.work / "certs"
        self.logs = self.work / "logs"
        self.cli_home = self.work / "flwr-home" / "cli"
        self.procs: list[Proc] = []
        self.nodes: dict[int, Proc] = {}  # node index (1..N) -> process
        self.executors: dict[int, Proc] = {}  # node index -> its SuperExec (process isolation)
        self.node_ids: dict[int, int] = {}  # node index -> SuperLink node id (registered keys)

    # -- setup ----------------------------------------------------------------------------------
    def prepare(self) -> None:
        for d in (self.work, self.logs, self.cli_home):
            d.mkdir(parents=True, exist_ok=True)
        for port in [self.port, *(self.node_port + i for i in range(self.n + self.extra_keys))]:
            if not port_is_free(port):
                raise DeploymentError(
                    f"port {port} on {HOST} is in use; pick others with ASYNCFL_SUPERLINK_PORT / "
                    "ASYNCFL_SUPERNODE_PORT or --port / --node-port"
                )
        if not self.insecure:
            self._run(
                [str(MAKE_CERTS), "-d", str(self.certs), "-n", str(self.n + self.extra_keys), *self.sans],
                "make-certs",
            )
        conn = [
            f'[superlink]\ndefault = "{CONNECTION}"\n',
            f"[superlink.{CONNECTION}]",
            f'address = "{HOST}:{self.port}"',
        ]
        if self.insecure:
            conn.append("insecure = true")
        else:
            conn.append(f'root-certificates = "{self.certs / "ca.crt"}"')
        (self.cli_home / "config.toml").write_text("\n".join(conn) + "\n")

    def env(self, home: Path, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        # Flower's processes start each other by name (flower-superexec, flwr-clientapp, ...):
        # take them from this interpreter's installation first, so all of them are one flwr.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["FLWR_HOME"] = str(home)
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", DEFAULT_TASK_POLL_INTERVAL)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(extra)
        return env

    def _run(self, cmd: list[str], what: str, timeout: float = 120) -> str:
        """Run a short command to completion; raise with its output when it fails."""
        try:
            res = subprocess.run(
                cmd,
                env=self.env(self.cli_home),
                cwd=self.work,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise DeploymentError(f"{what} timed out after {timeout:.0f} s: {shlex.join(cmd)}") from err
        if res.returncode != 0:
            raise DeploymentError(f"{what} failed (exit {res.returncode}): {shlex.join(cmd)}\n{res.stdout}{res.stderr}")
        return res.stdout

    def flwr(self, *args: str, timeout: float = 60) -> str:
        return self._run(["flwr", *args], f"flwr {args[0]}", timeout=timeout)

    def spawn(self, name: str, cmd: list[str], home: Path, **extra_env: str) -> Proc:
        home.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as out:
            out.write(f"$ {shlex.join(cmd)}\n".encode())
            out.flush()
            popen = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.work,
                env=self.env(home, **extra_env),
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        log(f"started {name} (pid {proc.pid}), log {log_path}")
        return proc

    # -- SuperLink ------------------------------------------------------------------------------
    def superlink_cmd(self) -> list[str]:
        cmd = [
            "flower-superlink",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        if self.insecure:
            return cmd + ["--insecure"]
        return cmd + [
            "--ssl-ca-certfile",
            str(self.certs / "ca.crt"),
            "--ssl-certfile",
            str(self.certs / "server.pem"),
            "--ssl-keyfile",
            str(self.certs / "server.key"),
            "--enable-supernode-auth",
        ]

    def superlink_env(self) -> dict[str, str]:
        """The SuperLink starts the ServerApp as its subprocess: the GPU it may see goes here."""
        return {} if self.server_gpu is None else {"CUDA_VISIBLE_DEVICES": self.server_gpu}

    def start_superlink(self, timeout: float = 60) -> Proc:
        proc = self.spawn(
            "superlink", self.superlink_cmd(), self.work / "flwr-home" / "superlink", **self.superlink_env()
        )
        self.wait_superlink_ready(proc, timeout)
        return proc

    def wait_superlink_ready(self, proc: Proc, timeout: float = 60) -> None:
        self.wait_for(lambda: port_accepts(self.port), timeout, "the SuperLink to listen", [proc])
        # The port is open; the Control API answering over TLS is the real readiness signal.
        self.wait_for(self._control_api_ready, timeout, "the SuperLink Control API", [proc])

    def _control_api_ready(self) -> bool:
        try:
            self.list_nodes()
        except DeploymentError:
            return False
        return True

    # -- SuperNodes -----------------------------------------------------------------------------
    def key(self, index: int) -> Path:
        return self.certs / "keys" / f"node-{index}"

    def register(self, index: int) -> int:
        out = self.flwr("supernode", "register", f"{self.key(index)}.pub", CONNECTION, "--format", "json")
        node_id = int(json.loads(out)["node-id"])
        self.node_ids[index] = node_id
        log(f"registered keys/node-{index}.pub as SuperNode {node_id}")
        return node_id

    def list_nodes(self) -> list[dict]:
        return json.loads(self.flwr("supernode", "ls", CONNECTION, "--format", "json"))["nodes"]

    @property
    def process_isolation(self) -> bool:
        return self.executor != "subprocess"

    def supernode_cmd(self, index: int, partition_id: int) -> list[str]:
        if self.idle_poll_s:  # flower-supernode with short polls (asyncfl/deploy/supernode.py)
            cmd = ["asyncfl-supernode", "--idle-poll-s", f"{self.idle_poll_s:g}"]
        else:
            cmd = ["flower-supernode"]
        cmd += [
            "--superlink",
            f"{HOST}:{self.port}",
            "--host",
            HOST,
            "--port",
            str(self.node_port + index - 1),
            "--node-config",
            f"partition-id={partition_id} num-partitions={self.n}",
        ]
        if self.process_isolation:
            cmd += ["--isolation", "process"]
        if self.insecure:
            return cmd + ["--insecure"]
        cmd += ["--root-certificates", str(self.certs / "ca.crt"), "--auth-supernode-private-key", str(self.key(index))]
        if self.process_isolation:  # the Runtime API the SuperExec dials: TLS + shared secret
            cmd += [
                "--ssl-certfile",
                str(self.certs / "server.pem"),
                "--ssl-keyfile",
                str(self.certs / "server.key"),
                "--ssl-ca-certfile",
                str(self.certs / "ca.crt"),
                "--superexec-auth-secret-file",
                str(self.certs / "superexec.secret"),
            ]
        return cmd

    def superexec_cmd(self, index: int) -> list[str]:
        """The SuperExec next to SuperNode `index` in process isolation."""
        prog = "asyncfl-superexec" if self.executor == "asyncfl" else "flower-superexec"
        cmd = [prog, "--runtime-api-address", f"{HOST}:{self.node_port + index - 1}"]
        if self.insecure:
            return cmd + ["--insecure"]
        return cmd + [
            "--root-certificates",
            str(self.certs / "ca.crt"),
            "--superexec-auth-secret-file",
            str(self.certs / "superexec.secret"),
        ]

    def node_env(self, index: int) -> dict[str, str]:
        """SuperNode `index` (1-based) and its SuperExec see GPU gpus[(index - 1) % len(gpus)]."""
        if not self.gpus:
            return {}
        return {"CUDA_VISIBLE_DEVICES": self.gpus[(index - 1) % len(self.gpus)]}

    def start_supernode(self, index: int, partition_id: int, *, name: str | None = None) -> Proc:
        """Start SuperNode `index` (1-based key/port index) serving partition `partition_id`."""
        cmd = self.supernode_cmd(index, partition_id)
        extra = self.node_env(index)
        name = name or f"supernode-{index}"
        home = self.work / "flwr-home" / name
        proc = self.spawn(name, cmd, home, **extra)
        self.nodes[index] = proc
        if self.process_isolation:  # ClientApps (and the GPU) belong to the node's SuperExec
            self.executors[index] = self.spawn(f"superexec-{index}", self.superexec_cmd(index), home, **extra)
        return proc

    def wait_nodes_online(self, indices: list[int], timeout: float = 90) -> None:
        procs = [self.nodes[i] for i in indices] + [self.executors[i] for i in indices if i in self.executors]

        def ready() -> bool:
            if self.insecure:  # no registration: count online nodes instead
                return sum(n["status"] == "online" for n in self.list_nodes()) >= len(indices)
            online = {int(n["node-id"]) for n in self.list_nodes() if n["status"] == "online"}
            return all(self.node_ids[i] in online for i in indices)

        self.wait_for(ready, timeout, f"{len(indices)} SuperNode(s) to come online", procs)
        log(f"{len(indices)} SuperNode(s) online")

    def wait_for(self, ready, timeout: float, what: str, procs: list[Proc], every: float = 0.5) -> None:
        """Poll `ready()` until true; fail when a process in `procs` dies or on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for p in procs:
                if not p.alive():
                    raise DeploymentError(f"{p.name} exited with status {p.popen.returncode} while waiting for {what}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise DeploymentError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(every)

    # -- kill one node mid-run ------------------------------------------------------------------
    def kill_later(self, index: int, after_s: float, sig: int) -> threading.Thread:
        """Kill SuperNode `index` (and its SuperExec: the machine is gone) `after_s` seconds
        after it received its first task."""
        proc = self.nodes[index]
        executor = self.executors.get(index)

        def watch() -> None:
            while proc.alive():
                if "Receiving:" in proc.log_path.read_text(errors="replace"):
                    time.sleep(after_s)
                    for p in (proc, executor):
                        if p is not None and p.alive():
                            log(f"killing {p.name} (pid {p.pid}) with {signal.Signals(sig).name}")
                            p.signal_group(sig)
                    return
                time.sleep(0.2)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return thread

    # -- the run --------------------------------------------------------------------------------
    def run_app(self, app: Path, run_config: list[str], timeout: float, log_name: str = "flwr-run.log") -> int:
        """`flwr run ... --stream` until the run ends; return the run id, raise unless completed."""
        cmd = ["flwr", "run", str(app), CONNECTION, "--stream"]
        for item in run_config:
            cmd += ["--run-config", item]
        log_path = self.logs / log_name
        log(f"$ {shlex.join(cmd)}")
        run_id = None
        with open(log_path, "w") as out:
            popen = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=self.env(self.cli_home),
                cwd=app,
                start_new_session=True,
            )
            proc = Proc("flwr-run", popen, log_path)
            self.procs.append(proc)
            timer = threading.Timer(timeout, proc.signal_group, (signal.SIGTERM,))
            timer.start()
            try:
                assert popen.stdout is not None
                for line in popen.stdout:
                    out.write(line)
                    out.flush()
                    try:
                        sys.stdout.write(line)
                        sys.stdout.flush()
                    except OSError:
                        pass
                    if run_id is None and (m := re.search(r"started run (\d+)", line)):
                        run_id = int(m.group(1))
                rc = popen.wait()
            finally:
                timer.cancel()
        if run_id is None:
            raise DeploymentError(f"flwr run did not start a run (exit {rc}); see {log_path}")
        status = self.run_status(run_id)
        if status.split(":")[0] in ("pending", "starting", "running"):
            # `flwr run --stream` returned (timeout or stream error) while the run goes on.
            self._run(["flwr", "stop", str(run_id), CONNECTION], "flwr stop", timeout=60)
            raise DeploymentError(f"run {run_id} still {status} after flwr run returned; stopped it")
        if status != "finished:completed":
            raise DeploymentError(f"run {run_id} ended with status {status!r} (flwr run exit {rc})")
        if rc != 0:
            raise DeploymentError(f"flwr run exited with status {rc}")
        log(f"run {run_id} finished:completed")
        return run_id

    def run_status(self, run_id: int) -> str:
        out = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        return json.loads(out)["runs"][0]["status"]

    # -- teardown -------------------------------------------------------------------------------
    def stop_all(self) -> None:
        # Reverse start order: the CLI, the SuperNodes, then the SuperLink.
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        self.stop_strays()

    def stray_pids(self) -> list[int]:
        """Processes that escaped our process groups but carry one of our private FLWR_HOMEs.

        The app may start helpers in a new session (asyncfl's node-local model worker does), so
        killing the groups misses them. Everything started under our SuperLink/SuperNodes
        inherits FLWR_HOME=<work>/flwr-home/..., which no other process on the machine has.
        """
        marker = f"FLWR_HOME={self.work / 'flwr-home'}/".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(v.startswith(marker) for v in env):
                pids.append(int(entry.name))
        return pids

    def stop_strays(self, grace_s: float = 10.0) -> None:
        pids = self.stray_pids()
        for pid in pids:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                log(f"stopping pid {pid}, started under this deployment: {cmd.strip()[:160]}")
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
            time.sleep(0.2)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def print_log_tails(self, lines: int = 40) -> None:
        for path in sorted(self.logs.glob("*.log")):
            print(f"----- {path} (last {lines} lines) -----\n{tail(path, lines)}", file=sys.stderr)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


# --------------------------------------------------------------------------------------------
# Run config and results
# --------------------------------------------------------------------------------------------
def parse_run_config(items: list[str]) -> dict:
    """The run-config overrides as flwr itself parses them (TOML values, later ones win)."""
    from flwr.common.config import parse_config_args  # CLI helper, imported lazily

    return parse_config_args(items) if items else {}


def default_results_dir(app: Path) -> str:
    import tomllib

    cfg = tomllib.loads((app / "pyproject.toml").read_text())
    return str(cfg.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}).get("results-dir", "results"))


def git_ignored(repo: Path, path: Path) -> bool:
    """Whether git ignores `path` in `repo` (flwr build skips git-ignored files)."""
    # The trailing slash makes directory-only patterns (`/results/`) match paths not made yet.
    res = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", f"{path}/"], capture_output=True, check=False)
    return res.returncode == 0


def find_run_dir(results_dir: Path, run_name: str, since: float) -> Path:
    """The run directory the ServerApp wrote: `run-name` if set, else the new one with a summary."""
    if run_name:
        candidates = [results_dir / run_name]
    else:
        candidates = [p for p in results_dir.glob("*/") if p.stat().st_mtime >= since - 1]
    with_summary = [p for p in candidates if (p / "summary.json").is_file()]
    if len(with_summary) == 1:
        return with_summary[0]
    if not with_summary:
        raise DeploymentError(
            f"no summary.json in a run directory under {results_dir} "
            f"(looked at: {', '.join(map(str, candidates)) or 'nothing new'})"
        )
    newest = max(with_summary, key=lambda p: (p / "summary.json").stat().st_mtime)
    log(f"several new run directories under {results_dir}; taking the newest, {newest}")
    return newest


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="local-deployment.sh",
        description="Run asyncfl as a real Flower deployment (SuperLink + N SuperNodes) on 127.0.0.1.",
    )
    p.add_argument("num_nodes", type=int, metavar="N", help="number of SuperNodes (partitions)")
    p.add_argument(
        "--run-config",
        "-c",
        action="append",
        default=[],
        metavar='"k=v ..."',
        help="run-config overrides, passed to `flwr run --run-config` (repeatable); "
        "with --run, they apply to every run",
    )
    p.add_argument(
        "--run",
        action="append",
        default=[],
        metavar='"k=v ..."',
        help="one run on this deployment with these overrides after the --run-config ones "
        "(repeatable: the runs follow each other on the same SuperLink and SuperNodes, "
        "whose node-local model workers stay warm from run to run when the model keys, "
        "seed included, are the same; a worker of other model keys keeps its memory "
        "until its SuperNode stops, so give runs of one deployment one model and seed). "
        "Each run prints its RUN_DIR=...",
    )
    p.add_argument(
        "--insecure", action="store_true", help="no TLS and no SuperNode authentication (local debugging only)"
    )
    p.add_argument("--work-dir", type=Path, help="certs, FLWR_HOMEs, logs (default: a new temp dir)")
    p.add_argument("--app", type=Path, default=REPO, help="Flower app directory (default: the repo)")
    p.add_argument("--port", type=int, help="SuperLink port (env ASYNCFL_SUPERLINK_PORT, default 9100)")
    p.add_argument(
        "--node-port", type=int, help="first SuperNode Runtime API port (env ASYNCFL_SUPERNODE_PORT, default port+1)"
    )
    p.add_argument(
        "--gpus",
        default=os.environ.get("ASYNCFL_NODE_GPUS", ""),
        help="comma list of GPU ids; SuperNode i gets CUDA_VISIBLE_DEVICES=gpus[i %% len] "
        "(env ASYNCFL_NODE_GPUS; default: leave CUDA_VISIBLE_DEVICES alone)",
    )
    p.add_argument(
        "--server-gpu",
        default=os.environ.get("ASYNCFL_SERVER_GPU"),
        help="GPU id the ServerApp may use (CUDA_VISIBLE_DEVICES of the SuperLink, which "
        "starts it; env ASYNCFL_SERVER_GPU; default: all, i.e. it works on GPU 0, "
        "next to SuperNode 1 when --gpus gives the nodes one GPU each)",
    )
    p.add_argument(
        "--executor",
        choices=EXECUTORS,
        default=os.environ.get("ASYNCFL_EXECUTOR", "asyncfl"),
        help="how SuperNodes run ClientApps: asyncfl = process isolation with "
        "asyncfl-superexec (ClientApp processes forked from a warm zygote; default), "
        "flower = process isolation with flower-superexec, subprocess = Flower's "
        "default isolation (env ASYNCFL_EXECUTOR)",
    )
    p.add_argument(
        "--idle-poll-s",
        type=float,
        default=float(os.environ.get("ASYNCFL_IDLE_POLL_S", DEFAULT_IDLE_POLL_S)),
        help="seconds an idle SuperNode waits before asking the SuperLink again "
        f"(asyncfl-supernode; default {DEFAULT_IDLE_POLL_S:g}); 0 = Flower's own "
        "flower-supernode, which waits 3 s (env ASYNCFL_IDLE_POLL_S)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds the run may take (default 1800)")
    p.add_argument(
        "--kill-node", type=int, metavar="I", help="kill SuperNode I (1..N) mid-run, to exercise node failure handling"
    )
    p.add_argument(
        "--kill-after",
        type=float,
        default=0.0,
        metavar="S",
        help="with --kill-node: seconds after that node received its first task (default 0)",
    )
    p.add_argument(
        "--kill-signal",
        choices=["KILL", "TERM"],
        default="KILL",
        help="KILL (crash: the SuperLink notices when heartbeats stop, ~60 s) or TERM "
        "(graceful: the node deregisters at once)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_nodes < 1:
        log("error: N must be >= 1")
        return 2
    if args.executor not in EXECUTORS:  # the env default is not checked by argparse
        log(f"error: --executor / ASYNCFL_EXECUTOR must be one of {', '.join(EXECUTORS)}, got {args.executor!r}")
        return 2
    if args.kill_node is not None and not 1 <= args.kill_node <= args.num_nodes:
        log(f"error: --kill-node must be in 1..{args.num_nodes}")
        return 2
    app = args.app.resolve()
    if not (app / "pyproject.toml").is_file():
        log(f"error: {app} has no pyproject.toml (not a Flower app)")
        return 2
    if args.insecure:
        log(
            "WARNING: --insecure: no TLS and no SuperNode authentication. Anyone who can reach "
            "the SuperLink port can join as a SuperNode or submit runs. Never use this beyond "
            "127.0.0.1 debugging."
        )

    # Results land where the run config says; a relative `results-dir` is taken relative to
    # the caller's cwd (the ServerApp process runs elsewhere), so pass it on as absolute.
    runs: list[tuple[list[str], Path, str]] = []  # per run: (run-config items, results dir, run-name)
    for extra in args.run or [""]:
        items = list(args.run_config) + ([extra] if extra else [])
        try:
            overrides = parse_run_config(items)
        except Exception as err:  # flwr raises several types for bad TOML
            log(f"error: cannot parse --run-config / --run {extra!r}: {err}")
            return 2
        results_dir = Path(str(overrides.get("results-dir", default_results_dir(app)))).expanduser()
        if not results_dir.is_absolute():
            results_dir = Path.cwd() / results_dir
            items.append(f"results-dir={json.dumps(str(results_dir))}")  # later keys win
        runs.append((items, results_dir, str(overrides.get("run-name", ""))))

    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="asyncfl-deploy-"))).resolve()
    for what, path in [("--work-dir", work)] + [("results-dir", r[1]) for r in runs[:1]]:
        if path.is_relative_to(app) and not git_ignored(app, path):
            msg = f"{what} {path} is inside the app {app} and not git-ignored: `flwr run` would pack it into the FAB"
            if what == "--work-dir":
                log(f"error: {msg}; pick a folder outside the app")
                return 2
            log(f"warning: {msg} on the next run")
    log(f"work dir {work}")
    dep = Deployment(
        work,
        args.num_nodes,
        insecure=args.insecure,
        superlink_port=args.port,
        node_port=args.node_port,
        gpus=[g for g in args.gpus.split(",") if g.strip()],
        server_gpu=args.server_gpu,
        executor=args.executor,
        idle_poll_s=args.idle_poll_s,
    )

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    ok, failed = False, 0
    try:
        dep.prepare()
        dep.start_superlink()
        if not args.insecure:
            for i in range(1, args.num_nodes + 1):
                dep.register(i)
        for i in range(1, args.num_nodes + 1):
            dep.start_supernode(i, partition_id=i - 1)
        dep.wait_nodes_online(list(range(1, args.num_nodes + 1)))
        if args.kill_node is not None:
            dep.kill_later(args.kill_node, args.kill_after, getattr(signal, f"SIG{args.kill_signal}"))
        for i, (items, results_dir, run_name) in enumerate(runs, 1):
            started = time.time()
            try:  # a failed run does not stop the ones after it; the exit status says
                dep.run_app(
                    app, items, args.timeout, log_name="flwr-run.log" if len(runs) == 1 else f"flwr-run-{i}.log"
                )
                run_dir = find_run_dir(results_dir, run_name, started)
            except DeploymentError as err:
                if len(runs) == 1:
                    raise
                failed += 1
                log(f"FAILED: run {i} of {len(runs)}: {err}")
                continue
            print(f"RUN_DIR={run_dir}", flush=True)
            log(f"summary: {run_dir / 'summary.json'}" + (f" (run {i} of {len(runs)})" if len(runs) > 1 else ""))
        ok = not failed
    except DeploymentError as err:
        log(f"FAILED: {err}")
    except KeyboardInterrupt:
        log("interrupted")
    except SystemExit as err:
        log(f"stopped by signal (exit {err.code})")
    finally:
        dep.stop_all()
        if not ok:
            dep.print_log_tails()
        log(f"all processes stopped; logs in {dep.logs}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
