"""Wire format of compressed deltas: `Payload` per tensor, `ArrayRecord` per state, validation.

Paper: Section 3 (PCA, QRCP, CUR factors) and Section 3.4 (the decoded delta feeds the server).

Notes
- Every array is a plain numpy array inside a Flower `ArrayRecord` (stored with `np.save`,
  `allow_pickle=False`); nothing is ever unpickled. Metadata is JSON text in a uint8 array.
- Record keys are `"<tensor>/<factor>"` plus one `"__meta__"` entry; tensor names may not hold "/".
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

import io
import json
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch

META_KEY = "__meta__"
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
    "pca": Layout(lambda m, n, r: {"u": (m, r), "v": (n, r), "mean": (n,)},
                  lambda f: f["u"] @ f["v"].mT + f["mean"].unsqueeze(-2), ("u", 1)),
    "qrcp": Layout(lambda m, n, r: {"rt": (m, r), "q": (n, r)},
                   lambda f: f["rt"] @ f["q"].mT, ("rt", 1)),
    "cur": Layout(lambda m, n, r: {"z": (m, r), "rows": (r, n), "idx": (r,)},
                  lambda f: f["z"] @ f["rows"], ("idx", 0), index="idx"),
}
KINDS = ("dense", *LAYOUTS)
COMPRESSORS = ("none", *LAYOUTS)  # compressor names; "none" sends every tensor dense


@lru_cache(maxsize=4096)
def _npy_header_len(descr: str, shape: tuple[int, ...]) -> int:
    """Length of the `np.save` header numpy writes for this dtype and shape."""
    buf = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return len(buf.getvalue())


def npy_nbytes(array: np.ndarray) -> int:
    """Bytes of `np.save(array)`: what `flwr.app.Array(array).data` holds."""
    descr = np.lib.format.dtype_to_descr(array.dtype)
    if not isinstance(descr, str):  # a structured dtype's descr is a list (unhashable, never sent)
        raise TypeError(f"npy_nbytes: structured dtype {array.dtype} is not supported")
    return _npy_header_len(descr, array.shape) + array.nbytes


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
        """Wire bytes: `ArrayRecord` of the factors keyed by factor name, `count_bytes()`."""
        return sum(npy_nbytes(a) + len(k) for k, a in self.factors.items())

    def meta(self) -> dict:
        """JSON-able description stored in the record metadata."""
        out: dict[str, Any] = {"kind": self.kind, "shape": list(self.shape), "dtype": self.dtype}
        if self.scales:
            out["scales"] = dict(self.scales)
        return out


# --- record building --------------------------------------------------------------------------
def _meta_array(payloads: Mapping[str, Payload], compressor: str) -> np.ndarray:
    """The metadata entry: JSON text as a 1-D uint8 array."""
    tensors = {name: p.meta() for name, p in payloads.items()}
    meta = {"format": FORMAT_VERSION, "compressor": compressor, "tensors": tensors}
    text = json.dumps(meta, separators=(",", ":")).encode()
    return np.frombuffer(text, dtype=np.uint8).copy()


def build_record(payloads: Mapping[str, Payload], compressor: str):
    """Pack payloads into one self-describing `flwr.app.ArrayRecord`."""
    from flwr.app import Array, ArrayRecord  # lazy: the math and the bench need no flwr

    arrays = {f"{name}/{key}": Array(np.ascontiguousarray(value))
              for name, p in payloads.items() for key, value in p.factors.items()}
    arrays[META_KEY] = Array(_meta_array(payloads, compressor))
    return ArrayRecord(array_dict=arrays)


def record_nbytes(payloads: Mapping[str, Payload], compressor: str) -> int:
    """`build_record(payloads, compressor).count_bytes()`, computed without flwr."""
    data = sum(p.nbytes + len(name) * len(p.factors) + len(p.factors)  # "<name>/" prefixes
               for name, p in payloads.items())
    return data + npy_nbytes(_meta_array(payloads, compressor)) + len(META_KEY)


def parse_record(record) -> tuple[str, dict[str, Payload]]:
    """Read (compressor, payloads) from a record (an `ArrayRecord`, or a mapping of names to
    numpy arrays); structure only, values are checked later."""
    try:
        keys = set(record.keys())
    except AttributeError:
        raise PayloadError(f"expected an ArrayRecord, got {type(record).__name__}") from None
    if META_KEY not in keys:
        raise PayloadError(f"record has no '{META_KEY}' entry: not a compressed-delta record")
    meta = _parse_meta(_load(record[META_KEY], META_KEY))
    compressor, payloads, used = meta["compressor"], {}, {META_KEY}
    for name, info in meta["tensors"].items():
        kind = info.get("kind") if isinstance(info, dict) else None
        allowed = ("dense",) if compressor == "none" else ("dense", compressor)
        if not isinstance(kind, str) or kind not in allowed:
            raise PayloadError(f"tensor '{name}': kind {kind!r} not allowed for compressor "
                               f"'{compressor}' (allowed: {allowed})")
        factors = {}
        for fac in LAYOUTS[kind].factors if kind in LAYOUTS else ("data",):
            key = f"{name}/{fac}"
            if key not in keys:
                raise PayloadError(f"tensor '{name}': factor '{fac}' is missing from the record")
            factors[fac] = _load(record[key], key)
            used.add(key)
        shape = info.get("shape")
        shape = tuple(shape) if isinstance(shape, list) else shape
        payloads[name] = Payload(kind, shape, info.get("dtype"), factors, info.get("scales", {}))
    extra = sorted(keys - used)
    if extra:
        raise PayloadError(f"record has arrays that belong to no declared tensor: {extra[:5]}")
    return compressor, payloads


def _load(array, key: str) -> np.ndarray:
    """Deserialize one `Array` (numpy, no pickle) or raise `PayloadError`; a numpy array
    (from an unpacked record, `asyncfl.transport.arrays_of`) is taken as it is."""
    if isinstance(array, np.ndarray):
        return array
    try:
        return array.numpy()  # np.load(..., allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad payload
        raise PayloadError(f"array '{key}' cannot be read as a numpy array: {err}") from None


def _parse_meta(raw: np.ndarray) -> dict:
    """Parse and shape-check the JSON metadata."""
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise PayloadError(f"'{META_KEY}' must be a 1-D uint8 array, got {raw.dtype} {raw.shape}")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PayloadError(f"'{META_KEY}' is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise PayloadError(f"unsupported record format (expected format {FORMAT_VERSION})")
    if meta.get("compressor") not in COMPRESSORS:
        raise PayloadError(f"unknown compressor {meta.get('compressor')!r}; known: {COMPRESSORS}")
    if not isinstance(meta.get("tensors"), dict):
        raise PayloadError("metadata has no 'tensors' object")
    return meta


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
        raise PayloadError(f"tensor '{name}': kind '{p.kind}' needs a non-empty >=2-D shape, "
                           f"got {p.shape}")
    layout = LAYOUTS[p.kind]
    m, n = p.shape[0], math.prod(p.shape[1:])
    r = _rank_of(name, p, layout)
    limit = min(m, n) if max_rank is None else min(m, n, max_rank)
    if r > limit:
        raise PayloadError(f"tensor '{name}': rank {r} is larger than allowed ({limit}) "
                           f"for shape {p.shape}")
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
        raise PayloadError(f"tensor '{name}': factors {sorted(p.factors)} != "
                           f"expected {sorted(want)}")
    for fac, shape in want.items():
        arr = p.factors[fac]
        if tuple(arr.shape) != shape:
            raise PayloadError(f"tensor '{name}': factor '{fac}' has shape {tuple(arr.shape)}, "
                               f"expected {shape} for shape {p.shape} at rank {mnr[2]}")
        if fac == layout.index:
            _check_index(name, fac, arr, m)
        elif str(arr.dtype) not in FLOAT_WIRE:
            raise PayloadError(f"tensor '{name}': factor '{fac}' has dtype {arr.dtype}, "
                               f"allowed: {FLOAT_WIRE}")
        else:
            _check_finite(name, fac, arr)


def _check_finite(name: str, fac: str, arr: np.ndarray) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise PayloadError(f"tensor '{name}': factor '{fac}' contains NaN or Inf")


def _check_index(name: str, fac: str, idx: np.ndarray, m: int) -> None:
    if idx.dtype != np.int64:
        raise PayloadError(f"tensor '{name}': factor '{fac}' must be int64 row indices, "
                           f"got {idx.dtype}")
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
            raise PayloadError(f"tensor '{name}': scale exponent for '{fac}' must be an int "
                               f"in [-{MAX_EXPONENT}, {MAX_EXPONENT}], got {e!r}")


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


def decode_payloads(payloads: Mapping[str, Payload], reference=None, *, device=None,
                    dtype: torch.dtype | None = torch.float32,
                    max_rank: int | None = None) -> dict[str, torch.Tensor]:
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
            raise PayloadError(f"tensor '{name}': shape {tuple(payloads[name].shape)} "
                               f"does not match the reference {want}")


def decode_state(record, reference: Mapping | None = None, *, device=None,
                 dtype: torch.dtype | None = torch.float32,
                 max_rank: int | None = None) -> dict[str, torch.Tensor]:
    """Decode a compressed-delta `ArrayRecord` from any compressor into dense tensors.

    Parameters
    ----------
    record : flwr.app.ArrayRecord | Mapping[str, np.ndarray]
        Built by `Compressor.encode_state` (or its arrays, e.g. unpacked by
        `asyncfl.transport.arrays_of`); self-describing (compressor, kinds, shapes).
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
