"""What the server loop keeps between replies: model, counters, stop checks, checkpoints.

The loops (`loop.py`, `async_loop.py`, `sync_loop.py`) only move messages; everything they
decide with (the version clock, the rule, the selector, when to evaluate, when to stop, what to
log) lives here so it can be tested without Flower.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asyncfl.config import AppConfig
from asyncfl.strategies.history import History

log = logging.getLogger("asyncfl")


class Clock:
    """Real time for the server loop: monotonic seconds and sleeping. The emulator
    (`asyncfl.emulate`) passes a virtual clock with the same two methods instead."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass
class ServerState:
    cfg: AppConfig
    x: dict[str, torch.Tensor]  # live trainable tensors of the server model
    device: torch.device
    rule_factory: Callable[[int], Any]  # num_clients -> rule (built once nodes are known)
    selector: Any
    recorder: Any
    evaluate_fn: Callable[[], dict[str, Any]]
    run_key: str  # names node-local client state (shifts) for this run
    run_dir: Path
    num_clients: int = 0
    version: int = 0  # number of changes of x
    updates: int = 0  # accepted client updates
    rounds: int = 0  # sync rounds completed
    last_eval: dict[str, Any] = field(default_factory=dict)
    initial_loss: float | None = None
    delta_g: float | None = None  # running mean of clients' mean reconstruction error
    bound: Any = None
    rule: Any = None
    resume: dict[str, Any] | None = None  # checkpoint to restore once nodes are known
    final_reason: str = ""
    history: History = field(default_factory=History)  # what Strategy.start's Result reports
    _last_eval_at: tuple[int, int] = (-1, -1)  # (version, updates) the last eval saw
    _last_eval_round: int = -1  # rounds completed when the last eval ran

    def prepare(self, num_clients: int) -> None:
        """Build the rule for `num_clients` and restore a checkpoint, if resuming."""
        self.num_clients = max(self.num_clients, num_clients)
        self.recorder.meta["num_clients"] = self.num_clients
        self.rule = self.rule_factory(self.num_clients)
        if self.resume is not None:
            self.restore(self.resume)
            self.recorder.log_event(
                "resume", version=self.version, updates=self.updates, path=self.cfg.output.resume_from
            )
            log.info("asyncfl: resumed at v=%d updates=%d", self.version, self.updates)

    @property
    def shapes(self) -> dict[str, torch.Size]:
        return {k: v.shape for k, v in self.x.items()}

    def sync_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def server_round(self) -> int:
        """Flower's round number for this run: completed rounds (sync) or the version (async)."""
        return self.rounds if self.cfg.server.mode == "sync" else self.version

    def flush_rule(self) -> None:
        if self.rule.flush(self.x).stepped:  # a partly filled FedBuff buffer
            self.version += 1
            self.history.close_step(self.version)

    # ---- budget ------------------------------------------------------------------------------
    @property
    def rounds_limit_applies(self) -> bool:
        """`num-rounds` stops the run unless the user set a budget or a target: then those do
        (a budget of 150 s must not end after 3 rounds because num-rounds kept its default)."""
        return not (self.cfg.stop.time_budget_s or self.cfg.stop.target_ppl)

    @property
    def max_updates(self) -> float:
        """Async: `max-updates`, else num-rounds x nodes when that applies, else unlimited."""
        if self.cfg.stop.max_updates:
            return self.cfg.stop.max_updates
        if self.rounds_limit_applies:
            return self.cfg.stop.num_rounds * max(self.num_clients, 1)
        return math.inf

    def limits(self) -> str:
        """The conditions that can stop this run, for the log."""
        cfg, out = self.cfg, []
        if cfg.server.mode == "sync" and self.rounds_limit_applies:
            out.append(f"num-rounds {cfg.stop.num_rounds}")
        if cfg.server.mode == "async" and math.isfinite(self.max_updates):
            source = "" if cfg.stop.max_updates else f" (num-rounds {cfg.stop.num_rounds} x {self.num_clients} nodes)"
            out.append(f"max-updates {self.max_updates:.0f}{source}")
        if cfg.stop.time_budget_s:
            out.append(f"time-budget-s {cfg.stop.time_budget_s:g}")
        if cfg.stop.target_ppl:
            out.append(f"target-ppl {cfg.stop.target_ppl:g}")
        if cfg.stop.stop_rule != "none":
            out.append(f"stop-rule {cfg.stop.stop_rule}")
        return ", ".join(out) or "none (Ctrl-C)"

    def stop_reason(self, elapsed: float) -> str | None:
        cfg = self.cfg
        if cfg.server.mode == "sync" and self.rounds_limit_applies and self.rounds >= cfg.stop.num_rounds:
            return f"num-rounds {cfg.stop.num_rounds} reached"
        if cfg.server.mode == "async" and self.updates >= self.max_updates:
            return f"max-updates {self.max_updates:.0f} reached"
        if cfg.stop.time_budget_s and elapsed >= cfg.stop.time_budget_s:
            return f"time-budget-s {cfg.stop.time_budget_s:g} reached"
        ppl = self.last_eval.get("ppl")
        if cfg.stop.target_ppl and ppl is not None and ppl <= cfg.stop.target_ppl:
            return f"target-ppl {cfg.stop.target_ppl:g} reached (ppl {ppl:.2f})"
        if self.bound is not None and self.delta_g is not None:
            clock = self.server_round
            if self.bound.should_stop(clock, self.delta_g):
                t_star = self.bound.threshold(self.delta_g)
                return f"bound stop rule: t={clock} >= t*={t_star:.1f} (delta_g={self.delta_g:.4g})"
        return None

    # ---- evaluation --------------------------------------------------------------------------
    def evaluate_and_log(self, elapsed: float, round_: int) -> dict[str, Any]:
        """Evaluate now, log it and return the metrics. The app's evaluator gives loss, ppl,
        top1 and top5; a Flower user's `evaluate_fn` (`asyncfl.strategies.api`) may give any
        other metrics, logged as they are. No metrics at all (a strategy with no evaluator):
        nothing is logged."""
        metrics = self.evaluate_fn()
        self.last_eval = metrics
        self._last_eval_at = (self.version, self.updates)
        self._last_eval_round = self.rounds
        if not metrics:
            return metrics
        self.history.add_evaluation(self.server_round, metrics)
        if self.initial_loss is None and "loss" in metrics:
            self.initial_loss = metrics["loss"]
        if self.bound is None and self.cfg.stop.stop_rule == "bound" and self.initial_loss is not None:
            self.bound = self.cfg.bound_rule(self.num_clients or 1, a1=self.initial_loss)
        fields = {k: v for k, v in metrics.items() if k not in ("version", "round", "updates")}
        self.recorder.log_eval(version=self.version, round=round_, updates=self.updates, **fields)
        if all(k in metrics for k in ("loss", "ppl", "top1")):
            log.info(
                "asyncfl: eval  v=%d updates=%d t=%.1fs  loss=%.4f ppl=%.2f top1=%.3f",
                self.version,
                self.updates,
                elapsed,
                metrics["loss"],
                metrics["ppl"],
                metrics["top1"],
            )
        else:
            log.info(
                "asyncfl: eval  v=%d updates=%d t=%.1fs  %s",
                self.version,
                self.updates,
                elapsed,
                " ".join(f"{k}={v}" for k, v in metrics.items()),
            )
        return metrics

    def evaluate_if_due(self, elapsed: float, per_round: bool = False, auto_every: int = 1) -> None:
        """Evaluate once `eval-every` rounds (`per_round`) or updates have passed since the
        last evaluation; `eval-every` 0 takes `auto_every` (the loop's task slots in async)."""
        every = self.cfg.stop.eval_every or max(1, auto_every)
        since = self.rounds - self._last_eval_round if per_round else self.updates - self._last_eval_at[1]
        if since >= every and self._last_eval_at != (self.version, self.updates):
            self.evaluate_and_log(elapsed, round_=self.rounds)

    def ensure_final_eval(self, elapsed: float) -> dict[str, Any]:
        """Evaluate the model as it is now, unless the last evaluation saw this very state:
        the final figures describe the saved model (a flushed FedBuff buffer is a new version
        with no new update)."""
        if self._last_eval_at != (self.version, self.updates):
            return self.evaluate_and_log(elapsed, round_=self.rounds)
        return self.last_eval

    # ---- one accepted update -----------------------------------------------------------------
    def after_update(
        self,
        reply: Any,
        staleness: int,
        weight: float,
        stepped: bool,
        decode_apply_s: float,
        elapsed: float,
        bump_version: bool = True,
    ) -> None:
        m = reply.metrics
        self.history.add_update(m)
        if stepped and bump_version:  # async: x moved (sync: the loop closes its rounds)
            self.version += 1
            self.history.close_step(self.version)
        self.updates += 1
        fro = m.get("fro-error")
        if fro is not None and math.isfinite(float(fro)):
            n = min(self.updates, max(self.num_clients, 1))  # running mean over ~one sweep
            self.delta_g = float(fro) if self.delta_g is None else self.delta_g + (float(fro) - self.delta_g) / n
        enc = m.get("encode-s")  # the client's encode time (absent: not reported)
        self.recorder.log_update(
            version=self.version,
            node=reply.node,
            partition=m.get("partition-id"),
            staleness=staleness,
            weight=weight,
            train_loss=m.get("train-loss"),
            bytes=m.get("bytes"),
            dense_bytes=m.get("dense-bytes"),
            rec_error=m.get("rec-error"),
            fro_error=fro,
            decode_apply_s=decode_apply_s,
            train_s=m.get("train-s"),
            tokens_per_s=m.get("tokens-per-s"),
            round_trip_s=elapsed - reply.task.sent_at,
            service_s=elapsed - (reply.task.started_at if reply.task.started_at is not None else reply.task.sent_at),
            prefetched=reply.task.prefetched,
            client_s=m.get("client-s"),
            sleep_s=m.get("sleep-s"),
            overrun_s=m.get("overrun-s"),
            encode_s=float(enc) if isinstance(enc, (int, float)) else None,
            bytes_down=reply.task.bytes_down,
            node_s=getattr(reply, "node_s", None),
            reply_age_s=getattr(reply, "reply_age_s", None),
            **({"ef_norm": m["ef-norm"], "ef_reset": m.get("ef-reset")} if "ef-norm" in m else {}),
        )
        log.info(
            "asyncfl: update %d/%s v=%d node=%s p=%s staleness=%d w=%.3f loss=%.3f %.0f B",
            self.updates,
            f"{self.max_updates:.0f}" if self.cfg.server.mode == "async" and math.isfinite(self.max_updates) else "-",
            self.version,
            reply.node,
            m.get("partition-id"),
            staleness,
            weight,
            float(m.get("train-loss", float("nan"))),
            float(m.get("bytes", 0)),
        )

    # ---- checkpoints -------------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        return {
            "format": "asyncfl-checkpoint-1",
            "version": self.version,
            "updates": self.updates,
            "rounds": self.rounds,
            "run_key": self.run_key,
            "state": {k: v.detach().cpu().clone() for k, v in self.x.items()},
            "rule": self.rule.state_dict(),
            "last_eval": dict(self.last_eval),
            "initial_loss": self.initial_loss,
            "delta_g": self.delta_g,
            "config": self.cfg.to_dict(),
        }

    def restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("format") != "asyncfl-checkpoint-1":
            raise ValueError(f"not an asyncfl checkpoint (format={ckpt.get('format')!r})")
        state = ckpt["state"]
        if set(state) != set(self.x) or any(state[k].shape != self.x[k].shape for k in state):
            raise ValueError(
                "checkpoint tensors do not match this model's trainable state (different model, preset or lora-rank?)"
            )
        with torch.no_grad():
            for k, v in self.x.items():
                v.copy_(state[k].to(v.device, v.dtype))
        self.rule.load_state_dict(ckpt["rule"])
        self.version, self.updates, self.rounds = ckpt["version"], ckpt["updates"], ckpt["rounds"]
        self.run_key = ckpt["run_key"]
        self.initial_loss, self.delta_g = ckpt.get("initial_loss"), ckpt.get("delta_g")


class Checkpointer:
    """Writes `<run_dir>/checkpoint.pt` every `checkpoint-every` accepted updates."""

    def __init__(self, state: ServerState) -> None:
        self.every = state.cfg.output.checkpoint_every
        self.path = state.run_dir / "checkpoint.pt"
        self._last = state.updates

    def maybe_save(self, state: ServerState) -> None:
        if not self.every or state.updates - self._last < self.every:
            return
        self.save(state)

    def save(self, state: ServerState) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save(state.checkpoint(), tmp)
        tmp.replace(self.path)  # atomic: a crash never leaves half a checkpoint
        self._last = state.updates
        state.recorder.log_event("checkpoint", version=state.version, updates=state.updates, path=str(self.path))
        log.info("asyncfl: checkpoint v=%d updates=%d -> %s", state.version, state.updates, self.path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"resume-from: no checkpoint file at {p}")
    return torch.load(p, map_location="cpu", weights_only=True)
