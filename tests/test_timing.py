"""The server's phase timer: unit behaviour, and what the loop records with it."""

from __future__ import annotations

import time

import pytest

from asyncfl.strategies.build import make_loop
from asyncfl.strategies.timing import PHASES, PhaseTimer
from tests.test_loop import FakeGrid, events, make_state


def test_phase_timer_sums_spans_and_counts_entries():
    t = PhaseTimer()
    t.add("decode", 0.25)
    t.add("decode", 0.5)
    t.add("apply", -1.0)  # a clock hiccup never subtracts
    with t.phase("eval"):
        time.sleep(0.02)
    s = t.summary()
    assert s["decode"] == {"s": 0.75, "n": 2}
    assert s["apply"] == {"s": 0.0, "n": 1}
    assert 0.02 <= s["eval"]["s"] < 1.0 and s["eval"]["n"] == 1
    assert set(s) == {"decode", "apply", "eval"}  # phases never entered are left out
    assert "decode 0.8 s (75%)" in t.describe(1.0)
    with pytest.raises(KeyError, match="unknown server phase 'decoding'"):
        t.add("decoding", 1.0)


class SlowPullGrid(FakeGrid):
    """Every pull takes `pull_s` of wall clock, as a SuperLink round trip would."""

    def __init__(self, *args, pull_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.pull_s = pull_s
        self.pulls = 0

    def pull_messages(self, message_ids):
        self.pulls += 1
        time.sleep(self.pull_s)
        return super().pull_messages(message_ids)


@pytest.mark.usefixtures("task_identity")
def test_loop_times_pulls_evaluations_and_reply_spans(tmp_path):
    state = make_state(tmp_path, rule="asgd", **{"max-updates": 6, "eval-every": 2, "warmup": False})
    evaluate = state.evaluate_fn

    def slow_eval():
        time.sleep(0.03)
        return evaluate()

    state.evaluate_fn = slow_eval
    grid = SlowPullGrid({1: 1, 2: 2}, pull_s=0.005)
    strategy = make_loop(state)
    t0 = time.perf_counter()
    strategy.start(grid)
    wall = time.perf_counter() - t0
    s = strategy.timer.summary()
    assert set(s) <= set(PHASES)
    assert s["pull"]["n"] == grid.pulls and s["pull"]["s"] >= 0.005 * grid.pulls
    n_evals = len(events(tmp_path, "eval"))  # the initial one and one every 2 updates
    assert n_evals == 4 and s["eval"]["n"] == n_evals and s["eval"]["s"] >= 0.03 * n_evals
    assert s["dispatch"]["n"] == len(grid.sent) and s["decode"]["n"] == s["apply"]["n"] == 6
    assert sum(v["s"] for v in s.values()) <= wall  # one thread: the phases never overlap
    assert state.evaluate_fn is slow_eval  # the timing wrapper is removed after the run
    for u in events(tmp_path, "update"):
        # push returned -> reply created -> decoded: both spans are real and end inside the run
        assert 0.0 <= u["node_s"] < wall and 0.0 <= u["reply_age_s"] < wall
