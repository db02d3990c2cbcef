"""Build the rule and the selector named in the run config."""

from __future__ import annotations

from asyncfl.config import AppConfig
from asyncfl.strategies.rules import make_rule
from asyncfl.strategies.selection import make_selector
from asyncfl.strategies.staleness import make_staleness_fn


def build_rule(cfg: AppConfig, num_clients: int):
    """The aggregation rule for `cfg.rule` (sync mode keeps one too, for checkpoints)."""
    s = make_staleness_fn(cfg.staleness, cfg.staleness_a, cfg.staleness_b)
    kwargs = {
        "fedasync": dict(alpha=cfg.alpha, staleness_fn=s),
        "fedbuff": dict(buffer_size=cfg.buffer_size, server_lr=cfg.server_lr, staleness_fn=s),
        "asgd": dict(server_lr=cfg.server_lr, delay_adaptive=cfg.delay_adaptive,
                     concurrency=max(cfg.concurrency or num_clients, 1)),
        "shifted": dict(server_lr=cfg.server_lr, shift_alpha=cfg.shift_alpha,
                        num_clients=max(num_clients, 1)),
        "saga": dict(server_lr=cfg.server_lr),
    }[cfg.rule]
    return make_rule(cfg.rule, **kwargs)


def build_selector(cfg: AppConfig):
    if cfg.selection == "loss-biased":
        return make_selector("loss-biased", floor=cfg.selection_floor)
    return make_selector(cfg.selection)
