"""Client-side work for one task: load the global weights, train, encode the delta.

Kept apart from `client_app.py` (which only speaks Flower) so tests and benchmarks can drive
the same code path. A `Worker` is built once per process and reused across messages: the
model, tokenizer and compressor are cached (Ray actors in simulation live for the whole run).

Notes
-----
* The delta is `local - received` over the trainable tensors only (with LoRA: the adapters).
* With the `shifted` rule the client compresses `delta - h_i` and keeps its shift `h_i` on
  node-local disk (`ASYNCFL_NODE_DIR`, default `~/.cache/asyncfl/node-state`), not in
  `context.state`, which would travel with every message.
* With `error-feedback` = "ef" the client adds the residual its earlier payloads dropped to the
  delta before encoding and keeps what this one drops (`asyncfl.client.state`).
* Heterogeneity emulation sleeps after the real work: a client with speed factor f sleeps
  (f - 1) x its measured compute time, or with `task-s` set until the task has lasted
  f x task-s (scaled by its share of `local-steps`), so that the emulated slowness does not
  follow how busy a shared GPU was; `uplink-mbps` adds bytes x 8 / rate.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from asyncfl.client.node import MODEL_KEYS, node_state_dir
from asyncfl.client.state import ClientShift, open_error_feedback
from asyncfl.compressors import decode_state, get_compressor
from asyncfl.config import AppConfig
from asyncfl.data import load_partition
from asyncfl.model import build_model, load_trainable_state, resolve_device, trainable_state
from asyncfl.protocol import UpdateLog
from asyncfl.train import train_local

log = logging.getLogger("asyncfl")


def task_seed(cfg: AppConfig, partition_id: int, version: int, repeat: int = 0) -> int:
    """A seed per (run seed, client, model version, repeat): fresh batches and sketches every
    task; `repeat` tells apart tasks that start from the same version (prefetch)."""
    key = (cfg.train.seed, partition_id, version) if repeat == 0 else (cfg.train.seed, partition_id, version, repeat)
    return hash(key) & 0x7FFFFFFF


def make_compressor(cfg: AppConfig, seed: int = 0):
    if cfg.compress.compressor == "none":
        return get_compressor("none")
    return get_compressor(
        cfg.compress.compressor,
        rank=cfg.compress.rank,
        method=cfg.compress.compress_method,
        dtype=cfg.compress.wire_dtype,
        energy=cfg.compress.energy or None,
        row_select=cfg.compress.row_select,
        seed=seed,
    )


@dataclass
class TaskResult:
    record: ArrayRecord
    metrics: dict[str, Any]


class Worker:
    """Holds the model for one process and runs training tasks on it."""

    def __init__(self, cfg: AppConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg)
        self.model = build_model(cfg).to(self.device)
        self.held: tuple[str, int, dict[str, torch.Tensor]] | None = None  # (run, version, weights)
        self._page_prev: dict[tuple[str, int], dict[str, torch.Tensor]] = {}  # page: last start point
        self._overrun_warned = False  # `task-s`: warn once when compute outlasts the emulated length

    def warm_up(
        self,
        cfg: AppConfig,
        partition_id: int,
        num_partitions: int,
        global_state: dict[str, torch.Tensor] | None = None,
        run_key: str = "",
        version: int = 0,
    ) -> dict[str, Any]:
        """Load the partition and run one training step, so data caches, compiled graphs and
        the allocator are ready before the first task. Safe: every task first loads the
        received weights into the model, and each task builds its own optimizer. Weights sent
        along (`global_state`, of `version`) are kept as the base of the next update log."""
        t0 = time.perf_counter()
        blocks = load_partition(cfg, partition_id, num_partitions)
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            one_step = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, local_steps=1))
            train_local(self.model, blocks, one_step, self.device, generator_seed=0)
        metrics: dict[str, Any] = {"partition-id": partition_id}
        if global_state is not None:
            self.held = (run_key, version, self._received(global_state))
            metrics["holds-version"] = version
        metrics["warmup-s"] = time.perf_counter() - t0
        return metrics

    def matches(self, cfg: AppConfig) -> bool:
        return all(cfg.value(k) == self.cfg.value(k) for k in MODEL_KEYS)

    def run_task(
        self,
        cfg: AppConfig,
        global_state: dict[str, torch.Tensor] | None,
        partition_id: int,
        num_partitions: int,
        run_key: str = "",
        version: int = 0,
        repeat: int = 0,
        update_log: UpdateLog | None = None,
        local_steps: int | None = None,
    ) -> TaskResult:
        """One task from the full global weights (`global_state`) or from an `update_log`
        over the weights this worker kept from its previous task; without those it answers
        with metrics {"need-full": 1} and no payload, and the server sends the weights.
        `local_steps` (DyLU) overrides the config's for this task."""
        t_start = time.perf_counter()
        seed = task_seed(cfg, partition_id, version, repeat)
        # the task's share of the configured work (DyLU hands out fewer or more local steps)
        step_share = local_steps / cfg.train.local_steps if local_steps and cfg.train.local_steps > 0 else 1.0
        if local_steps:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, local_steps=int(local_steps)))
        self.cfg, self.compressor = cfg, make_compressor(cfg, seed)
        # 1. data (cached per process) and the received global weights
        blocks = load_partition(cfg, partition_id, num_partitions)
        if update_log is not None:
            received = self._rebuild(run_key, update_log)
            if received is None:
                log.info(
                    "asyncfl: worker holds no weights of version %d (run %s): asking for them", update_log.base, run_key
                )
                return TaskResult(record=ArrayRecord(), metrics={"need-full": 1, "partition-id": partition_id})
        elif global_state is not None:
            received = self._received(global_state)
        else:
            raise ValueError("run_task needs the global weights or an update log, got neither")
        self.held = (run_key, version, received)  # never written: the log's next base
        # 2. local training; 3. delta = local - received (page: maybe a difference of two)
        stats, delta = self._train_delta(cfg, blocks, received, seed)
        page_diff = None
        if cfg.server.rule == "page":
            page_diff, delta = self._page_estimate(cfg, blocks, run_key, partition_id, received, seed, delta)
        shift = self._load_shift(cfg, run_key, partition_id) if cfg.server.rule == "shifted" else None
        to_send = shift.residual(delta) if shift is not None else delta
        # -- error feedback (asyncfl/client/state.py): add what earlier payloads dropped --------
        ef = open_error_feedback(cfg, run_key, partition_id, version, repeat, self.device)
        to_send = ef.add(to_send) if ef is not None else to_send
        # ---------------------------------------------------------------------------------------
        record, cm = self.compressor.encode_state(to_send, return_metrics=True)
        decoded = (
            self.compressor.decode_state(record, device=self.device) if shift is not None or ef is not None else None
        )  # what the server will apply
        # -- error feedback: keep what this payload dropped (reply metrics ef-norm, ef-reset) ----
        ef_metrics: dict[str, Any] = {}
        if ef is not None:
            assert decoded is not None  # decoded above whenever ef is set
            ef_metrics = ef.close(to_send, decoded, delta)
        # ---------------------------------------------------------------------------------------
        if shift is not None:  # both sides update h_i with the *decoded* residual
            assert decoded is not None  # decoded above whenever shift is set
            shift.update(decoded)
            path = self._shift_path(run_key, partition_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            shift.save(path)
        compute_s = time.perf_counter() - t_start
        # 4. heterogeneity emulation (real sleeps; reported wall-clock stays real)
        wait_s = cfg.emulate.slowness_s(partition_id, compute_s, step_share)
        sleep_s, overrun_s = max(wait_s, 0.0), max(-wait_s, 0.0)
        if overrun_s > 0 and not self._overrun_warned:
            self._overrun_warned = True
            log.warning(
                "asyncfl: partition %d computed %.2f s, %.2f s past its emulated task length "
                "(task-s=%g x factor %g): its tasks run slower than emulated; raise task-s",
                partition_id,
                compute_s,
                overrun_s,
                cfg.emulate.task_s,
                cfg.emulate.speed_of(partition_id),
            )
        if cfg.emulate.uplink_mbps:
            sleep_s += cm["bytes"] * 8 / (cfg.emulate.uplink_mbps * 1e6)
        if sleep_s > 0:
            time.sleep(sleep_s)
        metrics = {
            "partition-id": partition_id,
            "train-loss": stats.loss,
            "num-examples": stats.samples,
            "steps": stats.steps,
            "tokens": stats.tokens,
            "tokens-per-s": stats.tokens_per_s,
            "train-s": stats.seconds,
            "encode-s": cm["encode_s"],
            "bytes": cm["bytes"],
            "dense-bytes": cm["dense_bytes"],
            "rec-error": cm["mean_rel_error"],
            "fro-error": cm["mean_fro_error"],
            "sleep-s": sleep_s,
            "overrun-s": overrun_s,
            "client-s": time.perf_counter() - t_start,
            **ef_metrics,
        }
        if page_diff is not None:
            metrics["page-diff"] = page_diff
        return TaskResult(record=record, metrics=metrics)

    def _train_delta(
        self, cfg: AppConfig, blocks: torch.Tensor, start: dict[str, torch.Tensor], seed: int
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        """Train from `start` (loaded into the model) with this task's batches and dropout
        masks; returns the training stats and the delta `trained - start`."""
        load_trainable_state(self.model, start)
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # dropout masks: reproducible per task
            torch.manual_seed(seed)
            stats = train_local(self.model, blocks, cfg, self.device, generator_seed=seed)
        with torch.no_grad():
            delta = {k: v.detach() - start[k] for k, v in trainable_state(self.model).items()}
        return stats, delta

    def _page_estimate(
        self,
        cfg: AppConfig,
        blocks: torch.Tensor,
        run_key: str,
        partition_id: int,
        received: dict[str, torch.Tensor],
        seed: int,
        delta: dict[str, torch.Tensor],
    ) -> tuple[int, dict[str, torch.Tensor]]:
        """The client half of `page` (seed notes, Algorithm 6): with probability `page-p`, or
        when this worker does not hold the point of the node's previous task, the task's delta
        as it is ("fresh"); otherwise the difference between it and a delta trained from that
        previous point with the same batches and dropout masks ("diff"), which the server adds
        to its table entry. Returns (1 for a difference else 0, what to send); either way this
        task's start point is kept for the next one."""
        key = (run_key, partition_id)
        prev = self._page_prev.get(key)
        fresh = prev is None or random.Random(seed).random() < cfg.server.page_p
        self._page_prev[key] = received
        if fresh or prev is None:  # (prev is None means fresh)
            return 0, delta
        _, old = self._train_delta(cfg, blocks, prev, seed)
        return 1, {k: delta[k] - old[k] for k in delta}

    def _received(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The received weights as new tensors in the model's dtype, on its device."""
        target = trainable_state(self.model)
        return {
            k: torch.as_tensor(v).to(device=self.device, dtype=target[k].dtype if k in target else None, copy=True)
            for k, v in global_state.items()
        }

    def _rebuild(self, run_key: str, update_log: UpdateLog) -> dict[str, torch.Tensor] | None:
        """held weights + sum_i c_i decode(p_i), or None when this worker holds other weights."""
        if self.held is None or self.held[0] != run_key or self.held[1] != update_log.base:
            return None
        x = {k: v.clone() for k, v in self.held[2].items()}
        shapes = {k: v.shape for k, v in x.items()}
        with torch.no_grad():
            for coef, record in zip(update_log.coefs, update_log.records):
                update = decode_state(record, reference=shapes, device=self.device, max_rank=None)
                torch._foreach_add_(list(x.values()), [update[k] for k in x], alpha=coef)
        return x

    # ---- node-local shift state (rule "shifted") ------------------------------------------------
    @staticmethod
    def _shift_path(run_key: str, partition_id: int) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_key) or "run"
        return node_state_dir() / f"{safe}-p{partition_id}.pt"

    def _load_shift(self, cfg: AppConfig, run_key: str, partition_id: int) -> ClientShift:
        shift = ClientShift(shift_alpha=cfg.server.shift_alpha)
        if shift.load(self._shift_path(run_key, partition_id), missing_ok=True):
            shift.load_state_dict({k: v.to(self.device) for k, v in shift.state_dict().items()})
        return shift


_WORKER: Worker | None = None


def get_worker(cfg: AppConfig) -> Worker:
    """The process-wide worker, rebuilt only when the model-defining keys change."""
    global _WORKER
    if _WORKER is None or not _WORKER.matches(cfg):
        _WORKER = Worker(cfg)
    return _WORKER
