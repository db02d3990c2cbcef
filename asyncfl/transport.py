"""Many arrays as one Flower `Array`: the packed form of a message's `ArrayRecord`.

Flower moves every `Array` of a message as its own object (and splits it into 5 MB chunks),
each one an HTTP request between SuperLink and SuperNode and a row in their object stores. A
low-rank payload of the GPT-2 shape has ~450 factor arrays, the full weights ~150 tensors: in
deployment the per-object cost, not the bytes, dominated the time a message takes. Packed, a
record is one `Array` (one object per 5 MB of data) under the key `PACKED_KEY`.

Layout of the packed array (a 1-D uint8 numpy array, so `Array.numpy()` still works on it):

    b"AFLPACK1" | header length (uint64, little endian) | JSON header | data

The header is `{"arrays": [[name, dtype, shape, offset], ...]}`; the data begins at the first
multiple of `ALIGN` after the header and each offset (from there) is a multiple of `ALIGN`, so
the unpacked arrays are aligned views of the received bytes (no copy). Only numeric and bool
dtypes are accepted; nothing is unpickled. This module imports numpy (and flwr when packing):
it runs in the per-message ClientApp process, which must start fast.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

PACKED_KEY = "__packed__"
MAGIC = b"AFLPACK1"
ALIGN = 64
_PREFIX = len(MAGIC) + 8
_KINDS = "biuf"  # bool, signed, unsigned, float: what a weight or factor can be


class TransportError(ValueError):
    """A packed record is malformed: wrong magic, bad header, or arrays outside the data."""


def _npy_header(nbytes: int) -> bytes:
    """The `np.save` header of a 1-D uint8 array of `nbytes` (64-byte aligned, version 1.0)."""
    head = repr({"descr": "|u1", "fortran_order": False, "shape": (nbytes,)}).encode("latin1")
    pad = -(10 + len(head) + 1) % 64
    head += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def pack(arrays: Mapping[str, np.ndarray]):
    """One `flwr.app.ArrayRecord` holding `arrays` as a single packed `Array` (one copy)."""
    from flwr.app import Array, ArrayRecord

    entries: list[list[Any]] = []
    parts: list[bytes | memoryview] = []
    offset = 0
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind not in _KINDS:
            raise TypeError(f"array '{name}': dtype {a.dtype} cannot be packed (numeric or bool only)")
        if not a.flags.c_contiguous:
            a = a.copy(order="C")
        entries.append([str(name), a.dtype.str, list(a.shape), offset])
        if a.size:
            parts.append(a.reshape(-1).data.cast("B"))  # ndarray.data: memoryview(a)
        end = offset + a.nbytes
        offset = _align(end)
        parts.append(b"\0" * (offset - end))
    header = json.dumps({"arrays": entries}, separators=(",", ":")).encode()
    start = _align(_PREFIX + len(header))
    total = start + offset
    data = b"".join([_npy_header(total), MAGIC, len(header).to_bytes(8, "little"), header,
                     b"\0" * (start - _PREFIX - len(header)), *parts])
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(total,), stype="numpy.ndarray", data=data)})


def array_view(array: Any) -> np.ndarray:
    """A read-only numpy view of a Flower `Array`'s bytes, without the copy of `Array.numpy()`.

    `Array.data` holds `np.save` output: parse the header, view the rest. Anything unusual
    (Fortran order, object dtypes, another serialization) goes through `Array.numpy()`."""
    data = array.data
    if getattr(array, "stype", "numpy.ndarray") != "numpy.ndarray" or not isinstance(data, (bytes, bytearray)):
        return array.numpy()
    try:
        head = io.BytesIO(memoryview(data)[:65536 + 16])
        major, _minor = np.lib.format.read_magic(head)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(head)
    except (ValueError, OSError):
        return array.numpy()
    if fortran or dtype.hasobject:
        return array.numpy()
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(data, dtype=dtype, count=count, offset=head.tell()).reshape(shape)


def is_packed(record) -> bool:
    """True for a record made by `pack`."""
    return PACKED_KEY in record.keys()


def unpack_bytes(raw: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays of a packed uint8 array, as read-only views of it; `TransportError` if malformed."""
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise TransportError(f"packed data must be a 1-D uint8 array, got {raw.dtype} {raw.shape}")
    if raw.size < _PREFIX or raw[:len(MAGIC)].tobytes() != MAGIC:
        raise TransportError(f"packed data does not start with {MAGIC!r}")
    hlen = int.from_bytes(raw[len(MAGIC):_PREFIX].tobytes(), "little")
    if hlen > raw.size - _PREFIX:
        raise TransportError(f"header length {hlen} exceeds the {raw.size} bytes received")
    try:
        entries = json.loads(raw[_PREFIX:_PREFIX + hlen].tobytes().decode("utf-8"))["arrays"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise TransportError(f"packed header is not valid: {err}") from None
    if not isinstance(entries, list):
        raise TransportError("packed header: 'arrays' must be a list")
    start, out = _align(_PREFIX + hlen), {}
    for e in entries:
        out_name, a = _view(raw, start, e)
        if out_name in out:
            raise TransportError(f"packed header names array '{out_name}' twice")
        out[out_name] = a
    return out


def _view(raw: np.ndarray, start: int, e) -> tuple[str, np.ndarray]:
    try:
        name, dtype, shape, offset = e
        dt = np.dtype(dtype)
        ok = (isinstance(name, str) and isinstance(offset, int) and offset >= 0 and offset % ALIGN == 0
              and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape))
    except (TypeError, ValueError):
        raise TransportError(f"packed header entry {str(e)[:80]} is not [name, dtype, shape, offset]") from None
    if not ok:
        raise TransportError(f"packed header entry {str(e)[:80]} is not [name, dtype, shape, offset]")
    if dt.kind not in _KINDS or dt.hasobject or not dt.isnative:
        raise TransportError(f"array '{name}': dtype {dtype!r} not accepted (numeric or bool, native byte order)")
    nbytes = math.prod(shape) * dt.itemsize  # Python ints: a huge declared shape cannot wrap around
    begin = start + offset
    if begin + nbytes > raw.size:
        raise TransportError(f"array '{name}' ({dtype} {tuple(shape)}) lies beyond the {raw.size} bytes received")
    a = raw[begin:begin + nbytes].view(dt).reshape(tuple(shape))
    a.flags.writeable = False
    return name, a


def arrays_of(record) -> dict[str, np.ndarray]:
    """The arrays of a record, packed or not, as numpy views of its bytes where possible."""
    if is_packed(record):
        if len(record.keys()) != 1:
            raise TransportError(f"a packed record holds only '{PACKED_KEY}', got {sorted(record.keys())[:5]}")
        return unpack_bytes(array_view(record[PACKED_KEY]))
    return {k: array_view(a) for k, a in record.items()}
