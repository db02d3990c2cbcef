"""The node-local persistent worker used in deployment: same results, one warm process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from asyncfl import wire
from asyncfl.client.node_worker import control, run_remote, socket_path
from asyncfl.client.worker import Worker
from asyncfl.compressors import decode_state
from asyncfl.model import build_model, trainable_state
from tests.conftest import TINY_OFFLINE


@pytest.fixture
def remote(tmp_path, monkeypatch, shared_dir):
    monkeypatch.setenv("ASYNCFL_NODE_DIR", str(tmp_path / "node"))
    run_config = {**TINY_OFFLINE, "compressor": "none", "local-steps": 2}
    node = {"partition-id": 1, "num-partitions": 2}
    yield run_config, node
    control(socket_path(run_config, node), "shutdown")


def test_remote_task_matches_in_process_and_reuses_one_warm_worker(remote):
    run_config, node = remote
    from asyncfl.config import AppConfig

    cfg = AppConfig.from_run_config(run_config)
    start = {k: v.clone() for k, v in trainable_state(build_model(cfg)).items()}
    arrays = {k: v.numpy() for k, v in start.items()}
    task = {"run-key": "r", "version": 3}
    # the weights as one wire Array (written to the task file as they are) or a plain record
    out, metrics = run_remote(run_config, node, task, [wire.to_record(arrays)])
    pid = control(socket_path(run_config, node), "ping")["pid"]
    out2, _ = run_remote(run_config, node, task, [ArrayRecord({k: Array(v) for k, v in arrays.items()})])
    assert control(socket_path(run_config, node), "ping")["pid"] == pid  # the same warm process

    assert list(out.keys()) == [wire.KEY]  # the reply: the worker's wire bytes, as they are
    remote_update = decode_state(out)
    local = Worker(cfg).run_task(cfg, {k: v.clone() for k, v in start.items()}, 1, 2, run_key="r", version=3)
    local_update = decode_state(local.record)
    for k in local_update:
        torch.testing.assert_close(remote_update[k], local_update[k], atol=1e-5, rtol=1e-4)
    assert metrics["partition-id"] == 1 and metrics["num-examples"] == local.metrics["num-examples"]
    # deterministic: the same task twice gives the same payload, whichever form the weights had
    assert out[wire.KEY].data == out2[wire.KEY].data


def test_warm_up_builds_the_worker_and_leaves_the_next_task_unchanged(remote):
    run_config, node = remote
    from asyncfl.config import AppConfig

    out, metrics = run_remote(run_config, node, {"warmup": True}, [])
    assert len(out) == 0 and metrics["partition-id"] == 1 and metrics["warmup-s"] > 0
    pid = control(socket_path(run_config, node), "ping")["pid"]
    cfg = AppConfig.from_run_config(run_config)
    start = {k: v.clone() for k, v in trainable_state(build_model(cfg)).items()}
    task = {"run-key": "w", "version": 0}
    got, _ = run_remote(run_config, node, task, [wire.to_record({k: v.numpy() for k, v in start.items()})])
    assert control(socket_path(run_config, node), "ping")["pid"] == pid  # the warmed worker ran it

    cold = Worker(cfg).run_task(cfg, {k: v.clone() for k, v in start.items()}, 1, 2, run_key="w", version=0)
    warm_update = decode_state(got)
    for k, v in decode_state(cold.record).items():  # the warm-up's training step left no trace
        torch.testing.assert_close(warm_update[k], v, atol=1e-5, rtol=1e-4)


def test_remote_update_log_task_matches_in_process(remote):
    """Deployment path: each of the log's payloads travels as its own task file, as received."""
    from asyncfl.compressors import get_compressor
    from asyncfl.config import AppConfig
    from asyncfl.protocol import UpdateLog

    run_config, node = remote
    cfg = AppConfig.from_run_config(run_config)
    start = {k: v.clone() for k, v in trainable_state(build_model(cfg)).items()}
    g = torch.Generator().manual_seed(3)
    rec = get_compressor("pca", rank=2, dtype="fp32").encode_state(
        {k: 1e-3 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    )
    weights = wire.to_record({k: v.numpy() for k, v in start.items()})
    run_remote(run_config, node, {"run-key": "r", "version": 0}, [weights])
    task = {"run-key": "r", "version": 1, "update-log": {"base": 0, "coefs": [0.5], "n": 1}}
    out, metrics = run_remote(run_config, node, task, [rec])
    assert "need-full" not in metrics
    local = Worker(cfg)
    local.run_task(cfg, {k: v.clone() for k, v in start.items()}, 1, 2, run_key="r", version=0)
    expected = local.run_task(cfg, None, 1, 2, run_key="r", version=1, update_log=UpdateLog(0, [0.5], [rec]))
    got = decode_state(out)
    for k, v in decode_state(expected.record).items():
        torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-4)
    # a base it does not hold: the worker asks for the full weights instead of failing
    task["update-log"]["base"] = 5
    out, metrics = run_remote(run_config, node, task, [rec])
    assert metrics["need-full"] == 1 and len(out) == 0


def test_worker_errors_come_back_as_a_clear_exception(remote):
    run_config, node = remote
    task = {"run-key": "r", "version": 0}
    with pytest.raises(RuntimeError, match="node worker failed: .*trainable"):
        run_remote(run_config, node, task, [wire.to_record({"bogus": np.zeros(3, np.float32)})])
    with pytest.raises(RuntimeError, match="node worker failed: WireError: header length"):
        run_remote(run_config, node, task, [wire.record_of(b"\x99" * 16)])


def test_worker_exits_when_its_owner_is_gone_and_on_sigterm(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    sock = tmp_path / "w.sock"
    worker = subprocess.Popen([sys.executable, "-m", "asyncfl.client.node_worker", str(sock), str(owner.pid)])
    deadline = time.monotonic() + 60
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert control(sock, "ping")["pid"] == worker.pid
    owner.kill()
    owner.wait()
    assert worker.wait(timeout=30) == 0 and not sock.exists()  # followed its owner out

    worker = subprocess.Popen([sys.executable, "-m", "asyncfl.client.node_worker", str(sock)])
    while not sock.exists() and time.monotonic() < deadline + 60:
        time.sleep(0.1)
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(timeout=30) == 0 and not sock.exists()  # SIGTERM removes the socket
