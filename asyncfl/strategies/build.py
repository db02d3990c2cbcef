"""Build the rule, the selector and the run folder named in the run config."""

from __future__ import annotations

import time
from pathlib import Path

from asyncfl.config import AppConfig
from asyncfl.strategies.registry import make_rule
from asyncfl.strategies.rules import Rule
from asyncfl.strategies.selection import Selector, make_selector
from asyncfl.strategies.staleness import make_staleness_fn


def server_lr(cfg: AppConfig, num_clients: int) -> float:
    """`server-lr`, or with 0 (auto) the step at which every client delta counts as much as in
    FedAvg over n nodes (weight 1/n): the sync round's mean steps with 1; fedbuff's mean of K
    with K/n; rules adding single deltas (asgd, dn, shifted, saga-est) with 1/n; rules stepping
    with a mean over a table of all nodes (saga, page) with 1; fadas's AMSGrad step, which is
    per coordinate, not a multiple of a delta, with 1e-3. Measured: bench/README.md, "Async vs
    sync" (this is the 1/n of asgd and the K/n of fedbuff that won the sweeps there)."""
    if cfg.server_lr:
        return cfg.server_lr
    n = max(num_clients, 1)
    if cfg.mode == "sync" or cfg.rule in ("saga", "page"):
        return 1.0
    if cfg.rule == "fedbuff":
        return min(1.0, cfg.buffer_size / n)
    if cfg.rule == "fadas":
        return 1e-3
    return 1.0 / n


def build_rule(cfg: AppConfig, num_clients: int) -> Rule:
    """The aggregation rule: `cfg.rule` in async mode, FedAvg(M) in sync mode."""
    momentum = dict(momentum=cfg.server_momentum, nesterov=cfg.nesterov)
    lr = server_lr(cfg, num_clients)
    if cfg.mode == "sync":
        return make_rule("fedavg", server_lr=lr, **momentum)
    s = make_staleness_fn(cfg.staleness, cfg.staleness_a, cfg.staleness_b)
    n = max(num_clients, 1)
    kwargs = {
        "fedasync": dict(alpha=cfg.alpha, staleness_fn=s),
        "fedbuff": dict(buffer_size=cfg.buffer_size, server_lr=lr, staleness_fn=s, **momentum),
        "asgd": dict(server_lr=lr, delay_adaptive=cfg.delay_adaptive,
                     concurrency=max(cfg.concurrency or n, 1), **momentum),
        "dn": dict(buffer_size=cfg.buffer_size, server_lr=lr,
                   momentum=cfg.server_momentum, staleness_fn=s),
        "fadas": dict(buffer_size=cfg.buffer_size, server_lr=lr, beta1=cfg.fadas_beta1,
                      beta2=cfg.fadas_beta2, eps=cfg.fadas_eps, tau_c=cfg.fadas_tau_c or n),
        "shifted": dict(server_lr=lr, shift_alpha=cfg.shift_alpha, num_clients=n),
        "saga": dict(server_lr=lr),
        "saga-est": dict(server_lr=lr),
        "page": dict(server_lr=lr),
    }[cfg.rule]
    return make_rule(cfg.rule, **kwargs)


def build_selector(cfg: AppConfig) -> Selector:
    if cfg.selection == "loss-biased":
        return make_selector("loss-biased", floor=cfg.selection_floor)
    if cfg.selection == "time-aware":
        return make_selector("time-aware", floor=cfg.selection_floor, power=cfg.selection_power)
    return make_selector(cfg.selection)


def run_dir_for(cfg: AppConfig) -> Path:
    """`<results-dir>/<run-name>` (default name `<mode>-<rule>-<compressor>-<time>`); resuming
    without a `run-name`, the checkpoint's own run folder."""
    if cfg.resume_from and not cfg.run_name:
        return Path(cfg.resume_from).resolve().parent  # continue the checkpoint's run
    name = cfg.run_name or f"{cfg.mode}-{cfg.rule}-{cfg.compressor}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.results_dir) / name
