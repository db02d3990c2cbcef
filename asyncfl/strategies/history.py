"""What a Flower `Result` reports about a run, gathered while it runs.

`History` keeps, keyed by Flower's round number (completed rounds in sync mode, the global
version in async mode):

* `train`: the clients' training metrics of the updates that made that round / version
  (`aggregate_train`), and
* `evaluate`: the server-side evaluation of the global model at that round / version.

`Result` is then `History.result(arrays)`. The initial arrays and the Flower record types are
checked and converted here too (`checked_arrays`, `copy_into`, `metric_record`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result

from asyncfl.wire import arrays_of

# client metrics that identify, not measure: left out of the aggregated train metrics
_IDENTIFIERS = ("partition-id",)


def _number(value: Any) -> float | int | None:
    """`value` as a Python int or float (numpy and torch scalars included), else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, (np.generic, torch.Tensor)) and getattr(value, "ndim", 1) == 0:
        item = value.item()
        return item if isinstance(item, (int, float)) and not isinstance(item, bool) else None
    return None


def metric_record(metrics: Mapping[str, Any]) -> MetricRecord:
    """The numeric entries of `metrics` as a Flower `MetricRecord`: ints and floats (numpy and
    torch scalars converted) and lists of them; other values (text, None) are left out."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, (list, tuple)):
            items = [_number(i) for i in v]
            if items and all(i is not None for i in items):
                kinds = {type(i) for i in items}
                out[k] = list(items) if len(kinds) == 1 else [float(i) for i in items if i is not None]
        elif (n := _number(v)) is not None:
            out[k] = n
    return MetricRecord(out)


def aggregate_train(updates: list[Mapping[str, Any]]) -> MetricRecord:
    """The training metrics of several client updates in one record, as FedAvg weighs them:
    every numeric metric a client reports becomes its mean over the updates that report it,
    weighted by `num-examples` (1 where absent, the weight the sync mean uses too);
    `num-examples` is summed, `updates` counts them; `partition-id` is left out."""
    weights = [float(_number(m.get("num-examples")) or 1.0) for m in updates]
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    for m, w in zip(updates, weights):
        for k, v in m.items():
            n = _number(v)
            if n is None or k in _IDENTIFIERS or k == "num-examples" or not math.isfinite(n):
                continue
            sums[k] = sums.get(k, 0.0) + w * n
            totals[k] = totals.get(k, 0.0) + w
    out: dict[str, Any] = {k: sums[k] / totals[k] for k in sums if totals[k] > 0}
    examples = [_number(m.get("num-examples")) for m in updates]
    if any(e is not None for e in examples):
        out["num-examples"] = sum(e for e in examples if e is not None)
    out["updates"] = len(updates)
    return MetricRecord(out)


class History:
    """Train and evaluation metrics by Flower round (sync: rounds, async: versions)."""

    def __init__(self) -> None:
        self.train: dict[int, MetricRecord] = {}
        self.evaluate: dict[int, MetricRecord] = {}
        self._pending: list[Mapping[str, Any]] = []  # updates not yet part of a step

    def add_update(self, metrics: Mapping[str, Any]) -> None:
        """One accepted client update (its reply's metrics)."""
        self._pending.append(dict(metrics))

    def close_step(self, round_: int) -> None:
        """The updates added since the last step made round / version `round_`."""
        if self._pending:
            self.train[round_] = aggregate_train(self._pending)
            self._pending = []

    def add_evaluation(self, round_: int, metrics: Mapping[str, Any]) -> None:
        """The evaluation of the global model at round / version `round_` (a later evaluation
        of the same round / version, whose weights are the same, replaces it)."""
        record = metric_record(metrics)
        if record:
            self.evaluate[round_] = record

    def result(self, arrays: ArrayRecord) -> Result:
        """Flower's `Result`: the final arrays and the histories (no client-side evaluation)."""
        return Result(
            arrays=arrays, train_metrics_clientapp=dict(self.train), evaluate_metrics_serverapp=dict(self.evaluate)
        )


def global_arrays(x: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The global trainable tensors as an ArrayRecord (host copies, their own dtypes)."""
    return ArrayRecord({k: v.detach().cpu() for k, v in x.items()})


def checked_arrays(record: ArrayRecord, x: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The arrays of `record` (a wire record or a plain one) after checking that they are exactly the tensors
    of `x`: the same keys, each with the same shape. Raises ValueError naming the first
    offending key (and the expected and received shapes)."""
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"initial_arrays must be a flwr ArrayRecord, got {type(record).__name__}")
    arrays = arrays_of(record)
    missing = [k for k in x if k not in arrays]
    if missing:
        raise ValueError(
            f"initial_arrays lacks the model's trainable tensor {missing[0]!r} "
            f"(shape {tuple(x[missing[0]].shape)}); {len(missing)} missing in all"
        )
    extra = [k for k in arrays if k not in x]
    if extra:
        raise ValueError(
            f"initial_arrays has key {extra[0]!r}, which is not a trainable tensor of "
            f"the model ({len(extra)} such keys; the model has {len(x)})"
        )
    for k, t in x.items():
        if tuple(arrays[k].shape) != tuple(t.shape):
            raise ValueError(
                f"initial_arrays[{k!r}] has shape {tuple(arrays[k].shape)}, the model's "
                f"trainable tensor has shape {tuple(t.shape)}"
            )
    return arrays


def copy_into(x: Mapping[str, torch.Tensor], arrays: Mapping[str, np.ndarray]) -> None:
    """Copy `arrays` into the tensors of `x` in place (each keeps its device and dtype)."""
    with torch.no_grad():
        for k, t in x.items():
            t.copy_(torch.from_numpy(np.array(arrays[k])).to(t.device, t.dtype))
