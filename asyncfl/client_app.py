"""Flower ClientApp: receive the global weights, train locally, reply with the encoded delta."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from asyncfl.config import AppConfig, ConfigError
from asyncfl.logs import setup_logging
from asyncfl.worker import get_worker

app = ClientApp()


def partition_of(node_config) -> tuple[int, int]:
    """`partition-id` / `num-partitions` from the node config, checked."""
    try:
        pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            "node config must set integer `partition-id` and `num-partitions` "
            f"(e.g. flower-supernode --node-config 'partition-id=0 num-partitions=2'), got {dict(node_config)}"
        ) from None
    if not 0 <= pid < n:
        raise ConfigError(f"node config `partition-id` must be in [0, {n}), got {pid}")
    return pid, n


def handle_train(msg: Message, context: Context) -> Message:
    """One training task: the whole client-side protocol, used by `@app.train()`."""
    setup_logging()
    cfg = AppConfig.from_run_config(context.run_config)
    pid, num_partitions = partition_of(context.node_config)
    task_cfg = msg.content["config"]
    global_state = msg.content["arrays"].to_torch_state_dict()
    worker = get_worker(cfg)
    result = worker.run_task(cfg, global_state, pid, num_partitions,
                             run_key=str(task_cfg.get("run-key", context.run_id)),
                             version=int(task_cfg.get("version", 0)))
    content = RecordDict({"arrays": result.record, "metrics": MetricRecord(result.metrics)})
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)
