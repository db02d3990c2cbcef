"""Staleness weight functions s(tau) for asynchronous aggregation.

Xie, Koyejo, Gupta (2019), "Asynchronous Federated Optimization" (FedAsync), sec. 5.2,
scale an update that is ``tau`` global versions old by a weight s(tau) <= 1:

- ``constant``:   s(tau) = 1
- ``polynomial``: s(tau) = (1 + tau)^(-a),                       a >= 0
- ``hinge``:      s(tau) = 1 if tau <= b else 1 / (a (tau - b) + 1),  a, b >= 0

``tau`` is ``current global version - version the client started from`` (FLSim's
``ModelSequenceNumberTracker``), an int >= 0. All three return a value in (0, 1], so
``alpha * s(tau)`` stays a valid mixing weight for FedAsync.

Notes
-----
- Unlike FLSim's ``AsyncStalenessWeight`` we do not renormalize to 1 at the average
  staleness: the paper's formulas are used as written (s(0) = 1 for every kind).
- Unknown kinds and out-of-range parameters raise ``ValueError`` (never a silent
  fallback to ``constant``, unlike Plato).
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable

from asyncfl.choices import StalenessKind, check_choice, choices

STALENESS_KINDS = choices(StalenessKind)


def check_staleness(staleness: int) -> int:
    """Return ``staleness`` as an int; ``ValueError`` unless it is an int >= 0."""
    if isinstance(staleness, bool) or not isinstance(staleness, numbers.Integral):
        raise ValueError(f"staleness must be an int >= 0, got {staleness!r}")
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return int(staleness)


class StalenessFn(ABC):
    """A staleness weight s(tau) in (0, 1]; call it or use ``weight(tau)``."""

    kind: str = ""

    @abstractmethod
    def _raw(self, staleness: int) -> float:
        """Weight for a validated staleness."""

    def weight(self, staleness: int) -> float:
        """Return s(staleness); raises ``ValueError`` for staleness < 0 or non-int."""
        return self._raw(check_staleness(staleness))

    __call__ = weight

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class ConstantStaleness(StalenessFn):
    """s(tau) = 1: every update counts fully, however old."""

    kind = "constant"

    def _raw(self, staleness: int) -> float:
        return 1.0


class PolynomialStaleness(StalenessFn):
    """s(tau) = (1 + tau)^(-a); a = 0 is constant, larger a discounts stale more."""

    kind = "polynomial"

    def __init__(self, a: float) -> None:
        self.a = _check_param("a", a)

    def _raw(self, staleness: int) -> float:
        return float((1.0 + staleness) ** (-self.a))


class HingeStaleness(StalenessFn):
    """s(tau) = 1 up to tau = b, then 1 / (a (tau - b) + 1): hyperbolic decay past b."""

    kind = "hinge"

    def __init__(self, a: float, b: float) -> None:
        self.a = _check_param("a", a)
        self.b = _check_param("b", b)

    def _raw(self, staleness: int) -> float:
        if staleness <= self.b:
            return 1.0
        return 1.0 / (self.a * (staleness - self.b) + 1.0)


def _check_param(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"staleness `{name}` must be a number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"staleness `{name}` must be finite and >= 0, got {value}")
    return float(value)


def make_staleness_fn(kind: str, a: float, b: float) -> Callable[[int], float]:
    """Build the staleness function ``kind``.

    Parameters
    ----------
    kind : str
        One of ``STALENESS_KINDS``: ``"constant"``, ``"polynomial"``, ``"hinge"``.
    a : float
        Decay exponent (polynomial) or slope (hinge), >= 0. Validated for every kind,
        ignored by ``constant``.
    b : float
        Hinge point (hinge only), >= 0. Validated for every kind, ignored elsewhere.

    Returns
    -------
    StalenessFn
        Callable ``s(tau) -> float`` in (0, 1]; raises ``ValueError`` for ``tau < 0``.

    Raises
    ------
    ValueError
        Unknown ``kind`` (the message lists the valid kinds) or ``a``/``b`` < 0.
    """
    check_choice("`staleness`", kind, STALENESS_KINDS)
    a, b = _check_param("a", a), _check_param("b", b)
    if kind == "constant":
        return ConstantStaleness()
    if kind == "polynomial":
        return PolynomialStaleness(a)
    return HingeStaleness(a, b)


_KINDS = tuple(cls.kind for cls in (ConstantStaleness, PolynomialStaleness, HingeStaleness))
if _KINDS != STALENESS_KINDS:
    raise ImportError(f"staleness functions {_KINDS} are not asyncfl.choices.StalenessKind {STALENESS_KINDS}")
