"""Downlink by update log: send a node the low-rank payloads it lacks instead of the whole model.

With a linear rule every global step is a weighted sum of decoded client payloads:

* asgd:     x_{v+1} = x_v + gamma_t * decode(p)
* fedbuff:  x_{v+1} = x_v + sum_i (server_lr s(tau_i) / K) * decode(p_i)   (K buffered payloads)
* sync:     x_{v+1} = x_v + sum_i (server_lr w_i / sum w) * decode(p_i)   (one round)

so a node whose worker still holds version h of the global weights can rebuild version V from
the payloads applied in between and their coefficients: for the 124M shape at rank 10 that is
about 4.7 MB per version step instead of 500 MB of fp32 weights. The server re-sends the
payloads exactly as the clients uploaded them (no re-encoding) and the client decodes them
with the same code the server used, so the rebuilt weights equal the server's up to float
rounding of the additions (the client's delta is taken against its own copy, so that rounding
never enters the global model).

Rules that mix in older global states (fedasync, shifted, saga) are not linear in the payloads
alone; they always send the full weights. A node whose worker lost its copy (restart, crash)
answers "need-full" and gets the full weights next.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord

from asyncfl.protocol import UpdateLog

if TYPE_CHECKING:
    from asyncfl.config import AppConfig

LINEAR_RULES = ("asgd", "fedbuff")


def update_log_wanted(cfg: AppConfig, deployed: bool) -> bool:
    """Whether tasks may carry update logs (`downlink`): only where the global step is linear in
    the payloads (sync FedAvg, or a rule of `LINEAR_RULES`, without server momentum); "log" then
    always (the config rejects "log" elsewhere), "auto" with a compressor in a deployment (in
    simulation the weights cost no transfer), "full" never."""
    c, z = cfg.server, cfg.compress
    linear = (c.mode == "sync" or c.rule in LINEAR_RULES) and not c.server_momentum
    if z.downlink == "full" or not linear:
        return False
    return z.downlink == "log" or (z.compressor != "none" and deployed)


@dataclass
class DownlinkLog:
    """Server-side record of the version steps as weighted payloads, and of what each node holds.

    Parameters
    ----------
    dense_bytes : int
        Bytes of the full-weights message; a log costing more than `max_fraction` of it is not
        worth sending.
    max_fraction : float
        Send the log only while it is smaller than this share of the full weights.
    """

    dense_bytes: int
    max_fraction: float = 0.5
    payloads: dict[int, ArrayRecord] = field(default_factory=dict)
    steps: dict[int, list[tuple[float, int]]] = field(default_factory=dict)  # v -> terms of x_v -> x_{v+1}
    pending: list[tuple[float, int]] = field(default_factory=list)  # buffered, not yet stepped
    held: dict[int, int] = field(default_factory=dict)  # node -> version its worker holds
    _next_id: int = 0

    # ---- server side: what was applied ------------------------------------------------------
    def add(self, record: ArrayRecord, coef: float, stepped: bool, version_before: int) -> None:
        """Record one applied payload; `stepped`: x moved from `version_before` to the next."""
        pid = self._next_id
        self._next_id += 1
        self.payloads[pid] = record
        self.pending.append((float(coef), pid))
        if stepped:
            self._close_step(version_before)

    def add_round(self, records: list[ArrayRecord], coefs: list[float], version_before: int) -> None:
        """A sync round: one step made of all its payloads."""
        for r, c in zip(records, coefs):
            self.add(r, c, stepped=False, version_before=version_before)
        self._close_step(version_before)

    def _close_step(self, version_before: int) -> None:
        self.steps[version_before], self.pending = self.pending, []

    # ---- per node ---------------------------------------------------------------------------
    def message_for(self, node: int, version: int) -> UpdateLog | None:
        """The log taking `node` from the version it holds to `version`, or None (send full)."""
        base = self.held.get(node)
        if base is None or base > version:
            return None
        coefs: dict[int, float] = {}
        for v in range(base, version):
            if v not in self.steps:
                return None
            for c, pid in self.steps[v]:
                coefs[pid] = coefs.get(pid, 0.0) + c
        msg = UpdateLog(
            base, [coefs[p] for p in sorted(coefs)], [self.payloads[p] for p in sorted(coefs)], target=version
        )
        if msg.nbytes > self.max_fraction * self.dense_bytes:
            return None
        return msg

    def sent(self, node: int, version: int) -> None:
        """`node` was sent a task of `version`: its worker holds that version once it runs it."""
        self.held[node] = version

    def forget(self, node: int) -> None:
        """The node's copy is unknown (it asked for the full weights, failed or left)."""
        self.held.pop(node, None)

    def prune(self) -> None:
        """Drop steps no node can use: older than every node's copy, or so old that the log
        from there would cost more than the full weights anyway; then their payloads."""
        oldest = min(self.held.values(), default=None)
        if oldest is None:
            self.steps.clear()
        total, budget = 0, self.max_fraction * self.dense_bytes
        for v in sorted(self.steps, reverse=True):
            total += sum(self.payloads[p].count_bytes() for _, p in self.steps[v])
            if total > budget or (oldest is not None and v < oldest):  # (None: steps already cleared)
                for old in [u for u in self.steps if u <= v]:
                    del self.steps[old]
                break
        live = {pid for terms in self.steps.values() for _, pid in terms} | {pid for _, pid in self.pending}
        for pid in [p for p in self.payloads if p not in live]:
            del self.payloads[pid]
