"""Book-keeping of tasks and nodes for the server loop, and the prefetch timing.

A node runs its tasks one after another (a deployed SuperNode processes one message at a
time). Its *service time* for a task runs from the moment it could start it -- the push, or
its previous reply when the task was queued behind that one -- to the reply. Prefetch pushes
the next task when the running one is expected to end within the lead time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord


@dataclass
class Task:
    node: int
    version: int
    sent_at: float
    prefetched: bool = False  # pushed while the node was still running its previous task
    started_at: float | None = None  # when the node could start it (set when the reply arrives)
    bytes_down: int = 0  # bytes the task message's arrays carry (full weights or update log)
    pushed_wall: float | None = None  # time.time() when its push returned


SHORT_POLL_S = 0.5  # an idle poll at most this long is not worth queuing ahead for


@dataclass
class NodeInfo:
    partition: int | None = None
    failures: int = 0  # consecutive error replies
    retired: bool = False
    inflight: int = 0  # tasks pushed and not answered: 1 running, + 1 queued with prefetch
    free_at: float | None = None  # clock time of its last reply (it started the next task then)
    services: list[float] = field(default_factory=list)  # its last task service times
    steady: list[float] = field(default_factory=list)  # the same, its first task left out
    first_service: float | None = None  # the estimate its first task gave (see `replied`)
    last_version: int | None = None  # version of the last task pushed to it
    repeat: int = 0  # tasks of that same version pushed before it
    last_loss: float | None = None
    step_s: float | None = None  # seconds per local step of its last task (DyLU)
    idle_poll_s: float | None = None  # how soon its SuperNode notices a task when idle (None: unknown)

    def observe_poll(self, value: Any) -> None:
        """The `idle-poll-s` a reply reports (asyncfl-supernode), if sane."""
        if isinstance(value, (int, float)) and 0 <= value < 3600:
            self.idle_poll_s = float(value)

    def polls_quickly(self) -> bool:
        """Its SuperNode notices a new task within a fraction of a second when idle, so queuing
        its tasks ahead (prefetch) would buy staleness and save nothing."""
        return self.idle_poll_s is not None and self.idle_poll_s <= SHORT_POLL_S

    def observe_steps(self, steps: Any, client_s: Any) -> None:
        """Seconds per local step from a reply's `steps` and `client-s` metrics, if both are sane."""
        if isinstance(steps, (int, float)) and isinstance(client_s, (int, float)) and steps > 0 and client_s > 0:
            self.step_s = float(client_s) / float(steps)

    def start_of(self, task: Task) -> float:
        """When this node could start `task`: its push, or this node's last reply if later."""
        return max(task.sent_at, self.free_at if self.free_at is not None else task.sent_at)

    def replied(self, task: Task, now: float, ok: bool, handler_s: float | None = None) -> None:
        """One of this node's tasks came back at `now` (a reply, or an error when not `ok`).

        `handler_s`: the ClientApp's own time for it. A node's first task also pays one-time
        costs (app install, worker start, model build, often several times the steady service
        time), so for it the handler time, a lower bound, is what is kept: an estimate that is
        too low only queues the next task early (a little staleness), one that is too high
        misses the queueing and costs the SuperNode's whole idle poll."""
        first = self.free_at is None
        self.inflight = max(self.inflight - 1, 0)
        task.started_at = self.start_of(task)
        if ok:  # crashes say nothing about how long a task takes
            service = now - task.started_at
            if first and handler_s is not None and handler_s > 0:
                service = min(service, handler_s)
            if self.first_service is None:
                self.first_service = service
            self.services = [*self.services[-2:], service]
            if not first:
                self.steady = [*self.steady[-2:], service]
        self.free_at = now

    def expected_service(self) -> float | None:
        """The shortest of the last three task times. A task that was not queued ahead also
        holds the SuperNode's idle poll, so averages run long; and a late push costs that
        whole poll again, while an early one costs only a little staleness."""
        return min(self.services) if self.services else None

    def task_time(self) -> float | None:
        """How long its tasks take, for its update rate: the mean of its last three service
        times after the first (whose estimate is only a lower bound); None before that."""
        return sum(self.steady) / len(self.steady) if self.steady else None

    def next_task_due(self, running: Task, now: float, lead: float, peer_first: float | None = None) -> bool:
        """Whether `running` is expected to end within `lead` seconds of `now`.

        A node still on its first task has no time of its own; `peer_first`, the shortest first
        task another node has finished (same one-time costs), stands in for it. Without it, every
        node's second task would be pushed only at its first reply, after the SuperNode has
        already found no message and gone to sleep for its idle poll."""
        expected = self.expected_service()
        if expected is None:
            expected = peer_first
        return expected is not None and now >= self.start_of(running) + expected - lead


@dataclass
class Reply:
    """A validated, decoded client reply."""

    node: int
    task: Task
    update: dict[str, torch.Tensor]
    metrics: dict[str, Any] = field(default_factory=dict)
    decode_s: float = 0.0
    record: ArrayRecord = field(kw_only=True)  # the payload as uploaded (re-sent by the downlink log)
    node_s: float | None = None  # task pushed -> reply created (wall clock): delivery, node, handler
    reply_age_s: float | None = None  # reply created -> the server started decoding it
