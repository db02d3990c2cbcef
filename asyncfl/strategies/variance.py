"""Variance-reduced rules over a table of each client's latest update (seed notes 2.3, 2.5).

A client's *update* here is the decoded delta of one task (local training from the version it
was sent), standing in for the notes' gradient ``-grad f_i(x^{pi})``; ``saga`` (Algorithm 5,
``asyncfl.strategies.rules.SAGA``) steps with the mean of such a table.

- ``saga-est`` -- Algorithm 4, the SAGA estimator: with ``u_i`` node i's previous update and
  ``u_bar`` the mean of the table, an arrival ``d`` from node i steps with
  ``x <- x + lr (d - u_i + u_bar)`` and then replaces ``u_i <- d``. The notes start every
  table entry at the gradient of x^0; a delta at x^0 does not exist before a task ran, so a
  node's first update finds its entry equal to the table mean (the correction cancels: it
  steps with ``d``), and the table holds the nodes that have reported.
- ``page`` -- Algorithm 6, PAGE over the SAGA table. With probability ``p`` (``page-p``) a
  client runs a normal task (a *fresh* estimate); otherwise it trains twice from the same
  batches and dropout -- from the version it was sent and from the one of its previous task --
  and sends the *difference* of the two deltas, which the server adds to its table entry:
  ``g_i <- g_i + (d(x^{pi}) - d(x^{prev}))``. Either way the server steps with the table mean,
  ``x <- x + lr mean_i g_i``. The client half is ``asyncfl.client.worker``.
  The reply metric ``page-diff`` (1 or 0) says which kind an update is. A difference for a
  node without a table entry (its earlier update was dropped) is not applied; that client's
  next fresh estimate starts its entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from asyncfl.strategies.rules import Applied, State, TableRule, Tensors, _aligned
from asyncfl.strategies.staleness import check_staleness


class SagaEstimator(TableRule):
    """SAGA estimator (seed notes, Algorithm 4): ``x += lr (d - u_i + mean_j u_j)``, then
    ``u_i <- d``. Memory: reporting nodes + 1 models."""

    name = "saga-est"

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
        xs, lr = list(x.values()), self.server_lr
        olds, sums = self._entry(x, node)
        with torch.no_grad():
            torch._foreach_add_(xs, us, alpha=lr)
            if olds is not None:  # a newcomer's entry is taken as the mean: no correction
                torch._foreach_sub_(xs, olds, alpha=lr)
                torch._foreach_add_(xs, sums, alpha=lr / len(self._table))
            self._store(x, node, us, olds, sums)
        return Applied(lr, True)


class Page(TableRule):
    """PAGE over the SAGA table (seed notes, Algorithm 6): a fresh update replaces node i's
    entry, a difference (``info["page-diff"] == 1``) is added to it; then
    ``x += lr mean_j g_j``."""

    name = "page"

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
        flag = (info or {}).get("page-diff", 0)
        if flag not in (0, 1):
            raise ValueError(f"page: metric `page-diff` must be 0 or 1, got {flag!r}")
        kind = "diff" if flag else "fresh"
        if kind == "diff" and node not in self._table:
            return Applied(0.0, False)  # nothing to add it to (see the module notes)
        olds, sums = self._entry(x, node)
        with torch.no_grad():
            if olds is not None and kind == "diff":  # g_i += d: the entry and the sum
                torch._foreach_add_(olds, us)
                torch._foreach_add_(sums, us)
                self._table[node] = dict(zip(x, olds))
            else:  # a fresh estimate (or a node's first) replaces its entry
                self._store(x, node, us, olds, sums)
            weight = self.server_lr / len(self._table)
            torch._foreach_add_(list(x.values()), sums, alpha=weight)
        return Applied(weight, True)
