"""One client task end to end, without Flower transport: delta, payload, shift, emulation."""

from __future__ import annotations

import torch

from asyncfl.compressors import decode_state
from asyncfl.model import build_model, trainable_state
from asyncfl.worker import Worker


def fresh_global(cfg):
    return {k: v.clone() for k, v in trainable_state(build_model(cfg)).items()}


def test_task_reply_decodes_to_the_local_training_delta(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCFL_NODE_DIR", str(tmp_path))
    cfg = make_cfg(compressor="none")
    worker = Worker(cfg)
    start = fresh_global(cfg)
    result = worker.run_task(cfg, start, partition_id=0, num_partitions=2)
    update = decode_state(result.record, reference={k: v.shape for k, v in start.items()})
    local = trainable_state(worker.model)
    for k in start:  # lossless payload: exactly local - received
        torch.testing.assert_close(update[k], local[k] - start[k])
    m = result.metrics
    assert m["partition-id"] == 0 and m["num-examples"] == cfg.local_steps * cfg.batch_size
    assert m["bytes"] == result.record.count_bytes() and m["train-loss"] > 0


def test_low_rank_payload_is_smaller_and_close(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCFL_NODE_DIR", str(tmp_path))
    cfg = make_cfg(compressor="pca", rank=4)
    result = Worker(cfg).run_task(cfg, fresh_global(cfg), partition_id=1, num_partitions=2)
    m = result.metrics
    assert m["bytes"] < m["dense-bytes"] / 3
    assert 0 <= m["rec-error"] < 1


def test_lora_sends_only_adapters(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCFL_NODE_DIR", str(tmp_path))
    cfg = make_cfg(lora_rank=4, compressor="pca", rank=2)
    result = Worker(cfg).run_task(cfg, fresh_global(cfg), partition_id=0, num_partitions=2)
    update = decode_state(result.record)
    assert update and all("lora_" in k for k in update)


def test_shifted_client_keeps_its_shift_on_node_local_disk(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCFL_NODE_DIR", str(tmp_path))
    cfg = make_cfg(rule="shifted", compressor="none", **{"shift-alpha": 0.5})
    worker = Worker(cfg)
    g = fresh_global(cfg)
    first = decode_state(worker.run_task(cfg, g, 0, 2, run_key="r", version=0).record)
    saved = torch.load(tmp_path / "r-p0.pt", weights_only=True)
    for k in first:  # h_i = 0 + alpha * decoded
        torch.testing.assert_close(saved[k], 0.5 * first[k])
    second_result = worker.run_task(cfg, g, 0, 2, run_key="r", version=1)
    delta2 = {k: v - g[k] for k, v in trainable_state(worker.model).items()}
    second = decode_state(second_result.record)
    for k in second:  # the client now sends delta - h_i
        torch.testing.assert_close(second[k], delta2[k] - saved[k], atol=1e-6, rtol=1e-5)


def test_slow_client_sleeps_its_speed_factor(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCFL_NODE_DIR", str(tmp_path))
    cfg = make_cfg(**{"client-speeds": "1,3"})
    worker = Worker(cfg)
    result = worker.run_task(cfg, fresh_global(cfg), partition_id=1, num_partitions=2)
    m = result.metrics
    compute = m["client-s"] - m["sleep-s"]
    assert abs(m["sleep-s"] - 2 * compute) < 0.25 * compute + 0.05


def test_a_repeat_of_the_same_version_trains_on_other_batches(make_cfg, tmp_path, monkeypatch):
    """Prefetch can give a node two tasks of one version: same inputs must not mean same work."""
    monkeypatch.setenv("ASYNCFL_NODE_DIR", str(tmp_path))
    cfg = make_cfg(compressor="none")
    worker = Worker(cfg)
    start = fresh_global(cfg)

    def delta(repeat):
        r = worker.run_task(cfg, {k: v.clone() for k, v in start.items()}, 0, 2, version=5, repeat=repeat)
        return decode_state(r.record, reference={k: v.shape for k, v in start.items()}), r.metrics["train-loss"]

    (d0, loss0), (d0_again, loss0_again), (d1, loss1) = delta(0), delta(0), delta(1)
    for k in start:  # a task is reproducible ...
        torch.testing.assert_close(d0[k], d0_again[k])
    assert loss0 == loss0_again and loss1 != loss0  # ... and a repeat is a different one
    assert any(not torch.allclose(d0[k], d1[k]) for k in start)
