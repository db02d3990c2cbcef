"""Emulated federation: the real server loop and real client training on a virtual clock.

A deployment's timing is mostly waiting: a client computes, sleeps its emulated slowness, its
messages cross the SuperLink, an idle SuperNode sleeps through its poll. `EmulatedGrid` runs
the same server loop (rules, staleness, selection, prefetch, evaluation, stop conditions,
results files) against clients that train for real, in this process, one task at a time, while
the waiting happens on a `VirtualClock`: a 150 s deployment run takes the seconds its training
and evaluation compute needs. Use it to compare rules and hyperparameters cheaply and
reproducibly; a claim about real runs still needs real runs (`flwr run`, the local deployment).

Timing model of one task on node i (speed factor f_i, `client-speeds`):

    noticed  = push time, or for an idle SuperNode its next poll tick (every `poll_s`)
    start    = max(noticed, end of the node's previous task)   (a SuperNode runs one at a time)
    end      = start + f_i * compute * jitter + overhead_s

`compute` is the task's measured handler time (`task_s` = 0), or `task_s` scaled by the
task's local steps (DyLU) when set -- e.g. the per-task compute measured in a deployment, where
clients share a GPU; the run config's `task-s` (the fixed task length a deployment's clients
sleep up to) is the default. `jitter` is exp(N(0, sigma)) per task (seeded by the run's `seed`), the
run-to-run variation of real task times, which decides whether prefetch finds its estimate.
`overhead_s` stands for what a task costs beyond its compute (message
transfers, process start: ~1.3 s for the 124M shape in deployment, bench/README.md). A queued
task (prefetch) starts right after the previous one, with no poll. The server's own work
(decoding, applying, evaluating) advances the virtual clock by its real duration; client work
does not (it is accounted by the model above). With `poll_s` > 0 the grid counts as a
deployment for `prefetch = "auto"` (the update-log downlink stays off: the emulated nodes
share one in-process worker, which cannot hold a base per node); a poll shorter than
Flower's 3 s stands for `asyncfl-supernode`, whose nodes report it (`idle-poll-s`), so
`prefetch = "auto"` queues nothing ahead for them, as in a real deployment.

    python -m asyncfl.emulate --run-config configs/offline-tiny.toml --nodes 4 --speeds 1,1,2,4
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import logging
import math
import random
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from flwr.app import Context, Message, MetricRecord, RecordDict

from asyncfl.config import AppConfig, ConfigError, parse_overrides

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from asyncfl.strategies.server_state import Clock

log = logging.getLogger("asyncfl")


class VirtualClock:
    """Seconds that advance by `sleep` without sleeping, plus (with `server_time`) the real
    time spent outside `paused()` blocks, the server's own work, so the loop's waits cost no
    wall-clock time. Without `server_time` the server's work is free: runs are then exactly
    reproducible, and several can share a machine without slowing each other's clocks."""

    def __init__(self, server_time: bool = True) -> None:
        self.server_time = server_time
        self._t0 = time.monotonic()
        self._paused_s = 0.0
        self._skipped_s = 0.0

    def now(self) -> float:
        real = time.monotonic() - self._t0 - self._paused_s if self.server_time else 0.0
        return real + self._skipped_s

    def sleep(self, seconds: float) -> None:
        self._skipped_s += max(0.0, float(seconds))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Real time inside does not count (a client's compute, accounted separately)."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            self._paused_s += time.monotonic() - t0


@dataclass
class _Node:
    node_id: int
    partition: int
    speed: float
    busy_until: float = 0.0  # virtual time its last accepted task ends
    idle_since: float = 0.0  # when it last ran out of work (its poll ticks count from here)


@dataclass(order=True)
class _Pending:
    ready_at: float
    seq: int
    message_id: str = field(compare=False)
    reply: Message = field(compare=False)


class EmulatedGrid:
    """A Flower Grid stand-in whose nodes run the ClientApp's training handler in-process.

    Parameters
    ----------
    run_config : Mapping
        The run config the clients see (the ClientApp's `context.run_config`); its emulated
        slowness (`client-speeds`, `uplink-mbps`) is applied on the virtual clock, not slept.
    num_nodes : int
        Nodes 1..n, holding partitions 0..n-1.
    clock : VirtualClock
    task_s : float
        Compute seconds of a task with `local-steps` steps (scaled by a task's own steps);
        0 = the run config's `task-s`, and where that is 0 too the measured training time of
        each task.
    overhead_s : float
        Seconds a task costs beyond its compute (transfers, process start).
    poll_s : float
        An idle node's poll interval (a deployed SuperNode sleeps 3 s when it found no
        message); 0 = it notices a message at once (simulation).
    """

    def __init__(
        self,
        run_config: Mapping[str, Any],
        num_nodes: int,
        clock: VirtualClock,
        *,
        task_s: float = 0.0,
        overhead_s: float = 0.0,
        poll_s: float = 0.0,
        jitter: float = 0.0,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        for name, value in (("task_s", task_s), ("overhead_s", overhead_s), ("poll_s", poll_s), ("jitter", jitter)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.cfg = AppConfig.from_run_config(run_config)
        # the clients do not sleep: their slowness is applied on the virtual clock
        self.client_run_config = {
            **run_config,
            "client-speeds": "",
            "task-s": 0.0,
            "uplink-mbps": 0.0,
            "persistent-worker": "off",
        }
        self.clock = clock
        self.task_s = task_s or self.cfg.emulate.task_s  # `task-s`: the deployment's fixed task length
        self.overhead_s, self.poll_s, self.jitter = overhead_s, poll_s, jitter
        # an idle poll is a deployment's: `prefetch = "auto"` takes its deployment behaviour
        self.emulates_deployment = poll_s > 0
        # a poll shorter than Flower's 3 s is asyncfl-supernode's, which its nodes report
        self.node_report = {"idle-poll-s": poll_s} if 0 < poll_s < 3 else {}
        self.rng = random.Random(self.cfg.train.seed)
        self.nodes = {i + 1: _Node(i + 1, i, self.cfg.emulate.speed_of(i)) for i in range(num_nodes)}
        self._pending: list[_Pending] = []
        self._seq = 0
        self.tasks = 0

    # ---- the Grid methods the server loop uses ---------------------------------------------
    def get_node_ids(self) -> list[int]:
        return sorted(self.nodes)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            node = self.nodes.get(msg.metadata.dst_node_id)
            if node is None:
                ids.append("")
                continue
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid  # what the SuperLink would assign
            reply, ready_at = self._run(node, msg)
            heapq.heappush(self._pending, _Pending(ready_at, self._seq, mid, reply))
            self._seq += 1
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        now, wanted = self.clock.now(), set(message_ids)
        out: list[_Pending] = []
        keep: list[_Pending] = []
        while self._pending and self._pending[0].ready_at <= now:
            item = heapq.heappop(self._pending)
            (out if item.message_id in wanted else keep).append(item)
        for item in keep:
            heapq.heappush(self._pending, item)
        return [item.reply for item in out]

    # ---- one task ----------------------------------------------------------------------------
    def _context(self, node: _Node) -> Context:
        return Context(
            run_id=1,
            node_id=node.node_id,
            state=RecordDict(),
            node_config={"partition-id": node.partition, "num-partitions": len(self.nodes), **self.node_report},
            run_config=self.client_run_config,
        )

    def _run(self, node: _Node, msg: Message) -> tuple[Message, float]:
        """The reply to `msg` (computed now, off the clock) and the virtual time it is ready."""
        from asyncfl.client.app import handle_train, handle_warmup

        now = self.clock.now()
        warmup = msg.metadata.message_type != "train"
        t0 = time.perf_counter()
        with self.clock.paused():
            reply = (handle_warmup if warmup else handle_train)(msg, self._context(node))
        if warmup:
            return reply, now
        self.tasks += 1
        measured = time.perf_counter() - t0
        metrics: MutableMapping[str, Any] = (
            reply.content["metrics"] if "metrics" in reply.content.metric_records else MetricRecord()
        )  # a MetricRecord either way
        steps = float(metrics.get("steps", 0) or 0)
        full = self.cfg.train.local_steps
        compute = self.task_s * (steps / full if steps and full > 0 else 1.0) if self.task_s else measured
        if self.cfg.emulate.uplink_mbps:
            compute += float(metrics.get("bytes", 0)) * 8 / (self.cfg.emulate.uplink_mbps * 1e6) / node.speed
        busy = node.busy_until > now
        noticed = now
        if not busy and self.poll_s:  # an idle SuperNode finds the message at its next poll
            waited = now - max(node.idle_since, node.busy_until)
            noticed = now + (-waited) % self.poll_s
        start = max(noticed, node.busy_until)
        if self.jitter:
            compute *= math.exp(self.rng.gauss(0.0, self.jitter))
        end = start + node.speed * compute + self.overhead_s
        node.busy_until, node.idle_since = end, end
        # what the server would measure in a deployment: the handler's time with the slowness
        metrics["client-s"] = node.speed * compute
        metrics["sleep-s"] = (node.speed - 1.0) * compute
        return reply, end


def run_emulated(
    run_config: Mapping[str, Any],
    num_nodes: int,
    *,
    task_s: float = 0.0,
    overhead_s: float = 0.0,
    poll_s: float = 0.0,
    jitter: float = 0.0,
    server_time: bool = True,
) -> dict[str, Any]:
    """One emulated run of `run_config` with `num_nodes` nodes; returns its summary (the run
    folder is written as by a real run: events.jsonl, summary.json, results.md, plot.png)."""
    from flwr.supercore.task_identity import TaskIdentity

    from asyncfl.server_app import run

    cfg = AppConfig.from_run_config(run_config)
    clock = VirtualClock(server_time=server_time)
    grid = EmulatedGrid(
        run_config, num_nodes, clock, task_s=task_s, overhead_s=overhead_s, poll_s=poll_s, jitter=jitter
    )
    # Flower stamps messages with the running task's identity; outside its runtime, set one
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        # duck-typed stand-ins: the loop uses get_node_ids/push_messages/pull_messages and now/sleep
        summary = run(cast("Grid", grid), cfg, clock=cast("Clock", clock))
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    summary["emulation"] = {
        "nodes": num_nodes,
        "task_s": task_s,
        "overhead_s": overhead_s,
        "poll_s": poll_s,
        "jitter": jitter,
        "server_time": server_time,
        "tasks": grid.tasks,
    }
    return summary


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------
def parse_run_config(spec: str) -> dict[str, Any]:
    """A TOML file, or `key=value ...` pairs with TOML values (`config.parse_overrides`)."""
    path = Path(spec)
    if spec.endswith(".toml") and path.is_file():
        with open(path, "rb") as f:
            return tomllib.load(f)
    return parse_overrides(spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m asyncfl.emulate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--run-config",
        action="append",
        default=[],
        help="a TOML file or 'key=value ...' pairs; repeat to layer overrides",
    )
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument(
        "--task-s",
        type=float,
        default=0.0,
        help="compute seconds per task with `local-steps` steps (0 = the run config's task-s, else measured)",
    )
    p.add_argument("--overhead-s", type=float, default=0.0, help="seconds per task beyond compute")
    p.add_argument("--poll-s", type=float, default=0.0, help="idle SuperNode poll (deployment: 3)")
    p.add_argument(
        "--jitter", type=float, default=0.0, help="sigma of the log-normal factor on each task's compute time"
    )
    p.add_argument(
        "--no-server-time",
        action="store_true",
        help="the server's own work takes no virtual time (reproducible, parallel runs)",
    )
    args = p.parse_args(argv)
    from asyncfl.logs import setup_logging

    setup_logging()
    run_config: dict[str, Any] = {}
    try:
        for spec in args.run_config:
            run_config.update(parse_run_config(spec))
        summary = run_emulated(
            run_config,
            args.nodes,
            task_s=args.task_s,
            overhead_s=args.overhead_s,
            poll_s=args.poll_s,
            jitter=args.jitter,
            server_time=not args.no_server_time,
        )
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"final ppl {summary.get('final_eval_ppl')}, {summary['updates_applied']} updates in "
        f"{summary['wall_clock_s']:.1f} virtual s ({summary['stop_reason']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
