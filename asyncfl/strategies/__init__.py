"""Async strategy: update rules, staleness weights, client selection (the paper's bound
stopping rule, which the config checks too, is `asyncfl.stopping`), and the server loop as a
Flower strategy for your own ServerApp (`AsyncStrategy`, `SyncFedAvg`: `asyncfl.strategies.api`)."""

from asyncfl.strategies.adaptive import FADAS, DelayedNesterov
from asyncfl.strategies.api import AsyncStrategy, SyncFedAvg
from asyncfl.strategies.registry import RULES, make_rule
from asyncfl.strategies.rules import (
    ASGD,
    SAGA,
    Applied,
    FedAsync,
    FedAvg,
    FedBuff,
    Rule,
    ServerMomentum,
    Shifted,
    fedavg_mean,
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
from asyncfl.strategies.variance import Page, SagaEstimator

__all__ = [
    "AsyncStrategy",
    "SyncFedAvg",
    "ASGD",
    "FADAS",
    "RULES",
    "SAGA",
    "Applied",
    "DelayedNesterov",
    "FedAsync",
    "FedAvg",
    "FedBuff",
    "Page",
    "Rule",
    "SagaEstimator",
    "ServerMomentum",
    "Shifted",
    "fedavg_mean",
    "make_rule",
    "SELECTORS",
    "LossBiasedSelector",
    "SameSelector",
    "Selector",
    "UniformSelector",
    "make_selector",
    "STALENESS_KINDS",
    "ConstantStaleness",
    "HingeStaleness",
    "PolynomialStaleness",
    "StalenessFn",
    "check_staleness",
    "make_staleness_fn",
]
