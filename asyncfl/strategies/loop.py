"""The server loop shared by both modes: a Flower Strategy that drives its own training.

`ServerLoop.start()` owns the run (Flower's round-based `start()` is replaced, with its signature
and contract kept: initial arrays, num_rounds, timeout, train_config, evaluate_fn, and a `Result`
with the final arrays and the metric histories). What both modes share lives here: the nodes
(waiting for them, warm-up, late joiners, retiring), the task messages (the global weights or
an update log, `asyncfl.strategies.downlink`), pushing and pulling them, and decoding and
validating the replies. A subclass supplies the training loop itself (`_run`):

* `asyncfl.strategies.async_loop.AsyncLoop` -- every reply is applied through the rule the
  moment it arrives, weighted by its staleness; the idle node gets new work at once.
* `asyncfl.strategies.sync_loop.SyncLoop` -- the FedAvg baseline: a barrier per round and the
  sample-weighted mean of the decoded deltas.

`asyncfl.strategies.build.make_loop` picks one by `mode`; `asyncfl.strategies.api` builds one
for a Flower user's own ServerApp.

Faults never corrupt the global model: an error reply (client crash, node gone, TTL expired)
re-dispatches the node or retires it; a payload failing validation is rejected (logged) before
any tensor of the global state is touched.

Notes
-----
* Flower caveats followed (../shared/docs/flower-notes.md): one message per `push_messages`
  call, empty ids dropped, own poll interval, at most one message in flight per node in
  simulation (there a second message would run concurrently on another actor); a deployed
  SuperNode runs its messages one after another, so a second, queued one is safe there.
* The global trainable state `x` is the live parameter tensors of the server model, so rules
  update the model in place and evaluation needs no copy.
* `version` counts changes of `x` (a FedBuff buffer fill or a sync round is one version);
  `updates` counts accepted client updates. Staleness is measured in versions, as in FedBuff and
  FedAsync.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from asyncfl import wire
from asyncfl.compressors import PayloadError, decode_state
from asyncfl.flower_hooks import grid_in_deployment
from asyncfl.strategies.downlink import DownlinkLog, update_log_wanted
from asyncfl.strategies.history import checked_arrays, copy_into, global_arrays
from asyncfl.strategies.nodes import NodeInfo, Reply, Task
from asyncfl.strategies.server_state import Checkpointer, Clock, ServerState
from asyncfl.strategies.timing import PhaseTimer

log = logging.getLogger("asyncfl")

WARMUP_MESSAGE_TYPE = "query.warmup"  # answered by the ClientApp's @app.query("warmup")
_RETIRE_AT_ONCE = {ErrorCode.NODE_UNAVAILABLE, ErrorCode.LOAD_CLIENT_APP_EXCEPTION, ErrorCode.INVALID_FAB}
_FP16_MAX = 65504.0
# the entries of a training task's config the loop sets itself (a train_config may not)
TASK_CONFIG_KEYS = (
    "version",
    "repeat",
    "run-key",
    "rule",
    "downlink",
    "pack",
    "local-steps",
    "base-version",
    "log-coefs",
    "log-n",
)
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]  # Flower's centralized evaluation


def _checked_train_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """A `train_config` as the entries to add to every task's config; ValueError for a key the
    loop sets itself, flwr's TypeError for a value a ConfigRecord cannot hold."""
    entries = dict(config or {})
    clash = sorted(set(entries) & set(TASK_CONFIG_KEYS))
    if clash:
        raise ValueError(
            f"train_config key(s) {', '.join(clash)} are set by the strategy in every "
            f"task; use other names (reserved: {', '.join(TASK_CONFIG_KEYS)})"
        )
    ConfigRecord(entries)  # its type check, now rather than at the first task
    return entries


def _for_download(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """The host copy of a global tensor as sent to clients (`download-dtype`); a tensor beyond
    the fp16 range stays fp32."""
    t = t.detach()
    if dtype == "fp16" and t.is_floating_point() and (t.numel() == 0 or float(t.abs().max()) <= _FP16_MAX):
        return t.to(torch.float16).cpu()
    return t.float().cpu()


def handler_s(msg: Message) -> float | None:
    """The ClientApp's own time for a task (metric `client-s`), if the reply carries it."""
    if msg.has_error() or "metrics" not in msg.content.metric_records:
        return None
    value = msg.content["metrics"].get("client-s")
    return float(value) if isinstance(value, (int, float)) else None


class ServerLoop(Strategy):
    """Federated training over Flower messages; a subclass supplies the loop (`_run`) and how a
    batch of replies is applied through Flower's round hooks (`_apply_replies`).

    Parameters
    ----------
    state : ServerState
        The global model, its trainable tensors, the rule, selector, stop conditions,
        evaluator and recorder (built by `server_app`).
    clock : Clock, optional
        What the loop sleeps on between polls (default: real time).
    """

    def __init__(self, state: ServerState, clock: Clock | None = None) -> None:
        self.s = state
        self.cfg = state.cfg
        # the recorder's clock is the run clock (`elapsed`); this one sleeps between polls
        self.clock = clock or Clock()
        self.nodes: dict[int, NodeInfo] = {}
        self.inflight: dict[str, Task] = {}
        self._record_cache: tuple[int, ArrayRecord] | None = None
        self.rng = random.Random(self.cfg.train.seed)
        self.warmup_s: float | None = None  # how long the warm-up took (None: none was done)
        self.checkpointer = Checkpointer(state)
        self._last_node_scan = 0.0
        self.prefetch = False  # decided in start() (async mode only): queue next tasks ahead
        self.prefetched = 0  # tasks queued ahead
        self.push_s: list[float] = []  # how long the last task pushes took
        self.downlink: DownlinkLog | None = None  # decided in start(); None = full weights always
        self.log_tasks = 0  # tasks sent as an update log
        self.pack = False  # decided in start(): the global weights travel as one wire Array
        self.timer = PhaseTimer()  # where the server's time goes (pull, decode, apply, eval, ...)
        self.train_config: dict[str, Any] = {}  # start()'s train_config: added to every task's config

    # ----------------------------------------------------------------------------------------
    # What a mode supplies
    # ----------------------------------------------------------------------------------------
    def _run(self, grid: Grid) -> str:
        """Train until a stop condition; returns why it stopped."""
        raise NotImplementedError

    def _apply_replies(self, replies: list[Reply]) -> None:
        """Apply decoded replies handed in through Flower's `aggregate_train`."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------
    # Flower Strategy interface (round-based hooks; start() drives everything itself)
    # ----------------------------------------------------------------------------------------
    def configure_train(self, server_round, arrays, config, grid):  # noqa: D102
        return [self._task_message(n) for n in self._idle_nodes()]

    def aggregate_train(self, server_round, replies):  # noqa: D102
        decoded = [r for r in (self._decode(m, None) for m in replies) if r is not None]
        if decoded:
            self._apply_replies(decoded)
        return None, None

    def configure_evaluate(self, server_round, arrays, config, grid):  # noqa: D102
        return []  # evaluation is centralized on the server

    def aggregate_evaluate(self, server_round, replies):  # noqa: D102
        return None

    def summary(self) -> None:  # noqa: D102
        c = self.cfg
        log.info(
            "asyncfl: mode=%s rule=%s compressor=%s(rank=%d, %s) selection=%s concurrency=%s",
            c.server.mode,
            c.server.rule,
            c.compress.compressor,
            c.compress.rank,
            c.compress.compress_method,
            c.server.selection,
            c.server.concurrency or "all nodes",
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | Mapping[str, Any] | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Run the whole training (Flower's `Strategy.start`); returns a Flower `Result`.

        Every argument but `grid` is optional, and left out it changes nothing: the run is the
        one its config describes (this is how `asyncfl.server_app` calls it).

        Parameters
        ----------
        grid : Grid
            The Flower grid the tasks go through.
        initial_arrays : ArrayRecord, optional
            The weights training starts from, copied into the global state before anything is
            sent (each tensor keeps its device and dtype). Its keys and shapes must be exactly
            those of the trainable tensors (`ValueError` naming the first key that differs,
            with the expected and received shapes; nothing is changed then). None: the state's
            own weights. A checkpoint being resumed (`resume-from`) is restored after this, once
            the nodes are known, and wins.
        num_rounds : int, optional
            The config's `num-rounds` for this run (None: keep it), with its meaning unchanged:
            sync mode stops after that many rounds; async mode, unless `max-updates` is set,
            after `num_rounds` x nodes applied updates. With `time-budget-s` or `target-ppl`
            set, those stop the run and `num_rounds` does not.
        timeout : float, optional
            The config's `task-ttl-s` for this run (None: keep it): how long a task may wait for
            its reply; an expired task comes back as an error and the node gets a new one (or
            is retired after `max-node-failures` errors in a row).
        train_config : ConfigRecord or dict, optional
            Entries added to the config of every training task. A key the loop itself sets
            (`TASK_CONFIG_KEYS`) is a `ValueError`.
        evaluate_config : ConfigRecord, optional
            Accepted for Flower's signature; there is no client-side evaluation (evaluation is
            centralized), so a non-empty one is ignored with a warning.
        evaluate_fn : callable (server_round, arrays) -> MetricRecord | None, optional
            Flower's centralized evaluation, called at every evaluation point: at the start,
            every `eval-every` rounds (sync) or applied updates (async), and at the end (after
            a partly filled buffer is applied). `server_round` is the completed rounds (sync)
            or the global version (async); `arrays` the global trainable tensors then. It runs
            in addition to the state's own evaluator (the app's perplexity evaluation; none in
            a strategy built by `asyncfl.strategies.api`): both sets of metrics form one
            evaluation, and on a name both return `evaluate_fn`'s value is kept, so its
            `loss` / `ppl` drive `target-ppl` and `stop-rule` as the app's would.

        Returns
        -------
        Result
            `arrays`: the final global trainable tensors; `train_metrics_clientapp`: per round
            (sync) or version (async), the clients' metrics of the updates that made it,
            averaged weighted by `num-examples` (`history.aggregate_train`);
            `evaluate_metrics_serverapp`: every evaluation, by round (sync) or version (async);
            `evaluate_metrics_clientapp`: empty.
        """
        self._use_start_arguments(initial_arrays, num_rounds, timeout, train_config, evaluate_config)
        self.summary()
        self._configure(grid)
        own_evaluate = self.s.evaluate_fn
        evaluate = self._with_user_evaluation(own_evaluate, evaluate_fn)

        def timed_evaluate() -> dict[str, Any]:
            with self.timer.phase("eval"):
                return evaluate()

        self.s.evaluate_fn = timed_evaluate
        try:
            self.s.final_reason = self._train(grid)
            if self.prefetch:
                log.info("asyncfl: %d task(s) were queued ahead (prefetch)", self.prefetched)
            if self.downlink is not None:
                log.info("asyncfl: %d task(s) were sent as an update log", self.log_tasks)
            log.info("asyncfl: server time over %.1f s: %s", self.elapsed(), self.timer.describe(self.elapsed()))
            # the final evaluation, of the model as it ends, outside the server's phase timer
            self.s.evaluate_fn = evaluate
            self.s.ensure_final_eval(self.elapsed())
        finally:
            self.s.evaluate_fn = own_evaluate
        return self.s.history.result(global_arrays(self.s.x))

    def _configure(self, grid: Grid) -> None:
        """What depends on the kind of grid: packed arrays and the update-log downlink."""
        self.pack = self.cfg.server.pack == "on" or (self.cfg.server.pack == "auto" and grid_in_deployment(grid))
        if self.pack:
            log.info("asyncfl: arrays packed: the global weights travel as one Flower Array")
        if update_log_wanted(self.cfg, grid_in_deployment(grid)):
            dense = self._global_record().count_bytes()
            log.info(
                "asyncfl: downlink log on: nodes get the payloads applied since their last task "
                "while they are under half of the %.1f MB of full weights",
                dense / 1e6,
            )
            self.downlink = DownlinkLog(dense_bytes=dense)

    def _train(self, grid: Grid) -> str:
        """Wait for the nodes, warm them up, evaluate, train until a stop condition, and apply
        a partly filled buffer; returns why it stopped."""
        reason = "finished"
        try:
            self._wait_for_nodes(grid)
            if self.cfg.server.warmup:
                self._warm_up(grid)
            log.info("asyncfl: stops at: %s", self.s.limits())
            self.s.evaluate_and_log(self.elapsed(), round_=self.s.rounds)
            self.checkpointer = Checkpointer(self.s)
            reason = self._run(grid)
        except KeyboardInterrupt:
            reason = "interrupted"
            log.warning("asyncfl: interrupted; writing results before exit")
        self.s.flush_rule()
        return reason

    def run_extras(self) -> dict[str, Any]:
        """What the loop adds to summary.json (`extra`): counters and the server's time."""
        return {
            "version": self.s.version,
            "rounds": self.s.rounds,
            "prefetched_tasks": self.prefetched,
            "log_tasks": self.log_tasks,
            "warmup_s": self.warmup_s,
            "server_time_s": self.timer.summary(),
        }

    # ----------------------------------------------------------------------------------------
    # Strategy.start's optional arguments
    # ----------------------------------------------------------------------------------------
    def _use_start_arguments(
        self,
        initial_arrays: ArrayRecord | None,
        num_rounds: int | None,
        timeout: float | None,
        train_config: Mapping[str, Any] | None,
        evaluate_config: Mapping[str, Any] | None,
    ) -> None:
        """Check every argument first, then apply them (an error changes nothing)."""
        arrays = checked_arrays(initial_arrays, self.s.x) if initial_arrays is not None else None
        changes: dict[str, Any] = {}
        if num_rounds is not None:
            changes["num-rounds"] = num_rounds
        if timeout is not None:
            changes["task-ttl-s"] = timeout
        cfg = self.cfg.updated(changes) if changes else self.cfg
        task_config = _checked_train_config(train_config)
        if evaluate_config:
            log.warning(
                "asyncfl: evaluate_config ignored: evaluation is centralized (evaluate_fn), "
                "no evaluation tasks are sent"
            )
        if arrays is not None:
            copy_into(self.s.x, arrays)
            self._record_cache = None
            log.info("asyncfl: training starts from the %d initial arrays given", len(arrays))
        if changes:
            self.cfg = self.s.cfg = cfg
            self.s.recorder.config = cfg.to_dict()  # summary.json: the config that ran
            self.s.recorder.log_event("start_arguments", **changes)
        self.train_config = task_config

    def _with_user_evaluation(
        self, own: Callable[[], dict[str, Any]], evaluate_fn: EvaluateFn | None
    ) -> Callable[[], dict[str, Any]]:
        """`own` (the state's evaluator), then a Flower `evaluate_fn` if one is given, called
        with the round / version and the global arrays now; its metrics win on a shared name."""
        if evaluate_fn is None:
            return own

        def evaluate() -> dict[str, Any]:
            metrics = dict(own())
            record = evaluate_fn(self.s.server_round, global_arrays(self.s.x))
            if record is not None:
                metrics.update(record)
            return metrics

        return evaluate

    def _idle(self) -> None:
        """Sleep one poll interval between looks at the grid (timed as `idle`)."""
        t0 = time.perf_counter()
        self.clock.sleep(self.cfg.server.poll_interval_s)
        self.timer.add("idle", time.perf_counter() - t0)

    def elapsed(self) -> float:
        """Run time in seconds: the recorder's clock (continues on resume, restarts after the
        warm-up), so the loop's decisions and the event log read the same time."""
        return self.s.recorder.elapsed_s

    # ----------------------------------------------------------------------------------------
    # Warm-up: every node builds its model and loads its data before the clock starts
    # ----------------------------------------------------------------------------------------
    def _warm_up(self, grid: Grid) -> None:
        """Send each node a `query.warmup` message and wait for the answers (at most
        `node-wait-s`), then restart the run clock.

        A node's first task otherwise also pays its one-time costs (app install, worker start,
        model build, data, compiled graph: 8-30 s per node in deployment, 10-50 s per Ray actor
        in simulation), which lands in both modes' times, stretches every node's first task and
        makes those first updates stale. With the update-log downlink the message also carries the
        current weights, which the node keeps, so its first task is an update log too (otherwise
        every node's first task moves the full weights: ~25 s for the 124M shape with 4 nodes).
        A node that does not answer in time, or answers with an error, simply starts cold (an
        error is logged, not counted as a failure)."""
        t0 = self.clock.now()
        pending: dict[str, int] = {}
        node: int | None  # None below: a reply to no pending warm-up
        for node in self._alive_nodes():
            content = RecordDict(
                {"config": ConfigRecord({"run-key": self.s.run_key, "pack": self.pack, "version": self.s.version})}
            )
            if self.downlink is not None:  # the weights now, so that first tasks are update logs
                content["arrays"] = self._global_record()
            msg = Message(content, dst_node_id=node, message_type=WARMUP_MESSAGE_TYPE, ttl=self.cfg.server.node_wait_s)
            ids = [i for i in grid.push_messages([msg]) if i]
            if ids:
                pending[ids[0]] = node
        deadline = t0 + self.cfg.server.node_wait_s
        answered = 0
        while pending and self.clock.now() < deadline:
            for msg in grid.pull_messages(list(pending)):
                node = pending.pop(msg.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                if msg.has_error():
                    log.warning(
                        "asyncfl: node %s could not warm up (code %s): %s", node, msg.error.code, msg.error.reason
                    )
                    continue
                answered += 1
                metrics: Mapping[str, Any] = msg.content["metrics"] if "metrics" in msg.content.metric_records else {}
                self.nodes.setdefault(node, NodeInfo()).observe_poll(metrics.get("idle-poll-s"))
                if self.downlink is not None and metrics.get("holds-version") == self.s.version:
                    self.downlink.sent(node, self.s.version)  # it keeps them: send it logs
            if pending:
                self.clock.sleep(self.cfg.server.poll_interval_s)
        self.warmup_s = self.clock.now() - t0
        if pending:
            log.warning(
                "asyncfl: %d node(s) did not answer the warm-up within %.0f s; they start cold",
                len(pending),
                self.cfg.server.node_wait_s,
            )
        self.s.recorder.restart_clock()  # the run clock counts training, not start-up
        self.s.recorder.log_event("warmup", seconds=round(self.warmup_s, 3), nodes=answered)
        log.info("asyncfl: %d node(s) warmed up in %.1f s; the run clock starts now", answered, self.warmup_s)

    # ----------------------------------------------------------------------------------------
    # Messages: dispatch, pull, decode
    # ----------------------------------------------------------------------------------------
    def _global_record(self) -> ArrayRecord:
        """The global trainable state as an ArrayRecord, built once per version."""
        if self._record_cache is None or self._record_cache[0] != self.s.version:
            arrays = {k: _for_download(v, self.cfg.compress.download_dtype) for k, v in self.s.x.items()}
            record = wire.to_record({k: v.numpy() for k, v in arrays.items()}) if self.pack else ArrayRecord(arrays)
            self._record_cache = (self.s.version, record)
        return self._record_cache[1]

    def _task_message(self, node: int, repeat: int = 0) -> Message:
        config = {
            **self.train_config,
            "version": self.s.version,
            "repeat": repeat,
            "run-key": self.s.run_key,
            "rule": self.cfg.server.rule,
            "downlink": "full",
            "pack": self.pack,
        }
        if self.cfg.server.dylu:
            config["local-steps"] = self._dylu_steps(node)
        content = RecordDict()
        update_log = self.downlink.message_for(node, self.s.version) if self.downlink else None
        if update_log is None:
            content["arrays"] = self._global_record()
        else:  # the payloads since the version the node holds, instead of the weights
            config.update(
                {
                    "downlink": "log",
                    "base-version": update_log.base,
                    "log-coefs": update_log.coefs,
                    "log-n": len(update_log.records),
                }
            )
            for i, record in enumerate(update_log.records):
                content[f"log-{i}"] = record
        content["config"] = ConfigRecord(config)
        return Message(content, dst_node_id=node, message_type=MessageType.TRAIN, ttl=self.cfg.server.task_ttl_s)

    def _dylu_steps(self, node: int) -> int:
        """DyLU (Liu et al. 2024, sec. 4.2): local steps in proportion to the node's speed,
        `local-steps` for the fastest, so that all nodes' tasks take about as long. Speed =
        local steps per second of the ClientApp's own time (training, emulated slowness,
        encoding); a node not timed yet gets the full number."""
        full = max(self.cfg.train.local_steps, 1)
        mine = self.nodes[node].step_s
        fastest = min((i.step_s for i in self.nodes.values() if i.step_s and not i.retired), default=None)
        if mine is None or fastest is None:
            return full
        return max(1, round(full * fastest / mine))

    def _dispatch(self, grid: Grid, node: int, prefetched: bool = False) -> bool:
        # `repeat` > 0: this node already got a task of this version (prefetch with no update in
        # between); the client then draws other batches instead of repeating the same work
        info = self.nodes[node]
        repeat = info.repeat + 1 if info.last_version == self.s.version else 0
        t0, wall0 = self.clock.now(), time.perf_counter()
        message = self._task_message(node, repeat)
        ids = [i for i in grid.push_messages([message]) if i]
        self.push_s = [*self.push_s[-2:], self.clock.now() - t0]
        self.timer.add("dispatch", time.perf_counter() - wall0)
        if not ids:
            log.warning("asyncfl: node %s rejected a task; retiring it", node)
            self._retire(node, "push rejected")
            return False
        # the bytes it carries down: the full weights, or the update log's payloads
        # (count_bytes only sums the lengths of the arrays' buffers: cheap even for 500 MB)
        bytes_down = sum(r.count_bytes() for r in message.content.array_records.values())
        self.inflight[ids[0]] = Task(
            node=node,
            version=self.s.version,
            sent_at=self.elapsed(),
            prefetched=prefetched,
            bytes_down=bytes_down,
            pushed_wall=time.time(),
        )
        info.last_version, info.repeat, info.inflight = self.s.version, repeat, info.inflight + 1
        self.prefetched += prefetched
        if self.downlink is not None:
            self.log_tasks += "arrays" not in message.content.array_records
            self.downlink.sent(node, self.s.version)
            self.downlink.prune()
        return True

    def _pull(self, grid: Grid) -> Iterator[Message]:
        """The replies ready now, each checked against `inflight` when the caller reaches it:
        handling one reply can drop others of the same batch (an error that retires a node drops
        its queued task too, whose error reply may be in the batch)."""
        if not self.inflight:
            return
        t0 = time.perf_counter()
        replies = list(grid.pull_messages(list(self.inflight)))
        self.timer.add("pull", time.perf_counter() - t0)
        for msg in replies:
            if msg.metadata.reply_to_message_id in self.inflight:
                yield msg

    def _decode(self, msg: Message, task: Task | None) -> Reply | None:
        """Validate and decode a reply; log and return None for errors and bad payloads."""
        node_id = msg.metadata.src_node_id if task is None else task.node
        node = self.nodes.setdefault(node_id, NodeInfo())
        if msg.has_error():
            self._on_error(node_id, msg.error.code, msg.error.reason)
            return None
        metrics: dict[str, Any] = dict(msg.content["metrics"]) if "metrics" in msg.content.metric_records else {}
        if metrics.get("need-full"):  # its worker lost the weights the update log builds on
            log.info("asyncfl: node %s has no copy to apply an update log to; sending full weights", node_id)
            self.s.recorder.log_event("need_full", node=node_id, partition=node.partition)
            if self.downlink is not None:
                self.downlink.forget(node_id)
            return None
        try:
            record = msg.content.array_records.get("arrays")
            if record is None:
                raise PayloadError("reply has no ArrayRecord named 'arrays'")
            t0 = time.perf_counter()
            update = decode_state(
                record, reference=self.s.shapes, device=self.s.device, max_rank=self.cfg.compress.rank
            )
            self.s.sync_device()
            decode_s = time.perf_counter() - t0
            self.timer.add("decode", decode_s)
        except PayloadError as exc:
            log.warning("asyncfl: rejected payload from node %s: %s", node_id, exc)
            self.s.recorder.log_drop(
                node=node_id, partition=node.partition, staleness=None, reason=f"invalid payload: {exc}"
            )
            return None
        node.failures = 0
        node.observe_steps(metrics.get("steps"), metrics.get("client-s"))
        node.observe_poll(metrics.get("idle-poll-s"))
        node.partition = int(metrics.get("partition-id", -1))
        node.last_loss = float(metrics.get("train-loss", float("nan")))
        self.s.selector.observe(node_id, node.last_loss)
        # wall-clock spans around the node (one clock when server and nodes share a machine):
        # task pushed -> reply created, and reply created -> the server decodes it
        created = float(msg.metadata.created_at or 0.0)
        node_s = created - task.pushed_wall if task is not None and task.pushed_wall and created else None
        reply_age_s = time.time() - decode_s - created if created else None
        return Reply(
            node=node_id,
            task=task or Task(node_id, self.s.version, 0.0),
            update=update,
            metrics=metrics,
            decode_s=decode_s,
            record=record,
            node_s=node_s,
            reply_age_s=reply_age_s,
        )

    def _on_error(self, node_id: int, code: int, reason: str | None) -> None:
        node = self.nodes[node_id]
        node.failures += 1
        if self.downlink is not None:  # the worker may have died with its copy
            self.downlink.forget(node_id)
        self.s.recorder.log_drop(
            node=node_id, partition=node.partition, staleness=None, reason=f"error reply code {code}: {reason}"
        )
        log.warning("asyncfl: node %s error reply (code %s): %s", node_id, code, reason)
        if code in _RETIRE_AT_ONCE or node.failures >= self.cfg.server.max_node_failures:
            self._retire(node_id, f"error code {code} after {node.failures} consecutive failure(s)")

    def _retire(self, node_id: int, why: str) -> None:
        node = self.nodes.setdefault(node_id, NodeInfo())
        if node.retired:
            return
        node.retired, node.inflight = True, 0
        if self.downlink is not None:
            self.downlink.forget(node_id)
        for mid, task in list(self.inflight.items()):
            if task.node == node_id:
                del self.inflight[mid]
        self.s.rule.forget(node_id)
        self.s.recorder.log_event("node_retired", node=node_id, partition=node.partition, reason=why)
        log.warning("asyncfl: node %s retired (%s)", node_id, why)

    # ----------------------------------------------------------------------------------------
    # Nodes
    # ----------------------------------------------------------------------------------------
    def _wait_for_nodes(self, grid: Grid) -> None:
        deadline = time.monotonic() + self.cfg.server.node_wait_s
        while True:
            self._scan_nodes(grid, force=True)
            alive = self._alive_nodes()
            if len(alive) >= self.cfg.server.min_nodes:
                log.info("asyncfl: %d node(s) connected", len(alive))
                self.s.prepare(len(alive))
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(alive)} node(s) connected after {self.cfg.server.node_wait_s:.0f} s, "
                    f"`min-nodes` is {self.cfg.server.min_nodes}: start more SuperNodes or lower min-nodes"
                )
            time.sleep(0.5)

    def _scan_nodes(self, grid: Grid, force: bool = False) -> None:
        """Recruit late joiners; retire nodes that left while they had work."""
        now = time.monotonic()
        if not force and now - self._last_node_scan < 2.0:
            return
        self._last_node_scan = now
        online = set(grid.get_node_ids())
        for n in online:
            if n not in self.nodes:
                self.nodes[n] = NodeInfo()
        for n, info in self.nodes.items():
            if not info.retired and n not in online:
                self._retire(n, "left the federation")

    def _alive_nodes(self) -> list[int]:
        return sorted(n for n, i in self.nodes.items() if not i.retired)

    def _idle_nodes(self) -> list[int]:
        return sorted(n for n, i in self.nodes.items() if not i.retired and not i.inflight)

    def _working(self) -> int:
        return sum(1 for i in self.nodes.values() if not i.retired and i.inflight)
