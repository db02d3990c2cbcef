"""Local training and evaluation of a causal LM on packed token blocks (no Flower here).

Notes
-----
- bf16 autocast on CUDA, fp32 on CPU; `torch.compile` only on CUDA and when `compile` is set
  (the compiled wrapper is cached per model, it shares the model's parameters).
- The hot loop never syncs with the host: batch indices are drawn up front from a seeded
  generator, the data sits on the device, the loss is summed on the device and read once.
- Every batch is full (static shapes for `torch.compile`): the sampler walks a stream of
  reshuffled permutations, so `local-epochs` E over N blocks runs ceil(E * N / batch) steps.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

_COMPILED: dict[int, torch.nn.Module] = {}  # id(model) -> torch.compile(model)


@dataclass(frozen=True)
class TrainResult:
    """What one call of `train_local` did."""

    loss: float  # mean training loss over the steps (nats per token)
    samples: int  # blocks processed (steps x batch size; blocks may repeat)
    tokens: int  # tokens processed (samples x block size)
    steps: int  # optimizer steps
    seconds: float  # wall-clock time of the loop, device synchronized
    tokens_per_s: float


def _autocast(device: torch.device, bf16: bool | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast when `bf16` (None = on CUDA only), else full precision."""
    use_bf16 = device.type == "cuda" if bf16 is None else bf16
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compiled(model: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile(model)`, built once per model object."""
    compiled = _COMPILED.get(id(model))
    if compiled is None or getattr(compiled, "_orig_mod", None) is not model:
        compiled = _COMPILED[id(model)] = torch.compile(model)
    return compiled


def num_steps(cfg: Any, num_blocks: int) -> int:
    """Optimizer steps for one task: `local-steps`, or ceil(local-epochs x blocks / batch-size)."""
    if cfg.local_steps > 0:
        return cfg.local_steps
    return math.ceil(cfg.local_epochs * num_blocks / cfg.batch_size)


def batch_indices(num_blocks: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """(steps, batch_size) block indices from a stream of seeded permutations of the blocks."""
    g = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    perms = [torch.randperm(num_blocks, generator=g) for _ in range(math.ceil(need / num_blocks))]
    return torch.cat(perms)[:need].reshape(steps, batch_size)


def train_local(
    model: torch.nn.Module, blocks: torch.Tensor, cfg: Any, device: torch.device | str,
    *, generator_seed: int, bf16: bool | None = None,
) -> TrainResult:
    """Train `model` in place on `blocks` with AdamW(`lr`, `weight-decay`).

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM (HF GPT-2, possibly peft-wrapped); moved to `device`.
    blocks : torch.Tensor
        int64 (N, block_size) token blocks; labels are the inputs.
    cfg : AppConfig
        Uses `local-steps` / `local-epochs`, `batch-size`, `lr`, `weight-decay`, `compile`.
    device : torch.device or str
        Where to train; bf16 autocast on CUDA.
    generator_seed : int
        Seeds the shuffling (e.g. derived from seed, partition and model version).
    bf16 : bool or None, default None
        bf16 autocast; None = on CUDA, off on CPU (benchmarks override it).

    Returns
    -------
    TrainResult
    """
    device = torch.device(device)
    if blocks.ndim != 2 or len(blocks) == 0:
        raise ValueError(f"blocks must be a non-empty (N, block_size) tensor, got shape {tuple(blocks.shape)}")
    model.to(device).train()
    forward = _compiled(model) if cfg.compile and device.type == "cuda" else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")
    steps = num_steps(cfg, len(blocks))
    order = batch_indices(len(blocks), steps, cfg.batch_size, generator_seed).to(device)
    data = blocks.to(device, non_blocking=True)
    loss_sum = torch.zeros((), device=device)
    _sync(device)
    start = time.perf_counter()
    for step in range(steps):
        batch = data[order[step]]
        with _autocast(device, bf16):
            loss = forward(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += loss.detach().float()
    mean_loss = loss_sum.item() / steps  # the one host sync
    seconds = time.perf_counter() - start
    samples = steps * cfg.batch_size
    tokens = samples * blocks.shape[1]
    return TrainResult(mean_loss, samples, tokens, steps, seconds, tokens / max(seconds, 1e-9))


def evaluate(
    model: torch.nn.Module, blocks: torch.Tensor, batch_size: int, device: torch.device | str,
) -> dict[str, float | int]:
    """Next-token metrics of `model` on `blocks` (every position but the last of each block).

    Returns
    -------
    dict
        `loss` mean token cross-entropy (nats), `ppl` = exp(loss), `top1` / `top5` next-token
        accuracy, `tokens` number of predicted tokens. The model's train/eval mode is restored.
    """
    device = torch.device(device)
    if blocks.ndim != 2 or blocks.shape[1] < 2 or len(blocks) == 0:
        raise ValueError(f"blocks must be a non-empty (N, block_size >= 2) tensor, got {tuple(blocks.shape)}")
    was_training = model.training
    model.to(device).eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top1 hits, top5 hits
    with torch.inference_mode():
        for batch in blocks.split(batch_size):
            batch = batch.to(device, non_blocking=True)
            with _autocast(device):
                logits = model(input_ids=batch, use_cache=False).logits
            logits = logits[:, :-1].float()  # (B, T-1, V) predicts batch[:, 1:]
            target = batch[:, 1:]
            top5 = logits.topk(5, dim=-1).indices  # (B, T-1, 5), sorted: [..., 0] is top-1
            hits5 = (top5 == target.unsqueeze(-1)).any(-1)
            totals += torch.stack([
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").double(),
                (top5[..., 0] == target).sum().double(),
                hits5.sum().double(),
            ])
    model.train(was_training)
    n = blocks.shape[0] * (blocks.shape[1] - 1)
    loss, top1, top5 = (totals / n).tolist()
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "top1": top1, "top5": top5, "tokens": n}
