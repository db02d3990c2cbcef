"""The server loop against an in-memory fake Grid: ordering, faults, stale drops, resume.

The fake Grid plays the clients: each pushed task completes after a per-node number of
ticks (one tick per `pull_messages` call), so replies arrive out of order; like a SuperNode,
a node works through its messages one after another (a queued one starts when the previous
one is done). Each fake client
returns delta = c_node - 0.5 * received (a function of the weights it was sent), so the
expected global state can be recomputed independently, update by update, from the event log.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import Counter

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from asyncfl.compressors import decode_state, get_compressor
from asyncfl.config import AppConfig, ConfigError
from asyncfl.results import RunRecorder
from asyncfl.strategies.async_loop import AsyncLoop
from asyncfl.strategies.build import build_rule, build_selector, make_loop
from asyncfl.strategies.loop import WARMUP_MESSAGE_TYPE
from asyncfl.strategies.server_state import ServerState, load_checkpoint
from asyncfl.strategies.sync_loop import SyncLoop
from asyncfl.wire import arrays_of, is_wire

pytestmark = pytest.mark.usefixtures("task_identity")


X0 = {"w": torch.arange(12, dtype=torch.float32).reshape(4, 3) / 10, "b": torch.ones(3)}


def client_delta(node: int, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: float(node) - 0.5 * v for k, v in received.items()}


class FakeGrid:
    """Grid stand-in: node -> (ticks to finish, behaviour)."""

    def __init__(
        self,
        delays: dict[int, int],
        behaviour: dict[int, str] | None = None,
        equal_examples: bool = False,
        step_s: dict[int, float] | None = None,
    ):
        self.delays = delays
        self.behaviour = behaviour or {}
        self.equal_examples = equal_examples  # num-examples 1 for all (default: the node id)
        self.step_s = step_s or {}  # seconds per local step each node reports (DyLU)
        self.task_steps: list[tuple[int, int]] = []  # (node, local-steps in the task config)
        self.online = set(delays)
        self.tick = 0
        self.pending: dict[str, tuple[int, Message]] = {}
        self.sent: list[tuple[int, int]] = []  # (node, version) in push order
        self.repeats: list[int] = []  # the task config's `repeat`, in push order
        self.calls: dict[int, int] = {n: 0 for n in delays}
        self.busy_until: dict[int, int] = {n: 0 for n in delays}
        self.held: dict[int, tuple[int, dict]] = {}  # node -> (version, weights) its "worker" keeps
        self.log_tasks = 0  # tasks that came as an update log
        self.forgot: set[int] = set()
        self.max_queued: dict[int, int] = {n: 0 for n in delays}  # most messages held at once
        # records received, by ("weights" | "log", "wire" (one wire Array) | "plain" (per tensor))
        self.records: Counter[tuple[str, str]] = Counter()
        self.warmups: list[int] = []  # nodes sent a warm-up message
        self.cold_warmup = False  # True: warm-ups do not keep the weights they carry
        self.no_encode: set[int] = set()  # nodes whose replies do not report `encode-s`
        # per reply with a payload, in pull order: (node, bytes the task's arrays carried,
        # "full"/"log", nbytes of the full weights' tensors or number of log records, encode-s)
        self.replied: list[tuple[int, int, str, int, float | None]] = []

    def queued(self, node: int) -> int:
        return sum(1 for _, m in self.pending.values() if m.metadata.dst_node_id == node)

    def get_node_ids(self):
        return sorted(self.online)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            node = m.metadata.dst_node_id
            if node not in self.online:
                ids.append("")
                continue
            mid = uuid.uuid4().hex
            m.metadata.__dict__["_message_id"] = mid
            if m.metadata.message_type == WARMUP_MESSAGE_TYPE:  # answered at the next pull
                self.warmups.append(node)
                self.pending[mid] = (self.tick, m)
                ids.append(mid)
                continue
            done = max(self.tick, self.busy_until[node]) + self.delays[node]
            self.busy_until[node] = done
            self.pending[mid] = (done, m)
            self.max_queued[node] = max(self.max_queued[node], self.queued(node))
            self.sent.append((node, int(m.content["config"]["version"])))
            self.task_steps.append((node, int(m.content["config"].get("local-steps", 16))))
            self.repeats.append(int(m.content["config"]["repeat"]))
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        self.tick += 1
        out = []
        for mid in list(message_ids):
            if mid in self.pending and self.pending[mid][0] <= self.tick:
                _, msg = self.pending.pop(mid)
                out.append(self._reply(msg))
        return out

    def _reply(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if msg.metadata.message_type == WARMUP_MESSAGE_TYPE:
            metrics = {"warmup-s": 0.0}
            if "arrays" in msg.content.array_records and not self.cold_warmup:  # keep them, as the worker does
                version = int(msg.content["config"]["version"])
                self.held[node] = (
                    version,
                    {k: torch.from_numpy(a.copy()) for k, a in self._arrays(msg.content["arrays"], "weights").items()},
                )
                metrics["holds-version"] = version
            return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
        self.calls[node] += 1
        how = self.behaviour.get(node, "ok")
        if how == "crash" or (how == "crash-once" and self.calls[node] == 1):
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "boom"), reply_to=msg)
        if how == "gone":
            return Message(Error(ErrorCode.NODE_UNAVAILABLE, "heartbeat lapsed"), reply_to=msg)
        config = msg.content["config"]
        version = int(config["version"])
        # what the task carried down, counted here from the Flower arrays (buffer + key)
        carried = sum(len(a.data) + len(k) for rec in msg.content.array_records.values() for k, a in rec.items())
        if config.get("downlink", "full") == "log":  # rebuild from the weights kept last time
            if how == "amnesia-once" and node not in self.forgot:
                self.forgot.add(node)
                return Message(
                    RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord({"need-full": 1})}), reply_to=msg
                )
            base, held = self.held[node]
            assert base == int(config["base-version"])
            received = {k: v.clone() for k, v in held.items()}
            for i, c in enumerate(list(config["log-coefs"])[: int(config["log-n"])]):
                self._arrays(msg.content[f"log-{i}"], "log")
                for k, u in decode_state(msg.content[f"log-{i}"]).items():
                    received[k] += c * u
            self.log_tasks += 1
        else:
            arrays = self._arrays(msg.content["arrays"], "weights")
            received = {k: torch.from_numpy(a.copy()) for k, a in arrays.items()}
        self.held[node] = (version, {k: v.clone() for k, v in received.items()})
        delta = client_delta(node, received)
        if how == "nan":
            delta["w"][0, 0] = float("nan")
        if how == "wrong-shape":
            delta["w"] = torch.zeros(2, 2)
        record = get_compressor("none").encode_state(delta)  # one wire Array, as the ClientApp's
        if how == "bad-wire":  # the header claims more bytes for an array than it spans
            array = record["safetensors"]
            text = b'"w/data":{"dtype":"F32","shape":[4,3]'
            assert array.data.count(text) == 1
            array.data = array.data.replace(text, text.replace(b"[4,3]", b"[4,9]"))
        steps = int(config.get("local-steps", 16))
        metrics = {
            "partition-id": node,
            "train-loss": 1.0 / node,
            "num-examples": 1 if self.equal_examples else node,
            "steps": steps,
            "client-s": steps * self.step_s.get(node, 0.01),
            "bytes": record.count_bytes(),
            "dense-bytes": 60,
            "rec-error": 0.0,
            "fro-error": 0.0,
        }
        encode_s = None if node in self.no_encode else 0.001 * node + 1e-5 * self.calls[node]
        if encode_s is not None:
            metrics["encode-s"] = encode_s
        kind = config.get("downlink", "full")
        size = (
            int(config["log-n"]) if kind == "log" else sum(a.nbytes for a in arrays_of(msg.content["arrays"]).values())
        )
        self.replied.append((node, carried, kind, size, encode_s))
        metrics = MetricRecord(metrics)
        return Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=msg)

    def _arrays(self, record: ArrayRecord, what: str) -> dict:
        self.records[what, "wire" if is_wire(record) else "plain"] += 1
        return arrays_of(record)


def make_state(tmp_path, **overrides) -> ServerState:
    run_config = {
        "poll-interval-s": 0.001,
        "min-nodes": 1,
        "node-wait-s": 1.0,
        "eval-every": 1000,
        "results-dir": str(tmp_path),
        "run-name": "run",
        **overrides,
    }
    cfg = AppConfig.from_run_config(run_config)
    x = {k: v.clone() for k, v in X0.items()}
    run_dir = tmp_path / "run"
    recorder = RunRecorder(
        run_dir,
        config=cfg.to_dict(),
        mode=cfg.server.mode,
        compressor="none",
        rule=cfg.server.rule,
        num_clients=0,
        eval_split="test",
        train_split="validation",
        target_ppl=None,
        resume=bool(cfg.output.resume_from),
    )
    ckpt = load_checkpoint(cfg.output.resume_from) if cfg.output.resume_from else None
    return ServerState(
        cfg=cfg,
        x=x,
        device=torch.device("cpu"),
        rule_factory=lambda n: build_rule(cfg, n),
        selector=build_selector(cfg),
        recorder=recorder,
        evaluate_fn=lambda: {
            "loss": float(x["w"].abs().mean()),
            "ppl": math.exp(float(x["w"].abs().mean())),
            "top1": 0.0,
            "top5": 0.0,
        },
        run_key="run",
        run_dir=run_dir,
        resume=ckpt,
    )


def events(tmp_path, kind=None):
    lines = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    return [e for e in lines if kind is None or e["event"] == kind]


def asgd_step(lr: float, staleness: int, concurrency: int) -> float:
    """The default asgd step (delay-adaptive): lr, times concurrency / tau past concurrency."""
    return lr * concurrency / staleness if staleness > concurrency else lr


def replay_asgd(grid: FakeGrid, updates: list[dict], lr: float) -> dict[str, torch.Tensor]:
    """Independent recomputation: x_{v+1} = x_v + gamma * delta(node, x_{version sent}), gamma
    the delay-adaptive step with one task in flight per node of the grid."""
    xs = [{k: v.clone() for k, v in X0.items()}]
    for u in updates:
        x = xs[-1]
        base = xs[u["version"] - 1 - u["staleness"]]
        d = client_delta(u["node"], base)
        gamma = asgd_step(lr, u["staleness"], len(grid.delays))
        xs.append({k: x[k] + gamma * d[k] for k in x})
    return xs[-1]


def test_async_applies_out_of_order_replies_with_their_staleness(tmp_path):
    state = make_state(tmp_path, rule="asgd", **{"server-lr": 0.5, "max-updates": 9})
    grid = FakeGrid({1: 1, 2: 2, 3: 5})
    make_loop(state).start(grid)
    ups = events(tmp_path, "update")
    assert [u["version"] for u in ups] == list(range(1, 10))
    assert [u["node"] for u in ups[:3]] == [1, 2, 1]  # fast nodes overtake the slow one
    assert max(u["staleness"] for u in ups) >= 2  # the slow node's update is stale
    expected = replay_asgd(grid, ups, 0.5)
    for k in X0:
        torch.testing.assert_close(state.x[k], expected[k])


def test_fedasync_mixes_against_the_snapshot_the_client_started_from(tmp_path):
    state = make_state(tmp_path, rule="fedasync", alpha=0.5, staleness="constant", **{"max-updates": 6})
    grid = FakeGrid({1: 1, 3: 3})
    strategy = make_loop(state)
    strategy.start(grid)
    xs = [{k: v.clone() for k, v in X0.items()}]
    for u in events(tmp_path, "update"):
        base = xs[u["version"] - 1 - u["staleness"]]
        d = client_delta(u["node"], base)
        xs.append({k: 0.5 * xs[-1][k] + 0.5 * (base[k] + d[k]) for k in base})
    assert any(u["staleness"] > 0 for u in events(tmp_path, "update"))
    for k in X0:
        torch.testing.assert_close(state.x[k], xs[-1][k])
    assert set(strategy.snapshots) <= {t.version for t in strategy.inflight.values()}


def test_crash_is_redispatched_and_a_failing_node_is_retired(tmp_path):
    state = make_state(tmp_path, rule="asgd", **{"max-updates": 6, "max-node-failures": 2})
    grid = FakeGrid({1: 1, 2: 1, 3: 1}, {2: "crash-once", 3: "crash"})
    make_loop(state).start(grid)
    ups = events(tmp_path, "update")
    assert len(ups) == 6 and {u["node"] for u in ups} == {1, 2}
    retired = events(tmp_path, "node_retired")
    assert [r["node"] for r in retired] == [3]
    drops = events(tmp_path, "drop")
    assert sum(d["node"] == 3 for d in drops) == 2 and sum(d["node"] == 2 for d in drops) == 1


def test_node_unavailable_retires_at_once_and_the_run_goes_on(tmp_path):
    state = make_state(tmp_path, rule="asgd", **{"max-updates": 4})
    grid = FakeGrid({1: 1, 2: 2}, {2: "gone"})
    make_loop(state).start(grid)
    assert [r["node"] for r in events(tmp_path, "node_retired")] == [2]
    assert len(events(tmp_path, "update")) == 4


@pytest.mark.parametrize("how", ["nan", "wrong-shape", "bad-wire"])
def test_invalid_payload_is_rejected_and_global_model_untouched(tmp_path, how):
    state = make_state(tmp_path, rule="asgd", **{"server-lr": 1.0, "max-updates": 3})
    grid = FakeGrid({1: 1, 2: 1}, {2: how})
    make_loop(state).start(grid)
    ups = events(tmp_path, "update")
    assert {u["node"] for u in ups} == {1}
    bad = [d for d in events(tmp_path, "drop") if d["node"] == 2]
    assert bad and all("invalid payload" in d["reason"] for d in bad)
    if how == "bad-wire":  # rejected by the wire check, naming the defect
        assert all("'w/data': F32 (4, 9) needs 144 bytes" in d["reason"] for d in bad)
    expected = replay_asgd(grid, ups, 1.0)  # only node 1's updates moved the model
    for k in X0:
        torch.testing.assert_close(state.x[k], expected[k])


def test_updates_staler_than_max_staleness_are_dropped(tmp_path):
    state = make_state(tmp_path, rule="asgd", **{"max-updates": 8, "max-staleness": 1})
    grid = FakeGrid({1: 1, 2: 6})
    make_loop(state).start(grid)
    drops = [d for d in events(tmp_path, "drop") if "max-staleness" in d["reason"]]
    assert drops and all(d["node"] == 2 and d["staleness"] > 1 for d in drops)
    assert all(u["staleness"] <= 1 for u in events(tmp_path, "update"))


def test_make_loop_picks_the_loop_of_the_mode(tmp_path):
    assert isinstance(make_loop(make_state(tmp_path / "a")), AsyncLoop)
    loop = make_loop(make_state(tmp_path / "s", mode="sync", **{"num-rounds": 1}))
    assert isinstance(loop, SyncLoop) and not isinstance(loop, AsyncLoop)


def test_flower_round_hooks_run_a_fedavg_round(tmp_path):
    """configure_train -> push -> pull -> aggregate_train: one more FedAvg round after start()."""
    state = make_state(tmp_path, mode="sync", **{"num-rounds": 1, "server-lr": 1.0})
    grid = FakeGrid({1: 1, 2: 3})
    loop = make_loop(state)
    loop.start(grid)
    x = {k: v.clone() for k, v in state.x.items()}
    messages = loop.configure_train(2, None, None, grid)
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2]
    ids = grid.push_messages(messages)
    replies: list[Message] = []
    while len(replies) < len(ids):
        replies += grid.pull_messages(ids)
    assert loop.aggregate_train(2, replies) == (None, None)
    d1, d2 = client_delta(1, x), client_delta(2, x)
    for k in X0:  # weights = num-examples = node id
        torch.testing.assert_close(state.x[k], x[k] + (1 * d1[k] + 2 * d2[k]) / 3)
    assert state.version == 2 and len(events(tmp_path, "update")) == 4


def test_sync_mode_applies_the_sample_weighted_mean_per_round(tmp_path):
    state = make_state(tmp_path, mode="sync", **{"num-rounds": 3, "server-lr": 1.0})
    grid = FakeGrid({1: 1, 2: 3})
    make_loop(state).start(grid)
    x = {k: v.clone() for k, v in X0.items()}
    for _ in range(3):  # weights = num-examples = node id
        d1, d2 = client_delta(1, x), client_delta(2, x)
        x = {k: x[k] + (1 * d1[k] + 2 * d2[k]) / 3 for k in x}
    for k in X0:
        torch.testing.assert_close(state.x[k], x[k])
    assert state.rounds == 3 and state.version == 3
    assert all(u["staleness"] == 0 for u in events(tmp_path, "update"))


def test_checkpoint_then_resume_continues_the_version_count(tmp_path):
    first = make_state(tmp_path, rule="fedbuff", **{"buffer-size": 2, "max-updates": 4, "checkpoint-every": 2})
    make_loop(first).start(FakeGrid({1: 1, 2: 2}))
    ckpt = tmp_path / "run" / "checkpoint.pt"
    assert ckpt.exists()
    saved = load_checkpoint(ckpt)
    assert saved["updates"] == 4 and saved["version"] == first.version == 2
    second = make_state(tmp_path, rule="fedbuff", **{"buffer-size": 2, "max-updates": 8, "resume-from": str(ckpt)})
    make_loop(second).start(FakeGrid({1: 1, 2: 2}))
    assert second.updates == 8 and second.version == 4
    ups = events(tmp_path, "update")
    assert [u["version"] for u in ups][-4:] == [2, 3, 3, 4]
    assert len(events(tmp_path, "resume")) == 1


# ------------------------------------------------------------------------------------------
# prefetch: a node's next task queued while it still runs the current one
# ------------------------------------------------------------------------------------------
def test_prefetch_queues_one_task_ahead_and_the_model_matches_the_replay(tmp_path):
    # a huge lead time queues the next task as soon as a node's task time is known
    state = make_state(
        tmp_path, rule="asgd", prefetch="on", **{"prefetch-lead-s": 1e6, "server-lr": 0.5, "max-updates": 12}
    )
    grid = FakeGrid({1: 2, 2: 3})
    strategy = make_loop(state)
    strategy.start(grid)
    assert grid.max_queued == {1: 2, 2: 2}  # one running + one queued, never more
    ups = events(tmp_path, "update")
    assert len(ups) == 12 and strategy.prefetched > 0
    assert any(u["prefetched"] for u in ups) and not all(u["prefetched"] for u in ups)
    # a queued task carries the version it was pushed with: the replay checks its staleness
    expected = replay_asgd(grid, ups, 0.5)
    for k in X0:
        torch.testing.assert_close(state.x[k], expected[k])
    # no work is queued past max-updates: every pushed task but the unanswered ones was applied
    assert len(grid.sent) <= 12 + 2
    # a node given two tasks of one version is told so (the client then draws other batches)
    keys = [(n, v, r) for (n, v), r in zip(grid.sent, grid.repeats)]
    assert len(set(keys)) == len(keys) and max(grid.repeats) >= 1


def test_prefetch_auto_stays_off_outside_deployment(tmp_path):
    state = make_state(tmp_path, rule="asgd", **{"prefetch-lead-s": 1e6, "max-updates": 8})
    grid = FakeGrid({1: 1, 2: 2})
    strategy = make_loop(state)
    strategy.start(grid)
    assert not strategy.prefetch and strategy.prefetched == 0
    assert grid.max_queued == {1: 1, 2: 1}


def manual_prefetch(tmp_path, speeds: dict[int, float], t0: float):
    """A prefetching strategy (lead 2 s) driven by hand, on a clock set through `now[0]`."""
    state = make_state(tmp_path, rule="asgd", prefetch="on", **{"prefetch-lead-s": 2.0})
    grid = FakeGrid(speeds)
    strategy = make_loop(state)
    strategy.prefetch = True
    strategy._scan_nodes(grid, force=True)
    now = [t0]
    strategy.elapsed = lambda: now[0]
    return strategy, grid, now


def test_prefetch_waits_until_the_lead_time_before_the_expected_finish(tmp_path):
    strategy, grid, now = manual_prefetch(tmp_path, {1: 100}, t0=10.0)
    strategy._dispatch(grid, 1)
    node = strategy.nodes[1]
    node.services, node.free_at = [9.5, 8.0, 12.0], 9.0  # expect 8 s; started at 10 (pushed after the last reply)
    for t, expect in [(12.0, 1), (15.9, 1), (16.0, 2), (30.0, 2)]:  # due at 10 + 8 - 2 = 16
        now[0] = t
        strategy._prefetch(grid)
        assert node.inflight == expect, t
    assert [t.prefetched for t in strategy.inflight.values()] == [False, True]


def test_first_task_time_estimate_uses_the_handler_time_not_the_start_up():
    from asyncfl.strategies.nodes import NodeInfo, Task

    node = NodeInfo()
    first = Task(node=1, version=0, sent_at=0.0)
    node.inflight = 1
    node.replied(first, now=8.3, ok=True, handler_s=1.4)  # 8.3 s: app install, worker start, ...
    assert node.services == [1.4] and node.expected_service() == 1.4
    second = Task(node=1, version=1, sent_at=8.4)
    node.replied(second, now=13.6, ok=True, handler_s=0.7)  # later tasks: the real service time
    assert node.services == [1.4, pytest.approx(5.2)]
    crashed = Task(node=1, version=2, sent_at=13.6)
    node.replied(crashed, now=14.0, ok=False)  # a crash says nothing about task times
    assert len(node.services) == 2 and node.free_at == 14.0
    other = NodeInfo()
    other.replied(Task(node=2, version=0, sent_at=0.0), now=3.0, ok=True)  # no handler time sent
    assert other.services == [3.0]


def test_prefetch_survives_a_crash_and_a_node_leaving_with_a_queued_task(tmp_path):
    state = make_state(tmp_path, rule="asgd", prefetch="on", **{"prefetch-lead-s": 1e6, "max-updates": 6})
    grid = FakeGrid({1: 1, 2: 2}, {2: "crash-once"})
    strategy = make_loop(state)
    strategy.start(grid)
    ups = events(tmp_path, "update")
    assert len(ups) == 6 and {u["node"] for u in ups} == {1, 2}  # node 2 kept working after its crash
    assert not events(tmp_path, "node_retired")
    # node 2 leaves while it holds a running and a queued task: both are dropped with it
    before = strategy.nodes[2].inflight  # the run stopped with work still out
    strategy._dispatch(grid, 2, prefetched=True)
    assert strategy.nodes[2].inflight == before + 1 == grid.queued(2) >= 1
    grid.online.discard(2)
    strategy._scan_nodes(grid, force=True)
    assert strategy.nodes[2].retired and strategy.nodes[2].inflight == 0
    assert all(t.node != 2 for t in strategy.inflight.values())
    assert [r["node"] for r in events(tmp_path, "node_retired")] == [2]


def test_fp16_download_sends_rounded_weights_and_keeps_out_of_range_tensors_fp32(tmp_path):
    state = make_state(tmp_path, rule="asgd", **{"download-dtype": "fp16", "max-updates": 2})
    state.x["b"][0] = 1e5  # beyond fp16 range: this tensor must go as fp32
    strategy = make_loop(state)
    record = strategy._global_record()
    w, b = record["w"].numpy(), record["b"].numpy()
    assert w.dtype == np.float16 and b.dtype == np.float32
    np.testing.assert_array_equal(w, state.x["w"].numpy().astype(np.float16))
    np.testing.assert_array_equal(b, state.x["b"].numpy())
    fp32 = make_loop(make_state(tmp_path / "fp32", rule="asgd"))._global_record()
    assert record.count_bytes() < fp32.count_bytes()
    strategy.start(FakeGrid({1: 1, 2: 2}))  # clients train from the fp16 copy; the run completes
    assert len(events(tmp_path, "update")) == 2 and state.x["w"].dtype == torch.float32


# ------------------------------------------------------------------------------------------
# downlink update log: nodes rebuild the weights from the payloads they missed
# ------------------------------------------------------------------------------------------
@pytest.fixture
def log_always(monkeypatch):
    """The fake clients upload dense payloads, as big as the weights: send the log anyway."""
    import functools

    import asyncfl.strategies.loop as loop_mod

    monkeypatch.setattr(loop_mod, "DownlinkLog", functools.partial(loop_mod.DownlinkLog, max_fraction=100.0))


def weights_at_push(grid: FakeGrid, state: ServerState) -> dict[int, dict[str, torch.Tensor]]:
    """Spy on the grid: version -> the server's weights when it pushed messages of that version."""
    seen: dict[int, dict[str, torch.Tensor]] = {}
    push = grid.push_messages

    def spy(messages):
        messages = list(messages)
        for m in messages:
            version = int(m.content["config"]["version"])
            assert version == state.version  # a task always carries the current version
            seen.setdefault(version, {k: v.clone() for k, v in state.x.items()})
        return push(messages)

    grid.push_messages = spy
    return seen


@pytest.mark.parametrize("rule", ["asgd", "fedbuff"])
def test_update_log_downlink_trains_from_the_same_weights(tmp_path, log_always, rule):
    def run(path, downlink, cold=False):
        state = make_state(
            path, rule=rule, downlink=downlink, **{"server-lr": 0.5, "max-updates": 10, "buffer-size": 2}
        )
        grid = FakeGrid({1: 1, 2: 3})
        grid.cold_warmup = cold
        sent = weights_at_push(grid, state)
        strategy = make_loop(state)
        strategy.start(grid)
        return state, grid, strategy, sent

    state, grid, strategy, sent = run(tmp_path, "log")
    # the warm-up carried the weights, so every task, each node's first too, was an update log
    assert strategy.log_tasks == len(grid.sent) >= 10 and grid.log_tasks == sum(grid.calls.values())
    _, cold_grid, cold_strategy, _ = run(tmp_path / "cold", "log", cold=True)
    assert cold_strategy.log_tasks == len(cold_grid.sent) - 2  # a warm-up that kept nothing: all but the first
    # the same run with the full weights in every task: same updates, same model
    full, full_grid, _, _ = run(tmp_path / "full", "full")
    assert full_grid.log_tasks == 0 and grid.sent == full_grid.sent
    key = [(u["node"], u["version"], u["staleness"]) for u in events(tmp_path, "update")]
    assert len(key) == 10 and key == [
        (u["node"], u["version"], u["staleness"]) for u in events(tmp_path / "full", "update")
    ]
    for k in X0:
        torch.testing.assert_close(state.x[k], full.x[k])
    # each node's copy, rebuilt from the logs (past the warm-up's version 0; the newest is the
    # one the last applied update was computed from), equals the server's weights of that version
    versions = sorted(v for v, _ in grid.held.values())
    assert sorted(grid.held) == [1, 2] and versions[0] >= 1 and versions[-1] == state.version - 1
    for version, held in grid.held.values():
        for k in X0:
            torch.testing.assert_close(held[k], sent[version][k])


def test_sync_rounds_go_out_as_update_logs(tmp_path, log_always):
    state = make_state(tmp_path, mode="sync", downlink="log", **{"num-rounds": 3, "server-lr": 1.0})
    grid = FakeGrid({1: 1, 2: 3})
    make_loop(state).start(grid)
    x = {k: v.clone() for k, v in X0.items()}
    for _ in range(3):
        d1, d2 = client_delta(1, x), client_delta(2, x)
        x = {k: x[k] + (1 * d1[k] + 2 * d2[k]) / 3 for k in x}
    for k in X0:
        torch.testing.assert_close(state.x[k], x[k])
    assert grid.log_tasks == 6  # every round, both nodes: the warm-up left them the weights


def test_a_node_that_lost_its_copy_gets_the_full_weights(tmp_path, log_always):
    state = make_state(tmp_path, rule="asgd", downlink="log", **{"server-lr": 0.5, "max-updates": 8})
    grid = FakeGrid({1: 1, 2: 2}, {2: "amnesia-once"})
    make_loop(state).start(grid)
    assert [e["node"] for e in events(tmp_path, "need_full")] == [2]
    assert not events(tmp_path, "drop") and not events(tmp_path, "node_retired")
    ups = events(tmp_path, "update")
    assert len(ups) == 8 and {u["node"] for u in ups} == {1, 2}
    expected = replay_asgd(grid, ups, 0.5)
    for k in X0:
        torch.testing.assert_close(state.x[k], expected[k])


@pytest.mark.parametrize("mode, downlink", [("async", "full"), ("async", "log"), ("sync", "full"), ("sync", "log")])
def test_update_events_carry_the_encode_time_and_the_bytes_sent_down(tmp_path, log_always, mode, downlink):
    limit = {"max-updates": 10} if mode == "async" else {"num-rounds": 3}
    state = make_state(tmp_path, mode=mode, rule="asgd", downlink=downlink, pack="off", **{"server-lr": 0.5, **limit})
    grid = FakeGrid({1: 1, 2: 3, 3: 2})
    grid.no_encode = {3}  # node 3 does not report `encode-s`
    grid.cold_warmup = True  # the first tasks carry the full weights, later ones (log) a log
    make_loop(state).start(grid)
    ups = events(tmp_path, "update")
    assert len(ups) >= 9 and len(grid.replied) >= len(ups)
    (upload,) = {u["bytes"] for u in ups}  # the fake clients' dense payloads: all one size
    kinds = set()
    # replies are applied (and logged) in the order they were pulled; none is dropped here
    for u, (node, carried, kind, size, enc) in zip(ups, grid.replied):
        assert (u["node"], u["bytes_down"], u["encode_s"]) == (node, carried, enc)
        assert (enc is None) == (node == 3)
        if kind == "full":  # the tensors' bytes plus, per array, its npy header and key name
            assert size < u["bytes_down"] <= size + 256 * len(X0)
            assert size == sum(v.numel() * 4 for v in X0.values())  # fp32 download
        else:  # each log record is a payload as it was uploaded, re-sent unchanged
            assert u["bytes_down"] == size * upload and size >= 1
        kinds.add(kind)
    assert kinds == ({"full", "log"} if downlink == "log" else {"full"})
    summary = state.recorder.summary()
    assert summary["bytes_down_total"] == sum(u["bytes_down"] for u in ups)
    encs = [u["encode_s"] for u in ups if u["encode_s"] is not None]
    assert summary["mean_encode_s"] == pytest.approx(sum(encs) / len(encs))


def test_update_log_needs_a_linear_rule():
    from asyncfl.config import ConfigError

    with pytest.raises(ConfigError, match="downlink.*fedasync"):
        AppConfig.from_run_config({"downlink": "log", "rule": "fedasync"})
    assert AppConfig.from_run_config({"downlink": "log", "mode": "sync", "rule": "fedasync"}).compress.downlink == "log"


# ------------------------------------------------------------------------------------------
# pack: the global weights as one wire Array (payloads are one wire Array either way)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("downlink", ["full", "log"])
def test_packed_messages_train_the_same_model(tmp_path, log_always, downlink):
    def run(pack_mode):
        state = make_state(
            tmp_path / pack_mode,
            rule="asgd",
            pack=pack_mode,
            downlink=downlink,
            **{"server-lr": 0.5, "max-updates": 10},
        )
        grid = FakeGrid({1: 1, 2: 3})
        make_loop(state).start(grid)
        return state, grid

    packed, grid = run("on")
    plain, plain_grid = run("off")
    # the weights (each full-weights task, and the warm-up's with the update log) came as one
    # wire Array with pack on, as one Flower Array per tensor with it off
    assert grid.records["weights", "wire"] >= 1 and grid.records["weights", "plain"] == 0
    assert plain_grid.records["weights", "plain"] >= 1 and plain_grid.records["weights", "wire"] == 0
    for g in (grid, plain_grid):  # an update log re-sends the payloads as the clients sent them
        assert g.records["log", "plain"] == 0
        assert downlink == "full" or (g.log_tasks >= 6 and g.records["log", "wire"] >= g.log_tasks)
    ups = events(tmp_path / "on", "update")
    assert [u["node"] for u in ups] == [u["node"] for u in events(tmp_path / "off", "update")]
    expected = replay_asgd(grid, ups, 0.5)
    for k in X0:
        torch.testing.assert_close(packed.x[k], expected[k])
        torch.testing.assert_close(packed.x[k], plain.x[k], rtol=0, atol=0)


def test_pack_auto_is_off_outside_deployment(tmp_path):
    state = make_state(tmp_path, rule="asgd", **{"max-updates": 2})
    strategy = make_loop(state)
    grid = FakeGrid({1: 1})
    strategy.start(grid)
    assert not strategy.pack and grid.records["weights", "wire"] == 0


def test_a_node_on_its_first_task_borrows_the_peers_first_task_time(tmp_path):
    """Node 2's first task runs while node 1 has finished its own first task (6 s of handler
    time): node 2's second task is queued on that estimate, not only at node 2's first reply."""
    strategy, grid, now = manual_prefetch(tmp_path, {1: 100, 2: 100}, t0=0.0)
    strategy._dispatch(grid, 1)
    now[0] = 4.0
    strategy._dispatch(grid, 2)  # node 2's first task could start at t=4
    node1, node2 = strategy.nodes[1], strategy.nodes[2]
    now[0] = 5.5
    strategy._prefetch(grid)
    assert node2.inflight == 1  # nobody has a task time yet: nothing to go on
    first1 = next(t for t in strategy.inflight.values() if t.node == 1)
    now[0] = 6.5
    node1.replied(first1, now=6.5, ok=True, handler_s=6.0)  # node 1's first task: 6 s of handler
    assert node1.first_service == 6.0
    for t, expect in [(7.9, 1), (8.0, 2), (9.0, 2)]:  # node 2 due at 4 + 6 - 2 = 8
        now[0] = t
        strategy._prefetch(grid)
        assert node2.inflight == expect, t
    # a node's own history wins over the peers' once it has one
    node1.services = [20.0]
    assert not node1.next_task_due(first1, now=10.0, lead=2.0, peer_first=0.5)


def test_error_replies_of_a_dead_node_s_running_and_queued_task_in_one_pull(tmp_path):
    """A node dies holding a running and a queued task: both error replies come in one pull.
    The first retires the node and drops the queued task; its reply is then skipped, not a
    KeyError that ends the ServerApp."""
    strategy, grid, now = manual_prefetch(tmp_path, {1: 1, 2: 1}, t0=0.0)
    grid.behaviour[2] = "gone"
    strategy.s.prepare(2)  # the rule (start() builds it once the nodes are there)
    strategy._dispatch(grid, 2)
    strategy._dispatch(grid, 2, prefetched=True)
    assert grid.queued(2) == 2 and strategy.nodes[2].inflight == 2
    grid.tick = 10  # both ready: the next pull returns them together
    handled = [strategy._handle_async_reply(msg) for msg in strategy._pull(grid)]
    assert handled == [None]  # one reply handled (node retired), the other one skipped
    assert strategy.nodes[2].retired and strategy.nodes[2].inflight == 0
    assert all(t.node != 2 for t in strategy.inflight.values())
    assert [r["node"] for r in events(tmp_path, "node_retired")] == [2]


# ---------------------------------------------------------------------------------------------
# stop conditions, warm-up, FedBuff vs FedAvg, DyLU
# ---------------------------------------------------------------------------------------------
def test_a_time_budget_not_num_rounds_stops_an_async_run(tmp_path):
    # num-rounds 1 with 2 nodes would stop after 2 updates; with a budget set it does not apply
    state = make_state(tmp_path, rule="asgd", **{"num-rounds": 1, "time-budget-s": 0.4})
    grid = FakeGrid({1: 1, 2: 2})
    make_loop(state).start(grid)
    assert len(events(tmp_path, "update")) > 2
    assert state.final_reason == "time-budget-s 0.4 reached"
    # without a budget or target the old rule holds: max-updates = num-rounds x nodes
    plain = make_state(tmp_path / "b", rule="asgd", **{"num-rounds": 1})
    make_loop(plain).start(FakeGrid({1: 1, 2: 2}))
    assert plain.updates == 2 and plain.final_reason == "max-updates 2 reached"


def test_a_time_budget_stops_a_sync_run_mid_round_with_the_last_round_s_model(tmp_path):
    """A budget is a budget in sync mode too: the round in flight when it ends is dropped, the
    model is the last completed round's, and the final figures describe that model."""
    state = make_state(
        tmp_path,
        mode="sync",
        warmup=False,
        **{"num-rounds": 50, "time-budget-s": 0.5, "eval-every": 1, "server-lr": 1.0},
    )
    grid = FakeGrid({1: 1, 2: 1})
    real_push = grid.push_messages

    def push(messages):  # round 1 finishes; node 2's tasks after it never do
        ids = real_push(messages)
        if len(grid.sent) >= 2:  # both tasks of round 1 are out
            grid.delays[2] = 10**9
        return ids

    grid.push_messages = push
    real_pull = grid.pull_messages

    def pull(ids):  # a loop that waits for the round would poll on: fail instead of hanging
        assert grid.tick < 20_000, "the sync loop kept waiting for the round past its budget"
        return real_pull(ids)

    grid.pull_messages = pull
    t0 = time.monotonic()
    make_loop(state).start(grid)
    took = time.monotonic() - t0
    assert state.final_reason == "time-budget-s 0.5 reached (round 2 dropped)"
    assert state.rounds == 1 and state.updates == 2 and len(grid.sent) == 4
    d1, d2 = client_delta(1, X0), client_delta(2, X0)
    for k in X0:  # x0 + the sample-weighted mean of round 1 (weights = node ids)
        torch.testing.assert_close(state.x[k], X0[k] + (1 * d1[k] + 2 * d2[k]) / 3)
    evals = events(tmp_path, "eval")
    assert [e["round"] for e in evals] == [0, 1] and evals[-1]["version"] == 1
    assert took < 10  # it did not wait for the round (whose task would never end)


def test_a_target_not_num_rounds_stops_a_sync_run(tmp_path):
    # num-rounds 1 would stop after one round; the target (reached after round 4) stops it instead
    state = make_state(tmp_path, mode="sync", **{"num-rounds": 1, "eval-every": 1, "target-ppl": 20.0})
    state.evaluate_fn = lambda: {"loss": 1.0, "ppl": 100.0 / (1 + state.rounds), "top1": 0.0, "top5": 0.0}
    make_loop(state).start(FakeGrid({1: 1, 2: 1}))
    assert state.rounds == 4 and state.final_reason == "target-ppl 20 reached (ppl 20.00)"


def test_evaluations_run_after_the_next_task_is_out(tmp_path):
    """An evaluation never delays a task: async evaluates after the node that replied has its
    next task, sync evaluates round r while round r + 1 trains. Each evaluation records how
    many tasks had been pushed by then and what it evaluated."""
    state = make_state(tmp_path, rule="asgd", warmup=False, **{"max-updates": 6, "eval-every": 1})
    grid = FakeGrid({1: 1, 2: 2})
    seen: list[tuple[int, int]] = []  # (updates applied, tasks pushed) at each evaluation
    state.evaluate_fn = lambda: seen.append((state.updates, len(grid.sent))) or {"loss": 1.0, "ppl": 2.0}
    make_loop(state).start(grid)
    assert seen[0] == (0, 0)  # the initial evaluation, before any task
    # after update k the replying node already holds its next task: 2 first tasks + k
    assert seen[1:] == [(k, 2 + k) for k in range(1, 7)]
    sync = make_state(tmp_path / "sync", mode="sync", warmup=False, **{"num-rounds": 3, "eval-every": 1})
    sgrid = FakeGrid({1: 1, 2: 2})
    rounds_seen: list[tuple[int, int]] = []  # (rounds done, tasks pushed) at each evaluation
    sync.evaluate_fn = lambda: rounds_seen.append((sync.rounds, len(sgrid.sent))) or {"loss": 1.0, "ppl": 2.0}
    make_loop(sync).start(sgrid)
    # round r is evaluated once round r + 1 is out; the last round by the final evaluation
    assert rounds_seen == [(0, 0), (1, 4), (2, 6), (3, 6)]
    assert [e["round"] for e in events(tmp_path / "sync", "eval")] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("nodes", "extra", "at"),
    [
        ({1: 1, 2: 2}, {}, [0, 2, 4, 6]),  # auto: every 2 updates (2 nodes working)
        ({1: 1, 2: 2, 3: 1}, {}, [0, 3, 6]),  # auto: every 3
        ({1: 1, 2: 2, 3: 1}, {"concurrency": 2}, [0, 2, 4, 6]),  # auto: the 2 task slots
        ({1: 1, 2: 2}, {"eval-every": 4}, [0, 4, 6]),  # explicit; the end is always evaluated
        ({1: 1, 2: 2}, {"eval-every": 1}, [0, 1, 2, 3, 4, 5, 6]),
    ],
)
def test_eval_every_auto_evaluates_once_per_task_slot_worth_of_updates(tmp_path, nodes, extra, at):
    """`eval-every` 0 (the default) evaluates async once per C updates, C the task slots, as
    often per update as sync evaluates per round; an explicit N is every N updates."""
    state = make_state(tmp_path, rule="asgd", warmup=False, **{"max-updates": 6, "eval-every": 0, **extra})
    seen: list[int] = []
    state.evaluate_fn = lambda: seen.append(state.updates) or {"loss": 1.0, "ppl": 2.0}
    make_loop(state).start(FakeGrid(nodes))
    assert seen == at
    sync = make_state(tmp_path / "sync", mode="sync", warmup=False, **{"num-rounds": 3, "eval-every": 0})
    rounds: list[int] = []
    sync.evaluate_fn = lambda: rounds.append(sync.rounds) or {"loss": 1.0, "ppl": 2.0}
    make_loop(sync).start(FakeGrid(nodes))
    assert rounds == [0, 1, 2, 3]  # auto in sync: every round


def test_warm_up_reaches_every_node_first_and_restarts_the_run_clock(tmp_path):
    state = make_state(tmp_path, rule="asgd", **{"max-updates": 4})
    grid = FakeGrid({1: 1, 2: 2, 3: 1})
    strategy = make_loop(state)
    clock = [100.0]
    state.recorder._clock = lambda: clock[0]
    state.recorder._t0 = 100.0
    real_pull = grid.pull_messages

    def slow_pull(ids):  # the warm-up answers take 7 s of the recorder's clock
        if any(m.metadata.message_type == WARMUP_MESSAGE_TYPE for _, m in grid.pending.values()):
            clock[0] += 7.0
        return real_pull(ids)

    grid.pull_messages = slow_pull
    strategy.start(grid)
    assert sorted(grid.warmups) == [1, 2, 3] and grid.sent  # all warmed before any task
    evs = events(tmp_path)
    kinds = [e["event"] for e in evs]
    assert kinds.index("warmup") < kinds.index("update")
    warm = next(e for e in evs if e["event"] == "warmup")
    assert warm["nodes"] == 3 and warm["t"] == 0.0  # the clock restarted after it
    assert all(e["t"] < 7.0 for e in evs if e["event"] in ("update", "eval"))
    assert strategy.warmup_s is not None
    off = make_state(tmp_path / "off", rule="asgd", warmup=False, **{"max-updates": 2})
    grid_off = FakeGrid({1: 1})
    make_loop(off).start(grid_off)
    assert grid_off.warmups == [] and not events(tmp_path / "off", "warmup")


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fedbuff_with_k_all_clients_at_staleness_0_equals_fedavg(tmp_path, momentum):
    nodes = {1: 1, 2: 1, 3: 1}
    fb = make_state(
        tmp_path / "fb",
        rule="fedbuff",
        staleness="constant",
        **{"buffer-size": 3, "server-lr": 0.8, "server-momentum": momentum, "max-updates": 3},
    )
    grid = FakeGrid(nodes, equal_examples=True)
    make_loop(fb).start(grid)
    assert [u["staleness"] for u in events(tmp_path / "fb", "update")] == [0, 0, 0]
    avg = make_state(tmp_path / "avg", mode="sync", **{"num-rounds": 1, "server-lr": 0.8, "server-momentum": momentum})
    make_loop(avg).start(FakeGrid(nodes, equal_examples=True))
    for k in X0:
        torch.testing.assert_close(fb.x[k], avg.x[k], rtol=1e-6, atol=1e-7)
    assert not torch.equal(fb.x["w"], X0["w"])


def replay_weighted(updates: list[dict]) -> dict[str, torch.Tensor]:
    """x_{v+1} = x_v + w_v * delta(node, x_{version sent}), with each update's logged weight."""
    xs = [{k: v.clone() for k, v in X0.items()}]
    for u in updates:
        base = xs[u["version"] - 1 - u["staleness"]]
        d = client_delta(u["node"], base)
        xs.append({k: xs[-1][k] + u["weight"] * d[k] for k in X0})
    return xs[-1]


def test_balance_evens_out_each_nodes_share_of_the_steps(tmp_path):
    def run(path, balance):
        state = make_state(
            path, rule="asgd", balance=balance, **{"server-lr": 0.2, "max-updates": 24, "delay-adaptive": False}
        )
        grid = FakeGrid({1: 1, 2: 2, 3: 4})
        clock, pull = [0.0], grid.pull_messages

        def ticking_pull(ids):  # one second of run clock per look at the grid: task times = ticks
            clock[0] += 1.0
            return pull(ids)

        grid.pull_messages = ticking_pull
        state.recorder._clock = lambda: clock[0]
        make_loop(state).start(grid)
        return state, events(path, "update")

    state, ups = run(tmp_path / "on", True)
    # what was applied is what the events say: the state replays from the logged weights
    expected = replay_weighted(ups)
    for k in X0:
        torch.testing.assert_close(state.x[k], expected[k])
    # once every node has a task time, the slower a node the larger its step
    measured = next(i for i, u in enumerate(ups) if u["node"] == 3) + 1
    late = {u["node"]: u["weight"] for u in ups[measured:]}
    assert late[1] < 0.2 < late[3] and late[1] < late[2] < late[3]
    # each node's summed step is far more even than without balancing
    _, plain = run(tmp_path / "off", False)
    assert all(u["weight"] == 0.2 for u in plain)

    def spread(updates):
        total = {n: sum(u["weight"] for u in updates if u["node"] == n) for n in (1, 2, 3)}
        return max(total.values()) / min(total.values())

    assert spread(plain) > 3.0 and spread(ups) < 0.6 * spread(plain)


def test_balance_is_only_for_asgd():
    with pytest.raises(ConfigError, match='`balance`.*rule "asgd".*rule "fedbuff"'):
        AppConfig.from_run_config({"rule": "fedbuff", "balance": True})
    with pytest.raises(ConfigError, match='`balance`.*mode "sync"'):
        AppConfig.from_run_config({"mode": "sync", "balance": True})


def test_dylu_gives_each_node_steps_in_proportion_to_its_speed(tmp_path):
    state = make_state(tmp_path, rule="asgd", dylu=True, **{"local-steps": 16, "max-updates": 12})
    grid = FakeGrid({1: 1, 2: 2, 3: 4}, step_s={1: 0.1, 2: 0.2, 3: 0.4})
    make_loop(state).start(grid)
    steps = grid.task_steps
    # before a node's first reply it gets the full 16; afterwards 16 x fastest / its own
    assert all(s == 16 for n, s in steps[:3])
    later = {n: s for n, s in steps[3:]}
    assert later == {1: 16, 2: 8, 3: 4}
