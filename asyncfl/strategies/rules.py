"""Server update rules: how one decoded client delta changes the global model.

``x`` is the global state (``dict[str, Tensor]``, fp32, any device); an *update* is
the decoded client delta ``x_client - x_started_from`` (same keys and shapes). The
pseudo-gradient is ``g = -delta``, so an SGD step ``x - gamma g`` is
``x + gamma delta``. ``tau`` (staleness) counts the global versions applied since the
client got its copy.

- ``fedasync`` (Xie et al. 2019): ``x <- (1 - a) x + a (base + delta)``,
  ``a = alpha s(tau)``.
- ``fedbuff`` (Nguyen et al. 2022, Alg. 1): every K arrivals
  ``x <- x + server_lr * (1/K) * sum_i s(tau_i) delta_i``; ``flush`` applies a partial
  buffer.
- ``asgd`` (seed notes, Alg. 1): ``x <- x + gamma_t delta``; delay-adaptive
  ``gamma_t = gamma * concurrency / tau`` when tau > concurrency, else gamma
  (Koloskova et al. 2022; Mishchenko et al. 2022).
- ``shifted`` (seed notes, Alg. 2): the client sends ``D = C(delta - h_i)``; the server
  steps ``x <- x + gamma (h + D)`` with ``h = (1/n) sum_i h_i`` *before* updating the
  shifts ``h_i += alpha D``, ``h += (alpha/n) D``. ``asyncfl.client.state.ClientShift`` is
  the client half.
- ``saga`` (seed notes, Alg. 5): latest update ``u_i`` per node;
  ``x <- x + gamma mean_i u_i``.
- ``fedavg`` (sync mode): ``x <- x + server_lr * step(mean_i w_i delta_i)``, one step per
  round, the sample-weighted mean of the round's updates (``fedavg_mean``).
- Server momentum (``ServerMomentum``, fedbuff / asgd / fedavg): ``m <- beta m + g``, step
  ``g + beta m`` (Nesterov, as DiLoCo's outer optimizer: Douillard et al. 2023) or ``m``
  (heavy ball: FedAvgM, Hsu et al. 2019), where ``g`` is what the rule would step with.
  On asgd it acts on every stale update, which Liu et al. 2024 (arXiv 2401.09135) show to
  hurt; ``dn`` (``asyncfl.strategies.adaptive``) is their remedy.

Notes
-----
- Rules mutate ``x`` in place with ``torch._foreach_*`` (one fused launch per op) and
  never mutate ``update``/``base``.
- Everything is validated (keys, shapes, staleness) before ``x`` or the rule state is
  touched: a bad payload raises ``ValueError`` naming the tensor and changes nothing.
- ``state_dict`` returns the live state tensors (no copy); ``load_state_dict`` copies.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from asyncfl.strategies.staleness import ConstantStaleness, check_staleness
from asyncfl.tensors import State, Tensors
from asyncfl.tensors import aligned as _aligned
from asyncfl.tensors import check_real as _real
from asyncfl.tensors import copy_state as _copy

StalenessFn = Callable[[int], float]


@dataclass(frozen=True)
class Applied:
    """Outcome of one ``apply``/``flush``."""

    weight: float  # effective coefficient on this update (0.0 when nothing was applied)
    stepped: bool  # whether x changed in this call


def _lazy(table: State | None, x: State, what: str) -> tuple[State, list[Tensor]]:
    """A zero-initialised state table aligned with ``x`` (allocated on first use)."""
    if table is None:
        table = {k: torch.zeros_like(v) for k, v in x.items()}
    ts = _aligned(x, table, what)
    return dict(zip(x, ts)), ts


def _count(name: str, value: Any) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    return int(value)


def _lr(value: Any) -> float:
    return _real("server_lr", value, 0.0, math.inf, open_low=True)


def _momentum(value: Any) -> float:
    beta = _real("momentum", value, 0.0, 1.0, open_low=False)
    if beta >= 1.0:
        raise ValueError(f"`momentum` must be in [0.0, 1.0), got {value!r}")
    return beta


class ServerMomentum:
    """The server's step with optional momentum: ``x <- x + lr * step(g)``.

    ``momentum`` beta in [0, 1): 0 is plain ``x += lr g``; otherwise ``m <- beta m + g`` and
    ``step = g + beta m`` (``nesterov``) or ``m`` (heavy ball). ``g`` is a direction to
    *add* (a mean client delta), so this is SGD on the pseudo-gradient ``-g``.
    """

    def __init__(self, momentum: float = 0.0, nesterov: bool = True) -> None:
        self.beta = _momentum(momentum)
        self.nesterov = bool(nesterov)
        self.m: State | None = None

    def step(self, x: State, g: Sequence[Tensor], lr: float) -> None:
        xs = list(x.values())
        with torch.no_grad():
            if self.beta == 0.0:
                torch._foreach_add_(xs, list(g), alpha=lr)
                return
            self.m, ms = _lazy(self.m, x, "server momentum")
            torch._foreach_mul_(ms, self.beta)
            torch._foreach_add_(ms, list(g))
            if self.nesterov:
                torch._foreach_add_(xs, list(g), alpha=lr)
                torch._foreach_add_(xs, ms, alpha=lr * self.beta)
            else:
                torch._foreach_add_(xs, ms, alpha=lr)

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        self.m = _copy(d.get("m"))


class Rule(ABC):
    """Base class: one ``apply`` step; buffered/stateful rules override the rest."""

    name: ClassVar[str]
    needs_base: ClassVar[bool] = False  # True: the loop passes the client's start state

    @abstractmethod
    def apply(
        self,
        x: State,
        update: Tensors,
        *,
        staleness: int,
        node: int,
        base: Tensors | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> Applied:
        """Fold ``update`` from ``node`` into ``x`` in place; ValueError if invalid.
        ``info``: the client's reply metrics, for rules whose clients send different kinds
        of update (``page``)."""

    def flush(self, x: State) -> Applied:
        """Apply whatever is still buffered (end of training); no-op by default."""
        return Applied(0.0, False)

    def forget(self, node: int) -> None:  # noqa: B027 (an optional hook)
        """Drop the per-node state of a retired ``node``; no-op by default."""

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state: tensors and plain Python values only."""
        return {}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:  # noqa: B027 (an optional hook)
        """Restore ``state_dict()`` output."""


class FedAsync(Rule):
    """FedAsync: ``x <- (1 - a) x + a (base + update)`` with ``a = alpha s(tau)``.

    ``alpha`` in (0, 1] (larger: further toward each client); ``staleness_fn`` s(tau),
    default constant. ``base=None`` means base == x (exact at tau = 0), so
    ``x += a update``.
    """

    name = "fedasync"
    needs_base = True

    def __init__(self, alpha: float, staleness_fn: StalenessFn | None = None) -> None:
        self.alpha = _real("alpha", alpha, 0.0, 1.0, open_low=True)
        self.staleness_fn = staleness_fn or ConstantStaleness()

    def apply(
        self,
        x: State,
        update: Tensors,
        *,
        staleness: int,
        node: int,
        base: Tensors | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> Applied:  # noqa: D102
        a = self.alpha * self.staleness_fn(check_staleness(staleness))
        us = _aligned(x, update, "update")
        bs = None if base is None else _aligned(x, base, "base")
        xs = list(x.values())
        with torch.no_grad():
            if bs is not None:
                torch._foreach_mul_(xs, 1.0 - a)
                torch._foreach_add_(xs, bs, alpha=a)
            torch._foreach_add_(xs, us, alpha=a)
        return Applied(a, True)


class FedBuff(Rule):
    """FedBuff: every K arrivals ``x <- x + server_lr (1/K) sum_i s(tau_i) delta_i``.

    ``buffer_size`` K >= 1 (K = 1 is asgd with step server_lr s(tau));
    ``server_lr`` > 0; ``staleness_fn`` default constant. The buffer is one running
    weighted-sum tensor per key; the divisor is the count (FedBuff paper), not the sum
    of weights. ``Applied.weight`` is ``server_lr s(tau) / K``; ``flush`` divides a
    partial buffer by its count and reports ``server_lr / count``.
    """

    name = "fedbuff"

    def __init__(
        self,
        buffer_size: int,
        server_lr: float,
        staleness_fn: StalenessFn | None = None,
        momentum: float = 0.0,
        nesterov: bool = True,
    ) -> None:
        self.buffer_size = _count("buffer_size", buffer_size)
        self.server_lr = _lr(server_lr)
        self.staleness_fn = staleness_fn or ConstantStaleness()
        self.opt = ServerMomentum(momentum, nesterov)  # one momentum step per buffer
        self._sum: State | None = None  # sum_i s(tau_i) delta_i over the buffer
        self.count = 0  # updates currently buffered

    def apply(
        self,
        x: State,
        update: Tensors,
        *,
        staleness: int,
        node: int,
        base: Tensors | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> Applied:  # noqa: D102
        s = self.staleness_fn(check_staleness(staleness))
        us = _aligned(x, update, "update")
        self._sum, acc = _lazy(self._sum, x, "fedbuff buffer")
        with torch.no_grad():
            torch._foreach_add_(acc, us, alpha=s)
        self.count += 1
        full = self.count == self.buffer_size
        if full:
            self._step(x, acc)
        return Applied(self.server_lr * s / self.buffer_size, full)

    def flush(self, x: State) -> Applied:  # noqa: D102
        if self.count == 0:
            return Applied(0.0, False)
        weight = self.server_lr / self.count
        self._sum, acc = _lazy(self._sum, x, "fedbuff buffer")
        self._step(x, acc)
        return Applied(weight, True)

    def _step(self, x: State, acc: list[Tensor]) -> None:
        with torch.no_grad():
            if self.opt.beta:
                torch._foreach_div_(acc, float(self.count))
                self.opt.step(x, acc, self.server_lr)
            else:
                torch._foreach_add_(list(x.values()), acc, alpha=self.server_lr / self.count)
            torch._foreach_zero_(acc)  # keep the memory for the next buffer
        self.count = 0

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"count": self.count, "sum": self._sum if self.count else None, **self.opt.state_dict()}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:  # noqa: D102
        self.count = int(d["count"])
        self._sum = _copy(d["sum"]) if self.count else None
        self.opt.load_state_dict(d)


class ASGD(Rule):
    """Pure asynchronous SGD ``x <- x + gamma_t update`` (seed notes, Algorithm 1).

    ``server_lr`` gamma > 0. With ``delay_adaptive``,
    ``gamma_t = gamma * concurrency / tau`` for tau > ``concurrency`` (tau_C >= 1, the
    jobs in flight: a public attribute the loop may update as nodes come and go).
    ``node_scale`` (node -> factor, default 1; the loop fills it with `balance` on, see
    ``balance_scales``) multiplies the step of that node's updates.
    """

    name = "asgd"

    def __init__(
        self,
        server_lr: float,
        delay_adaptive: bool = False,
        concurrency: int = 1,
        momentum: float = 0.0,
        nesterov: bool = True,
    ) -> None:
        self.server_lr = _lr(server_lr)
        self.delay_adaptive = bool(delay_adaptive)
        self.concurrency = _count("concurrency", concurrency)
        self.opt = ServerMomentum(momentum, nesterov)  # on every update (Liu et al.: hurts)
        self.node_scale: dict[int, float] = {}

    def step_size(self, staleness: int, node: int | None = None) -> float:
        """gamma_t for an update of this staleness (from this node)."""
        tau = check_staleness(staleness)
        gamma = self.server_lr
        if self.delay_adaptive and tau > self.concurrency:
            gamma *= min(1.0, self.concurrency / tau)
        return gamma * self.node_scale.get(node, 1.0) if node is not None else gamma

    def apply(
        self,
        x: State,
        update: Tensors,
        *,
        staleness: int,
        node: int,
        base: Tensors | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> Applied:  # noqa: D102
        gamma = self.step_size(staleness, node)
        us = _aligned(x, update, "update")
        self.opt.step(x, us, gamma)
        return Applied(gamma, True)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return self.opt.state_dict()

    def load_state_dict(self, d: Mapping[str, Any]) -> None:  # noqa: D102
        self.opt.load_state_dict(d)


def balance_scales(service_s: Mapping[int, float], limit: float) -> dict[int, float]:
    """Step factors that make every node's data count equally however often it reports.

    Applied on arrival, node i's updates add up in proportion to its rate r_i = 1 / s_i (s_i
    its task time), so the model leans on the fast nodes' data; with IID shards that is
    fewer distinct examples, which overfits sooner. Fraboni et al. 2023 (JMLR 24(110), "A
    General Theory for Federated Optimization with Asynchronous and Heterogeneous Clients
    Updates") show the fixed point is the federated optimum only when each client's
    expected aggregation weight is its data share; weighting node i's updates by
    ``mean_j r_j / r_i`` does that and keeps the total step per unit time (sum_i r_i x
    factor_i) what it was. Factors are clipped to [1/limit, limit]; nodes without a
    (positive) task time are left out and get 1."""
    rates = {n: 1.0 / s for n, s in service_s.items() if s > 0 and math.isfinite(s)}
    if not rates:
        return {}
    mean = sum(rates.values()) / len(rates)
    lo, hi = 1.0 / limit, limit
    return {n: min(hi, max(lo, mean / r)) for n, r in rates.items()}


class Shifted(Rule):
    """Compressed differences against per-node shifts h_i (seed notes, Algorithm 2).

    ``server_lr`` gamma > 0; ``shift_alpha`` alpha in [0, 1], equal to the clients'
    ``shift_alpha`` (``asyncfl.client.state.ClientShift``; 0: no shifts, identical to asgd,
    no state kept); ``num_clients`` n >= 1 in ``h = (1/n) sum_i h_i``, counting nodes that have not
    reported yet (their h_i = 0). A node beyond n grows n by one and ``forget`` shrinks
    it, so h stays the mean over current members. Memory: (reporting nodes + 1) models.
    """

    name = "shifted"

    def __init__(self, server_lr: float, shift_alpha: float, num_clients: int) -> None:
        self.server_lr = _lr(server_lr)
        self.shift_alpha = _real("shift_alpha", shift_alpha, 0.0, 1.0, open_low=False)
        self.num_clients = _count("num_clients", num_clients)
        self._h: State | None = None  # mean shift h
        self._shifts: dict[int, State] = {}  # h_i of each node that has reported

    def apply(
        self,
        x: State,
        update: Tensors,
        *,
        staleness: int,
        node: int,
        base: Tensors | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> Applied:  # noqa: D102
        check_staleness(staleness)
        us = _aligned(x, update, "update")
        xs, gamma, alpha = list(x.values()), self.server_lr, self.shift_alpha
        if alpha == 0.0:
            with torch.no_grad():
                torch._foreach_add_(xs, us, alpha=gamma)
            return Applied(gamma, True)
        self._h, hs = _lazy(self._h, x, "mean shift")
        if node not in self._shifts and len(self._shifts) >= self.num_clients:
            self._resize(hs, None, self.num_clients + 1)  # a new member, h_i = 0
        what = f"shift of node {node}"
        self._shifts[node], his = _lazy(self._shifts.get(node), x, what)
        with torch.no_grad():
            torch._foreach_add_(xs, hs, alpha=gamma)  # the step uses h^t ...
            torch._foreach_add_(xs, us, alpha=gamma)
            torch._foreach_add_(his, us, alpha=alpha)  # ... then the shifts move
            torch._foreach_add_(hs, us, alpha=alpha / self.num_clients)
        return Applied(gamma, True)

    def _resize(self, hs: list[Tensor], h_out: list[Tensor] | None, n_new: int) -> None:
        """n -> n_new members keeping h the mean: h <- (n h - h_out) / n_new."""
        n = self.num_clients
        with torch.no_grad():
            if n_new == 0:
                torch._foreach_zero_(hs)
            else:
                torch._foreach_mul_(hs, n / n_new)
                if h_out is not None:
                    torch._foreach_add_(hs, h_out, alpha=-1.0 / n_new)
        self.num_clients = n_new

    def forget(self, node: int) -> None:
        """Drop h_node (n -> n - 1); a node that never reported counts as h_node = 0."""
        if node in self._shifts:
            h_out: list[Tensor] | None = list(self._shifts.pop(node).values())
        elif self.num_clients > len(self._shifts):
            h_out = None
        else:
            return
        if self._h is None:
            self.num_clients -= 1
        else:
            self._resize(list(self._h.values()), h_out, self.num_clients - 1)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        shifts = dict(self._shifts)
        return {"num_clients": self.num_clients, "h": self._h, "shifts": shifts}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:  # noqa: D102
        self.num_clients = int(d["num_clients"])
        self._h = _copy(d["h"])
        self._shifts = {int(i): _copy(t) for i, t in d["shifts"].items()}


class TableRule(Rule):
    """A rule over a table of each node's latest entry u_i and their running sum (so a step is
    O(model size)); memory is m + 1 models for m nodes in the table. Subclasses: `SAGA` here,
    `saga-est` and `page` in `asyncfl.strategies.variance`."""

    def __init__(self, server_lr: float) -> None:
        self.server_lr = _lr(server_lr)
        self._table: dict[int, State] = {}  # latest entry u_i per node
        self._sum: State | None = None  # sum_i u_i

    def _entry(self, x: State, node: int) -> tuple[list[torch.Tensor] | None, list[torch.Tensor]]:
        """Node's entry aligned with x (None if it has none) and the running sum's tensors."""
        prev = self._table.get(node)
        olds = None if prev is None else _aligned(x, prev, f"{self.name} table")
        self._sum, sums = _lazy(self._sum, x, f"{self.name} sum")
        return olds, sums

    def _store(
        self, x: State, node: int, us: list[torch.Tensor], olds: list[torch.Tensor] | None, sums: list[torch.Tensor]
    ) -> None:
        """Replace node's entry by ``us`` and keep the sum (call under ``torch.no_grad()``)."""
        if olds is None:
            olds = [u.clone() for u in us]
        else:
            torch._foreach_sub_(sums, olds)
            torch._foreach_copy_(olds, us)
        torch._foreach_add_(sums, us)
        self._table[node] = dict(zip(x, olds))

    def forget(self, node: int) -> None:  # noqa: D102
        old = self._table.pop(node, None)
        if old is None or self._sum is None:
            return
        with torch.no_grad():
            if self._table:
                torch._foreach_sub_(list(self._sum.values()), list(old.values()))
            else:  # exactly zero, not the float residue of adding and removing
                torch._foreach_zero_(list(self._sum.values()))

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"table": dict(self._table)}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore the table and recompute the running sum exactly (no float drift)."""
        self._table = {int(i): _copy(t) for i, t in d["table"].items()}
        self._sum = None
        for t in self._table.values():
            self._sum, sums = _lazy(self._sum, t, f"{self.name} table")
            torch._foreach_add_(sums, list(t.values()))


class SAGA(TableRule):
    """Revised SAGA (seed notes, Algorithm 5): ``x <- x + gamma (1/m) sum_i u_i``.

    ``server_lr`` gamma > 0. u_i is node i's latest update and m the number of nodes in
    the table (those that have reported, minus forgotten ones), not a fixed n: dividing
    by n would shrink the first steps by m/n while the table fills (cf. SAG's "divide by
    the number seen", Schmidt, Le Roux, Bach 2017); once all n report it is Algorithm 5
    exactly. A running sum keeps each update O(model size); memory is m + 1 models.
    """

    name = "saga"

    def apply(
        self,
        x: State,
        update: Tensors,
        *,
        staleness: int,
        node: int,
        base: Tensors | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> Applied:  # noqa: D102
        check_staleness(staleness)
        us = _aligned(x, update, "update")
        olds, sums = self._entry(x, node)
        with torch.no_grad():
            self._store(x, node, us, olds, sums)
            weight = self.server_lr / len(self._table)
            torch._foreach_add_(list(x.values()), sums, alpha=weight)
        return Applied(weight, True)


def fedavg_mean(updates: Sequence[Tensors], weights: Sequence[float]) -> State:
    """Weighted mean ``sum_i w_i u_i / sum_i w_i`` (sync: ``x += server_lr * mean``).

    Raises ``ValueError`` for no updates, a length mismatch, a negative or non-finite
    weight, an all-zero weight sum, or keys/shapes differing from ``updates[0]``.
    """
    if not updates or len(updates) != len(weights):
        raise ValueError(f"need one weight per update, got {len(updates)} updates and {len(weights)} weights")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, >= 0, not all 0: {list(weights)}")
    ref, total = updates[0], float(sum(weights))
    rest = [_aligned(ref, u, f"updates[{i}]") for i, u in enumerate(updates[1:], 1)]
    out = [t.detach() * (weights[0] / total) for t in ref.values()]  # new tensors
    with torch.no_grad():
        for w, ts in zip(weights[1:], rest):
            torch._foreach_add_(out, ts, alpha=w / total)
    return dict(zip(ref, out))


class FedAvg(Rule):
    """Synchronous FedAvg (the baseline): one step per round with the sample-weighted mean of
    the round's updates, ``x <- x + server_lr * step(mean)``; ``momentum`` > 0 makes it
    FedAvgM (heavy ball) or DiLoCo's Nesterov outer step. ``apply`` takes a round of one."""

    name = "fedavg"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.0, nesterov: bool = True) -> None:
        self.server_lr = _lr(server_lr)
        self.opt = ServerMomentum(momentum, nesterov)

    def apply_round(self, x: State, updates: Sequence[Tensors], weights: Sequence[float]) -> list[float]:
        """Step with the weighted mean of a round; returns each update's coefficient in it."""
        aligned = [dict(zip(x, _aligned(x, u, f"updates[{i}]"))) for i, u in enumerate(updates)]
        mean = fedavg_mean(aligned, weights)  # everything is validated before x is touched
        self.opt.step(x, [mean[k] for k in x], self.server_lr)
        total = float(sum(weights))
        return [self.server_lr * w / total for w in weights]

    def apply(
        self,
        x: State,
        update: Tensors,
        *,
        staleness: int,
        node: int,
        base: Tensors | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> Applied:  # noqa: D102
        check_staleness(staleness)
        _aligned(x, update, "update")
        return Applied(self.apply_round(x, [update], [1.0])[0], True)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return self.opt.state_dict()

    def load_state_dict(self, d: Mapping[str, Any]) -> None:  # noqa: D102
        self.opt.load_state_dict(d)
