"""Client selection: same, uniform and loss-biased policies with a seeded RNG."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from asyncfl.strategies import SELECTORS, LossBiasedSelector, make_selector
from asyncfl.strategies.selection import TimeAwareSelector

DRAWS = 40_000
TOL = 0.012  # ~5 standard deviations of a frequency near 0.25 over DRAWS draws


def frequencies(selector, idle, seed=0, draws=DRAWS, finished=None):
    rng = random.Random(seed)
    counts = Counter(selector.select(idle, finished, rng) for _ in range(draws))
    return {node: c / draws for node, c in counts.items()}


@pytest.mark.parametrize("name", SELECTORS)
def test_no_idle_node_gives_none(name):
    assert make_selector(name).select([], 3, random.Random(0)) is None


def test_same_returns_the_finished_node_when_it_is_idle():
    same = make_selector("same")
    assert all(same.select([1, 4, 7], 4, random.Random(s)) == 4 for s in range(20))


def test_same_falls_back_to_uniform_over_idle_nodes():
    # Prepare: the finished node 9 is not idle (retired or busy)
    same = make_selector("same")
    # Execute
    freq = frequencies(same, [1, 4, 7], finished=9)
    # Assert
    assert set(freq) == {1, 4, 7}
    assert all(abs(f - 1 / 3) < TOL for f in freq.values())
    assert same.select([5], None, random.Random(0)) == 5


def test_uniform_frequencies_and_reproducibility():
    uniform = make_selector("uniform")
    freq = frequencies(uniform, [3, 7, 9, 12])
    assert set(freq) == {3, 7, 9, 12}
    assert all(abs(f - 0.25) < TOL for f in freq.values())
    # same seed, any order of `idle`: the same picks
    a = [uniform.select([3, 7, 9, 12], None, r) for r in [random.Random(5)] for _ in range(50)]
    b = [uniform.select([12, 9, 7, 3], None, r) for r in [random.Random(5)] for _ in range(50)]
    assert a == b


def test_loss_biased_probabilities_hand_computed():
    # Prepare: losses 1 and 3 known, node 2 unseen -> gets the max known loss 3
    sel = LossBiasedSelector(floor=0.1, power=1.0)
    sel.observe(0, 1.0)
    sel.observe(1, 3.0)
    # Execute
    q = sel.probabilities([0, 1, 2])
    # Assert: q_i = 0.1/3 + 0.9 * L_i / 7
    assert q[0] == pytest.approx(0.1 / 3 + 0.9 / 7)
    assert q[1] == pytest.approx(0.1 / 3 + 0.9 * 3 / 7)
    assert q[2] == pytest.approx(q[1])
    assert math.fsum(q.values()) == pytest.approx(1.0)
    assert q[1] > q[0] > 0


def test_loss_biased_q_positive_for_zero_loss_and_uniform_without_information():
    sel = LossBiasedSelector(floor=0.05, power=2.0)
    assert sel.probabilities([0, 1, 2, 3]) == {n: 0.25 for n in range(4)}  # nothing known
    sel.observe(0, 0.0)
    sel.observe(1, 0.0)
    assert sel.probabilities([0, 1]) == {0: 0.5, 1: 0.5}  # all zero: uniform
    sel.observe(2, 4.0)
    q = sel.probabilities([0, 1, 2])
    assert min(q.values()) == pytest.approx(0.05 / 3)  # the floor keeps q_i > 0
    assert math.fsum(q.values()) == pytest.approx(1.0)
    assert LossBiasedSelector(floor=1.0).probabilities([0, 1]) == {0: 0.5, 1: 0.5}


def test_loss_biased_frequencies_follow_q():
    sel = LossBiasedSelector(floor=0.2)
    for node, loss in ((0, 1.0), (1, 2.0), (2, 5.0)):
        sel.observe(node, loss)
    q = sel.probabilities([0, 1, 2])
    freq = frequencies(sel, [0, 1, 2], seed=1)
    assert all(abs(freq[n] - q[n]) < TOL for n in q)
    assert freq[2] > freq[1] > freq[0]


def test_observe_smooths_and_ignores_bad_losses():
    sel = LossBiasedSelector(decay=0.5)
    assert sel.observe(0, 2.0) and sel.observe(0, 4.0)
    assert sel.losses[0] == 3.0  # 0.5 * 2 + 0.5 * 4
    assert not sel.observe(0, None)
    assert not sel.observe(0, math.nan)
    assert not sel.observe(0, -1.0)
    assert sel.losses[0] == 3.0
    sel.forget(0)
    assert sel.losses == {}
    assert not make_selector("uniform").observe(0, 1.0)


def test_power_of_choice_takes_the_highest_loss_candidate():
    sel = LossBiasedSelector(floor=0.5, candidates=3)
    for node, loss in ((0, 1.0), (1, 2.0), (2, 5.0)):
        sel.observe(node, loss)
    # d = number of idle nodes: always the argmax
    assert {sel.select([0, 1, 2], None, random.Random(s)) for s in range(30)} == {2}
    # d = 2 distinct candidates out of 3: the lowest-loss node can never win
    two = LossBiasedSelector(floor=0.5, candidates=2)
    for node, loss in ((0, 1.0), (1, 2.0), (2, 5.0)):
        two.observe(node, loss)
    picks = Counter(two.select([0, 1, 2], None, random.Random(s)) for s in range(300))
    assert picks[0] == 0 and picks[1] > 0 and picks[2] > picks[1]


def test_make_selector_errors():
    with pytest.raises(
        ValueError, match="`selection` must be one of 'same', 'uniform', 'loss-biased', 'time-aware', got 'round-robin'"
    ):
        make_selector("round-robin")
    with pytest.raises(ValueError, match="accepted arguments: floor, power, decay, candidates"):
        make_selector("loss-biased", temperature=2.0)
    with pytest.raises(ValueError, match="accepted arguments: none"):
        make_selector("uniform", floor=0.1)
    for kwargs, field in (
        (dict(floor=0.0), "floor"),
        (dict(floor=1.5), "floor"),
        (dict(power=-1.0), "power"),
        (dict(decay=1.0), "decay"),
        (dict(candidates=-1), "candidates"),
    ):
        with pytest.raises(ValueError, match=f"`{field}`"):
            make_selector("loss-biased", **kwargs)


def test_time_aware_probabilities_hand_computed():
    # floor 0.2 over 3 idle nodes; task time = the shortest of each node's last three
    sel = TimeAwareSelector(floor=0.2, power=1.0)
    for node, times in ((0, [1.5, 1.0]), (1, [2.0]), (2, [4.0, 9.0, 5.0, 4.5])):
        for seconds in times:
            assert sel.observe_time(node, seconds)
    q = sel.probabilities([2, 0, 1])
    rates = {0: 1.0, 1: 0.5, 2: 1 / 4.5}  # node 2: the shortest of its last three (9, 5, 4.5)
    for node, r in rates.items():  # floor / m + (1 - floor) * rate / sum of rates
        assert q[node] == pytest.approx(0.2 / 3 + 0.8 * r / sum(rates.values()), rel=1e-12)
    assert sum(q.values()) == pytest.approx(1.0)
    assert sel.task_time(2) == 4.5  # its last three: 9, 5, 4.5
    # a node never timed borrows the shortest known time: explored like the fastest
    assert sel.task_time(7) == 1.0
    # bad times are ignored; power 0 is uniform; nothing timed is uniform
    assert not sel.observe_time(0, -1.0) and not sel.observe_time(0, math.nan) and not sel.observe_time(0, None)
    assert set(TimeAwareSelector(power=0.0).probabilities([1, 2]).values()) == {0.5}
    flat = TimeAwareSelector()
    assert flat.probabilities([3, 4]) == {3: 0.5, 4: 0.5}


def test_time_aware_frequencies_follow_q_and_every_q_is_positive():
    sel = TimeAwareSelector(floor=0.1, power=2.0)
    for node, seconds in ((0, 1.0), (1, 10.0)):
        sel.observe_time(node, seconds)
    q = sel.probabilities([0, 1])
    assert q[1] >= 0.1 / 2 and q[0] > 0.9
    freq = frequencies(sel, [0, 1])
    for node in (0, 1):
        assert abs(freq[node] - q[node]) < TOL
    with pytest.raises(ValueError, match="`floor`"):
        make_selector("time-aware", floor=0.0)
