"""Build the rule and the selector named in the run config."""

from __future__ import annotations

from asyncfl.config import AppConfig
from asyncfl.strategies.registry import make_rule
from asyncfl.strategies.rules import Rule
from asyncfl.strategies.selection import Selector, make_selector
from asyncfl.strategies.staleness import make_staleness_fn


def build_rule(cfg: AppConfig, num_clients: int) -> Rule:
    """The aggregation rule: `cfg.rule` in async mode, FedAvg(M) in sync mode."""
    momentum = dict(momentum=cfg.server_momentum, nesterov=cfg.nesterov)
    if cfg.mode == "sync":
        return make_rule("fedavg", server_lr=cfg.server_lr, **momentum)
    s = make_staleness_fn(cfg.staleness, cfg.staleness_a, cfg.staleness_b)
    n = max(num_clients, 1)
    kwargs = {
        "fedasync": dict(alpha=cfg.alpha, staleness_fn=s),
        "fedbuff": dict(buffer_size=cfg.buffer_size, server_lr=cfg.server_lr, staleness_fn=s, **momentum),
        "asgd": dict(server_lr=cfg.server_lr, delay_adaptive=cfg.delay_adaptive,
                     concurrency=max(cfg.concurrency or n, 1), **momentum),
        "dn": dict(buffer_size=cfg.buffer_size, server_lr=cfg.server_lr,
                   momentum=cfg.server_momentum, staleness_fn=s),
        "fadas": dict(buffer_size=cfg.buffer_size, server_lr=cfg.server_lr, beta1=cfg.fadas_beta1,
                      beta2=cfg.fadas_beta2, eps=cfg.fadas_eps, tau_c=cfg.fadas_tau_c or n),
        "shifted": dict(server_lr=cfg.server_lr, shift_alpha=cfg.shift_alpha, num_clients=n),
        "saga": dict(server_lr=cfg.server_lr),
        "saga-est": dict(server_lr=cfg.server_lr),
        "page": dict(server_lr=cfg.server_lr),
    }[cfg.rule]
    return make_rule(cfg.rule, **kwargs)


def build_selector(cfg: AppConfig) -> Selector:
    if cfg.selection == "loss-biased":
        return make_selector("loss-biased", floor=cfg.selection_floor)
    if cfg.selection == "time-aware":
        return make_selector("time-aware", floor=cfg.selection_floor, power=cfg.selection_power)
    return make_selector(cfg.selection)
