"""The rules by name: the classes of `asyncfl.choices.RuleName`, the names the config accepts."""

from __future__ import annotations

import inspect
from typing import Any

from asyncfl.choices import RuleName, check_choice, choices
from asyncfl.strategies.adaptive import FADAS, DelayedNesterov
from asyncfl.strategies.rules import ASGD, SAGA, FedAsync, FedAvg, FedBuff, Rule, Shifted
from asyncfl.strategies.variance import Page, SagaEstimator

_REGISTRY: dict[str, type[Rule]] = {
    cls.name: cls for cls in (FedAsync, FedBuff, ASGD, DelayedNesterov, FADAS, Shifted, SAGA, SagaEstimator, Page)
}
RULES = tuple(_REGISTRY)  # the async rules (`rule`); sync mode uses FedAvg
if RULES != choices(RuleName):
    raise ImportError(f"rule registry {RULES} is not asyncfl.choices.RuleName {choices(RuleName)}")


def make_rule(name: str, **kwargs: Any) -> Rule:
    """Build rule ``name`` (one of ``RULES``, or ``fedavg``) from its constructor's keyword
    arguments. Raises ``ValueError`` for an unknown name (listing ``RULES``), unknown or missing
    arguments (listing the accepted ones) or invalid values."""
    check_choice("`rule`", name, (*RULES, "fedavg"))
    cls = FedAvg if name == "fedavg" else _REGISTRY[name]
    params = inspect.signature(cls).parameters
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        raise ValueError(f"rule {name!r}: {err}; accepted arguments: {', '.join(params)}") from None
    return cls(**kwargs)
