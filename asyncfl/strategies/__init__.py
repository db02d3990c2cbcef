"""Async strategy: update rules, staleness weights, client selection, stopping rules."""

from asyncfl.strategies.rules import (
    ASGD,
    RULES,
    SAGA,
    Applied,
    ClientShift,
    FedAsync,
    FedBuff,
    Rule,
    Shifted,
    fedavg_mean,
    make_rule,
)
from asyncfl.strategies.selection import (
    SELECTORS,
    LossBiasedSelector,
    SameSelector,
    Selector,
    UniformSelector,
    make_selector,
)
from asyncfl.strategies.staleness import (
    STALENESS_KINDS,
    ConstantStaleness,
    HingeStaleness,
    PolynomialStaleness,
    StalenessFn,
    check_staleness,
    make_staleness_fn,
)
from asyncfl.strategies.stopping import BoundStopRule, StopConditions

__all__ = [
    "ASGD", "RULES", "SAGA", "Applied", "ClientShift", "FedAsync", "FedBuff", "Rule",
    "Shifted", "fedavg_mean", "make_rule",
    "SELECTORS", "LossBiasedSelector", "SameSelector", "Selector", "UniformSelector",
    "make_selector",
    "STALENESS_KINDS", "ConstantStaleness", "HingeStaleness", "PolynomialStaleness",
    "StalenessFn", "check_staleness", "make_staleness_fn",
    "BoundStopRule", "StopConditions",
]
