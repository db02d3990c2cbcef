"""Flower ServerApp: build the model and the strategy from the run config, run, write results."""

from __future__ import annotations

import logging
import os

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from asyncfl.config import AppConfig, ConfigError
from asyncfl.data import load_eval_blocks, load_eval_stream, resolve_train_split
from asyncfl.flower_hooks import HookMissingError, grid_in_deployment
from asyncfl.logs import setup_logging
from asyncfl.model import build_model, build_tokenizer, resolve_device, save_model, trainable_state
from asyncfl.results import RunRecorder
from asyncfl.strategies.build import build_rule, build_selector, make_loop, run_dir_for
from asyncfl.strategies.server_state import Checkpointer, Clock, ServerState, load_checkpoint
from asyncfl.train import evaluate, evaluate_strided

app = ServerApp()
log = logging.getLogger("asyncfl")


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    try:
        cfg = AppConfig.from_run_config(context.run_config)
    except ConfigError as exc:
        log.error("asyncfl: bad run config: %s", exc)
        raise SystemExit(2) from None
    if grid_in_deployment(grid):  # deployment: replies are pulled from the SuperLink
        from asyncfl.deploy.pulls import ENV, SERVER_MODULE, install_fast_pulls, retry_from_env

        try:
            retry_s = retry_from_env()
            fast = install_fast_pulls(SERVER_MODULE, retry_s, required=ENV in os.environ)
        except (ValueError, HookMissingError) as exc:
            log.error("asyncfl: %s", exc)
            raise SystemExit(2) from None
        if fast:
            log.info("asyncfl: reply objects not yet uploaded are retried after %g s (Flower: 1 s)", retry_s)
    run(grid, cfg)


def run(grid: Grid, cfg: AppConfig, clock: Clock | None = None) -> dict:
    """Train with `cfg` over `grid`; returns the summary written to summary.json.

    `clock` (default: real time) is what the run is timed with; the emulator passes a
    virtual one."""
    clock = clock or Clock()
    device = resolve_device(cfg)
    model = build_model(cfg).to(device).eval()
    tokenizer = build_tokenizer(cfg)
    eval_blocks, eval_split = load_eval_blocks(cfg), cfg.data.eval_split
    stream = load_eval_stream(cfg) if cfg.data.eval_stride else None

    def evaluate_fn() -> dict[str, float]:
        if stream is not None:  # sliding windows over the eval token stream (README, "Evaluation")
            return evaluate_strided(
                model, stream, cfg.data.block_size, cfg.data.eval_stride, cfg.train.eval_batch_size, device
            )
        return evaluate(model, eval_blocks, cfg.train.eval_batch_size, device)

    run_dir = run_dir_for(cfg)
    ckpt = load_checkpoint(cfg.output.resume_from) if cfg.output.resume_from else None
    recorder = RunRecorder.for_run(
        cfg,
        run_dir,
        eval_split=eval_split,
        train_split=resolve_train_split(cfg),
        clock=clock.now,
        resume=ckpt is not None,
    )
    log.info(
        "asyncfl: run dir %s; training on split '%s', evaluating on '%s' (%d blocks)",
        run_dir,
        resolve_train_split(cfg),
        eval_split,
        len(eval_blocks),
    )
    state = ServerState(
        cfg=cfg,
        x=trainable_state(model),
        device=device,
        rule_factory=lambda n: build_rule(cfg, n),
        selector=build_selector(cfg),
        recorder=recorder,
        evaluate_fn=evaluate_fn,
        run_key=run_dir.name,
        run_dir=run_dir,
        resume=ckpt,
    )
    strategy = make_loop(state, clock=clock)
    strategy.start(grid)  # ends with the final evaluation, of the model as saved
    if cfg.output.checkpoint_every:
        Checkpointer(state).save(state)
    if cfg.output.save_model:
        save_model(model, tokenizer, run_dir / "model")
    summary = recorder.finish(stop_reason=state.final_reason, extra=strategy.run_extras())
    log.info(
        "asyncfl: done (%s): ppl %.2f -> %.2f in %.1f s; results in %s",
        state.final_reason,
        summary.get("initial_eval_ppl") or float("nan"),
        summary.get("final_eval_ppl") or float("nan"),
        summary.get("wall_clock_s") or 0.0,
        run_dir,
    )
    return summary
