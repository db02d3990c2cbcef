"""Flower ClientApp: receive the global weights, train locally, reply with the encoded delta.

This module imports only flwr, numpy and the config, so a per-message ClientApp process in
deployment starts fast; the training code is imported where it runs (here in simulation, or
in the node's persistent worker, see `asyncfl.client.node_worker`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from asyncfl.client.node import node_report, partition_of
from asyncfl.client.node_worker import run_remote
from asyncfl.config import AppConfig
from asyncfl.flower_hooks import clientapp_in_deployment
from asyncfl.logs import setup_logging
from asyncfl.protocol import UpdateLog
from asyncfl.wire import arrays_of

app = ClientApp()


def use_persistent_worker(cfg: AppConfig) -> bool:
    if cfg.model.persistent_worker == "auto":
        return clientapp_in_deployment()  # a per-task process: the node's warm worker trains
    return cfg.model.persistent_worker == "on"


def handle_train(msg: Message, context: Context) -> Message:
    """One training task: the whole client-side protocol (used by the train handler)."""
    setup_logging()
    cfg = AppConfig.from_run_config(context.run_config)
    pid, num_partitions = partition_of(context.node_config)
    # a ConfigRecord; its values come off the wire, so they are converted (and checked) here
    task_cfg: Mapping[str, Any] = msg.content["config"]
    task: dict[str, Any] = {
        "run-key": str(task_cfg.get("run-key", context.run_id)),
        "version": int(task_cfg.get("version", 0)),
        "repeat": int(task_cfg.get("repeat", 0)),
        "local-steps": int(task_cfg.get("local-steps", 0)),
    }  # > 0: DyLU's steps for this task
    logs = _update_log(msg)  # None: the message carries the full weights
    # the reply's payload is one wire Array (the compressor's record), whatever `pack` says
    if use_persistent_worker(cfg):  # deployment: the node's warm worker does the work
        if logs is None:
            records = [msg.content.array_records["arrays"]]
        else:  # each payload its own file, as received
            records = logs[2]
            task["update-log"] = {"base": logs[0], "coefs": logs[1], "n": len(logs[2])}
        node = {"partition-id": pid, "num-partitions": num_partitions}
        record, metrics = run_remote(dict(context.run_config), node, task, records)
    else:  # simulation: this process (a Ray actor) lives for the whole run
        from asyncfl.client.worker import get_worker

        global_state = None if logs is not None else _torch_views(arrays_of(msg.content["arrays"]))
        result = get_worker(cfg).run_task(
            cfg,
            global_state,
            pid,
            num_partitions,
            run_key=task["run-key"],
            version=task["version"],
            repeat=task["repeat"],
            update_log=None if logs is None else UpdateLog(*logs),
            local_steps=task["local-steps"],
        )
        record, metrics = result.record, result.metrics
    metrics = {**metrics, **node_report(context.node_config)}
    content = RecordDict({"arrays": record, "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


def _update_log(msg: Message) -> tuple[int, list[float], list[ArrayRecord]] | None:
    """(base version, coefficients, payload records) when the task came as an update log."""
    cfg: Mapping[str, Any] = msg.content["config"]
    if cfg.get("downlink", "full") != "log":
        return None
    return (
        int(cfg["base-version"]),
        [float(c) for c in cfg["log-coefs"]],
        [msg.content.array_records[f"log-{i}"] for i in range(int(cfg["log-n"]))],
    )


def _torch_views(arrays: dict) -> dict:
    """Tensors over the received bytes (read-only, no copy); the worker copies them into the
    model, so the 500 MB of a full 124M state are not duplicated on the way in."""
    import warnings

    import torch

    with warnings.catch_warnings():  # "non-writable tensor": it is only read
        warnings.simplefilter("ignore", UserWarning)
        return {k: torch.from_numpy(a) for k, a in arrays.items()}


def handle_warmup(msg: Message, context: Context) -> Message:
    """Build the model, load the partition and run one training step (compiled graphs,
    allocator, caches), so the first real task costs what every later one does; keep the
    weights the message carries (update-log downlink) as the base of the first task's log."""
    setup_logging()
    cfg = AppConfig.from_run_config(context.run_config)
    pid, num_partitions = partition_of(context.node_config)
    task_cfg: Mapping[str, Any] = msg.content["config"] if "config" in msg.content.config_records else {}
    task: dict[str, Any] = {
        "warmup": True,
        "run-key": str(task_cfg.get("run-key", context.run_id)),
        "version": int(task_cfg.get("version", 0)),
    }
    # with the update-log downlink the weights come along: the worker keeps them as its base
    weights = msg.content["arrays"] if "arrays" in msg.content.array_records else None
    if use_persistent_worker(cfg):
        node = {"partition-id": pid, "num-partitions": num_partitions}
        _, metrics = run_remote(dict(context.run_config), node, task, [] if weights is None else [weights])
    else:
        from asyncfl.client.worker import get_worker

        arrays = {} if weights is None else arrays_of(weights)
        metrics = get_worker(cfg).warm_up(
            cfg, pid, num_partitions, _torch_views(arrays) or None, run_key=task["run-key"], version=task["version"]
        )
    metrics = {**metrics, **node_report(context.node_config)}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)


@app.query("warmup")
def warmup(msg: Message, context: Context) -> Message:
    return handle_warmup(msg, context)
