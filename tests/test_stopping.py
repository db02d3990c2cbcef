"""The paper's bound stopping rule (sec. 3.4)."""

from __future__ import annotations

import math

import pytest

from asyncfl.stopping import BoundStopRule

# n = 1, mu = 0.5, rho_bar = 0  -> lambda = 1 - 0.5 = 0.5
# L = 1, eta = 1, C = 0, D = 0.5 -> x = 4 * 1 * 0.5 / (0.5 * 8) = 0.5
# A1 = 2.25                      -> (L/mu) A1 - x = 4.5 - 0.5 = 4
HALF = dict(n=1, mu=0.5, rho_bar=0.0, L=1.0, A1=2.25, C=0.0, D=0.5, eta=1.0)


def test_lambda_x_and_threshold_hand_computed():
    rule = BoundStopRule(**HALF)
    assert rule.lam == 0.5
    assert rule.x == 0.5
    assert rule.initial == 4.0
    # delta_g = x + 4 / 8 -> t* = log_0.5(1/8) = 3
    assert rule.threshold(1.0) == 3.0
    assert not rule.should_stop(2, 1.0)
    assert rule.should_stop(3, 1.0) and rule.should_stop(4, 1.0)


def test_threshold_with_selection_skew():
    # rho_bar = 8/3 -> 1 + 3 rho_bar / 8 = 2; n = 2, mu = 0.05 -> lambda = 0.8
    # x = 4 * 2 * (0.5 * 0.1 + 0.15) / (0.05 * 16) = 2; (L/mu) A1 - x = 40 - 2 = 38
    rule = BoundStopRule(n=2, mu=0.05, rho_bar=8 / 3, L=2.0, A1=1.0, C=0.1, D=0.15, eta=0.5)
    assert rule.lam == pytest.approx(0.8)
    assert rule.x == pytest.approx(2.0)
    delta_g = 2.0 + 38.0 * 0.8**5
    assert rule.threshold(delta_g) == pytest.approx(5.0)
    assert not rule.should_stop(4, delta_g)
    assert rule.should_stop(6, delta_g)


def test_unattainable_target_never_stops():
    rule = BoundStopRule(**HALF)
    for delta_g in (0.5, 0.1, 0.0):  # delta_g <= x: the log argument is <= 0
        assert rule.threshold(delta_g) == math.inf
        assert not rule.should_stop(10**9, delta_g)


def test_target_above_the_initial_bound_stops_at_once():
    rule = BoundStopRule(**HALF)
    assert rule.threshold(4.5) == 0.0  # argument exactly 1
    assert rule.threshold(100.0) < 0  # argument > 1
    assert rule.should_stop(0, 4.5) and rule.should_stop(0, 100.0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(n=10, mu=0.1), "lambda = 1 - n\\*mu\\*\\(1 \\+ 3\\*rho_bar/8\\) = 0 "),
        (dict(n=2, mu=0.5, rho_bar=1.0), "lambda .* = -0.375 with n=2, mu=0.5, rho_bar=1.0"),
        (dict(mu=0.0), "`mu` must be > 0"),
        (dict(L=-1.0), "`L` must be > 0"),
        (dict(A1=0.0), "`A1` must be > 0"),
        (dict(eta=0.0), "`eta` must be > 0"),
        (dict(rho_bar=-0.5), "`rho_bar` must be >= 0"),
        (dict(C=-1.0), "`C` must be >= 0"),
        (dict(D=math.nan), "`D` must be a finite number"),
        (dict(n=0), "`n` must be an int >= 1"),
        (dict(D=5.0), "\\(L/mu\\)\\*A1 = 4.5 must exceed x"),
    ],
)
def test_bad_constants_raise(changes, message):
    with pytest.raises(ValueError, match=message):
        BoundStopRule(**{**HALF, **changes})


def test_threshold_rejects_a_non_finite_delta_g():
    with pytest.raises(ValueError, match="delta_g"):
        BoundStopRule(**HALF).threshold(math.nan)
