"""Server optimizers for stale, buffered updates: Delayed Nesterov and FADAS.

- ``dn`` -- Delayed Nesterov (Liu et al. 2024, "Asynchronous Local-SGD Training for Language
  Modeling", arXiv 2401.09135, sec. 4.1). Server momentum applied on every stale update
  amplifies staleness; DN applies each arriving delta at once without momentum and folds the
  momentum in once per N arrivals::

      every arrival:   x <- x + lr s(tau) delta / N;   buf <- buf + s(tau) delta
      every N-th:      m <- beta m + buf / N;  x <- x + lr beta m;  buf <- 0

  Over N arrivals x moves by ``lr (mean + beta m)``: one Nesterov step on their mean, while
  every arrival still reaches the model at once. ``momentum = 0`` is asgd with step lr / N.
- ``fadas`` -- FADAS (Wang et al., ICML 2024, arXiv 2407.18365, Algorithm 1): an AMSGrad step
  on the mean of K buffered deltas, with a delay-adaptive step size::

      Delta = mean of the K deltas;  m <- b1 m + (1 - b1) Delta;  v <- b2 v + (1 - b2) Delta^2
      v_hat <- max(v_hat, v);  lr_t = lr if tau_max <= tau_c else min(lr, 1 / tau_max)
      x <- x + lr_t m / (sqrt(v_hat) + eps)

  ``tau_max`` is the largest staleness in the buffer. Being an adaptive method, its ``lr``
  is a per-coordinate step (about 1e-3 here), not a multiple of the client delta.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from asyncfl.strategies.rules import (
    Applied,
    Rule,
    ServerMomentum,
    StalenessFn,
    State,
    Tensors,
    _aligned,
    _copy,
    _count,
    _lazy,
    _lr,
    _real,
)
from asyncfl.strategies.staleness import ConstantStaleness, check_staleness


class DelayedNesterov(Rule):
    """Delayed Nesterov momentum (``dn``): each delta applied at once, momentum every N.

    ``buffer_size`` N >= 1 (Liu et al. use the number of workers), ``server_lr`` > 0,
    ``momentum`` beta in [0, 1), ``staleness_fn`` s(tau) (default constant).
    """

    name = "dn"

    def __init__(
        self, buffer_size: int, server_lr: float, momentum: float = 0.9, staleness_fn: StalenessFn | None = None
    ) -> None:
        self.buffer_size = _count("buffer_size", buffer_size)
        self.server_lr = _lr(server_lr)
        self.opt = ServerMomentum(momentum, nesterov=True)
        self.staleness_fn = staleness_fn or ConstantStaleness()
        self._buf: State | None = None  # sum of s(tau) delta since the last momentum step
        self.count = 0

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
        weight = self.server_lr * s / self.buffer_size
        xs = list(x.values())
        with torch.no_grad():
            torch._foreach_add_(xs, us, alpha=weight)
            if self.opt.beta == 0.0:
                return Applied(weight, True)
            self._buf, buf = _lazy(self._buf, x, "dn buffer")
            torch._foreach_add_(buf, us, alpha=s)
            self.count += 1
            if self.count == self.buffer_size:
                self._momentum_step(x, buf)
        return Applied(weight, True)

    def _momentum_step(self, x: State, buf: list[torch.Tensor]) -> None:
        """m <- beta m + buf / N; x <- x + lr beta m (the gradient part is already in x)."""
        opt = self.opt
        opt.m, ms = _lazy(opt.m, x, "dn momentum")
        torch._foreach_mul_(ms, opt.beta)
        torch._foreach_add_(ms, buf, alpha=1.0 / self.buffer_size)
        torch._foreach_add_(list(x.values()), ms, alpha=self.server_lr * opt.beta)
        torch._foreach_zero_(buf)
        self.count = 0

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"count": self.count, "buf": self._buf if self.count else None, **self.opt.state_dict()}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:  # noqa: D102
        self.count = int(d["count"])
        self._buf = _copy(d["buf"]) if self.count else None
        self.opt.load_state_dict(d)


class FADAS(Rule):
    """FADAS: AMSGrad on the mean of K buffered deltas, delay-adaptive step (``fadas``).

    ``buffer_size`` K >= 1, ``server_lr`` eta > 0, ``beta1`` in [0, 1), ``beta2`` in
    [0, 1), ``eps`` > 0, ``tau_c`` >= 1 the staleness up to which eta is used as is.
    ``flush`` steps with a partial buffer.
    """

    name = "fadas"

    def __init__(
        self,
        buffer_size: int,
        server_lr: float,
        beta1: float = 0.9,
        beta2: float = 0.99,
        eps: float = 1e-8,
        tau_c: int = 1,
    ) -> None:
        self.buffer_size = _count("buffer_size", buffer_size)
        self.server_lr = _lr(server_lr)
        self.beta1 = _real("beta1", beta1, 0.0, 1.0, open_low=False)
        self.beta2 = _real("beta2", beta2, 0.0, 1.0, open_low=False)
        if self.beta1 >= 1.0 or self.beta2 >= 1.0:
            raise ValueError(f"`beta1` and `beta2` must be in [0.0, 1.0), got {beta1!r}, {beta2!r}")
        self.eps = _real("eps", eps, 0.0, 1.0, open_low=True)
        self.tau_c = _count("tau_c", tau_c)
        self._sum: State | None = None
        self.count = 0
        self.tau_max = 0
        self._m: State | None = None
        self._v: State | None = None
        self._vhat: State | None = None

    def step_size(self, tau_max: int) -> float:
        """eta if tau_max <= tau_c, else min(eta, 1 / tau_max)."""
        return self.server_lr if tau_max <= self.tau_c else min(self.server_lr, 1.0 / tau_max)

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
        tau = check_staleness(staleness)
        us = _aligned(x, update, "update")
        self._sum, acc = _lazy(self._sum, x, "fadas buffer")
        with torch.no_grad():
            torch._foreach_add_(acc, us)
        self.count += 1
        self.tau_max = max(self.tau_max, tau)
        if self.count == self.buffer_size:
            lr = self._step(x, acc)
            return Applied(lr / self.buffer_size, True)
        return Applied(0.0, False)

    def flush(self, x: State) -> Applied:  # noqa: D102
        if self.count == 0:
            return Applied(0.0, False)
        n = self.count
        self._sum, acc = _lazy(self._sum, x, "fadas buffer")
        return Applied(self._step(x, acc) / n, True)

    def _step(self, x: State, acc: list[torch.Tensor]) -> float:
        b1, b2 = self.beta1, self.beta2
        lr = self.step_size(self.tau_max)
        self._m, ms = _lazy(self._m, x, "fadas m")
        self._v, vs = _lazy(self._v, x, "fadas v")
        self._vhat, vh = _lazy(self._vhat, x, "fadas v_hat")
        with torch.no_grad():
            torch._foreach_div_(acc, float(self.count))  # Delta, the buffer mean
            torch._foreach_mul_(ms, b1)
            torch._foreach_add_(ms, acc, alpha=1.0 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, acc, acc, value=1.0 - b2)
            torch._foreach_maximum_(vh, vs)
            denom = torch._foreach_sqrt(vh)
            torch._foreach_add_(denom, self.eps)
            torch._foreach_addcdiv_(list(x.values()), ms, denom, value=lr)
            torch._foreach_zero_(acc)
        self.count, self.tau_max = 0, 0
        return lr

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "count": self.count,
            "tau_max": self.tau_max,
            "sum": self._sum if self.count else None,
            "m": self._m,
            "v": self._v,
            "v_hat": self._vhat,
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:  # noqa: D102
        self.count, self.tau_max = int(d["count"]), int(d["tau_max"])
        self._sum = _copy(d["sum"]) if self.count else None
        self._m, self._v, self._vhat = _copy(d["m"]), _copy(d["v"]), _copy(d["v_hat"])
