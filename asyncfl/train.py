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
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from asyncfl.config import AppConfig

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
        compiled = _COMPILED[id(model)] = cast(torch.nn.Module, torch.compile(model))  # an OptimizedModule
    return compiled


def num_steps(cfg: AppConfig, num_blocks: int) -> int:
    """Optimizer steps for one task: `local-steps`, or ceil(local-epochs x blocks / batch-size)."""
    if cfg.train.local_steps > 0:
        return cfg.train.local_steps
    return math.ceil(cfg.train.local_epochs * num_blocks / cfg.train.batch_size)


def batch_indices(num_blocks: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """(steps, batch_size) block indices from a stream of seeded permutations of the blocks."""
    g = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    perms = [torch.randperm(num_blocks, generator=g) for _ in range(math.ceil(need / num_blocks))]
    return torch.cat(perms)[:need].reshape(steps, batch_size)


def train_local(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    cfg: AppConfig,
    device: torch.device | str,
    *,
    generator_seed: int,
    bf16: bool | None = None,
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
    forward = _compiled(model) if cfg.model.compile and device.type == "cuda" else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=device.type == "cuda")
    steps = num_steps(cfg, len(blocks))
    order = batch_indices(len(blocks), steps, cfg.train.batch_size, generator_seed).to(device)
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
    samples = steps * cfg.train.batch_size
    tokens = samples * blocks.shape[1]
    return TrainResult(mean_loss, samples, tokens, steps, seconds, tokens / max(seconds, 1e-9))


def evaluate(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
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
            totals += torch.stack(
                [
                    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").double(),
                    (top5[..., 0] == target).sum().double(),
                    hits5.sum().double(),
                ]
            )
    model.train(was_training)
    n = blocks.shape[0] * (blocks.shape[1] - 1)
    loss, top1, top5 = (totals / n).tolist()
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "top1": top1, "top5": top5, "tokens": n}


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of Hugging Face's strided sliding-window perplexity over `n_tokens` tokens.

    Window i starts at `i * stride` and ends at `min(start + window, n_tokens)`; the loop stops
    at the first window that reaches the end. Each window scores the tokens that the previous
    window did not reach, from the previous window's end to its own; the first token of a
    window has no prediction in it, so scoring starts at in-window position >= 1.

    Returns
    -------
    list of (begin, end, first)
        Stream slice `[begin, end)` and the first scored in-window position: the scored tokens
        are `ids[begin + first:end]`, each predicted from the window's tokens before it.
    """
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window = {window}], got {stride}")
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens, got {n_tokens}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        out.append((begin, end, max(1, prev_end - begin)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def evaluate_strided(
    model: torch.nn.Module,
    ids: torch.Tensor,
    window: int,
    stride: int,
    batch_size: int,
    device: torch.device | str,
) -> dict[str, float | int]:
    """Next-token metrics with Hugging Face's strided sliding window ("Perplexity of
    fixed-length models") over the 1-D token stream `ids`.

    Windows of `window` tokens start every `stride` tokens (`sliding_windows`); each scores
    only the tokens past the previous window's end, so every such token is scored once, with
    at least `window - stride` tokens of context (fewer near the start). With `stride = window`
    and a stream of whole windows this is exactly `evaluate` on the consecutive blocks. Windows
    of one length are batched (`batch_size` at a time); the metrics are means over all scored tokens.

    Returns
    -------
    dict
        As `evaluate` (`loss`, `ppl`, `top1`, `top5`, `tokens` scored), plus `windows`.
    """
    device = torch.device(device)
    if ids.ndim != 1:
        raise ValueError(f"ids must be a 1-D token stream, got shape {tuple(ids.shape)}")
    wins = [w for w in sliding_windows(len(ids), window, stride) if w[1] - w[0] > w[2]]
    was_training = model.training
    model.to(device).eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top1 hits, top5 hits
    n = 0
    batches: list[list[tuple[int, int, int]]] = []
    for w in wins:  # consecutive windows of one length share a batch
        if batches and len(batches[-1]) < batch_size and batches[-1][0][1] - batches[-1][0][0] == w[1] - w[0]:
            batches[-1].append(w)
        else:
            batches.append([w])
    with torch.inference_mode():
        for batch in batches:
            x = torch.stack([ids[b:e] for b, e, _ in batch]).to(device, non_blocking=True)
            first = torch.tensor([f for _, _, f in batch], device=device)
            # label position j + 1 is predicted by logits at position j
            scored = torch.arange(1, x.shape[1], device=device)[None] >= first[:, None]  # (B, L-1)
            with _autocast(device):
                logits = model(input_ids=x, use_cache=False).logits
            logits = logits[:, :-1][scored].float()  # (scored tokens, V)
            target = x[:, 1:][scored]
            top5 = logits.topk(5, dim=-1).indices
            totals += torch.stack(
                [
                    F.cross_entropy(logits, target, reduction="sum").double(),
                    (top5[:, 0] == target).sum().double(),
                    (top5 == target[:, None]).any(-1).sum().double(),
                ]
            )
            n += sum(e - b - f for b, e, f in batch)  # = scored.sum(), without a host sync
    model.train(was_training)
    loss, top1, top5 = (totals / n).tolist()
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "top1": top1,
        "top5": top5,
        "tokens": n,
        "windows": len(wins),
    }
