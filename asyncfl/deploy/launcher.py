"""`asyncfl-superexec`: Flower's SuperExec, with ClientApp processes forked from a warm zygote.

In Flower's deployment runtime a SuperExec polls its SuperNode for tasks and starts a fresh
`flwr-clientapp` process for every message. Before that process does anything it imports
Flower's runtime (SQLAlchemy, Alembic, FastAPI, httpx, protobuf): about 1 s on a 2-core CPU,
paid by every update. This command is `flower-superexec` (Flower's own argument parser, task
loop, authentication and TLS handling; every flag works the same) with one change: a ClientApp
task runs in a child forked from a *zygote*, a process started once that has already imported
that runtime. The child calls Flower's own `run_clientapp` with the task's token, exactly what
`flwr-clientapp --token ...` would call, so the app sees no difference; the app's own modules
are imported fresh in each child from the installed FAB (a new app version is never served
stale code). Other task types (a ServerApp, when pointed at a SuperLink) keep Flower's
subprocess executor.

Why a separate zygote instead of forking the SuperExec itself: the SuperExec holds an open
HTTP client and may run helper threads (parent monitor, health server); a fork copies only the
calling thread, and locks held by the others would stay locked in the child. The zygote starts
nothing but imports; it checks that it still runs a single thread before each fork.

Use it in process isolation, one per SuperNode, in place of `flower-superexec`:

    flower-supernode ... --isolation process --port 9094 ...
    asyncfl-superexec --runtime-api-address 127.0.0.1:9094 --root-certificates ca.crt ...

`--fork off` (or env ASYNCFL_FORK=0) makes it behave exactly like `flower-superexec`. If the
zygote cannot start or dies, tasks fall back to Flower's subprocess executor (logged once).
The SuperExec's executor is swapped through `flwr.supercore.superexec.run_superexec.get_executor`
and the children run `flwr.supernode.runtime.run_clientapp.run_clientapp` (hooks `EXECUTOR` and
`CLIENTAPP_RUNTIME` of `asyncfl.flower_hooks`). On a flwr without them the command exits with
an error naming the hook if forking was asked for (`--fork on`, `ASYNCFL_FORK=1`); by default it
warns once and runs Flower's executor unchanged.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from typing import Any

from asyncfl import flower_hooks

FORK_ENV = "ASYNCFL_FORK"
_ZYGOTE_FLAG = "--zygote-fd"


def _log(msg: str) -> None:
    try:
        print(f"[asyncfl-superexec] {msg}", file=sys.stderr, flush=True)
    except OSError:
        pass


# ------------------------------------------------------------------------------------------
# The zygote: imports once, forks one child per ClientApp task
# ------------------------------------------------------------------------------------------
def warm_imports() -> None:
    """What every `flwr-clientapp` process imports before it runs an app, plus numpy."""
    import flwr.app  # noqa: F401
    import flwr.clientapp  # noqa: F401
    import flwr.supernode.runtime.run_clientapp  # noqa: F401  (the bulk: ~1 s)
    import numpy  # noqa: F401  (the app's transport uses it)
    from flwr.supercore.tls import validate_and_resolve_root_certificates  # noqa: F401


def clientapp_argv(req: dict[str, Any]) -> list[str]:
    """The command line `flwr-clientapp` would have had for this task (Flower's executor)."""
    argv = ["flwr-clientapp", "--runtime-api-address", req["address"], "--token", "***"]
    if req.get("insecure"):
        argv.append("--insecure")
    elif req.get("root_certificates"):
        argv += ["--root-certificates", req["root_certificates"]]
    if req.get("parent_pid") is not None:
        argv += ["--parent-pid", str(req["parent_pid"])]
    return argv


def run_child(req: dict[str, Any]) -> int:
    """Inside the forked child: run one ClientApp task through Flower's own runtime."""
    from logging import INFO

    from flwr.supercore import log
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    # The process now is a ClientApp process: argv says so (apps may look, asyncfl does).
    sys.argv = clientapp_argv(req)
    log(INFO, "Start `flwr-clientapp` process (forked by asyncfl-superexec)")
    insecure = bool(req.get("insecure"))
    try:
        run_clientapp(
            runtime_api_address=req["address"],
            token=req["token"],
            insecure=insecure,
            certificates=validate_and_resolve_root_certificates(req.get("root_certificates"), insecure),
            parent_pid=req.get("parent_pid"),
            runtime_dependency_install=bool(req.get("runtime_dependency_install")),
        )
    except SystemExit as exc:  # flwr_exit ends every task this way
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def _fork_child(req: dict[str, Any], conn: socket.socket) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        conn.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        code = run_child(req)
    except BaseException:  # noqa: BLE001 - a child must never return into the zygote loop
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def zygote_main(fd: int) -> int:
    """Serve fork requests on the socket `fd`: one JSON line in, `{"pid": N}` or
    `{"error": "..."}` out. Exits when the SuperExec closes its end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the SuperExec's to handle
    conn = socket.socket(fileno=fd)
    try:
        warm_imports()
    except Exception as exc:  # noqa: BLE001
        conn.sendall((json.dumps({"error": f"warm imports failed: {exc!r}"}) + "\n").encode())
        return 1
    conn.sendall(b'{"ready": true}\n')
    buf = b""
    while True:
        ready, _, _ = select.select([conn], [], [], 1.0)
        _reap()
        if not ready:
            continue
        chunk = conn.recv(65536)
        if not chunk:  # the SuperExec is gone
            return 0
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            reply: dict[str, Any]
            try:
                req = json.loads(line)
                if threading.active_count() != 1:
                    raise RuntimeError(f"zygote runs {threading.active_count()} threads; refusing to fork")
                reply = {"pid": _fork_child(req, conn)}
            except Exception as exc:  # noqa: BLE001 - reported to the SuperExec
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            conn.sendall((json.dumps(reply) + "\n").encode())


# ------------------------------------------------------------------------------------------
# The SuperExec side: an executor that asks the zygote for ClientApp processes
# ------------------------------------------------------------------------------------------
class ZygoteError(RuntimeError):
    """The zygote could not start or answer; the caller falls back to Flower's executor."""


class Zygote:
    """A handle on the zygote process: start, fork one task, stop."""

    def __init__(self, start_timeout: float = 120.0) -> None:
        parent, child = socket.socketpair()
        self.conn = parent
        self.reader = parent.makefile("rb")
        cmd = [sys.executable, "-m", "asyncfl.deploy.launcher", _ZYGOTE_FLAG, str(child.fileno())]
        self.proc = subprocess.Popen(cmd, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        child.close()
        self.conn.settimeout(start_timeout)
        try:
            hello = self._read("start")
            if not hello.get("ready"):
                raise ZygoteError(hello.get("error", f"unexpected first line {hello}"))
        except (ZygoteError, ValueError) as exc:  # no zygote left behind
            self.close()
            raise ZygoteError(str(exc)) from exc
        self.conn.settimeout(30.0)

    def _read(self, what: str) -> dict[str, Any]:
        try:
            line = self.reader.readline()
        except OSError as exc:  # timeout included
            raise ZygoteError(f"zygote did not answer ({what}): {exc}") from exc
        if not line:
            raise ZygoteError(f"zygote exited (status {self.proc.poll()}) during {what}")
        return json.loads(line)

    def fork(self, req: dict[str, Any]) -> int:
        try:
            self.conn.sendall((json.dumps(req) + "\n").encode())
        except OSError as exc:
            raise ZygoteError(f"zygote unreachable: {exc}") from exc
        try:
            reply = self._read("fork")
        except ValueError as exc:  # not JSON
            raise ZygoteError(f"zygote answered garbage: {exc}") from exc
        if "pid" not in reply:
            raise ZygoteError(reply.get("error", f"unexpected reply {reply}"))
        return int(reply["pid"])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        try:  # the zygote exits on EOF (its running children finish their task); the socket's
            self.reader.close()  # fd stays open while its file object does
            self.conn.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ForkingExecutor:
    """Flower's executor protocol; ClientApp tasks are forked from the zygote, others go to
    `fallback` (Flower's subprocess executor)."""

    def __init__(self, fallback: Any) -> None:
        from flwr.supercore.constant import TaskType

        self.fallback = fallback
        self.client_app = TaskType.CLIENT_APP
        self.zygote: Zygote | None = None
        self.broken = False  # the zygote failed to start: Flower's executor from now on
        self.forked = 0
        self.closed = False
        self._zygote()  # warm before the first task arrives

    def _zygote(self) -> Zygote | None:
        if self.broken:
            return None
        if self.zygote is not None and not self.zygote.alive():
            _log(f"zygote exited (status {self.zygote.proc.returncode}); starting a new one")
            self.zygote = None
        if self.zygote is None:
            t0 = time.monotonic()
            try:
                self.zygote = Zygote()
            except (ZygoteError, OSError) as exc:
                _log(f"zygote unavailable ({exc}); ClientApp tasks run as `flwr-clientapp` processes")
                self.broken = True
                return None
            _log(f"zygote ready (pid {self.zygote.proc.pid}, warm imports {time.monotonic() - t0:.1f} s)")
        return self.zygote

    def launch(self, spec: Any):
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != self.client_app or (zygote := self._zygote()) is None:
            return self.fallback.launch(spec)
        req = {
            "address": spec.runtime_api_address,
            "token": spec.token,
            "insecure": spec.insecure,
            "root_certificates": spec.root_certificates_path,
            "parent_pid": spec.parent_pid,
            "runtime_dependency_install": spec.runtime_dependency_install,
        }
        try:
            zygote.fork(req)
        except ZygoteError as exc:
            _log(f"fork failed ({exc}); this task runs as a `flwr-clientapp` process")
            zygote.close()
            self.zygote = None
            return self.fallback.launch(spec)
        self.forked += 1
        return LaunchResult.accepted()

    # the rest of the protocol: no capacity limits, like Flower's subprocess executor
    def get_eligible_capacity(self, supported_task_types, **kwargs):
        return self.fallback.get_eligible_capacity(supported_task_types, **kwargs)

    def wait_for_capacity(self, task_type=None, **kwargs):
        return self.fallback.wait_for_capacity(task_type, **kwargs)

    def reconcile(self) -> None:
        self.fallback.reconcile()

    def close(self) -> None:
        if not self.closed:  # Flower may call this twice (exit handler, then shutdown)
            _log(f"stopping: {self.forked} ClientApp task(s) ran in forked processes")
        self.closed = True
        if self.zygote is not None:
            self.zygote.close()
            self.zygote = None
        self.fallback.close()


def install_forking_executor(required: bool = False) -> bool:
    """Make Flower's SuperExec build a `ForkingExecutor` in place of its subprocess executor
    (hooks `flower_hooks.EXECUTOR` and `CLIENTAPP_RUNTIME`). Where this flwr lacks them:
    `HookMissingError` if `required` (`--fork on`), else a warning, False, and Flower's
    behaviour unchanged. Installing twice wraps Flower's `get_executor` once."""

    def apply(rs: Any) -> None:
        from flwr.supercore.constant import ExecutorType
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        original = getattr(rs.get_executor, "asyncfl_original", rs.get_executor)

        def get_executor(executor_type, *args: Any, **kwargs: Any):
            executor = original(executor_type, *args, **kwargs)
            if executor_type == ExecutorType.SUBPROCESS and isinstance(executor, SubprocessExecutor):
                return ForkingExecutor(executor)
            return executor

        get_executor.asyncfl_original = original  # type: ignore[attr-defined]
        rs.get_executor = get_executor

    return flower_hooks.install(
        flower_hooks.EXECUTOR,
        apply,
        needs=[flower_hooks.CLIENTAPP_RUNTIME],
        required=required,
        say=_log,
        fallback="running Flower's executor unchanged",
    )


def fork_mode(argv: list[str], env: Mapping[str, str] | None = None) -> tuple[str, list[str]]:
    """Strip our own `--fork on|off` from argv (the rest is Flower's): "on" (asked for, by the
    flag or `ASYNCFL_FORK`), "off", or "auto" (neither given: on where this flwr allows)."""
    text = (os.environ if env is None else env).get(FORK_ENV)
    mode = (
        "auto"
        if text is None or not text.strip()
        else ("off" if text.strip().lower() in ("0", "off", "false", "no") else "on")
    )
    rest, i = [], 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg == "--fork":
            if i + 1 >= len(argv):
                raise SystemExit("asyncfl-superexec: --fork needs a value: on or off")
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--fork="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            rest.append(arg)
            i += 1
            continue
        if value not in ("on", "off"):
            raise SystemExit(f"asyncfl-superexec: --fork must be on or off, got {value!r}")
        mode = value
    return mode, rest


def fork_enabled(argv: list[str]) -> tuple[bool, list[str]]:
    """`fork_mode` as a yes/no: forking unless turned off."""
    mode, rest = fork_mode(argv)
    return mode != "off", rest


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [_ZYGOTE_FLAG]:
        sys.exit(zygote_main(int(argv[1])))
    mode, rest = fork_mode(argv)
    if any(a in ("-h", "--help") for a in rest):
        print(
            "asyncfl-superexec: flower-superexec with ClientApp processes forked from a warm\n"
            "zygote. Extra flag: --fork on|off (default: on where this flwr allows; env\n"
            "ASYNCFL_FORK=0 turns it off).\n"
            "All other flags are flower-superexec's:\n",
            flush=True,
        )
    if mode != "off":
        try:
            install_forking_executor(required=mode == "on")
        except flower_hooks.HookMissingError as exc:
            raise SystemExit(f"asyncfl-superexec: {exc}; use --fork off to run Flower's executor") from None
    from flwr.supercore.cli.flower_superexec import flower_superexec

    sys.argv = ["flower-superexec", *rest]
    flower_superexec()


if __name__ == "__main__":
    main()
