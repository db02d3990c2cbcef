"""The node-local persistent worker used in deployment: same results, one warm process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array

from asyncfl.compressors import decode_state
from asyncfl.model import build_model, trainable_state
from asyncfl.node_worker import control, read_arrays, run_remote, socket_path, write_arrays
from asyncfl.transport import array_view
from asyncfl.worker import Worker
from tests.conftest import TINY_OFFLINE


def test_array_file_round_trip_keeps_dtype_shape_and_bits(tmp_path):
    arrays = {"a/U": np.random.rand(3, 4).astype(np.float16), "b.weight": np.arange(6.0).reshape(2, 3),
              "idx": np.array([5, 1, 9], dtype=np.int64), "__meta__": np.frombuffer(b'{"x": 1}', np.uint8),
              "scalar": np.array(2.5, dtype=np.float32)}
    index = write_arrays(tmp_path / "f.bin", arrays)
    back = read_arrays(tmp_path / "f.bin", index)
    assert list(back) == list(arrays)
    for k in arrays:
        assert back[k].dtype == arrays[k].dtype and back[k].shape == arrays[k].shape
        np.testing.assert_array_equal(back[k], arrays[k])


def test_mapped_read_survives_unlink_and_copies_on_write(tmp_path):
    arrays = {"w": np.random.rand(5, 7).astype(np.float32), "e": np.zeros((0, 3), np.float32)}
    path = tmp_path / "f.bin"
    back = read_arrays(path, write_arrays(path, arrays), copy=False)
    path.unlink()  # the client removes its task files once the worker has answered
    np.testing.assert_array_equal(back["w"], arrays["w"])
    assert back["e"].shape == (0, 3)
    back["w"][0, 0] = -1.0  # writable (torch.from_numpy needs that), private to this process
    assert torch.from_numpy(back["w"])[0, 0] == -1.0


@pytest.mark.parametrize("value", [
    np.random.rand(3, 4).astype(np.float32), np.random.rand(6).astype(np.float16), np.array(2.5),
    np.zeros((0, 3), np.float32), np.arange(5, dtype=">i4"), np.arange(24, dtype=np.int64).reshape(2, 3, 4),
    np.asfortranarray(np.random.rand(3, 2)),
])
def test_array_view_equals_flower_numpy_without_a_copy(value):
    arr = Array(value)
    view = array_view(arr)
    ref = arr.numpy()
    assert view.dtype == ref.dtype and view.shape == ref.shape
    np.testing.assert_array_equal(view, ref)
    if not np.isfortran(value) or value.ndim < 2:  # C order: a view into Array.data itself
        assert not view.flags.owndata and not view.flags.writeable


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
    out, metrics = run_remote(run_config, node, task, arrays)
    pid = control(socket_path(run_config, node), "ping")["pid"]
    out2, _ = run_remote(run_config, node, task, arrays)
    assert control(socket_path(run_config, node), "ping")["pid"] == pid  # the same warm process

    from flwr.app import Array, ArrayRecord

    remote_update = decode_state(ArrayRecord({k: Array(v) for k, v in out.items()}))
    local = Worker(cfg).run_task(cfg, {k: v.clone() for k, v in start.items()}, 1, 2, run_key="r", version=3)
    local_update = decode_state(local.record)
    for k in local_update:
        torch.testing.assert_close(remote_update[k], local_update[k], atol=1e-5, rtol=1e-4)
    assert metrics["partition-id"] == 1 and metrics["num-examples"] == local.metrics["num-examples"]
    for k in out:  # deterministic: the same task twice gives the same payload
        np.testing.assert_array_equal(out[k], out2[k])


def test_warm_up_builds_the_worker_and_leaves_the_next_task_unchanged(remote):
    run_config, node = remote
    from asyncfl.config import AppConfig

    out, metrics = run_remote(run_config, node, {"warmup": True}, {})
    assert out == {} and metrics["partition-id"] == 1 and metrics["warmup-s"] > 0
    pid = control(socket_path(run_config, node), "ping")["pid"]
    cfg = AppConfig.from_run_config(run_config)
    start = {k: v.clone() for k, v in trainable_state(build_model(cfg)).items()}
    task = {"run-key": "w", "version": 0}
    got, _ = run_remote(run_config, node, task, {k: v.numpy() for k, v in start.items()})
    assert control(socket_path(run_config, node), "ping")["pid"] == pid  # the warmed worker ran it

    from flwr.app import Array, ArrayRecord

    cold = Worker(cfg).run_task(cfg, {k: v.clone() for k, v in start.items()}, 1, 2, run_key="w", version=0)
    warm_update = decode_state(ArrayRecord({k: Array(v) for k, v in got.items()}))
    for k, v in decode_state(cold.record).items():  # the warm-up's training step left no trace
        torch.testing.assert_close(warm_update[k], v, atol=1e-5, rtol=1e-4)


def test_remote_update_log_task_matches_in_process(remote):
    """Deployment path: the log's payloads travel in the task file, prefixed, and are regrouped."""
    from flwr.app import Array, ArrayRecord

    from asyncfl.compressors import get_compressor
    from asyncfl.config import AppConfig
    from asyncfl.protocol import UpdateLog
    from asyncfl.transport import array_view

    run_config, node = remote
    cfg = AppConfig.from_run_config(run_config)
    start = {k: v.clone() for k, v in trainable_state(build_model(cfg)).items()}
    g = torch.Generator().manual_seed(3)
    rec = get_compressor("pca", rank=2, dtype="fp32").encode_state(
        {k: 1e-3 * torch.randn(v.shape, generator=g) for k, v in start.items()})
    run_remote(run_config, node, {"run-key": "r", "version": 0}, {k: v.numpy() for k, v in start.items()})
    arrays = {f"log-0/{k}": array_view(a) for k, a in rec.items()}
    task = {"run-key": "r", "version": 1, "update-log": {"base": 0, "coefs": [0.5], "n": 1}}
    out, metrics = run_remote(run_config, node, task, arrays)
    assert "need-full" not in metrics
    local = Worker(cfg)
    local.run_task(cfg, {k: v.clone() for k, v in start.items()}, 1, 2, run_key="r", version=0)
    expected = local.run_task(cfg, None, 1, 2, run_key="r", version=1, update_log=UpdateLog(0, [0.5], [rec]))
    got = decode_state(ArrayRecord({k: Array(v) for k, v in out.items()}))
    for k, v in decode_state(expected.record).items():
        torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-4)
    # a base it does not hold: the worker asks for the full weights instead of failing
    task["update-log"]["base"] = 5
    out, metrics = run_remote(run_config, node, task, arrays)
    assert metrics["need-full"] == 1 and out == {}


def test_worker_errors_come_back_as_a_clear_exception(remote):
    run_config, node = remote
    with pytest.raises(RuntimeError, match="node worker failed: .*trainable"):
        run_remote(run_config, node, {"run-key": "r", "version": 0}, {"bogus": np.zeros(3, np.float32)})


def test_worker_exits_when_its_owner_is_gone_and_on_sigterm(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    sock = tmp_path / "w.sock"
    worker = subprocess.Popen([sys.executable, "-m", "asyncfl.node_worker", str(sock), str(owner.pid)])
    deadline = time.monotonic() + 60
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert control(sock, "ping")["pid"] == worker.pid
    owner.kill()
    owner.wait()
    assert worker.wait(timeout=30) == 0 and not sock.exists()  # followed its owner out

    worker = subprocess.Popen([sys.executable, "-m", "asyncfl.node_worker", str(sock)])
    while not sock.exists() and time.monotonic() < deadline + 60:
        time.sleep(0.1)
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(timeout=30) == 0 and not sock.exists()  # SIGTERM removes the socket
