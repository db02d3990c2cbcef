"""The one wire format of a message's arrays: safetensors bytes, carried as one Flower `Array`.

Flower moves every `Array` of a message as its own object (and every 5 MB chunk of it), each
one an HTTP request between SuperLink and SuperNode and a row in their object stores; a
low-rank payload of the GPT-2 shape has ~250 factor arrays, the full weights 148 tensors. So a
record travels as a single `Array` under the key `KEY` whose bytes are a safetensors buffer
(https://huggingface.co/docs/safetensors): any safetensors reader opens them
(`safetensors.numpy.load(record[KEY].data)`). The same bytes are the node worker's task and
reply files (`asyncfl.client.node_worker`): a message's arrays are encoded once, by the sender.

Layout (the safetensors format):

    header length n (uint64, little endian) | JSON header (n bytes, space-padded to 8) | data

The header maps each name to `{"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}`
(offsets into the data) and holds text metadata under `"__metadata__"` (a compressed payload's
compressor, kinds and shapes: `asyncfl.compressors.codec`). The writer here fills one buffer
with a single copy of the data (the library's `safetensors.numpy.save` makes two; the tests
check both ways that its bytes and the library's read back identically); tensors are stored
widest dtype first, so each lies at a multiple of its item size. Reading parses and checks the
header (JSON, dtypes: bool, int, uint, float; shapes; offsets inside the data, contiguous and
non-overlapping, as the library requires) and returns numpy views of the received bytes: no
copy, nothing unpickled; any defect is a `WireError` naming it.

The `Array` says `stype="safetensors"`, `dtype="uint8"`, `shape=(len,)`; `Array.numpy()`
refuses that stype, so read records with `arrays_of` / `read_record`, which also take a plain
Flower record (one `np.save` Array per tensor, what `pack="off"` sends for the weights).
numpy only; flwr is imported where a record is built, so the codec's byte counts need none.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

KEY = "safetensors"  # the record entry holding the buffer
STYPE = "safetensors"  # its Array.stype
KEY_METADATA = "__metadata__"  # the header entry of the text metadata (safetensors' name)
MAX_HEADER = 100_000_000  # bytes of JSON header accepted (the safetensors library's limit)
# safetensors dtype codes accepted on the wire, and their numpy dtypes (little endian)
DTYPES: dict[str, np.dtype] = {
    code: np.dtype(t)
    for code, t in (
        ("BOOL", "|b1"),
        ("U8", "|u1"),
        ("I8", "|i1"),
        ("U16", "<u2"),
        ("I16", "<i2"),
        ("U32", "<u4"),
        ("I32", "<i4"),
        ("U64", "<u8"),
        ("I64", "<i8"),
        ("F16", "<f2"),
        ("F32", "<f4"),
        ("F64", "<f8"),
    )
}
_CODE = {(dt.kind, dt.itemsize): code for code, dt in DTYPES.items()}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}

Buffer = bytes | bytearray | memoryview | np.ndarray


class WireError(ValueError):
    """A received buffer or record is not valid wire data (the message names the defect)."""


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------
def _wire_array(name: str, a: Any) -> np.ndarray:
    """`a` as a C-contiguous little-endian numpy array of an accepted dtype (copies only if not)."""
    a = np.asarray(a)
    code = _CODE.get((a.dtype.kind, a.dtype.itemsize))
    if code is None:
        raise TypeError(f"array '{name}': dtype {a.dtype} cannot travel; accepted: bool, (u)int8-64, float16/32/64")
    if a.dtype != DTYPES[code]:  # big endian: safetensors is little endian
        a = a.astype(DTYPES[code])
    if not a.flags.c_contiguous:
        a = a.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    return a


def _layout(arrays: Mapping[str, Any], metadata: Mapping[str, str] | None) -> tuple[bytes, list[np.ndarray]]:
    """The padded header (length prefix included) and the arrays in data order."""
    items = [(str(k), _wire_array(str(k), v)) for k, v in arrays.items()]
    header: dict[str, Any] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise TypeError(f"metadata must map str to str, got {bad[0]!r}: {metadata[bad[0]]!r}")
        header[KEY_METADATA] = dict(metadata)
    if any(name == KEY_METADATA for name, _ in items):
        raise ValueError(f"'{KEY_METADATA}' is reserved by safetensors and cannot name an array")
    # widest item size first: every tensor then lies at a multiple of its item size
    order = sorted(range(len(items)), key=lambda i: -items[i][1].dtype.itemsize)
    offsets, pos = {}, 0
    for i in order:
        offsets[i] = (pos, pos + items[i][1].nbytes)
        pos += items[i][1].nbytes
    for i, (name, a) in enumerate(items):  # header in the caller's order (decode keeps it)
        header[name] = {
            "dtype": _CODE[(a.dtype.kind, a.dtype.itemsize)],
            "shape": list(a.shape),
            "data_offsets": list(offsets[i]),
        }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, [items[i][1] for i in order]


def _raw(a: np.ndarray) -> memoryview:
    return a.reshape(-1).view(np.uint8).data if a.size else memoryview(b"")


def encode(arrays: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors bytes of `arrays` (numpy arrays or array-likes) and text `metadata`:
    one copy of the data. Raises TypeError for a dtype that cannot travel (object, complex,
    strings, ...) or non-text metadata."""
    head, parts = _layout(arrays, metadata)
    return b"".join([head, *(_raw(a) for a in parts)])


def encoded_nbytes(arrays: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> int:
    """`len(encode(arrays, metadata))`, from the shapes and dtypes alone (no data copied)."""
    head, parts = _layout(arrays, metadata)
    return len(head) + sum(a.nbytes for a in parts)


def write(path: str | os.PathLike, arrays: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> int:
    """Write `encode(arrays, metadata)` to `path` without building it in memory; returns its size."""
    head, parts = _layout(arrays, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for a in parts:
            f.write(_raw(a))
    return len(head) + sum(a.nbytes for a in parts)


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------
def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise WireError(f"header names '{k}' twice")
        out[k] = v
    return out


def _as_uint8(buffer: Buffer) -> np.ndarray:
    if isinstance(buffer, np.ndarray):
        if buffer.dtype != np.uint8 or buffer.ndim != 1:
            raise WireError(f"wire data must be a 1-D uint8 array, got {buffer.dtype} {buffer.shape}")
        return buffer
    if not isinstance(buffer, (bytes, bytearray, memoryview, mmap.mmap)):
        raise WireError(f"wire data must be bytes or a uint8 array, got {type(buffer).__name__}")
    return np.frombuffer(buffer, dtype=np.uint8)


def decode(buffer: Buffer) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(arrays, metadata) of a safetensors buffer, the arrays as views of it (read-only for
    bytes; a tensor the buffer's address leaves misaligned is copied). Raises `WireError`."""
    raw = _as_uint8(buffer)
    if raw.size < 8:
        raise WireError(f"wire data of {raw.size} bytes is shorter than its 8-byte header length")
    n = int.from_bytes(raw[:8].tobytes(), "little")
    if n > MAX_HEADER or n > raw.size - 8:
        raise WireError(f"header length {n} exceeds the {raw.size - 8} bytes after it (or the limit of {MAX_HEADER})")
    try:
        header = json.loads(raw[8 : 8 + n].tobytes().decode("utf-8"), object_pairs_hook=_pairs)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireError(f"header is not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise WireError(f"header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop(KEY_METADATA, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WireError(f"header '{KEY_METADATA}' must map names to text, got {str(metadata)[:80]}")
    data = raw[8 + n :]
    spans = [(name, *_entry(name, e)) for name, e in header.items()]
    _check_cover(spans, data.size)
    out = {}
    for name, dt, shape, begin, end in spans:
        a = data[begin:end].view(dt).reshape(shape)
        out[name] = a if a.flags.aligned else a.copy()
    return out, metadata


def _entry(name: str, e: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked."""
    if not isinstance(e, dict) or set(e) != _ENTRY_KEYS:
        raise WireError(f"tensor '{name}': header entry {str(e)[:80]} must have exactly the keys {sorted(_ENTRY_KEYS)}")
    code, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if code not in DTYPES:
        raise WireError(f"tensor '{name}': dtype {code!r} not accepted; accepted: {sorted(DTYPES)}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise WireError(f"tensor '{name}': shape {shape!r} is not a list of sizes")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise WireError(f"tensor '{name}': data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    dt = DTYPES[code]
    nbytes = math.prod(shape) * dt.itemsize  # Python ints: a huge shape cannot wrap around
    if offsets[1] - offsets[0] != nbytes:
        raise WireError(
            f"tensor '{name}': {code} {tuple(shape)} needs {nbytes} bytes, its "
            f"data_offsets {offsets} span {offsets[1] - offsets[0]}"
        )
    return dt, tuple(shape), offsets[0], offsets[1]


def _check_cover(spans: list[tuple[str, np.dtype, tuple[int, ...], int, int]], size: int) -> None:
    """The tensors tile the data exactly: within it, no overlap, no gap, nothing after."""
    pos, prev = 0, None
    for name, _, _, begin, end in sorted(spans, key=lambda s: (s[3], s[4])):
        if end > size:
            raise WireError(f"tensor '{name}': data_offsets [{begin}, {end}] lie beyond the {size} data bytes received")
        if begin < pos:
            raise WireError(f"tensor '{name}': data_offsets [{begin}, {end}] overlap tensor '{prev}'")
        if begin > pos:
            raise WireError(f"tensor '{name}': data_offsets [{begin}, {end}] leave a gap after byte {pos}")
        pos, prev = end, name
    if pos != size:
        raise WireError(f"{size - pos} data bytes after the last tensor belong to none")


def read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """`decode` of a file, mapped copy-on-write: the views cost no copy until written to, are
    writable (private to this process) and stay valid after the file is unlinked."""
    size = Path(path).stat().st_size
    raw = np.memmap(path, dtype=np.uint8, mode="c") if size else np.zeros(0, np.uint8)
    return decode(raw)


# ------------------------------------------------------------------------------------------
# Flower records
# ------------------------------------------------------------------------------------------
def record_of(data: bytes):
    """One `flwr.app.ArrayRecord` holding the wire bytes `data` as its single `Array`."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({KEY: Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)})


def to_record(arrays: Mapping[str, Any], metadata: Mapping[str, str] | None = None):
    """`arrays` and `metadata` as one wire `ArrayRecord` (one copy of the data)."""
    return record_of(encode(arrays, metadata))


def is_wire(record) -> bool:
    """True for a record holding a wire Array (`to_record`), False for a plain Flower record."""
    return KEY in record.keys()


def buffer_of(record) -> bytes | bytearray:
    """The wire bytes of a record made by `to_record`; `WireError` if it is not one."""
    keys = list(record.keys())
    if keys != [KEY]:
        raise WireError(f"a wire record holds only '{KEY}', got {sorted(keys)[:5]}")
    array = record[KEY]
    if array.stype != STYPE or not isinstance(array.data, (bytes, bytearray)):
        raise WireError(f"record entry '{KEY}' has stype {array.stype!r}, expected {STYPE!r}")
    return array.data


def read_record(record) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(arrays, metadata) of a record: a wire record's views, or a plain Flower record's
    arrays (views of each `Array`'s bytes where possible) with no metadata."""
    if is_wire(record):
        return decode(buffer_of(record))
    return {k: array_view(a) for k, a in record.items()}, {}


def arrays_of(record) -> dict[str, np.ndarray]:
    """The arrays of a record, wire or plain, as numpy views of its bytes where possible."""
    return read_record(record)[0]


def write_record(path: str | os.PathLike, record) -> None:
    """Write a record's arrays to `path` as wire bytes: a wire record's buffer as it is, a
    plain record encoded (its metadata: none)."""
    if is_wire(record):
        Path(path).write_bytes(buffer_of(record))
    else:
        write(path, arrays_of(record))


def array_view(array: Any) -> np.ndarray:
    """A read-only numpy view of a plain Flower `Array`'s bytes, without the copy of
    `Array.numpy()`: `Array.data` holds `np.save` output, so parse its header and view the
    rest. Anything unusual (Fortran order, object dtypes, another stype) goes through
    `Array.numpy()`."""
    data = array.data
    if getattr(array, "stype", "numpy.ndarray") != "numpy.ndarray" or not isinstance(data, (bytes, bytearray)):
        return array.numpy()
    try:
        head = io.BytesIO(memoryview(data)[: 65536 + 16])
        major, _minor = np.lib.format.read_magic(head)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(head)
    except (ValueError, OSError):
        return array.numpy()
    if fortran or dtype.hasobject:
        return array.numpy()
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(data, dtype=dtype, count=count, offset=head.tell()).reshape(shape)
