"""The rules by name: the one place that lists them (config choices, builders, tests)."""

from __future__ import annotations

import inspect
from typing import Any

from asyncfl.strategies.adaptive import FADAS, DelayedNesterov
from asyncfl.strategies.rules import ASGD, SAGA, FedAsync, FedAvg, FedBuff, Rule, Shifted
from asyncfl.strategies.variance import Page, SagaEstimator

_REGISTRY: dict[str, type[Rule]] = {cls.name: cls for cls in (
    FedAsync, FedBuff, ASGD, DelayedNesterov, FADAS, Shifted, SAGA, SagaEstimator, Page)}
RULES = tuple(_REGISTRY)  # the async rules (`rule`); sync mode uses FedAvg


def make_rule(name: str, **kwargs: Any) -> Rule:
    """Build rule ``name`` (one of ``RULES``, or ``fedavg``) from its constructor's keyword
    arguments. Raises ``ValueError`` for an unknown name (listing ``RULES``), unknown or missing
    arguments (listing the accepted ones) or invalid values."""
    cls = FedAvg if name == "fedavg" else _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown rule {name!r}; choose one of {', '.join(RULES)}")
    params = inspect.signature(cls).parameters
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        raise ValueError(f"rule {name!r}: {err}; accepted arguments: "
                         f"{', '.join(params)}") from None
    return cls(**kwargs)
