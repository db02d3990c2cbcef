"""The asynchronous loop: each client update is applied the moment it arrives.

Every reply is decoded, weighted by its staleness (global versions applied since the task was
sent) and applied through the rule at once; the selection policy then hands new work to an idle
node. No barrier. One task runs per working node; with `prefetch` (on by default in deployment)
its next task is queued shortly before the running one is expected to end, so the SuperNode
picks it up at once instead of sleeping through its idle poll (3 s in flwr 1.41) -- at the price
of the few versions applied in that lead time. Updates staler than `max-staleness` are dropped.

fedasync needs the state each client started from: snapshots are taken copy-on-write, only when
`x` is about to change while a task still references the current version.
"""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import Message
from flwr.serverapp import Grid

from asyncfl.flower_hooks import grid_in_deployment
from asyncfl.strategies.loop import ServerLoop, handler_s
from asyncfl.strategies.nodes import Reply, Task
from asyncfl.strategies.rules import ASGD, balance_scales
from asyncfl.strategies.server_state import Clock, ServerState

log = logging.getLogger("asyncfl")


class AsyncLoop(ServerLoop):
    """Asynchronous federated training: the rule steps once per reply (or per buffer fill)."""

    def __init__(self, state: ServerState, clock: Clock | None = None) -> None:
        super().__init__(state, clock=clock)
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}  # version -> x then (fedasync's base)

    def _configure(self, grid: Grid) -> None:
        super()._configure(grid)
        self.prefetch = self._prefetch_wanted(grid)

    def _run(self, grid: Grid) -> str:
        self._fill_slots(grid, finished=None)
        while True:
            reason = self.s.stop_reason(self.elapsed())
            if reason:
                return reason
            if not self.inflight:
                self._fill_slots(grid, finished=None)
                if not self.inflight:
                    return "no nodes left"
            for msg in self._pull(grid):
                finished = self._handle_async_reply(msg)
                self._fill_slots(grid, finished=finished)
                # evaluate once the node that replied has its next task: the evaluation then
                # runs while it trains instead of delaying its next task
                self.s.evaluate_if_due(self.elapsed(), auto_every=self._slots())
                reason = self.s.stop_reason(self.elapsed())
                if reason:
                    return reason
            self._prefetch(grid)
            self._scan_nodes(grid)
            self._idle()

    def _apply_replies(self, replies: list[Reply]) -> None:
        for reply in replies:  # replies to tasks of the current version: staleness 0
            self._apply_update(reply, reply.task, self.s.version - reply.task.version)

    def _handle_async_reply(self, msg: Message) -> int | None:
        """Process one reply; returns the node that became idle (None if retired)."""
        task = self.inflight.pop(msg.metadata.reply_to_message_id)
        node = self.nodes[task.node]
        node.replied(task, self.elapsed(), ok=not msg.has_error(), handler_s=handler_s(msg))
        self.s.selector.observe_time(task.node, node.expected_service())
        reply = self._decode(msg, task)
        if reply is None:
            return None if node.retired else task.node
        staleness = self.s.version - task.version
        if self.cfg.server.max_staleness and staleness > self.cfg.server.max_staleness:
            self.s.recorder.log_drop(
                node=task.node,
                partition=node.partition,
                staleness=staleness,
                reason=f"staleness {staleness} > max-staleness {self.cfg.server.max_staleness}",
            )
            self._release_snapshots()
            return task.node
        self._apply_update(reply, task, staleness)
        return task.node

    def _apply_update(self, reply: Reply, task: Task, staleness: int) -> None:
        """One update through the rule (the snapshot it started from, for rules that need it),
        then the downlink log, the record and a checkpoint when one is due."""
        t0 = time.perf_counter()
        if self.s.rule.needs_base and any(t.version == self.s.version for t in self.inflight.values()):
            self.snapshots.setdefault(self.s.version, {k: v.clone() for k, v in self.s.x.items()})
        base = self.snapshots.get(task.version)
        version_before = self.s.version
        if self.cfg.server.balance and isinstance(self.s.rule, ASGD):
            self.s.rule.node_scale = self._balance_scales()
        applied = self.s.rule.apply(
            self.s.x, reply.update, staleness=staleness, node=task.node, base=base, info=reply.metrics
        )
        if self.downlink is not None:
            self.downlink.add(reply.record, applied.weight, applied.stepped, version_before)
        self.s.sync_device()
        apply_s = time.perf_counter() - t0
        self.timer.add("apply", apply_s)
        self._release_snapshots()
        self.s.after_update(reply, staleness, applied.weight, applied.stepped, reply.decode_s + apply_s, self.elapsed())
        self.checkpointer.maybe_save(self.s)

    def _fill_slots(self, grid: Grid, finished: int | None) -> None:
        """Dispatch tasks until `concurrency` nodes are working (or no idle node is left)."""
        limit = self._slots()
        while self._working() < limit:
            idle = self._idle_nodes()
            if not idle:
                return
            node = self.s.selector.select(idle, finished, self.rng)
            if node is None or not self._dispatch(grid, node):
                return
            finished = None

    def _slots(self) -> int:
        """How many nodes work at once: `concurrency`, or every live node."""
        return self.cfg.server.concurrency or len(self._alive_nodes())

    def _balance_scales(self) -> dict[int, float]:
        """`balance`: each live node's step factor from its measured task time."""
        alive = [n for n, i in self.nodes.items() if not i.retired]
        times = {n: t for n in alive if (t := self.nodes[n].task_time()) is not None}
        return balance_scales(times, limit=max(len(alive), 1))

    def _release_snapshots(self) -> None:
        needed = {t.version for t in self.inflight.values()}
        for v in list(self.snapshots):
            if v not in needed:
                del self.snapshots[v]

    # ----------------------------------------------------------------------------------------
    # Prefetch: queue a working node's next task shortly before it is expected to finish
    # ----------------------------------------------------------------------------------------
    def _prefetch_wanted(self, grid: Grid) -> bool:
        c = self.cfg.server
        if c.prefetch == "off":
            return False
        if c.prefetch == "auto":
            # in simulation a second message per node would run concurrently on another actor
            # (flower-notes), so auto stays off there
            if not (grid_in_deployment(grid) or getattr(grid, "emulates_deployment", False)):
                return False
            if c.selection != "same" and c.concurrency:
                log.info(
                    "asyncfl: prefetch off: it would pin the working nodes under selection=%s with concurrency=%d",
                    c.selection,
                    c.concurrency,
                )
                return False
        if c.prefetch == "auto":
            log.info(
                "asyncfl: prefetch auto: the next task of a node whose SuperNode polls "
                "slowly (Flower's flower-supernode: 3 s; nodes of asyncfl-supernode report "
                "theirs) is queued %.1f s (+ the time a push takes) before its expected "
                "finish",
                c.prefetch_lead_s,
            )
        else:
            log.info(
                "asyncfl: prefetch on: each node's next task is queued %.1f s (+ the time a "
                "push takes) before its expected finish",
                c.prefetch_lead_s,
            )
        return True

    def _prefetch(self, grid: Grid) -> None:
        """Queue the next task of each node whose running task should end within the lead time."""
        if not self.prefetch:
            return
        now = self.elapsed()
        budget = self.s.max_updates - self.s.updates - len(self.inflight)  # no work past the end (may be inf)
        # the push itself takes time (building and uploading the global weights: seconds for
        # the 124M shape), so it starts that much earlier
        lead = self.cfg.server.prefetch_lead_s + max(self.push_s, default=0.0)
        peer_first = min((i.first_service for i in self.nodes.values() if i.first_service is not None), default=None)
        for n, info in sorted(self.nodes.items()):
            if info.retired or info.inflight != 1 or budget <= 0:
                continue
            if self.cfg.server.prefetch == "auto" and info.polls_quickly():
                continue  # it notices the next task as soon as it is pushed
            running = next(t for t in self.inflight.values() if t.node == n)
            if info.next_task_due(running, now, lead, peer_first):
                if self._dispatch(grid, n, prefetched=True):
                    budget -= 1
