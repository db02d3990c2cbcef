"""Packed transport: many arrays as one Flower Array, checked against the arrays themselves,
through Flower's own object split (deflate / inflate), and against malformed input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from asyncfl.compressors import decode_state, get_compressor
from asyncfl.transport import ALIGN, MAGIC, PACKED_KEY, TransportError, arrays_of, pack, unpack_bytes


def sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "h.0.w": rng.standard_normal((5, 7)).astype(np.float32),
        "h.0.b": rng.standard_normal(7).astype(np.float16),
        "idx": rng.integers(0, 100, 9).astype(np.int64),
        "f64": rng.standard_normal((2, 3, 4)),
        "bytes": np.frombuffer(b"meta data", dtype=np.uint8).copy(),
        "mask": np.array([True, False, True]),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "strided": np.arange(20, dtype=np.int32).reshape(4, 5)[:, ::2],  # not contiguous
    }


def flower_round_trip(record: ArrayRecord) -> ArrayRecord:
    """What a receiver gets: the record deflated into Flower objects and inflated again."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}
    return inflate_object_from_contents(record.object_id, contents, keep_object_contents=False)


def test_round_trip_keeps_values_dtypes_and_shapes():
    arrays = sample_arrays()
    out = arrays_of(pack(arrays))
    assert list(out) == list(arrays)
    for k, a in arrays.items():
        assert out[k].dtype == a.dtype and out[k].shape == a.shape, k
        np.testing.assert_array_equal(out[k], a)


def test_unpacked_arrays_are_aligned_read_only_views_of_the_received_bytes():
    record = pack(sample_arrays())
    raw = np.frombuffer(record[PACKED_KEY].data, dtype=np.uint8)
    for k, a in arrays_of(record).items():
        assert not a.flags.writeable, k
        if a.size:
            assert np.shares_memory(a, raw), k  # a view, no copy
            assert a.ctypes.data % a.dtype.itemsize == 0, k
    # the packed Array is an ordinary uint8 numpy Array for anyone reading it with Flower
    assert record[PACKED_KEY].numpy().dtype == np.uint8


def test_packed_record_survives_flowers_object_split_as_few_objects():
    rng = np.random.default_rng(1)
    arrays = {f"t{i}/{f}": rng.standard_normal((64, 4)).astype(np.float32)
              for i in range(150) for f in ("u", "v", "mean")}  # a low-rank payload's shape
    plain = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    packed = pack(arrays)
    n_plain, n_packed = len(get_all_nested_objects(plain)), len(get_all_nested_objects(packed))
    assert n_plain > 2 * len(arrays)  # each Array and its chunk travel as their own objects
    assert n_packed <= 3  # the record, the Array and its one chunk (under 5 MB)
    out = arrays_of(flower_round_trip(packed))
    for k, a in arrays.items():
        np.testing.assert_array_equal(out[k], a)


def test_large_record_is_split_in_chunks_and_rebuilt_exactly():
    big = {"w": np.arange(3_000_000, dtype=np.float32), "b": np.ones(3, np.float16)}  # 12 MB: 3 chunks
    out = arrays_of(flower_round_trip(pack(big)))
    np.testing.assert_array_equal(out["w"], big["w"])
    np.testing.assert_array_equal(out["b"], big["b"])


def test_decoding_a_packed_payload_equals_decoding_the_original():
    rng = torch.Generator().manual_seed(0)
    delta = {"a": torch.randn(32, 24, generator=rng), "b": torch.randn(24, generator=rng)}
    record = get_compressor("pca", rank=4).encode_state(delta)
    direct = decode_state(record)
    via_pack = decode_state(arrays_of(flower_round_trip(pack(arrays_of(record)))))
    for k in delta:
        torch.testing.assert_close(via_pack[k], direct[k], rtol=0, atol=0)


def test_unpacked_record_passes_through():
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    out = arrays_of(ArrayRecord({k: Array(v) for k, v in arrays.items()}))
    np.testing.assert_array_equal(out["x"], arrays["x"])


def test_pack_refuses_object_arrays():
    with pytest.raises(TypeError, match="'bad'.*object"):
        pack({"bad": np.array([{"a": 1}], dtype=object)})


# --- malformed input -------------------------------------------------------------------------
def _raw(arrays=None) -> bytearray:
    arrays = arrays or {"a_name_leaving_room_for_edits": np.ones((2, 3), np.float32)}
    return bytearray(pack(arrays)[PACKED_KEY].numpy().tobytes())


def _with_header(raw: bytearray, header: dict) -> np.ndarray:
    """`raw` with its JSON header replaced (padded to the same length)."""
    hlen = int.from_bytes(raw[len(MAGIC):len(MAGIC) + 8], "little")
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= hlen
    raw[len(MAGIC) + 8:len(MAGIC) + 8 + hlen] = text + b" " * (hlen - len(text))
    return np.frombuffer(bytes(raw), dtype=np.uint8)


@pytest.mark.parametrize("entry, match", [
    (["w", "<f4", [2, 300], 0], "beyond"),
    (["w", "|O", [2, 3], 0], "dtype"),
    (["w", ">f4", [2, 3], 0], "byte order"),
    (["w", "<f8", [2 ** 40, 2 ** 40], 0], "beyond"),  # would wrap around in int64
    (["w", "<f4", [2, -3], 0], "not \\[name, dtype, shape, offset\\]"),
    (["w", "<f4", [2, 3], 3], "not \\[name, dtype, shape, offset\\]"),  # misaligned offset
    (["w", "<f4", [2, 3]], "not \\[name, dtype, shape, offset\\]"),
    (["w", "nonsense", [2, 3], 0], "not \\[name, dtype, shape, offset\\]"),
])
def test_malformed_entries_raise_a_transport_error(entry, match):
    with pytest.raises(TransportError, match=match):
        unpack_bytes(_with_header(_raw(), {"arrays": [entry]}))


def test_malformed_containers_raise_a_transport_error():
    raw = _raw()
    with pytest.raises(TransportError, match="does not start with"):
        unpack_bytes(np.frombuffer(b"XXXXXXXX" + bytes(raw[8:]), dtype=np.uint8))
    with pytest.raises(TransportError, match="header length"):
        bad = bytearray(raw)
        bad[len(MAGIC):len(MAGIC) + 8] = (10 ** 9).to_bytes(8, "little")
        unpack_bytes(np.frombuffer(bytes(bad), dtype=np.uint8))
    with pytest.raises(TransportError, match="not valid"):
        bad = bytearray(raw)
        bad[len(MAGIC) + 8] = ord("!")
        unpack_bytes(np.frombuffer(bytes(bad), dtype=np.uint8))
    with pytest.raises(TransportError, match="twice"):
        unpack_bytes(_with_header(_raw({"w_long_name": np.ones(2, np.float32), "v_long_name": np.ones(2, np.float32)}),
                                  {"arrays": [["w", "<f4", [2], 0], ["w", "<f4", [2], ALIGN]]}))
    with pytest.raises(TransportError, match="1-D uint8"):
        unpack_bytes(np.zeros(64, dtype=np.float32))
    with pytest.raises(TransportError, match="only '__packed__'"):
        record = pack({"w": np.ones(2, np.float32)})
        record["extra"] = Array(np.ones(2, np.float32))
        arrays_of(record)
