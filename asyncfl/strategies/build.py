"""Build the rule, the selector, the loop and the run folder named in the run config."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from asyncfl.choices import RuleName
from asyncfl.config import AppConfig
from asyncfl.strategies.async_loop import AsyncLoop
from asyncfl.strategies.loop import ServerLoop
from asyncfl.strategies.registry import make_rule
from asyncfl.strategies.rules import Rule
from asyncfl.strategies.selection import Selector, make_selector
from asyncfl.strategies.server_state import Clock, ServerState
from asyncfl.strategies.staleness import make_staleness_fn
from asyncfl.strategies.sync_loop import SyncLoop


def server_lr(cfg: AppConfig, num_clients: int) -> float:
    """`server-lr`, or with 0 (auto) the step at which every client delta counts as much as in
    FedAvg over n nodes (weight 1/n): the sync round's mean steps with 1; fedbuff's mean of K
    with K/n; rules adding single deltas (asgd, dn, shifted, saga-est) with 1/n; rules stepping
    with a mean over a table of all nodes (saga, page) with 1; fadas's AMSGrad step, which is
    per coordinate, not a multiple of a delta, with 1e-3. Measured: bench/README.md, "Async vs
    sync" (this is the 1/n of asgd and the K/n of fedbuff that won the sweeps there)."""
    if cfg.server.server_lr:
        return cfg.server.server_lr
    n = max(num_clients, 1)
    if cfg.server.mode == "sync" or cfg.server.rule in ("saga", "page"):
        return 1.0
    if cfg.server.rule == "fedbuff":
        return min(1.0, cfg.server.buffer_size / n)
    if cfg.server.rule == "fadas":
        return 1e-3
    return 1.0 / n


def build_rule(cfg: AppConfig, num_clients: int) -> Rule:
    """The aggregation rule: `cfg.server.rule` in async mode, FedAvg(M) in sync mode."""
    c = cfg.server
    momentum: dict[str, Any] = dict(momentum=c.server_momentum, nesterov=c.nesterov)
    lr = server_lr(cfg, num_clients)
    if c.mode == "sync":
        return make_rule("fedavg", server_lr=lr, **momentum)
    s = make_staleness_fn(c.staleness, c.staleness_a, c.staleness_b)
    n = max(num_clients, 1)
    kwargs: dict[RuleName, dict[str, Any]] = {
        "fedasync": dict(alpha=c.alpha, staleness_fn=s),
        "fedbuff": dict(buffer_size=c.buffer_size, server_lr=lr, staleness_fn=s, **momentum),
        "asgd": dict(server_lr=lr, delay_adaptive=c.delay_adaptive, concurrency=max(c.concurrency or n, 1), **momentum),
        "dn": dict(buffer_size=c.buffer_size, server_lr=lr, momentum=c.server_momentum, staleness_fn=s),
        "fadas": dict(
            buffer_size=c.buffer_size,
            server_lr=lr,
            beta1=c.fadas_beta1,
            beta2=c.fadas_beta2,
            eps=c.fadas_eps,
            tau_c=c.fadas_tau_c or n,
        ),
        "shifted": dict(server_lr=lr, shift_alpha=c.shift_alpha, num_clients=n),
        "saga": dict(server_lr=lr),
        "saga-est": dict(server_lr=lr),
        "page": dict(server_lr=lr),
    }
    return make_rule(c.rule, **kwargs[c.rule])


def build_selector(cfg: AppConfig) -> Selector:
    if cfg.server.selection == "loss-biased":
        return make_selector("loss-biased", floor=cfg.server.selection_floor)
    if cfg.server.selection == "time-aware":
        return make_selector("time-aware", floor=cfg.server.selection_floor, power=cfg.server.selection_power)
    return make_selector(cfg.server.selection)


def make_loop(state: ServerState, clock: Clock | None = None) -> ServerLoop:
    """The server loop of the state's `mode`: `AsyncLoop` or `SyncLoop` (FedAvg)."""
    loop = SyncLoop if state.cfg.server.mode == "sync" else AsyncLoop
    return loop(state, clock=clock)


def run_dir_for(cfg: AppConfig) -> Path:
    """`<results-dir>/<run-name>` (default name `<mode>-<rule>-<compressor>-<time>`); resuming
    without a `run-name`, the checkpoint's own run folder."""
    if cfg.output.resume_from and not cfg.output.run_name:
        return Path(cfg.output.resume_from).resolve().parent  # continue the checkpoint's run
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.output.run_name or f"{cfg.server.mode}-{cfg.server.rule}-{cfg.compress.compressor}-{stamp}"
    return Path(cfg.output.results_dir) / name
