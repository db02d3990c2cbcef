"""Stopping rule: the paper's convergence-bound threshold.

Paper (sec. 2.3 and 3.4, eq. near "we obtain the equation for time"): with constants n
(clients), mu, rho_bar (selection skew), L (smoothness), A1 = F(w^0) - F*, C, D and the
learning rate eta,

    lambda = 1 - n mu (1 + 3 rho_bar / 8)
    x      = 4 L (eta C + D) / (mu (8 + 3 rho_bar))
    F(w^t) - F*  <=  lambda^t ((L/mu) A1 - x) + x                          (the bound)

and the stopping threshold for a target gap delta_g (the mean reconstruction error of
the compressed updates) is where the bound reaches delta_g:

    t* = log_lambda( (delta_g - x) / ((L/mu) A1 - x) ).

Reading (what we implement and why)
-----------------------------------
- Sec. 3.4 says "If t >= current round, the training process halts", sec. 2.3 says
  "once the current communication round reaches the calculated threshold t, the training
  process is terminated". We implement sec. 2.3: stop when ``version >= t*``. With
  lambda in (0, 1) and (L/mu) A1 > x the bound decreases in t, so it is <= delta_g
  exactly for t >= t*; the literal 3.4 wording would halt at round 0 whenever t* >= 0,
  i.e. before any training, and never halt once training passed t*.
- The log argument ``r = (delta_g - x) / ((L/mu) A1 - x)``:
  ``r <= 0`` (delta_g <= x, below the bound's floor) -> the bound never reaches delta_g:
  ``t* = inf``, this rule never stops training (the other limits still apply);
  ``0 < r < 1`` -> ``t* > 0``; ``r >= 1`` (delta_g at or above the initial bound) ->
  ``t* <= 0``: stop at once.
- The paper also sets mu = 1/L; we take mu as given (with mu = 1/L, lambda in (0, 1)
  needs n (1 + 3 rho_bar / 8) < L).
- The constructor requires lambda in (0, 1) and (L/mu) A1 > x; otherwise the bound does
  not decrease toward x and t* has no meaning, so it raises ``ValueError``.
- "version" is the server's count of global model updates, our asynchronous "round".
"""

from __future__ import annotations

import math


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _finite(name: str, value: float) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    _require(ok and math.isfinite(value), f"`{name}` must be a finite number, got {value!r}")
    return float(value)


class BoundStopRule:
    """Stop once the paper's bound guarantees the gap is below ``delta_g`` (sec. 3.4).

    Parameters
    ----------
    n : int
        Number of clients, >= 1.
    mu : float
        Strong-convexity-like constant, > 0 (the paper uses 1/L).
    rho_bar : float
        Selection skew rho_bar >= 0 (1 for unbiased selection).
    L : float
        Smoothness constant, > 0.
    A1 : float
        Initial gap F(w^0) - F*, > 0.
    C, D : float
        Variance/heterogeneity constants, >= 0 (paper: C in [0.03, 0.1], D in [0, 1]).
    eta : float
        Learning rate, > 0.

    Raises
    ------
    ValueError
        A constant out of range, lambda = 1 - n mu (1 + 3 rho_bar/8) outside (0, 1), or
        (L/mu) A1 <= x (the message shows the constants and the computed value).
    """

    def __init__(self, n: int, mu: float, rho_bar: float, L: float, A1: float, C: float, D: float, eta: float) -> None:
        _require(isinstance(n, int) and not isinstance(n, bool) and n >= 1, f"`n` must be an int >= 1, got {n!r}")
        for name, value in (("mu", mu), ("L", L), ("A1", A1), ("eta", eta)):
            _require(_finite(name, value) > 0, f"`{name}` must be > 0, got {value}")
        for name, value in (("rho_bar", rho_bar), ("C", C), ("D", D)):
            _require(_finite(name, value) >= 0, f"`{name}` must be >= 0, got {value}")
        self.n, self.mu, self.rho_bar, self.L = n, float(mu), float(rho_bar), float(L)
        self.A1, self.C, self.D, self.eta = float(A1), float(C), float(D), float(eta)
        self.lam = 1.0 - n * mu * (1.0 + 3.0 * rho_bar / 8.0)
        self.x = 4.0 * L * (eta * C + D) / (mu * (8.0 + 3.0 * rho_bar))
        consts = f"n={n}, mu={mu}, rho_bar={rho_bar}"
        _require(
            0.0 < self.lam < 1.0,
            f"lambda = 1 - n*mu*(1 + 3*rho_bar/8) = {self.lam:.6g} with {consts} "
            "must be in (0, 1) for the bound to converge; lower mu or n",
        )
        self.initial = L / mu * A1 - self.x  # the bound's (L/mu) A1 - x
        _require(
            self.initial > 0,
            f"(L/mu)*A1 = {L / mu * A1:.6g} must exceed x = 4L(eta*C + D)/(mu(8 + "
            f"3*rho_bar)) = {self.x:.6g} (L={L}, A1={A1}, C={C}, D={D}, "
            f"eta={eta}, {consts})",
        )

    def threshold(self, delta_g: float) -> float:
        """t* for target gap ``delta_g``: ``inf`` if never attained, <= 0 if at once."""
        ratio = (_finite("delta_g", delta_g) - self.x) / self.initial
        if ratio <= 0.0:
            return math.inf
        return math.log(ratio) / math.log(self.lam)

    def should_stop(self, version: int, delta_g: float) -> bool:
        """True once ``version >= threshold(delta_g)``."""
        return version >= self.threshold(delta_g)

    def __repr__(self) -> str:
        return f"BoundStopRule(lambda={self.lam:.6g}, x={self.x:.6g}, initial={self.initial:.6g})"
