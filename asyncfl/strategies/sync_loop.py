"""The synchronous loop: the FedAvg baseline over the same dispatch, decode and logging code.

Each round sends every idle node (or `concurrency` of them, drawn at random) a task of the same
version, waits for all replies (the barrier), and steps once with the sample-weighted mean of
the decoded deltas: `x <- x + server_lr * mean` (FedAvgM with `server-momentum`).
"""

from __future__ import annotations

import time

from flwr.serverapp import Grid

from asyncfl.strategies.loop import ServerLoop
from asyncfl.strategies.nodes import Reply


class SyncLoop(ServerLoop):
    """Synchronous federated training: one FedAvg(M) step per round of replies."""

    def _run(self, grid: Grid) -> str:
        while True:
            reason = self.s.stop_reason(self.elapsed())
            if reason:
                return reason
            nodes = self._idle_nodes()
            if self.cfg.server.concurrency:
                nodes = self.rng.sample(nodes, min(self.cfg.server.concurrency, len(nodes)))
            for n in nodes:
                self._dispatch(grid, n)
            if not self.inflight:
                return "no nodes left"
            if self.s.rounds:
                # the last round's model is evaluated while this round trains (off the round's
                # critical path); a stop it triggers (target-ppl) drops the round just sent
                self.s.evaluate_if_due(self.elapsed(), per_round=True)
                reason = self.s.stop_reason(self.elapsed())
                if reason:
                    return reason
            replies = []
            while self.inflight:
                budget = self.cfg.stop.time_budget_s
                if budget and self.elapsed() >= budget:
                    # a budget is a budget, as in async mode: the round in flight is dropped
                    # and the model stays the last completed round's (already evaluated)
                    return f"time-budget-s {budget:g} reached (round {self.s.rounds + 1} dropped)"
                for msg in self._pull(grid):
                    task = self.inflight.pop(msg.metadata.reply_to_message_id)
                    self.nodes[task.node].replied(task, self.elapsed(), ok=not msg.has_error())
                    reply = self._decode(msg, task)
                    if reply is not None:
                        replies.append(reply)
                self._scan_nodes(grid)
                self._idle()
            if replies:
                self._apply_mean(replies)
            self.s.rounds += 1
            self.s.history.close_step(self.s.rounds)
            self.checkpointer.maybe_save(self.s)

    def _apply_replies(self, replies: list[Reply]) -> None:
        self._apply_mean(replies)

    def _apply_mean(self, replies: list[Reply]) -> None:
        """One FedAvg(M) step with the round's sample-weighted mean (`FedAvg.apply_round`)."""
        t0 = time.perf_counter()
        weights = [float(r.metrics.get("num-examples", 1.0)) for r in replies]
        coefs = self.s.rule.apply_round(self.s.x, [r.update for r in replies], weights)
        self.s.sync_device()
        self.timer.add("apply", time.perf_counter() - t0)
        apply_s = (time.perf_counter() - t0) / len(replies)
        if self.downlink is not None:
            self.downlink.add_round([r.record for r in replies], coefs, self.s.version)
        self.s.version += 1
        for r, c in zip(replies, coefs):
            self.s.after_update(r, 0, c, True, r.decode_s + apply_s, self.elapsed(), bump_version=False)
