"""Error feedback (asyncfl.client.state): hand-computed residuals, the running-sum invariant,
the worker's two-task round trip on disk (simulation) and in the node worker's memory
(deployment), resets that never crash, and the config rules of `error-feedback`."""

from __future__ import annotations

import logging

import pytest
import torch

from asyncfl.client import state as client_state
from asyncfl.client.state import ErrorFeedback, marker_path, residual_path
from asyncfl.client.worker import Worker, make_compressor, task_seed
from asyncfl.compressors import decode_state, get_compressor
from asyncfl.config import AppConfig, ConfigError
from asyncfl.model import build_model, trainable_state

F64 = torch.float64


def rank1(m: torch.Tensor) -> torch.Tensor:
    """Best rank-1 approximation (truncated SVD)."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return s[0] * torch.outer(u[:, 0], vh[0])


def m(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


# ---------------------------------------------------------------------------------------------
# The recursion by hand
# ---------------------------------------------------------------------------------------------
def test_rank1_residual_is_exactly_what_was_dropped_hand_computed():
    ef = ErrorFeedback()
    # step 1: diag(3, 1) -> rank 1 keeps diag(3, 0); the residual is diag(0, 1)
    sent = ef.add({"w": m([3, 0], [0, 1])})
    d1 = rank1(sent["w"])
    torch.testing.assert_close(d1, m([3, 0], [0, 0]))
    ef.keep(sent, {"w": d1})
    torch.testing.assert_close(ef.e["w"], m([0, 0], [0, 1]))
    # step 2: diag(0, 2) + e = diag(0, 3), rank 1 already: sent whole, nothing owed
    sent = ef.add({"w": m([0, 0], [0, 2])})
    torch.testing.assert_close(sent["w"], m([0, 0], [0, 3]))
    d2 = rank1(sent["w"])
    ef.keep(sent, {"w": d2})
    torch.testing.assert_close(ef.e["w"], torch.zeros(2, 2, dtype=F64))
    # step 3: [[1, 2], [2, 1]] has singular values 3 (along [1, 1]) and 1 (along [1, -1])
    sent = ef.add({"w": m([1, 2], [2, 1])})
    d3 = rank1(sent["w"])
    torch.testing.assert_close(d3, m([1.5, 1.5], [1.5, 1.5]))
    ef.keep(sent, {"w": d3})
    torch.testing.assert_close(ef.e["w"], m([-0.5, 0.5], [0.5, -0.5]))
    # the server got diag(3, 3) + [[1.5, 1.5], [1.5, 1.5]]: the dense sum minus the last residual
    dense = m([3, 0], [0, 1]) + m([0, 0], [0, 2]) + m([1, 2], [2, 1])
    torch.testing.assert_close(d1 + d2 + d3, dense - ef.e["w"])
    # without error feedback, step 1's dropped diag(0, 1) is lost for good
    plain = rank1(m([3, 0], [0, 1])) + rank1(m([0, 0], [0, 2])) + rank1(m([1, 2], [2, 1]))
    torch.testing.assert_close(dense - plain, m([-0.5, 0.5], [0.5, 0.5]))


def test_add_copies_and_keeps_fp32_and_matches_checks_names_and_shapes():
    ef = ErrorFeedback()
    r = {"w": torch.ones(2, 3)}
    assert ef.add(r)["w"] is r["w"] and ef.norm() == 0.0  # e = 0: nothing to add, no copy
    ef.keep({"w": torch.ones(2, 3, dtype=torch.bfloat16)}, {"w": torch.zeros(2, 3)})
    assert ef.e["w"].dtype == torch.float32
    out = ef.add(r)
    assert out["w"] is not r["w"] and torch.equal(r["w"], torch.ones(2, 3))  # input untouched
    assert ef.norm() == pytest.approx(6**0.5)
    assert ef.matches({"w": torch.zeros(2, 3)})
    assert not ef.matches({"w": torch.zeros(3, 2)}) and not ef.matches({"v": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="differ in tensors"):
        ef.keep({"w": torch.ones(1)}, {"v": torch.ones(1)})


@pytest.mark.parametrize("name", ["pca", "qrcp", "cur"])
@pytest.mark.parametrize("wire", ["fp16", "fp32"])
def test_decoded_running_sum_tracks_the_dense_sum_within_the_last_residual(name, wire):
    """Real rank-1 compressors on a fixed sequence of similar rank-3 deltas (as successive
    updates are): e is exactly s - decode(payload) from the wire values, and
    sum(decoded) + e_T = sum(dense); without EF the lower components are lost every step."""
    g = torch.Generator().manual_seed(7)
    u = torch.linalg.qr(torch.randn(12, 3, generator=g))[0]
    v = torch.linalg.qr(torch.randn(10, 3, generator=g))[0]
    base = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ v.T
    seq = [{"w": base + 0.1 * torch.randn(12, 10, generator=g), "b": torch.randn(10, generator=g)} for _ in range(12)]
    comp = get_compressor(name, rank=1, dtype=wire)
    ef = ErrorFeedback()
    dense = {k: torch.zeros_like(v, dtype=F64) for k, v in seq[0].items()}
    got = {k: torch.zeros_like(v, dtype=F64) for k, v in seq[0].items()}
    plain = {k: torch.zeros_like(v, dtype=F64) for k, v in seq[0].items()}
    for delta in seq:
        sent = ef.add(delta)
        decoded = decode_state(comp.encode_state(sent))  # as the server decodes it
        e = ef.keep(sent, decoded)
        for k in delta:
            torch.testing.assert_close(e[k], sent[k] - decoded[k], rtol=0, atol=0)
            dense[k] += delta[k].double()
            got[k] += decoded[k].double()
            plain[k] += decode_state(comp.encode_state({k: delta[k]}))[k].double()
        assert torch.equal(e["b"], torch.zeros(10))  # vectors travel bit-exact: nothing owed
    for k in dense:
        torch.testing.assert_close(got[k] + e[k].double(), dense[k], rtol=0, atol=1e-5)
    gap_ef = float((dense["w"] - got["w"]).norm())
    gap_plain = float((dense["w"] - plain["w"]).norm())
    assert gap_ef == pytest.approx(float(e["w"].norm()), rel=1e-5)
    assert gap_ef < 0.25 * gap_plain


# ---------------------------------------------------------------------------------------------
# Through the worker: simulation path (node-local disk)
# ---------------------------------------------------------------------------------------------
def fresh_global(cfg):
    return {k: v.clone() for k, v in trainable_state(build_model(cfg)).items()}


def delta_of(worker, start):
    return {k: v.detach() - start[k] for k, v in trainable_state(worker.model).items()}


def encode_like_the_worker(cfg, state, partition_id, version):
    """The payload a task would send for `state`, decoded: the worker's compressor, same seed."""
    comp = make_compressor(cfg, task_seed(cfg, partition_id, version))
    return decode_state(comp.encode_state(state))


def norm(state) -> float:
    return sum(float(v.double().square().sum()) for v in state.values()) ** 0.5


@pytest.fixture
def node_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCFL_NODE_DIR", str(tmp_path / "node"))
    client_state.keep_in_memory(False)
    yield tmp_path / "node"
    client_state.keep_in_memory(False)


def test_worker_carries_the_residual_across_two_tasks_on_disk(make_cfg, node_dir):
    cfg = make_cfg(local_steps=1, compressor="pca", rank=2, error_feedback="ef")
    worker, g = Worker(cfg), fresh_global(cfg)
    r1 = worker.run_task(cfg, g, 0, 2, run_key="r", version=0)
    delta1 = delta_of(worker, g)
    d1 = decode_state(r1.record)
    e1 = torch.load(residual_path("r", 0), weights_only=True)["e"]
    for k in delta1:  # what was dropped of the first delta
        torch.testing.assert_close(e1[k], delta1[k] - d1[k], rtol=0, atol=1e-7)
    assert r1.metrics["ef-reset"] == 0
    assert r1.metrics["ef-norm"] == pytest.approx(norm(e1) / norm(delta1), rel=1e-6)

    r2 = worker.run_task(cfg, g, 0, 2, run_key="r", version=1)
    delta2 = delta_of(worker, g)
    d2 = decode_state(r2.record)
    want = encode_like_the_worker(cfg, {k: delta2[k] + e1[k] for k in delta2}, 0, 1)
    alone = encode_like_the_worker(cfg, delta2, 0, 1)
    e2 = torch.load(residual_path("r", 0), weights_only=True)["e"]
    for k in delta2:
        torch.testing.assert_close(d2[k], want[k], rtol=0, atol=1e-6)  # sent C(delta2 + e1)
        # two payloads + the residual = the two dense deltas
        torch.testing.assert_close(d1[k] + d2[k] + e2[k], delta1[k] + delta2[k], rtol=0, atol=1e-6)
    assert any(not torch.allclose(d2[k], alone[k]) for k in d2)  # not what plain PCA sends
    assert r2.metrics["ef-reset"] == 0
    assert r2.metrics["ef-norm"] == pytest.approx(norm(e2) / norm(delta2), rel=1e-6)


def test_shifted_residual_first_then_error_feedback(make_cfg, node_dir):
    """With rule shifted the client sends C(delta - h_i + e); h_i and e use the same decoded D."""
    cfg = make_cfg(local_steps=1, compressor="pca", rank=2, error_feedback="ef", rule="shifted", shift_alpha=0.5)
    worker, g = Worker(cfg), fresh_global(cfg)
    d1 = decode_state(worker.run_task(cfg, g, 1, 2, run_key="s", version=0).record)
    delta1 = delta_of(worker, g)
    h1 = torch.load(node_dir / "s-p1.pt", weights_only=True)
    e1 = torch.load(residual_path("s", 1), weights_only=True)["e"]
    for k in d1:
        torch.testing.assert_close(h1[k], 0.5 * d1[k])
        torch.testing.assert_close(e1[k], delta1[k] - d1[k], rtol=0, atol=1e-7)
    d2 = decode_state(worker.run_task(cfg, g, 1, 2, run_key="s", version=1).record)
    delta2 = delta_of(worker, g)
    want = encode_like_the_worker(cfg, {k: delta2[k] - h1[k] + e1[k] for k in delta2}, 1, 1)
    h2 = torch.load(node_dir / "s-p1.pt", weights_only=True)
    for k in d2:
        torch.testing.assert_close(d2[k], want[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(h2[k], h1[k] + 0.5 * d2[k])


def test_no_state_without_error_feedback_or_with_a_lossless_compressor(make_cfg, node_dir):
    for cfg in (
        make_cfg(local_steps=1, compressor="pca", rank=2),
        make_cfg(local_steps=1, compressor="none", error_feedback="ef"),
    ):
        result = Worker(cfg).run_task(cfg, fresh_global(cfg), 0, 2, run_key="n", version=0)
        assert "ef-norm" not in result.metrics
        assert not residual_path("n", 0).exists()


def test_a_residual_not_older_than_the_task_or_unreadable_is_dropped_not_fatal(make_cfg, node_dir, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("asyncfl"), "propagate", True)  # setup_logging turns it off
    cfg = make_cfg(local_steps=1, compressor="qrcp", rank=2, error_feedback="ef")
    worker, g = Worker(cfg), fresh_global(cfg)
    worker.run_task(cfg, g, 0, 2, run_key="r", version=3)
    # the same run key again from version 0 (a new run that reused the name): e starts at 0
    again = worker.run_task(cfg, g, 0, 2, run_key="r", version=0)
    assert again.metrics["ef-reset"] == 1
    d = decode_state(again.record)
    want = encode_like_the_worker(cfg, delta_of(worker, g), 0, 0)
    for k in d:
        torch.testing.assert_close(d[k], want[k], rtol=0, atol=1e-6)
    assert "not older than this task" in caplog.text
    # a damaged file: warning, e = 0, and the task still answers
    residual_path("r", 0).write_bytes(b"not a torch file")
    broken = worker.run_task(cfg, g, 0, 2, run_key="r", version=1)
    assert broken.metrics["ef-reset"] == 1 and "unreadable" in caplog.text
    after = worker.run_task(cfg, g, 0, 2, run_key="r", version=2)  # and the file is good again
    assert after.metrics["ef-reset"] == 0


def test_memory_store_keeps_nothing_on_disk_and_reports_a_lost_residual(make_cfg, node_dir):
    """The persistent worker's store, in-process: a second process (a restart) that finds the
    marker without the residual starts from e = 0 and says so."""
    cfg = make_cfg(local_steps=1, compressor="cur", rank=2, error_feedback="ef")
    worker, g = Worker(cfg), fresh_global(cfg)
    client_state.keep_in_memory(True)
    worker.run_task(cfg, g, 1, 2, run_key="m", version=0)
    second = worker.run_task(cfg, g, 1, 2, run_key="m", version=1)
    assert second.metrics["ef-reset"] == 0
    assert not residual_path("m", 1).exists() and marker_path("m", 1).read_text().split()[:2] == ["1", "0"]
    client_state.keep_in_memory(False)  # forgets, as a new process would
    client_state.keep_in_memory(True)
    lost = worker.run_task(cfg, g, 1, 2, run_key="m", version=2)
    assert lost.metrics["ef-reset"] == 1
    d = decode_state(lost.record)
    want = encode_like_the_worker(cfg, delta_of(worker, g), 1, 2)
    for k in d:
        torch.testing.assert_close(d[k], want[k], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Through the node worker process: deployment path (memory)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def remote_ef(node_dir, shared_dir):
    from asyncfl.client.node_worker import control, socket_path
    from tests.conftest import TINY_OFFLINE

    run_config = {**TINY_OFFLINE, "compressor": "pca", "rank": 2, "error-feedback": "ef", "local-steps": 1}
    node = {"partition-id": 1, "num-partitions": 2}
    yield run_config, node
    control(socket_path(run_config, node), "shutdown")


def test_node_worker_keeps_the_residual_in_memory_across_tasks_and_restarts_from_zero(
    remote_ef, node_dir, tmp_path, monkeypatch
):
    from asyncfl.client.node_worker import control, run_remote, socket_path
    from asyncfl.wire import to_record

    run_config, node = remote_ef
    cfg = AppConfig.from_run_config(run_config)
    g = fresh_global(cfg)
    weights = to_record({k: v.numpy() for k, v in g.items()})

    def remote(version):
        out, metrics = run_remote(run_config, node, {"run-key": "d", "version": version}, [weights])
        return decode_state(out), metrics

    r0, m0 = remote(0)
    r1, m1 = remote(1)
    assert m0["ef-reset"] == 0 and m1["ef-reset"] == 0
    assert not residual_path("d", 1).exists() and marker_path("d", 1).exists()  # memory only
    # the same two tasks in-process through the disk store give the same payloads
    monkeypatch.setenv("ASYNCFL_NODE_DIR", str(tmp_path / "local"))
    local = Worker(cfg)
    l0 = decode_state(local.run_task(cfg, g, 1, 2, run_key="d", version=0).record)
    l1_result = local.run_task(cfg, g, 1, 2, run_key="d", version=1)
    l1 = decode_state(l1_result.record)
    for k in l0:
        torch.testing.assert_close(r0[k], l0[k], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(r1[k], l1[k], atol=1e-5, rtol=1e-4)
    assert m1["ef-norm"] == pytest.approx(l1_result.metrics["ef-norm"], rel=1e-3)
    # the second payload carried the first one's residual: it differs from a fresh start
    fresh = Worker(cfg)
    monkeypatch.setenv("ASYNCFL_NODE_DIR", str(tmp_path / "fresh"))
    f1 = decode_state(fresh.run_task(cfg, g, 1, 2, run_key="d", version=1).record)
    assert any(not torch.allclose(r1[k], f1[k], atol=1e-4) for k in r1)
    # a restarted worker has lost the residual: it starts from e = 0 and reports it
    monkeypatch.setenv("ASYNCFL_NODE_DIR", str(node_dir))
    control(socket_path(run_config, node), "shutdown")
    r2, m2 = remote(2)
    assert m2["ef-reset"] == 1
    monkeypatch.setenv("ASYNCFL_NODE_DIR", str(tmp_path / "fresh2"))
    f2 = decode_state(Worker(cfg).run_task(cfg, g, 1, 2, run_key="d", version=2).record)
    for k in f2:
        torch.testing.assert_close(r2[k], f2[k], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"error-feedback": "ef21"}, 'rule "asgd"'),
        ({"error-feedback": "ef21", "rule": "shifted"}, "shift-alpha 0.5"),
        ({"error-feedback": "ef21", "rule": "shifted", "shift-alpha": 1.0, "mode": "sync"}, 'mode "sync"'),
    ],
)
def test_ef21_outside_the_shifted_rule_is_a_config_error_naming_the_values(overrides, named):
    with pytest.raises(ConfigError, match='error-feedback` = "ef21"') as err:
        AppConfig.from_run_config(overrides)
    assert named in str(err.value)


def test_error_feedback_values():
    with pytest.raises(ConfigError, match="`error-feedback` must be one of 'none', 'ef', 'ef21', got \"ef22\""):
        AppConfig.from_run_config({"error-feedback": "ef22"})
    assert AppConfig.from_run_config({"error-feedback": "ef", "mode": "sync"}).compress.error_feedback == "ef"
    ok = AppConfig.from_run_config({"error-feedback": "ef21", "rule": "shifted", "shift-alpha": 1.0})
    assert ok.compress.error_feedback == "ef21"
