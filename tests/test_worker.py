"""One client task end to end, without Flower transport: delta, payload, shift, emulation."""

from __future__ import annotations

import pytest
import torch

from asyncfl.client.worker import Worker
from asyncfl.compressors import decode_state
from asyncfl.model import build_model, trainable_state


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
    assert m["partition-id"] == 0 and m["num-examples"] == cfg.train.local_steps * cfg.train.batch_size
    assert m["train-loss"] > 0
    # bytes: the record's one wire Array (safetensors bytes, read by the library) and its key;
    # the tensor data alone is every trainable tensor in fp32 (lossless)
    from safetensors.numpy import load

    from asyncfl.wire import KEY

    data = result.record[KEY].data
    assert m["bytes"] == len(data) + len(KEY)
    assert sum(a.nbytes for a in load(data).values()) == 4 * sum(v.numel() for v in start.values())


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


def test_with_task_s_a_task_lasts_its_factor_times_the_fixed_length(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCFL_NODE_DIR", str(tmp_path))
    cfg = make_cfg(**{"client-speeds": "1,3", "task-s": 0.8})
    worker = Worker(cfg)
    for partition in (0, 1):  # data loaded and the first step taken before the timed tasks
        worker.warm_up(cfg, partition, 2)

    def assert_lasts(m, want):
        """client-s = compute + sleep = the fixed length, or the compute when that overran
        (a loaded machine: CI shares two cores), the overrun then reported exactly."""
        if m["overrun-s"] == 0:
            assert m["sleep-s"] > 0 and want <= m["client-s"] < want + 0.1
        else:
            assert m["sleep-s"] == 0 and m["client-s"] == pytest.approx(want + m["overrun-s"], abs=0.05)

    for partition, want in ((1, 2.4), (0, 0.8)):
        assert_lasts(worker.run_task(cfg, fresh_global(cfg), partition_id=partition, num_partitions=2).metrics, want)
    # DyLU's half a task lasts half as long
    half = cfg.train.local_steps // 2
    m = worker.run_task(cfg, fresh_global(cfg), partition_id=1, num_partitions=2, local_steps=half).metrics
    assert m["steps"] == half
    assert_lasts(m, 2.4 * half / cfg.train.local_steps)


def test_a_task_longer_than_task_s_sleeps_nothing_and_reports_the_overrun(make_cfg, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ASYNCFL_NODE_DIR", str(tmp_path))
    cfg = make_cfg(**{"client-speeds": "1,3", "task-s": 1e-4})
    worker = Worker(cfg)
    with caplog.at_level("WARNING", logger="asyncfl"):
        runs = [worker.run_task(cfg, fresh_global(cfg), partition_id=1, num_partitions=2).metrics for _ in range(2)]
    for m in runs:
        assert m["sleep-s"] == 0
        # overrun = compute - 3 x 1e-4, the compute being the handler's time without a sleep
        assert m["overrun-s"] == pytest.approx(m["client-s"] - 3e-4, abs=0.02)
    warnings = [r.getMessage() for r in caplog.records if "emulated task length" in r.getMessage()]
    assert len(warnings) == 1 and "partition 1" in warnings[0] and "raise task-s" in warnings[0]


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


def test_update_log_rebuilds_the_weights_from_the_held_copy(make_cfg, tmp_path, monkeypatch):
    from asyncfl.compressors import get_compressor
    from asyncfl.protocol import UpdateLog

    monkeypatch.setenv("ASYNCFL_NODE_DIR", str(tmp_path))
    cfg = make_cfg(compressor="none")
    worker = Worker(cfg)
    x0 = fresh_global(cfg)
    worker.run_task(cfg, {k: v.clone() for k, v in x0.items()}, 0, 2, run_key="r", version=4)
    # two low-rank "client payloads" applied by the server with weights 0.5 and -0.25
    g = torch.Generator().manual_seed(1)
    payloads = [
        get_compressor("pca", rank=2, dtype="fp32").encode_state(
            {k: 1e-3 * torch.randn(v.shape, generator=g) for k, v in x0.items()}
        )
        for _ in range(2)
    ]
    coefs = [0.5, -0.25]
    expected = {k: v.double() for k, v in x0.items()}
    for c, p in zip(coefs, payloads):
        for k, u in decode_state(p).items():
            expected[k] += c * u.double()
    result = worker.run_task(cfg, None, 0, 2, run_key="r", version=6, update_log=UpdateLog(4, coefs, payloads))
    assert "need-full" not in result.metrics
    run_key, version, held = worker.held
    assert (run_key, version) == ("r", 6)
    for k in x0:  # the weights the task trained from
        torch.testing.assert_close(held[k].double(), expected[k], rtol=1e-5, atol=1e-6)
    # a log over weights this worker does not hold: no training, ask for the full weights
    for stale in (UpdateLog(4, coefs, payloads), UpdateLog(6, coefs, payloads)):
        rk = "other-run" if stale.base == 6 else "r"
        out = worker.run_task(cfg, None, 0, 2, run_key=rk, version=7, update_log=stale)
        assert out.metrics["need-full"] == 1 and len(out.record) == 0
    assert worker.held[1] == 6


@pytest.mark.usefixtures("task_identity")
def test_client_handler_answers_wire_and_plain_weights_alike(make_cfg, tmp_path, monkeypatch):
    """The ClientApp's train handler (simulation path): a task whose weights come as one wire
    Array and one whose weights come as a plain Flower record get the same reply, one wire
    Array, bit for bit."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from asyncfl.client.app import handle_train
    from asyncfl.wire import KEY, to_record
    from tests.conftest import TINY_OFFLINE

    monkeypatch.setenv("ASYNCFL_NODE_DIR", str(tmp_path))
    run_config = {**TINY_OFFLINE, "compressor": "pca", "rank": 2, "persistent-worker": "off"}
    start = fresh_global(make_cfg(**{k: v for k, v in run_config.items() if k != "persistent-worker"}))
    arrays = {k: v.numpy() for k, v in start.items()}
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=run_config,
    )

    def reply(packed: bool):
        record = to_record(arrays) if packed else ArrayRecord({k: Array(v) for k, v in arrays.items()})
        config = ConfigRecord({"version": 0, "run-key": "r", "pack": packed})
        msg = Message(RecordDict({"arrays": record, "config": config}), dst_node_id=7, message_type="train")
        msg.metadata.__dict__["_message_id"] = f"task-{packed}"
        return handle_train(msg, context).content["arrays"]

    packed, plain = reply(True), reply(False)
    assert list(packed.keys()) == [KEY] == list(plain.keys())
    assert packed[KEY].data == plain[KEY].data  # same task (seed, weights) -> the same bytes
    shapes = {k: v.shape for k, v in start.items()}
    assert decode_state(packed, reference=shapes).keys() == shapes.keys()
