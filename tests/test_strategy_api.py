"""Flower's Strategy.start contract (initial arrays, num_rounds, timeout, train_config,
evaluate_fn, Result) and the public API of `asyncfl.strategies.api`, against test_loop's
in-memory FakeGrid. Expected states are recomputed independently from the fake clients'
deltas (`client_delta`), update by update or round by round."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord

from asyncfl.config import ConfigError
from asyncfl.emulate import run_emulated
from asyncfl.strategies import AsyncStrategy, SyncFedAvg
from asyncfl.strategies.build import make_loop
from tests.conftest import TINY_OFFLINE
from tests.test_loop import X0, FakeGrid, client_delta, events, make_state

pytestmark = pytest.mark.usefixtures("task_identity")

# weights other than X0 (and of another dtype: the state's fp32 tensors must stay fp32)
INITIAL = {
    "w": torch.linspace(-1.0, 2.0, 12, dtype=torch.float64).reshape(4, 3),
    "b": torch.tensor([0.5, -0.25, 2.0], dtype=torch.float64),
}


def as_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()}


def fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float32).clone() for k, v in state.items()}


def replay_asgd(x0: dict[str, torch.Tensor], updates: list[dict], lr: float) -> list[dict[str, torch.Tensor]]:
    """The global state of every version: x_{v+1} = x_v + lr * delta(node, x_{version sent})."""
    xs = [fp32(x0)]
    for u in updates:
        base = xs[u["version"] - 1 - u["staleness"]]
        d = client_delta(u["node"], base)
        xs.append({k: xs[-1][k] + lr * d[k] for k in base})
    return xs


def replay_fedavg(x0: dict[str, torch.Tensor], nodes: list[int], rounds: int) -> list[dict[str, torch.Tensor]]:
    """The global state after each sync round: x + sum_n n * delta_n / sum_n n (num-examples = n)."""
    xs = [fp32(x0)]
    for _ in range(rounds):
        x = xs[-1]
        deltas = {n: client_delta(n, x) for n in nodes}
        xs.append({k: x[k] + sum(n * deltas[n][k] for n in nodes) / sum(nodes) for k in x})
    return xs


class Evaluations:
    """A Flower evaluate_fn that records its calls and returns the mean of `w` (and a `top1`,
    a name the app's evaluator also returns)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[str, torch.Tensor]]] = []

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        tensors = as_tensors(arrays)
        self.calls.append((server_round, tensors))
        return MetricRecord({"w-mean": float(tensors["w"].mean()), "top1": 0.25 + server_round})


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k].to(torch.float32), b[k].to(torch.float32))


# ---------------------------------------------------------------------------------------------
# initial_arrays, evaluate_fn and Result
# ---------------------------------------------------------------------------------------------
def test_async_run_starts_from_initial_arrays_and_evaluates_every_version(tmp_path):
    state = make_state(tmp_path, rule="asgd", **{"server-lr": 0.5, "max-updates": 6, "eval-every": 1})
    live_w = state.x["w"]
    evaluate = Evaluations()
    result = make_loop(state).start(
        FakeGrid({1: 1, 2: 2, 3: 3}), initial_arrays=ArrayRecord(INITIAL), evaluate_fn=evaluate
    )
    ups = events(tmp_path, "update")
    assert len(ups) == 6 and max(u["staleness"] for u in ups) >= 1
    xs = replay_asgd(INITIAL, ups, 0.5)  # from the initial arrays, not from X0
    # evaluate_fn: once per version, the first at 0 with the initial arrays themselves
    assert [r for r, _ in evaluate.calls] == list(range(7))
    assert_states_equal(evaluate.calls[0][1], INITIAL)
    for version, arrays in evaluate.calls:
        assert_states_equal(arrays, xs[version])
    # the state's tensors were written in place and kept their dtype
    assert state.x["w"] is live_w and live_w.dtype == torch.float32
    assert_states_equal(state.x, xs[-1])
    assert_states_equal(as_tensors(result.arrays), xs[-1])
    # Result: every evaluation by version, the app's metrics and evaluate_fn's together
    assert sorted(result.evaluate_metrics_serverapp) == list(range(7))
    for version, _ in evaluate.calls:
        record = result.evaluate_metrics_serverapp[version]
        assert record["w-mean"] == pytest.approx(float(xs[version]["w"].mean()))
        assert record["top1"] == 0.25 + version  # evaluate_fn's value wins on a shared name
        assert record["loss"] == pytest.approx(float(xs[version]["w"].abs().mean()))  # the app's evaluator
    # the events log carries them too
    evals = events(tmp_path, "eval")
    assert [e["version"] for e in evals] == list(range(7))
    assert [e["w-mean"] for e in evals] == pytest.approx([float(x["w"].mean()) for x in xs])
    # train metrics: one update per version (asgd), its client's loss 1/node
    assert sorted(result.train_metrics_clientapp) == list(range(1, 7))
    for u in ups:
        record = result.train_metrics_clientapp[u["version"]]
        assert record["updates"] == 1 and record["num-examples"] == u["node"]
        assert record["train-loss"] == pytest.approx(1.0 / u["node"])
    assert result.evaluate_metrics_clientapp == {}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"w": torch.zeros(2, 2), "b": torch.zeros(3)}, r"initial_arrays\['w'\] has shape \(2, 2\).*\(4, 3\)"),
        ({"w": torch.zeros(4, 3)}, r"lacks the model's trainable tensor 'b' \(shape \(3,\)\)"),
        (
            {"w": torch.zeros(4, 3), "b": torch.zeros(3), "lm_head.weight": torch.zeros(3)},
            r"key 'lm_head.weight', which is not a trainable tensor",
        ),
    ],
)
def test_mismatched_initial_arrays_raise_and_change_nothing(tmp_path, bad, message):
    state = make_state(tmp_path, rule="asgd", **{"max-updates": 2})
    grid = FakeGrid({1: 1})
    evaluate = Evaluations()
    with pytest.raises(ValueError, match=message):
        make_loop(state).start(grid, initial_arrays=ArrayRecord(bad), num_rounds=5, evaluate_fn=evaluate)
    assert_states_equal(state.x, X0)
    assert grid.sent == [] and grid.warmups == [] and evaluate.calls == []
    assert state.cfg.stop.num_rounds == 3  # the other arguments were not applied either
    assert [e["event"] for e in events(tmp_path)] == ["start"]


def test_sync_run_evaluates_each_round_with_that_rounds_weights(tmp_path):
    state = make_state(tmp_path, mode="sync", **{"num-rounds": 3, "server-lr": 1.0, "eval-every": 1})
    evaluate = Evaluations()
    result = make_loop(state).start(FakeGrid({1: 1, 2: 3}), initial_arrays=ArrayRecord(INITIAL), evaluate_fn=evaluate)
    xs = replay_fedavg(INITIAL, [1, 2], 3)
    assert [r for r, _ in evaluate.calls] == [0, 1, 2, 3]
    for rnd, arrays in evaluate.calls:
        assert_states_equal(arrays, xs[rnd])
    assert_states_equal(as_tensors(result.arrays), xs[3])
    assert sorted(result.evaluate_metrics_serverapp) == [0, 1, 2, 3]
    # train metrics per round: both nodes, the loss weighted by num-examples (1 x 1 + 2 x 1/2) / 3
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    for record in result.train_metrics_clientapp.values():
        assert record["updates"] == 2 and record["num-examples"] == 3
        assert record["train-loss"] == pytest.approx(2 / 3)
        assert "partition-id" not in record


def test_the_final_evaluation_happens_inside_start_after_the_buffer_is_flushed(tmp_path):
    # fedbuff K=2 and 3 updates: the third sits in the buffer until the end, then a last step
    state = make_state(
        tmp_path, rule="fedbuff", staleness="constant", **{"buffer-size": 2, "server-lr": 1.0, "max-updates": 3}
    )
    evaluate = Evaluations()
    result = make_loop(state).start(FakeGrid({1: 1, 2: 1}), evaluate_fn=evaluate)
    assert state.version == 2 and state.updates == 3
    assert [r for r, _ in evaluate.calls] == [0, 2]  # eval-every 1000: the start and the end
    assert_states_equal(evaluate.calls[-1][1], state.x)
    assert [e["version"] for e in events(tmp_path, "eval")] == [0, 2]
    assert sorted(result.evaluate_metrics_serverapp) == [0, 2]
    # train metrics by the version each update went into: two in the first step, one flushed
    ups = events(tmp_path, "update")
    assert {v: r["updates"] for v, r in result.train_metrics_clientapp.items()} == {1: 2, 2: 1}
    first = ups[:2]  # fake clients: loss 1/node, num-examples node
    expected = sum(u["node"] * (1.0 / u["node"]) for u in first) / sum(u["node"] for u in first)
    assert result.train_metrics_clientapp[1]["train-loss"] == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# num_rounds, timeout, train_config
# ---------------------------------------------------------------------------------------------
def test_num_rounds_stops_a_sync_run_after_that_many_rounds(tmp_path):
    state = make_state(tmp_path, mode="sync", **{"num-rounds": 5, "server-lr": 1.0})
    make_loop(state).start(FakeGrid({1: 1, 2: 2}), num_rounds=2)
    assert state.rounds == 2 and state.final_reason == "num-rounds 2 reached"
    assert_states_equal(state.x, replay_fedavg(X0, [1, 2], 2)[-1])
    assert state.recorder.config["num-rounds"] == 2  # summary.json says what ran
    assert [e["num-rounds"] for e in events(tmp_path, "start_arguments")] == [2]


def test_num_rounds_stops_an_async_run_after_num_rounds_x_nodes_updates(tmp_path):
    state = make_state(tmp_path, rule="asgd", **{"num-rounds": 5, "server-lr": 0.5})
    make_loop(state).start(FakeGrid({1: 1, 2: 2, 3: 2}), num_rounds=2)
    assert state.updates == 6 and state.final_reason == "max-updates 6 reached"
    ups = events(tmp_path, "update")
    assert_states_equal(state.x, replay_asgd(X0, ups, 0.5)[-1])
    # an explicit max-updates is the config's own stop: num_rounds does not replace it
    explicit = make_state(tmp_path / "explicit", rule="asgd", **{"max-updates": 4})
    make_loop(explicit).start(FakeGrid({1: 1, 2: 2, 3: 2}), num_rounds=5)
    assert explicit.updates == 4 and explicit.final_reason == "max-updates 4 reached"


def test_without_arguments_start_runs_the_config_unchanged(tmp_path):
    state = make_state(tmp_path, rule="asgd", **{"num-rounds": 2, "task-ttl-s": 77.0})
    grid = FakeGrid({1: 1, 2: 2})
    ttls = spy_tasks(grid)
    make_loop(state).start(grid)
    assert state.updates == 4 and not events(tmp_path, "start_arguments")
    assert {m.metadata.ttl for m in ttls} == {77.0}
    assert state.recorder.config["num-rounds"] == 2


def spy_tasks(grid: FakeGrid) -> list[Message]:
    """The training messages the strategy pushes, in push order."""
    seen: list[Message] = []
    push = grid.push_messages

    def spy(messages):
        messages = list(messages)
        seen.extend(m for m in messages if m.metadata.message_type == MessageType.TRAIN)
        return push(messages)

    grid.push_messages = spy
    return seen


def test_train_config_reaches_every_task_and_timeout_is_the_task_ttl(tmp_path, caplog):
    state = make_state(tmp_path, rule="asgd", **{"max-updates": 5})
    grid = FakeGrid({1: 1, 2: 2})
    tasks = spy_tasks(grid)
    make_loop(state).start(
        grid,
        train_config={"proximal-mu": 0.01, "tag": "exp-1"},
        timeout=42.0,
        evaluate_config=ConfigRecord({"batch": 4}),
    )
    assert "evaluate_config ignored" in caplog.text  # no client-side evaluation to send it with
    assert len(tasks) >= 5
    for m in tasks:
        config = m.content["config"]
        assert config["proximal-mu"] == 0.01 and config["tag"] == "exp-1"
        assert config["version"] >= 0 and config["run-key"] == "run"  # the loop's own entries stay
        assert m.metadata.ttl == 42.0
    assert state.cfg.server.task_ttl_s == 42.0


def test_train_config_may_not_set_the_loops_own_entries(tmp_path):
    state = make_state(tmp_path, rule="asgd", **{"max-updates": 2})
    grid = FakeGrid({1: 1})
    with pytest.raises(ValueError, match="train_config key.*version"):
        make_loop(state).start(grid, train_config={"version": 7, "lr": 0.1})
    assert grid.sent == [] and grid.warmups == []


# ---------------------------------------------------------------------------------------------
# the public API: AsyncStrategy / SyncFedAvg.from_config
# ---------------------------------------------------------------------------------------------
def fast_keys(tmp_path, name: str) -> dict:
    return {
        "results_dir": str(tmp_path),
        "run_name": name,
        "poll_interval_s": 0.001,
        "min_nodes": 1,
        "node_wait_s": 1.0,
    }


def test_async_strategy_from_config_runs_and_writes_its_results(tmp_path):
    x0_before = fp32(X0)
    strategy = AsyncStrategy.from_config(X0, 'rule="asgd" server-lr=0.5', device="cpu", **fast_keys(tmp_path, "api"))
    assert strategy.cfg.server.mode == "async" and strategy.cfg.server.rule == "asgd"
    assert strategy.s.x["w"] is not X0["w"]  # its own copy
    evaluate = Evaluations()
    result = strategy.start(
        FakeGrid({1: 1, 2: 2}), initial_arrays=ArrayRecord(INITIAL), num_rounds=3, evaluate_fn=evaluate
    )
    run = tmp_path / "api"
    ups = [
        json.loads(line)
        for line in (run / "events.jsonl").read_text().splitlines()
        if json.loads(line)["event"] == "update"
    ]
    assert len(ups) == 6  # num_rounds 3 x 2 nodes
    xs = replay_asgd(INITIAL, ups, 0.5)
    assert_states_equal(as_tensors(result.arrays), xs[-1])
    for k in X0:  # the caller's tensors untouched
        assert torch.equal(X0[k], x0_before[k])
    # no evaluator of its own: the evaluations are evaluate_fn's alone
    assert set(result.evaluate_metrics_serverapp[0]) == {"w-mean", "top1"}
    assert [r for r, _ in evaluate.calls] == [0, 2, 4, 6]  # eval-every auto: every 2 updates (2 nodes)
    summary = json.loads((run / "summary.json").read_text())
    assert summary == strategy.run_summary
    assert summary["updates_applied"] == 6 and summary["num_evals"] == 4 and summary["rule"] == "asgd"
    assert summary["stop_reason"] == "max-updates 6 reached" and summary["config"]["num-rounds"] == 3
    assert (run / "results.md").exists()
    with pytest.raises(RuntimeError, match="has run once"):
        strategy.start(FakeGrid({1: 1}))


def test_sync_fedavg_from_config_is_fedavg_rounds(tmp_path):
    strategy = SyncFedAvg.from_config(ArrayRecord(X0), server_lr=1.0, warmup=False, **fast_keys(tmp_path, "sync"))
    assert strategy.cfg.server.mode == "sync"
    result = strategy.start(FakeGrid({1: 1, 2: 3}), num_rounds=2)
    assert strategy.s.rounds == 2 and result.evaluate_metrics_serverapp == {}  # no evaluate_fn: none
    assert_states_equal(as_tensors(result.arrays), replay_fedavg(X0, [1, 2], 2)[-1])
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert strategy.run_summary is not None and strategy.run_summary["rule"] == "fedavg"


def test_from_config_rejects_unknown_keys_and_the_other_mode(tmp_path):
    with pytest.raises(ConfigError, match="unknown run config key.*buffr-size"):
        AsyncStrategy.from_config(X0, buffr_size=2, **fast_keys(tmp_path, "bad"))
    with pytest.raises(ConfigError, match="`buffer-size` must be a number >= 1"):
        AsyncStrategy.from_config(X0, "buffer-size=0", **fast_keys(tmp_path, "bad"))
    with pytest.raises(ConfigError, match='`mode` is "sync" for this strategy'):
        SyncFedAvg.from_config(X0, mode="async", **fast_keys(tmp_path, "bad"))
    strategy = AsyncStrategy.from_config(X0, 'rule="fedbuff" buffer-size=3', **fast_keys(tmp_path, "ok"))
    assert (strategy.cfg.server.rule, strategy.cfg.server.buffer_size) == ("fedbuff", 3)


# ---------------------------------------------------------------------------------------------
# the app path: server_app.run evaluates at the end once, through start()
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_updates, eval_updates", [(4, [0, 2, 4]), (5, [0, 2, 4, 5])])
def test_the_app_evaluates_the_final_model_once(tmp_path, max_updates, eval_updates):
    run_config = {
        **TINY_OFFLINE,
        "compressor": "pca",
        "rank": 2,
        "min-nodes": 2,
        "save-model": False,
        "results-dir": str(tmp_path),
        "run-name": "app",
        "rule": "asgd",
        "server-lr": 0.5,
        "max-updates": max_updates,
        "eval-every": 2,
        "local-steps": 1,
    }
    summary = run_emulated(run_config, 2, task_s=1.0, server_time=False)
    lines = [json.loads(line) for line in (tmp_path / "app" / "events.jsonl").read_text().splitlines()]
    evals = [e for e in lines if e["event"] == "eval"]
    assert [e["updates"] for e in evals] == eval_updates
    assert summary["num_evals"] == len(eval_updates)
    assert summary["final_eval_ppl"] == evals[-1]["ppl"] and summary["initial_eval_ppl"] == evals[0]["ppl"]
    assert [e["event"] for e in lines][-1] == "finish" and not any(e["event"] == "start_arguments" for e in lines)
