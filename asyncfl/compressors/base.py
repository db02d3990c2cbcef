"""Common compressor interface: options, the dense/low-rank policy and the batched encoder.

Paper: Section 3 ("Linear approximation techniques in Algorithm 1"): every 2-D parameter
delta S (m x n) is replaced by rank-k factors; Section 3.3 defines the reconstruction errors.

Notes
- 1-D tensors (biases, LayerNorm) and matrices with min(m, n) <= k, or whose factors would not
  be smaller ((m + n) k min_ratio >= m n), are sent raw, bit-exact, in their own dtype.
- >2-D tensors are factorized as (shape[0], -1); factorization is in fp32 on the tensor's own
  device; matrices of one shape are stacked and factorized as one batch (GPT-2 has 12 of each).
- All device work of a state is launched before the first host transfer (no per-tensor sync).
- Randomness comes from a private `torch.Generator` seeded with `seed` at every call, so
  `encode` is a pure function of (options, input); the global RNG is never touched.
- `energy`: adaptive rank = fewest leading components capturing that fraction of ||S||_F^2
  (of the centered S for PCA), capped by `rank`; 0 or None means fixed rank.
"""

from __future__ import annotations

import math
import time
from abc import ABC
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import ClassVar, cast

import numpy as np
import torch
from torch import Tensor

from asyncfl.choices import CompressMethod, RowSelect, WireDtype, check_choice, choices

from . import codec
from .codec import LAYOUTS, Payload

METHODS = choices(CompressMethod)
WIRE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
ROW_SELECT = choices(RowSelect)
if tuple(WIRE_DTYPES) != choices(WireDtype):
    raise ImportError(f"wire dtypes {tuple(WIRE_DTYPES)} are not asyncfl.choices.WireDtype {choices(WireDtype)}")


@dataclass(frozen=True)
class CompressorOptions:
    """Options shared by all compressors (identity ignores them)."""

    rank: int = 10  # components per matrix: higher => more bytes, lower error (paper: 10)
    method: str = "randomized"  # "exact" (SVD / scipy QRCP) | "randomized" (sketching)
    dtype: str = "fp16"  # wire dtype of the factors: "fp16" halves the bytes of "fp32"
    energy: float | None = None  # adaptive rank (fraction of energy); None/0 = fixed rank
    oversample: int = 10  # extra sketch columns: higher => closer to exact, slower
    power_iters: int = 2  # subspace iterations: higher => closer to exact, slower
    row_select: str = "greedy"  # CUR rows: "greedy" | "pivoted" | "leverage" | "uniform" (paper)
    seed: int = 0  # seed of the private generator
    min_ratio: float = 1.0  # send dense when (m + n) * rank * min_ratio >= m * n

    def __post_init__(self) -> None:
        _check_int("rank", self.rank, 1)
        _check_int("oversample", self.oversample, 0)
        _check_int("power_iters", self.power_iters, 0)
        _check_int("seed", self.seed, 0)
        _check_choice("method", self.method, METHODS)
        _check_choice("dtype", self.dtype, tuple(WIRE_DTYPES))
        _check_choice("row_select", self.row_select, ROW_SELECT)
        if self.energy == 0:
            object.__setattr__(self, "energy", None)
        if self.energy is not None and not (_is_real(self.energy) and 0 < self.energy <= 1):
            raise ValueError(f"`energy` must be None or a float in (0, 1], got {self.energy!r}")
        if not (_is_real(self.min_ratio) and self.min_ratio > 0):
            raise ValueError(f"`min_ratio` must be a number > 0, got {self.min_ratio!r}")


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(key: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{key}` must be an int >= {low}, got {value!r}")


def _check_choice(key: str, value, allowed: tuple[str, ...]) -> None:
    check_choice(f"`{key}`", value, allowed)


OPTION_NAMES = tuple(f.name for f in fields(CompressorOptions))


def should_compress(shape: tuple[int, ...], rank: int, min_ratio: float = 1.0) -> bool:
    """Whether a tensor of this shape is factorized (True) or sent raw (False)."""
    if len(shape) < 2 or 0 in shape:
        return False
    m, n = shape[0], math.prod(shape[1:])
    return min(m, n) > rank and (m + n) * rank * min_ratio < m * n


class Compressor(ABC):
    """Encode a delta tensor (or a whole state) into low-rank factors, and decode it back.

    Subclasses set `name` and implement `factorize`; everything else is shared.
    """

    name: ClassVar[str]
    compresses: ClassVar[bool] = True  # False: every tensor travels dense (identity)

    def __init__(self, **options) -> None:
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for compressor '{self.name}'; accepted: {OPTION_NAMES}")
        self.options = CompressorOptions(**options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    # --- the math, per subclass -------------------------------------------------------------
    def factorize(self, x: Tensor, gen: torch.Generator) -> tuple[dict[str, Tensor], Tensor]:
        """Factors of x (b, m, n) fp32 at full rank k (rank axis last but for CUR rows),
        and per-matrix ranks (b,) long; only the first ranks[i] components are sent."""
        raise NotImplementedError(f"compressor '{self.name}' sends every tensor dense")

    # --- one tensor -------------------------------------------------------------------------
    def encode(self, tensor: Tensor) -> Payload:
        """Encode one tensor into a `Payload` (dense or low-rank, by `should_compress`)."""
        return self._encode_many({"tensor": tensor})[0]["tensor"]

    def decode(self, payload: Payload, *, device=None, dtype: torch.dtype | None = torch.float32) -> Tensor:
        """Validate and rebuild one payload (raises `PayloadError`)."""
        return codec.decode_payloads({"tensor": payload}, device=device, dtype=dtype)["tensor"]

    # --- a whole state ----------------------------------------------------------------------
    def encode_state(self, state: Mapping[str, Tensor], *, return_metrics: bool = False):
        """Encode every tensor of `state` into one self-describing `ArrayRecord`.

        Returns the record, or `(record, metrics)` with metrics `bytes` (record's
        `count_bytes()`), `dense_bytes` (fp32 size of the state), `rel_error` (name ->
        ||S - S_hat||_F / ||S||_F, 0 for dense tensors), `mean_rel_error` and `mean_fro_error`
        (the paper's (1/n) sum ||S_i - S_hat_i||_F), both over the factorized matrices,
        `ranks` (name -> rank, 0 for dense), `n_compressed` and `encode_s` (seconds).
        """
        start = time.perf_counter()
        payloads, groups = self._encode_many(state)
        record = codec.build_record(payloads, self.name)
        seconds = time.perf_counter() - start
        if not return_metrics:
            return record
        metrics = _metrics(state, payloads, groups, self.name)
        metrics.update(bytes=record.count_bytes(), encode_s=seconds)
        return record, metrics

    def decode_state(
        self,
        record,
        reference: Mapping | None = None,
        *,
        device=None,
        dtype: torch.dtype | None = torch.float32,
        max_rank: int | None = -1,
    ) -> dict[str, Tensor]:
        """Decode any compressor's record, as the module-level `decode_state`.

        Differs only in `max_rank`: the default -1 means this compressor's `rank` (a peer
        configured alike never sends more); None accepts any rank up to min(m, n). Pass
        `reference` (expected names and shapes) for untrusted input: it also bounds the size
        of what is built. Raises `PayloadError` before producing any output.
        """
        limit = self.options.rank if max_rank == -1 else max_rank
        return codec.decode_state(record, reference, device=device, dtype=dtype, max_rank=limit)

    # --- shared driver ----------------------------------------------------------------------
    def _encode_many(self, state: Mapping[str, Tensor]):
        """Payloads for every tensor (order kept) and the device-side groups (for metrics).

        1. split dense tensors from factorized ones, group the latter by (device, m, n);
        2. launch every group's factorization (no host sync);
        3. copy everything to the host at once, then cut the payloads out of it.
        """
        opts, dense = self.options, []
        groups: dict[tuple[torch.device, int, int], list[str]] = {}
        for name, t in state.items():
            _check_tensor(name, t)
            if self.compresses and should_compress(tuple(t.shape), opts.rank, opts.min_ratio):
                m = t.shape[0]
                groups.setdefault((t.device, m, t.numel() // m), []).append(name)
            else:
                dense.append(name)
        launched = []
        with torch.no_grad():
            for (device, m, n), names in groups.items():
                mats = [state[nm].detach().reshape(m, n) for nm in names]
                x = (mats[0][None] if len(mats) == 1 else torch.stack(mats)).float()
                gen = torch.Generator(device).manual_seed(opts.seed)
                factors, ranks = self.factorize(x, gen)
                wire, exps = _to_wire(factors, WIRE_DTYPES[opts.dtype])
                launched.append((names, x, wire, exps, ranks))
            raw = [state[nm].detach().to(_dense_wire(state[nm].dtype)) for nm in dense]
            parts = [[*g[2].values(), *g[3].values(), g[4]] for g in launched]
            host = iter(to_host(raw + [t for part in parts for t in part]))
        payloads = {
            nm: Payload("dense", tuple(state[nm].shape), _dtype_name(state[nm]), {"data": next(host)}) for nm in dense
        }
        for names, _, wire, exps, _ in launched:
            host_factors = {k: next(host) for k in wire}
            scales = {k: next(host) for k in exps}
            payloads.update(_split(self.name, names, state, host_factors, scales, next(host)))
        return {name: payloads[name] for name in state}, launched


def _check_tensor(name: str, t) -> None:
    if not isinstance(name, str) or "/" in name:
        raise ValueError(f"tensor name {name!r} must be a str without '/'")
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise ValueError(f"tensor '{name}' must be a floating-point torch.Tensor, got {getattr(t, 'dtype', type(t))}")


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _dense_wire(dtype: torch.dtype) -> torch.dtype:
    """Lossless wire dtype of a raw tensor (its own; bf16 widened to fp32)."""
    return getattr(torch, codec.DENSE_WIRE[str(dtype).removeprefix("torch.")])


def to_host(tensors: list[Tensor]) -> list[np.ndarray]:
    """Numpy copies of many tensors with one device-to-host transfer per (device, dtype)."""
    out: list[np.ndarray | None] = [None] * len(tensors)
    buckets: dict = {}
    for i, t in enumerate(tensors):
        if t.device.type == "cpu":
            out[i] = t.contiguous().numpy().copy()
        else:
            buckets.setdefault((t.device, t.dtype), []).append(i)
    for idx in buckets.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx]).cpu().numpy()
        start = 0
        for i in idx:
            size = tensors[i].numel()
            out[i] = flat[start : start + size].reshape(tuple(tensors[i].shape))
            start += size
    return cast(list[np.ndarray], out)  # every slot is filled above


def _to_wire(factors: dict[str, Tensor], wire: torch.dtype):
    """Cast float factors to the wire dtype; fp16 ones are first scaled by 2**-e per matrix."""
    out, exps = {}, {}
    for key, f in factors.items():
        if not f.is_floating_point() or wire == torch.float32:
            out[key] = f if not f.is_floating_point() else f.float()
            continue
        amax = f.abs().flatten(1).amax(1)  # (b,)
        e = torch.frexp(amax).exponent.clamp(-codec.MAX_EXPONENT, codec.MAX_EXPONENT)
        e = torch.where(amax > 0, e, torch.zeros_like(e))  # max |f| 2**-e in [0.5, 1)
        out[key] = (f * torch.exp2(-e.float()).view(-1, *[1] * (f.ndim - 1))).to(wire)
        exps[key] = e
    return out, exps


def _split(kind: str, names: list[str], state, host: dict, exps: dict, ranks: np.ndarray):
    """A group's host factors, cut per matrix to its rank, as payloads."""
    out = {}
    for i, name in enumerate(names):
        t = state[name]
        m, n, r = t.shape[0], t.numel() // t.shape[0], int(ranks[i])
        axes = LAYOUTS[kind].shapes(m, n, -1)  # -1 marks the rank axis
        factors = {}
        for key, arr in host.items():
            cut = tuple(slice(0, r) if d == -1 else slice(None) for d in axes[key])
            factors[key] = np.ascontiguousarray(arr[i][cut])
        scales = {k: int(v[i]) for k, v in exps.items()}
        out[name] = Payload(kind, tuple(t.shape), _dtype_name(t), factors, scales)
    return out


def _metrics(state, payloads, groups, kind: str) -> dict:
    """Reconstruction errors from the wire values (fp16 rounding included), one host copy."""
    errs, refs, order = [], [], []
    for names, x, wire, exps, ranks in groups:
        f = {}
        for key, v in wire.items():
            if v.is_floating_point():
                scale = torch.exp2(exps[key].float()) if key in exps else torch.ones(len(names))
                v = v.float() * scale.to(v.device).view(-1, *[1] * (v.ndim - 1))
            f[key] = v
        m, n = x.shape[1:]  # x: (b, m, n)
        axes = LAYOUTS[kind].shapes(m, n, -1)
        for key, shape in axes.items():  # zero the components beyond each matrix's rank
            if -1 in shape and key != LAYOUTS[kind].index:
                axis = 1 + shape.index(-1)
                keep = torch.arange(f[key].shape[axis], device=x.device) < ranks[:, None]
                f[key] = f[key] * keep.view(len(names), *[-1 if a == axis else 1 for a in range(1, f[key].ndim)])
        recon = LAYOUTS[kind].rebuild(f)
        errs.append((x - recon).flatten(1).norm(dim=1).cpu())
        refs.append(x.flatten(1).norm(dim=1).cpu())
        order += names
    fro = dict(zip(order, torch.cat(errs).tolist())) if order else {}
    ref = dict(zip(order, torch.cat(refs).tolist())) if order else {}
    rel = {name: (fro[name] / ref[name] if ref[name] > 0 else 0.0) if name in fro else 0.0 for name in state}
    n = max(len(fro), 1)
    return {
        "dense_bytes": sum(4 * t.numel() for t in state.values()),
        "rel_error": rel,
        "mean_rel_error": sum(rel[k] for k in fro) / n,
        "mean_fro_error": sum(fro.values()) / n,
        "ranks": {name: payloads[name].rank for name in state},
        "n_compressed": len(fro),
    }
