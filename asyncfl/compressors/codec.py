"""Wire format of compressed deltas: `Payload` per tensor, `ArrayRecord` per state, validation.

Paper: Section 3 (PCA, QRCP, CUR factors) and Section 3.4 (the decoded delta feeds the server).

Notes
- A record is one wire `Array` (`asyncfl.wire`: safetensors bytes, nothing unpickled): the
  factors under `"<tensor>/<factor>"` (tensor names may not hold "/"), and in the safetensors
  `__metadata__` `format` ("1"), `compressor` and `tensors` (JSON: name -> kind, shape, dtype,
  fp16 scales).
- Layouts (m = shape[0], n = numel / m, r = rank), all decoded in fp32:
  dense: data (original shape, original dtype; bf16 travels as fp32, losslessly);
  pca: u (m, r) = U_r S_r, v (n, r), mean (n,) -> u v^T + mean;
  qrcp: rt (m, r) = (R_r P^T)^T (permutation folded in, so no pivots travel), q (n, r) -> rt q^T;
  cur: z (m, r), rows (r, n) = S[idx], idx (r,) int64 -> z rows.
- fp16 factors are scaled by a power of two (exponent in the metadata) so their largest entry
  lies in [0.5, 1): tiny deltas neither underflow nor lose precision; fp32 factors are unscaled.
- Decoding validates the whole record before producing any tensor; every failure is a
  `PayloadError` naming the tensor and the problem.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from asyncfl import wire

FORMAT_VERSION = 1
MAX_EXPONENT = 127  # |power-of-two scale exponent| accepted on decode
FLOAT_WIRE = ("float16", "float32")
# original dtype -> dtype of a dense tensor on the wire (lossless)
DENSE_WIRE = {"float16": "float16", "float32": "float32", "bfloat16": "float32", "float64": "float64"}


class PayloadError(ValueError):
    """A compressed payload or record is malformed, inconsistent or unsafe to decode."""


# --- layouts: factor shapes and reconstruction per kind ---------------------------------------
@dataclass(frozen=True)
class Layout:
    """Wire layout of one kind: factor shapes for (m, n, r) and the reconstruction (m, n).

    `rebuild` also works on batches (b, ...) of factors (used for the encoder's metrics).
    """

    shapes: Callable[[int, int, int], dict[str, tuple[int, ...]]]
    rebuild: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    rank_at: tuple[str, int]  # (factor, axis) whose length is the rank
    index: str | None = None  # name of the int64 row-index factor, if any

    @property
    def factors(self) -> tuple[str, ...]:
        return tuple(self.shapes(1, 1, 1))


LAYOUTS: dict[str, Layout] = {
    "pca": Layout(
        lambda m, n, r: {"u": (m, r), "v": (n, r), "mean": (n,)},
        lambda f: f["u"] @ f["v"].mT + f["mean"].unsqueeze(-2),
        ("u", 1),
    ),
    "qrcp": Layout(lambda m, n, r: {"rt": (m, r), "q": (n, r)}, lambda f: f["rt"] @ f["q"].mT, ("rt", 1)),
    "cur": Layout(
        lambda m, n, r: {"z": (m, r), "rows": (r, n), "idx": (r,)},
        lambda f: f["z"] @ f["rows"],
        ("idx", 0),
        index="idx",
    ),
}
KINDS = ("dense", *LAYOUTS)
COMPRESSORS = ("none", *LAYOUTS)  # compressor names; "none" sends every tensor dense


@dataclass(frozen=True)
class Payload:
    """One encoded tensor: kind, original shape and dtype, numpy factors, fp16 scale exponents."""

    kind: str  # "dense" | "pca" | "qrcp" | "cur"
    shape: tuple[int, ...]  # original tensor shape
    dtype: str  # original torch dtype name, e.g. "float32"
    factors: dict[str, np.ndarray]
    scales: dict[str, int] = field(default_factory=dict)  # factor -> exponent e (x 2**e)

    @property
    def rank(self) -> int:
        """Number of low-rank components (0 for dense payloads)."""
        if self.kind not in LAYOUTS:
            return 0
        key, axis = LAYOUTS[self.kind].rank_at
        return int(self.factors[key].shape[axis])

    @property
    def nbytes(self) -> int:
        """Bytes of the factors' data (the record adds its header: `record_nbytes`)."""
        return sum(a.nbytes for a in self.factors.values())

    def meta(self) -> dict:
        """JSON-able description stored in the record metadata."""
        out: dict[str, Any] = {"kind": self.kind, "shape": list(self.shape), "dtype": self.dtype}
        if self.scales:
            out["scales"] = dict(self.scales)
        return out


# --- record building --------------------------------------------------------------------------
def record_metadata(payloads: Mapping[str, Payload], compressor: str) -> dict[str, str]:
    """The record's safetensors `__metadata__`: format, compressor and the tensors (JSON)."""
    tensors = {name: p.meta() for name, p in payloads.items()}
    return {
        "format": str(FORMAT_VERSION),
        "compressor": compressor,
        "tensors": json.dumps(tensors, separators=(",", ":")),
    }


def _factor_arrays(payloads: Mapping[str, Payload]) -> dict[str, np.ndarray]:
    return {f"{name}/{key}": value for name, p in payloads.items() for key, value in p.factors.items()}


def build_record(payloads: Mapping[str, Payload], compressor: str):
    """Pack payloads into one self-describing `flwr.app.ArrayRecord` (one wire Array)."""
    return wire.to_record(_factor_arrays(payloads), record_metadata(payloads, compressor))


def record_nbytes(payloads: Mapping[str, Payload], compressor: str) -> int:
    """`build_record(payloads, compressor).count_bytes()`, computed without flwr or a copy."""
    return wire.encoded_nbytes(_factor_arrays(payloads), record_metadata(payloads, compressor)) + len(wire.KEY)


def parse_record(record) -> tuple[str, dict[str, Payload]]:
    """Read (compressor, payloads) from a record: a wire `ArrayRecord`, its bytes (bytes or a
    uint8 array) or its decoded `(arrays, metadata)`; structure only, values are checked later."""
    arrays, meta = _unwrap(record)
    compressor, payloads, used = meta["compressor"], {}, set()
    for name, info in meta["tensors"].items():
        kind = info.get("kind") if isinstance(info, dict) else None
        allowed = ("dense",) if compressor == "none" else ("dense", compressor)
        if not isinstance(kind, str) or kind not in allowed:
            raise PayloadError(
                f"tensor '{name}': kind {kind!r} not allowed for compressor '{compressor}' (allowed: {allowed})"
            )
        factors = {}
        for fac in LAYOUTS[kind].factors if kind in LAYOUTS else ("data",):
            key = f"{name}/{fac}"
            if key not in arrays:
                raise PayloadError(f"tensor '{name}': factor '{fac}' is missing from the record")
            factors[fac] = arrays[key]
            used.add(key)
        shape = info.get("shape")
        shape = tuple(shape) if isinstance(shape, list) else shape
        payloads[name] = Payload(kind, shape, info.get("dtype"), factors, info.get("scales", {}))
    extra = sorted(set(arrays) - used)
    if extra:
        raise PayloadError(f"record has arrays that belong to no declared tensor: {extra[:5]}")
    return compressor, payloads


def _unwrap(record) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, parsed metadata) of any accepted form of a record; `PayloadError` otherwise."""
    try:
        if isinstance(record, tuple) and len(record) == 2:
            arrays, metadata = record
        elif isinstance(record, (bytes, bytearray, memoryview, np.ndarray)):
            arrays, metadata = wire.decode(record)
        elif hasattr(record, "keys"):
            if not wire.is_wire(record):
                raise PayloadError(
                    f"record is not a compressed-delta record: expected one "
                    f"'{wire.KEY}' Array, got keys {sorted(record.keys())[:5]}"
                )
            arrays, metadata = wire.decode(wire.buffer_of(record))
        else:
            raise PayloadError(f"expected an ArrayRecord, got {type(record).__name__}")
    except wire.WireError as err:
        raise PayloadError(f"record is not valid wire data: {err}") from None
    return dict(arrays), _parse_meta(metadata)


def _parse_meta(metadata: Mapping[str, str]) -> dict:
    """Parse and shape-check the record's metadata."""
    if not isinstance(metadata, Mapping) or metadata.get("format") != str(FORMAT_VERSION):
        raise PayloadError(f"unsupported record format (expected format {FORMAT_VERSION})")
    if metadata.get("compressor") not in COMPRESSORS:
        raise PayloadError(f"unknown compressor {metadata.get('compressor')!r}; known: {COMPRESSORS}")
    try:
        tensors = json.loads(metadata.get("tensors", ""))
    except (TypeError, json.JSONDecodeError) as err:
        raise PayloadError(f"metadata 'tensors' is not valid JSON: {err}") from None
    if not isinstance(tensors, dict):
        raise PayloadError("metadata 'tensors' is not a JSON object")
    return {"compressor": metadata["compressor"], "tensors": tensors}


# --- value validation -------------------------------------------------------------------------
def validate(name: str, p: Payload, max_rank: int | None = None) -> None:
    """Check kind, shape, dtypes, factor shapes, rank, finiteness, scales and indices."""
    if p.kind not in KINDS:
        raise PayloadError(f"tensor '{name}': unknown kind {p.kind!r}; known: {KINDS}")
    if not (isinstance(p.shape, tuple) and all(type(d) is int and d >= 0 for d in p.shape)):
        raise PayloadError(f"tensor '{name}': shape {p.shape!r} is not a list of sizes")
    if p.dtype not in DENSE_WIRE:
        raise PayloadError(f"tensor '{name}': dtype {p.dtype!r} not one of {tuple(DENSE_WIRE)}")
    if p.kind == "dense":
        want, data = DENSE_WIRE[p.dtype], p.factors.get("data")
        if data is None or set(p.factors) != {"data"} or str(data.dtype) != want or data.shape != p.shape:
            got = {k: f"{a.dtype} {a.shape}" for k, a in p.factors.items()}
            raise PayloadError(f"tensor '{name}': dense data must be {want} {p.shape}, got {got}")
        return _check_finite(name, "data", data)
    if len(p.shape) < 2 or 0 in p.shape:
        raise PayloadError(f"tensor '{name}': kind '{p.kind}' needs a non-empty >=2-D shape, got {p.shape}")
    layout = LAYOUTS[p.kind]
    m, n = p.shape[0], math.prod(p.shape[1:])
    r = _rank_of(name, p, layout)
    limit = min(m, n) if max_rank is None else min(m, n, max_rank)
    if r > limit:
        raise PayloadError(f"tensor '{name}': rank {r} is larger than allowed ({limit}) for shape {p.shape}")
    _check_factors(name, p, layout, (m, n, r))
    _check_scales(name, p, layout)


def _rank_of(name: str, p: Payload, layout: Layout) -> int:
    """Rank read from the factor that carries it."""
    key, axis = layout.rank_at
    arr = p.factors.get(key)
    if not isinstance(arr, np.ndarray) or arr.ndim <= axis:
        raise PayloadError(f"tensor '{name}': factor '{key}' is missing or has too few dims")
    return int(arr.shape[axis])


def _check_factors(name: str, p: Payload, layout: Layout, mnr: tuple[int, int, int]) -> None:
    want, m = layout.shapes(*mnr), mnr[0]
    if set(p.factors) != set(want):
        raise PayloadError(f"tensor '{name}': factors {sorted(p.factors)} != expected {sorted(want)}")
    for fac, shape in want.items():
        arr = p.factors[fac]
        if tuple(arr.shape) != shape:
            raise PayloadError(
                f"tensor '{name}': factor '{fac}' has shape {tuple(arr.shape)}, "
                f"expected {shape} for shape {p.shape} at rank {mnr[2]}"
            )
        if fac == layout.index:
            _check_index(name, fac, arr, m)
        elif str(arr.dtype) not in FLOAT_WIRE:
            raise PayloadError(f"tensor '{name}': factor '{fac}' has dtype {arr.dtype}, allowed: {FLOAT_WIRE}")
        else:
            _check_finite(name, fac, arr)


def _check_finite(name: str, fac: str, arr: np.ndarray) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise PayloadError(f"tensor '{name}': factor '{fac}' contains NaN or Inf")


def _check_index(name: str, fac: str, idx: np.ndarray, m: int) -> None:
    if idx.dtype != np.int64:
        raise PayloadError(f"tensor '{name}': factor '{fac}' must be int64 row indices, got {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= m):
        raise PayloadError(f"tensor '{name}': row index out of range [0, {m}) in '{fac}'")
    if np.unique(idx).size != idx.size:
        raise PayloadError(f"tensor '{name}': row indices in '{fac}' are not unique")


def _check_scales(name: str, p: Payload, layout: Layout) -> None:
    if not isinstance(p.scales, dict):
        raise PayloadError(f"tensor '{name}': scales must be an object")
    for fac, e in p.scales.items():
        if fac not in p.factors or fac == layout.index:
            raise PayloadError(f"tensor '{name}': scale given for unknown factor {fac!r}")
        if type(e) is not int or abs(e) > MAX_EXPONENT:
            raise PayloadError(
                f"tensor '{name}': scale exponent for '{fac}' must be an int "
                f"in [-{MAX_EXPONENT}, {MAX_EXPONENT}], got {e!r}"
            )


# --- decoding ---------------------------------------------------------------------------------
def reconstruct(p: Payload, device=None, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """Rebuild one validated payload on `device` (dtype None = the original dtype)."""
    out_dtype = dtype or getattr(torch, p.dtype)
    if p.kind == "dense":
        return torch.from_numpy(p.factors["data"].copy()).to(device=device, dtype=out_dtype)
    layout = LAYOUTS[p.kind]
    f = {}
    for k, a in p.factors.items():
        with warnings.catch_warnings():  # read-only views of received bytes: only read here
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(np.ascontiguousarray(a)).to(device)
        f[k] = t if k == layout.index else t.float() * (2.0 ** p.scales.get(k, 0))
    return layout.rebuild(f).reshape(p.shape).to(out_dtype)


def decode_payloads(
    payloads: Mapping[str, Payload],
    reference=None,
    *,
    device=None,
    dtype: torch.dtype | None = torch.float32,
    max_rank: int | None = None,
) -> dict[str, torch.Tensor]:
    """Validate every payload (and against `reference`), then rebuild them all."""
    if reference is not None:
        _check_reference(payloads, reference)
    for name, p in payloads.items():
        validate(name, p, max_rank)
    out = {name: reconstruct(p, device, dtype) for name, p in payloads.items()}
    if out:  # fp16 factors times 2**e can still overflow in the product; one host sync
        finite = torch.stack([torch.isfinite(t).all() for t in out.values()]).cpu()
        for name, ok in zip(out, finite.tolist()):
            if not ok:
                raise PayloadError(f"tensor '{name}': reconstruction overflows to Inf/NaN")
    return out


def _check_reference(payloads: Mapping[str, Payload], reference: Mapping) -> None:
    missing = sorted(set(reference) - set(payloads))
    extra = sorted(set(payloads) - set(reference))
    if missing:
        raise PayloadError(f"record is missing tensors: {missing[:5]} ({len(missing)} in all)")
    if extra:
        raise PayloadError(f"record has extra tensors not in the reference: {extra[:5]}")
    for name, ref in reference.items():
        want = tuple(getattr(ref, "shape", ref))
        if tuple(payloads[name].shape) != want:
            raise PayloadError(
                f"tensor '{name}': shape {tuple(payloads[name].shape)} does not match the reference {want}"
            )


def decode_state(
    record,
    reference: Mapping | None = None,
    *,
    device=None,
    dtype: torch.dtype | None = torch.float32,
    max_rank: int | None = None,
) -> dict[str, torch.Tensor]:
    """Decode a compressed-delta `ArrayRecord` from any compressor into dense tensors.

    Parameters
    ----------
    record : flwr.app.ArrayRecord | bytes | np.ndarray | tuple[dict, dict]
        Built by `Compressor.encode_state` (one wire Array), or its bytes, or its
        `asyncfl.wire.decode` output (arrays, metadata); self-describing (compressor, kinds,
        shapes).
    reference : Mapping[str, torch.Size | tuple | Tensor] | None, default None
        Expected names and shapes; missing, extra or mismatched tensors are errors. Pass it
        for untrusted input: without it a tiny payload may declare a huge shape.
    device : torch.device | str | None, default None (CPU)
        Where the decoded tensors are built.
    dtype : torch.dtype | None, default torch.float32
        Output dtype; None keeps each tensor's original dtype.
    max_rank : int | None, default None
        Reject payloads whose rank exceeds this (always rejected above min(m, n)).

    Returns
    -------
    dict[str, torch.Tensor]

    Raises
    ------
    PayloadError
        On any malformed, inconsistent, non-finite or unexpected content, before any output.
    """
    _, payloads = parse_record(record)
    return decode_payloads(payloads, reference, device=device, dtype=dtype, max_rank=max_rank)
