"""A node-local persistent worker that keeps the model warm between ClientApp processes.

In Flower's deployment runtime every message starts a fresh `flwr-clientapp` process, so a
client would import torch and transformers, build GPT-2 and load its data again for every
update (measured: 15-20 s per update on the H100 host). With `persistent-worker` on, the
ClientApp process stays light (flwr + numpy): it hands the task to a long-lived worker process
on the same node, started on first use, that holds the `asyncfl.client.worker.Worker` (model, data,
compiled graph) across tasks, exactly as a Ray actor does in simulation.

Protocol (Unix socket, one JSON line each way, no pickle): the request names the run config,
node config, task config, the task's input files and the reply file. Each file holds one
record's arrays in the wire format (`asyncfl.wire`: safetensors bytes), in /dev/shm when it
exists: the ClientApp writes a received wire Array's bytes as they are (the full weights, or
each payload of an update log), the worker maps them copy-on-write and validates them, and
writes its reply record's bytes as they are, which the ClientApp sends on. Any failure on the
worker side comes back as an error text and the ClientApp raises it (an error reply to the
server).

Notes
-----
* One worker per (SuperNode partition, GPU visibility, model keys, installed app folder): a
  changed app or model never talks to an old worker.
* The worker exits after `IDLE_EXIT_S` without tasks, when the process that started the
  ClientApp (the SuperNode's SuperExec) is gone, or on SIGTERM, and removes its socket.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import socketserver
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from asyncfl import wire
from asyncfl.client import node
from asyncfl.client.node import node_state_dir, partition_of
from asyncfl.config import AppConfig
from asyncfl.protocol import UpdateLog

IDLE_EXIT_S = 1800.0
START_TIMEOUT_S = 300.0


def _scratch_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else node_state_dir()


# ------------------------------------------------------------------------------------------
# Client side (inside the short-lived ClientApp process)
# ------------------------------------------------------------------------------------------
def socket_path(run_config: dict[str, Any], node_config: dict[str, Any]) -> Path:
    """The node worker's socket: one worker per model, partition, GPU set, app folder and
    owner (the process that starts this node's ClientApp processes, whose exit the worker
    follows), so two SuperNodes on one machine never share a worker, even with equal configs."""
    app_dir = str(Path(__file__).resolve().parent)
    key = json.dumps(
        [
            [run_config.get(k) for k in node.MODEL_KEYS],
            node_config.get("partition-id"),
            node_config.get("num-partitions"),
            os.environ.get("CUDA_VISIBLE_DEVICES"),
            app_dir,
            os.getppid(),
        ],
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    # AF_UNIX paths are limited to ~100 bytes: keep the socket in a short folder
    return Path(tempfile.gettempdir()) / f"asyncfl-{os.getuid()}-{digest}.sock"


def _connect(path: Path, timeout: float) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        return s
    except OSError:
        s.close()
        return None


def _spawn(path: Path) -> None:
    log_dir = node_state_dir()
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    with open(log_dir / f"{path.stem}.log", "ab") as log:
        owner = str(os.getppid())  # the SuperExec that runs ClientApp processes for this node
        subprocess.Popen(
            [sys.executable, "-m", "asyncfl.client.node_worker", str(path), owner],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


def ensure_worker(path: Path) -> socket.socket:
    """Connect to the node's worker, starting it first if none answers."""
    s = _connect(path, timeout=5)
    if s is not None:
        return s
    path.unlink(missing_ok=True)
    _spawn(path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        time.sleep(0.2)
        s = _connect(path, timeout=5)
        if s is not None:
            return s
    raise RuntimeError(
        f"asyncfl node worker did not start within {START_TIMEOUT_S:.0f} s; "
        f"see {node_state_dir() / (path.stem + '.log')}"
    )


def run_remote(
    run_config: dict[str, Any], node_config: dict[str, Any], task: dict[str, Any], records: list
) -> tuple[Any, dict[str, Any]]:
    """Run one task on the node's persistent worker: `records` are the task's ArrayRecords
    (the full weights, or an update log's payloads; none for a warm-up without weights).
    Returns (reply ArrayRecord, metrics); the reply's wire bytes are checked before use."""
    from flwr.app import ArrayRecord

    path = socket_path(run_config, node_config)
    with tempfile.TemporaryDirectory(dir=_scratch_dir(), prefix="asyncfl-task-") as tmp:
        inputs = [Path(tmp) / f"in-{i}.safetensors" for i in range(len(records))]
        for file, record in zip(inputs, records):
            wire.write_record(file, record)
        out = Path(tmp) / "out.safetensors"
        request = {
            "run_config": run_config,
            "node_config": node_config,
            "task": task,
            "in": [str(p) for p in inputs],
            "out": str(out),
        }
        with ensure_worker(path) as s:
            s.settimeout(None)
            s.sendall((json.dumps(request) + "\n").encode())
            reply = json.loads(s.makefile("rb").readline() or b'{"ok": false, "error": "worker closed"}')
        if not reply.get("ok"):
            raise RuntimeError(f"asyncfl node worker failed: {reply.get('error')}")
        if not out.exists():  # no payload (a warm-up, or "need-full")
            return ArrayRecord(), reply["metrics"]
        data = out.read_bytes()
        wire.decode(data)  # a defect is the worker's, reported here rather than by the server
        return wire.record_of(data), reply["metrics"]


def control(path: Path, op: str) -> dict[str, Any] | None:
    """Send `ping` (returns the worker's pid) or `shutdown` to a running worker, if any."""
    s = _connect(path, timeout=5)
    if s is None:
        return None
    with s:
        s.sendall((json.dumps({"op": op}) + "\n").encode())
        return json.loads(s.makefile("rb").readline() or b"null")


# ------------------------------------------------------------------------------------------
# Worker side (the long-lived process)
# ------------------------------------------------------------------------------------------
class _Handler(socketserver.StreamRequestHandler):
    server: _Server  # the server that made this handler (serve() below)

    def handle(self) -> None:
        self.server.last_task = time.monotonic()
        reply: dict[str, Any]
        try:
            req = json.loads(self.rfile.readline())
            if req.get("op") == "ping":
                reply = {"ok": True, "pid": os.getpid()}
            elif req.get("op") == "shutdown":
                # unlink first: a client arriving now starts a new worker, not a dying one
                Path(cast(str, self.server.server_address)).unlink(missing_ok=True)  # a Unix socket's path
                self.server.last_task = -IDLE_EXIT_S
                self.wfile.write(b'{"ok": true}\n')
                return
            else:
                reply = {"ok": True, **serve_task(req)}
        except Exception as exc:  # noqa: BLE001 - every failure goes back as text
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        self.wfile.write((json.dumps(reply) + "\n").encode())
        self.server.last_task = time.monotonic()


def serve_task(req: dict[str, Any]) -> dict[str, Any]:
    import torch

    from asyncfl.client.worker import get_worker

    cfg = AppConfig.from_run_config(req["run_config"])
    pid, n = partition_of(req["node_config"])
    task = req["task"]
    # copy-on-write maps of the task files: the model reads the weights straight from them
    inputs = [wire.read(p) for p in req["in"]]
    if task.get("warmup"):
        state = {k: torch.from_numpy(a) for k, a in inputs[0][0].items()} if inputs else None
        metrics = get_worker(cfg).warm_up(
            cfg, pid, n, state or None, run_key=str(task.get("run-key", "")), version=int(task.get("version", 0))
        )
        return {"metrics": metrics}
    state, update_log = None, None
    if "update-log" in task:  # one file per payload, decoded: (arrays, metadata) each
        spec = task["update-log"]
        if len(inputs) != int(spec["n"]):
            raise ValueError(f"update log of {spec['n']} payloads came with {len(inputs)} files")
        update_log = UpdateLog(int(spec["base"]), [float(c) for c in spec["coefs"]], inputs)
    else:
        if len(inputs) != 1:
            raise ValueError(f"a task with the full weights needs one input file, got {len(inputs)}")
        state = {k: torch.from_numpy(a) for k, a in inputs[0][0].items()}
    result = get_worker(cfg).run_task(
        cfg,
        state,
        pid,
        n,
        run_key=task["run-key"],
        version=task["version"],
        repeat=int(task.get("repeat", 0)),
        update_log=update_log,
        local_steps=int(task.get("local-steps", 0)),
    )
    if len(result.record):  # its wire bytes as they are (a compressor's record is one wire Array)
        wire.write_record(Path(req["out"]), result.record)
    return {"metrics": result.metrics}


class _Server(socketserver.UnixStreamServer):
    last_task = time.monotonic()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def serve(path: Path, owner: int | None = None) -> None:
    import signal

    from asyncfl.logs import setup_logging

    setup_logging()
    node.SERVING = True  # client state (error feedback) stays in this process's memory
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # runs the `finally` below
    path.unlink(missing_ok=True)
    with _Server(str(path), _Handler) as server:
        server.timeout = 5.0
        try:
            while time.monotonic() - server.last_task < IDLE_EXIT_S:
                if owner is not None and not _alive(owner):
                    break  # the SuperNode that started us is gone
                server.handle_request()
        finally:
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None)
