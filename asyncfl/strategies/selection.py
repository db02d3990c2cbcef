"""Client selection: which idle node gets the next task after an update arrives.

- ``same`` (seed notes, Algorithm 1, line 4): the node that just finished gets new work
  at once; if it is not idle (retired, busy) fall back to ``uniform``.
- ``uniform`` (seed notes, Algorithm 3, line 9): ``k ~ Uni(idle nodes)``.
- ``loss-biased`` (paper, sec. 2.1): sample from probabilities q over the idle nodes
  with ``sum q = 1`` and every ``q_i > 0``::

      q_i = floor / m + (1 - floor) * L_i^power / sum_j L_j^power      (m idle nodes)

  where ``L_i`` is node i's recent training loss (an exponential moving average with
  ``decay``; 0 keeps only the latest). A node that never reported gets the largest known
  loss, so it is explored; with no losses at all (or all zero) q is uniform. ``floor``
  in (0, 1] keeps every ``q_i >= floor / m > 0``. With ``candidates = d >= 2`` it is
  power-of-choice (Cho, Wang, Joshi 2020): draw d distinct candidates by q, take the
  one with the highest loss.
- ``time-aware`` (paper, sec. 2.1: choose q to minimise the expected wall-clock time
  subject to convergence, sum q = 1, q_i > 0)::

      q_i = floor / m + (1 - floor) * t_i^-power / sum_j t_j^-power      (m idle nodes)

  where ``t_i`` is node i's measured task time (the shortest of its last three: what a task
  costs it when nothing else gets in the way). The expected time per update,
  ``sum_i q_i t_i``, falls as q moves to fast nodes; the floor is the convergence side of
  the trade (every node's data keeps a share ``>= floor / m``; with IID data the skew costs
  little). ``power = 1`` gives each node the share of tasks it would get if every node
  worked without a cap; a node never timed gets the shortest known time (explored first).
  Without a ``concurrency`` cap every idle node gets work anyway and q only orders them.

Notes
-----
- Randomness only comes from the ``random.Random`` passed to ``select``, and idle nodes
  are sorted first, so a seeded run picks the same nodes whatever order ``idle`` has.
- ``observe`` ignores a missing (None), negative or non-finite loss and returns False,
  so a bad client metric never stops the server loop.
"""

from __future__ import annotations

import inspect
import math
import numbers
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from asyncfl.choices import SelectionName, check_choice, choices

SELECTORS = choices(SelectionName)


def _nodes(idle: Sequence[int]) -> list[int]:
    return sorted(set(idle))


class Selector(ABC):
    """Picks the next node to dispatch to; ``None`` when no node is idle."""

    name: ClassVar[str]

    @abstractmethod
    def select(self, idle: Sequence[int], finished: int | None, rng: random.Random) -> int | None:
        """One node of ``idle``; ``finished`` is the node whose reply just arrived."""

    def observe(self, node: int, loss: float | None) -> bool:
        """Record ``node``'s latest training loss; unused by loss-blind selectors."""
        return False

    def observe_time(self, node: int, seconds: float | None) -> bool:
        """Record how long ``node``'s latest task took; unused by time-blind selectors."""
        return False

    def forget(self, node: int) -> None:  # noqa: B027 (an optional hook)
        """Drop what is known about a retired ``node``."""


class UniformSelector(Selector):
    """Uniform over the idle nodes (seed notes, Algorithm 3)."""

    name = "uniform"

    def select(self, idle: Sequence[int], finished: int | None, rng: random.Random) -> int | None:  # noqa: D102
        nodes = _nodes(idle)
        return rng.choice(nodes) if nodes else None


class SameSelector(UniformSelector):
    """The node that just finished, if idle; else uniform (seed notes, Algorithm 1)."""

    name = "same"

    def select(self, idle: Sequence[int], finished: int | None, rng: random.Random) -> int | None:  # noqa: D102
        if finished is not None and finished in idle:
            return finished
        return super().select(idle, finished, rng)


class LossBiasedSelector(Selector):
    """Loss-proportional probabilities with a uniform floor (paper, sec. 2.1).

    Parameters
    ----------
    floor : float, default 0.1
        Share of probability spread uniformly, in (0, 1]; 1 is uniform, smaller follows
        the losses more closely. Guarantees ``q_i >= floor / m``.
    power : float, default 1.0
        Exponent >= 0 on the losses; larger favours high-loss nodes more, 0 is uniform.
    decay : float, default 0.0
        EMA factor in [0, 1) for each node's loss; 0 keeps only the latest loss.
    candidates : int, default 0
        d >= 2 turns on power-of-choice (highest loss among d nodes drawn by q);
        0 or 1 samples straight from q.
    """

    name = "loss-biased"

    def __init__(self, floor: float = 0.1, power: float = 1.0, decay: float = 0.0, candidates: int = 0) -> None:
        self.floor = _number("floor", floor, 0.0, 1.0, open_low=True, open_high=False)
        self.power = _number("power", power, 0.0, math.inf, open_low=False, open_high=True)
        self.decay = _number("decay", decay, 0.0, 1.0, open_low=False, open_high=True)
        ok = isinstance(candidates, int) and not isinstance(candidates, bool)
        if not ok or candidates < 0:
            raise ValueError(f"`candidates` must be an int >= 0, got {candidates!r}")
        self.candidates = candidates
        self.losses: dict[int, float] = {}  # smoothed recent loss per node

    def observe(self, node: int, loss: float | None) -> bool:
        """Fold ``loss`` into ``node``'s EMA; False (ignored) if None, < 0 or inf."""
        if loss is None or not isinstance(loss, numbers.Real):
            return False
        if not math.isfinite(loss) or loss < 0:
            return False
        old = self.losses.get(node)
        new = float(loss) if old is None else self.decay * old + (1 - self.decay) * loss
        self.losses[node] = new
        return True

    def forget(self, node: int) -> None:  # noqa: D102
        self.losses.pop(node, None)

    def _loss(self, node: int) -> float:
        """Known loss, or the largest known one for a node that never reported."""
        default = max(self.losses.values(), default=1.0)
        return self.losses.get(node, default)

    def probabilities(self, idle: Sequence[int]) -> dict[int, float]:
        """Probabilities q over ``idle``: sum 1, every q_i > 0 ({} if none idle)."""
        nodes = _nodes(idle)
        if not nodes:
            return {}
        scores = [self._loss(n) ** self.power for n in nodes]
        total, m = sum(scores), len(nodes)
        if total <= 0 or not math.isfinite(total):
            return {n: 1.0 / m for n in nodes}
        return {n: self.floor / m + (1 - self.floor) * s / total for n, s in zip(nodes, scores)}

    def select(self, idle: Sequence[int], finished: int | None, rng: random.Random) -> int | None:  # noqa: D102
        q = self.probabilities(idle)
        if not q:
            return None
        if self.candidates < 2:
            return rng.choices(list(q), weights=list(q.values()))[0]
        pool, drawn = dict(q), []
        for _ in range(min(self.candidates, len(q))):  # d distinct draws by q
            node = rng.choices(list(pool), weights=list(pool.values()))[0]
            drawn.append(node)
            del pool[node]
        return max(drawn, key=self._loss)  # ties: the first drawn


class TimeAwareSelector(Selector):
    """Probabilities favouring nodes with short task times, with a uniform floor (paper,
    sec. 2.1: minimise the expected wall-clock time per update with every q_i > 0).

    Parameters
    ----------
    floor : float, default 0.2
        Share of probability spread uniformly, in (0, 1]; guarantees ``q_i >= floor / m``.
    power : float, default 1.0
        Exponent >= 0 on the task rates 1 / t_i; 0 is uniform, larger favours fast nodes more.
    """

    name = "time-aware"

    def __init__(self, floor: float = 0.2, power: float = 1.0) -> None:
        self.floor = _number("floor", floor, 0.0, 1.0, open_low=True, open_high=False)
        self.power = _number("power", power, 0.0, math.inf, open_low=False, open_high=True)
        self.times: dict[int, list[float]] = {}  # last three task times per node

    def observe_time(self, node: int, seconds: float | None) -> bool:
        """Keep ``seconds`` among node's last three task times; False (ignored) if not > 0."""
        if seconds is None or not isinstance(seconds, numbers.Real):
            return False
        if not math.isfinite(seconds) or seconds <= 0:
            return False
        self.times[node] = [*self.times.get(node, [])[-2:], float(seconds)]
        return True

    def forget(self, node: int) -> None:  # noqa: D102
        self.times.pop(node, None)

    def task_time(self, node: int) -> float | None:
        """The node's shortest recent task time, or the shortest known one if never timed."""
        own = self.times.get(node)
        if own:
            return min(own)
        return min((min(t) for t in self.times.values() if t), default=None)

    def probabilities(self, idle: Sequence[int]) -> dict[int, float]:
        """q over ``idle``: sum 1, every q_i >= floor / m ({} if none idle)."""
        nodes = _nodes(idle)
        if not nodes:
            return {}
        times = [self.task_time(n) for n in nodes]
        m = len(nodes)
        if any(t is None for t in times):  # nothing timed yet: uniform
            return {n: 1.0 / m for n in nodes}
        rates = [t**-self.power for t in times]  # type: ignore[operator]
        total = sum(rates)
        return {n: self.floor / m + (1 - self.floor) * r / total for n, r in zip(nodes, rates)}

    def select(self, idle: Sequence[int], finished: int | None, rng: random.Random) -> int | None:  # noqa: D102
        q = self.probabilities(idle)
        if not q:
            return None
        return rng.choices(list(q), weights=list(q.values()))[0]


def _number(name: str, value: Any, low: float, high: float, *, open_low: bool, open_high: bool) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and math.isfinite(value):
        ok = low < value if open_low else low <= value
        ok = ok and (value < high if open_high else value <= high)
    if not ok:
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"selection `{name}` must be in {interval}, got {value!r}")
    return float(value)


_REGISTRY: dict[str, type[Selector]] = {
    "same": SameSelector,
    "uniform": UniformSelector,
    "loss-biased": LossBiasedSelector,
    "time-aware": TimeAwareSelector,
}
if tuple(_REGISTRY) != SELECTORS or any(cls.name != name for name, cls in _REGISTRY.items()):
    raise ImportError(f"selector registry {tuple(_REGISTRY)} is not asyncfl.choices.SelectionName {SELECTORS}")


def make_selector(name: str, **kwargs: Any) -> Selector:
    """Build selector ``name`` (one of ``SELECTORS``).

    Raises ``ValueError`` for an unknown name (listing ``SELECTORS``), unknown
    arguments (listing the accepted ones) or invalid values.
    """
    check_choice("`selection`", name, SELECTORS)
    cls = _REGISTRY[name]
    sig = inspect.signature(cls)
    try:
        sig.bind(**kwargs)
    except TypeError as err:
        accepted = ", ".join(sig.parameters) or "none"
        raise ValueError(f"selection {name!r}: {err}; accepted arguments: {accepted}") from None
    return cls(**kwargs)
