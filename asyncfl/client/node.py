"""What a client node knows about itself (no torch): its partition, its report to the server,
and where its local state lives.

Imported by the ClientApp, the node's persistent worker (`asyncfl.client.node_worker`), the worker
and the client state alike, so none of them imports another for these. (Whether this process runs
in Flower's deployment runtime: `asyncfl.flower_hooks.clientapp_in_deployment`.)
"""

from __future__ import annotations

import os
from pathlib import Path

from asyncfl.config import ConfigError

# Run-config keys that decide the model a node's worker holds (and so which persistent worker
# serves a run): anything else can change per task without a rebuild.
MODEL_KEYS = (
    "model",
    "pretrained",
    "model-preset",
    "lora-rank",
    "lora-alpha",
    "lora-dropout",
    "device",
    "seed",
    "block-size",
    "compile",
)

# True in the node's persistent worker process (`asyncfl.client.node_worker.serve`): it owns one partition
SERVING = False


def node_state_dir() -> Path:
    """Node-local state (client shifts, error-feedback residuals, worker logs):
    `ASYNCFL_NODE_DIR`, default `~/.cache/asyncfl/node-state`."""
    return Path(os.environ.get("ASYNCFL_NODE_DIR", Path.home() / ".cache" / "asyncfl" / "node-state"))


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


def node_report(node_config) -> dict[str, float]:
    """What the node tells the server about itself: `idle-poll-s`, how soon its SuperNode
    notices a new message when idle (set by `asyncfl-supernode`; absent: unknown, e.g.
    Flower's flower-supernode, which waits 3 s)."""
    value = node_config.get("idle-poll-s")
    try:
        return {"idle-poll-s": float(value)} if value is not None else {}
    except (TypeError, ValueError):
        return {}
