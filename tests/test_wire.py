"""The wire format (asyncfl/wire.py) against the safetensors library as the independent
reference, both ways; through Flower's own object split; and against malformed buffers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors
import safetensors.numpy as st
import torch
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from asyncfl import wire
from asyncfl.compressors import decode_state, get_compressor
from asyncfl.wire import WireError


def sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "h.0.w": rng.standard_normal((5, 7)).astype(np.float32),
        "h.0.b": rng.standard_normal(7).astype(np.float16),
        "idx": rng.integers(0, 100, 9).astype(np.int64),
        "f64": rng.standard_normal((2, 3, 4)),
        "u8": np.frombuffer(b"some bytes", dtype=np.uint8).copy(),
        "i8": np.array([-3, 0, 7], np.int8),
        "u16": np.array([1, 65535], np.uint16),
        "i16": np.array([-300], np.int16),
        "u32": np.array([2**32 - 1], np.uint32),
        "i32": np.array([-1, 2], np.int32),
        "u64": np.array([2**64 - 1], np.uint64),
        "mask": np.array([True, False, True]),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "strided": np.arange(20, dtype=np.int32).reshape(4, 5)[:, ::2],  # not contiguous
        "big_endian": np.arange(4, dtype=">f8"),
    }


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k, a in want.items():
        assert got[k].shape == a.shape and got[k].dtype == a.dtype.newbyteorder("<"), k
        np.testing.assert_array_equal(got[k], a, err_msg=k)


def test_library_reads_what_we_write(tmp_path):
    arrays = sample_arrays()
    data = wire.encode(arrays, {"compressor": "pca", "note": "é"})
    assert_same(st.load(data), arrays)
    path = tmp_path / "x.safetensors"
    assert wire.write(path, arrays, {"compressor": "pca", "note": "é"}) == len(data)
    assert path.read_bytes() == data  # one format: the file is the same bytes
    with safetensors.safe_open(str(path), framework="np") as f:
        assert f.metadata() == {"compressor": "pca", "note": "é"}
        assert_same({k: f.get_tensor(k) for k in f.keys()}, arrays)


def test_we_read_what_the_library_writes(tmp_path):
    arrays = {k: np.ascontiguousarray(v) for k, v in sample_arrays().items()}
    data = st.save(arrays, metadata={"format": "1", "tensors": "{}"})
    got, meta = wire.decode(data)
    assert_same(got, arrays)
    assert meta == {"format": "1", "tensors": "{}"}
    path = tmp_path / "lib.safetensors"
    st.save_file(arrays, str(path))
    got, meta = wire.read(path)
    assert_same(got, arrays) and meta == {}


def test_decode_keeps_the_writers_order_and_gives_aligned_read_only_views():
    arrays = sample_arrays()
    data = wire.encode(arrays)
    got, meta = wire.decode(data)
    assert list(got) == list(arrays) and meta == {}
    raw = np.frombuffer(data, np.uint8)
    for k, a in got.items():
        assert not a.flags.writeable, k
        if a.size:
            assert np.shares_memory(a, raw), k  # a view, no copy
            assert a.ctypes.data % a.dtype.itemsize == 0, k
    assert wire.encoded_nbytes(arrays) == len(data)
    assert wire.encoded_nbytes(arrays, {"a": "b"}) == len(wire.encode(arrays, {"a": "b"}))


def test_file_read_is_a_private_copy_on_write_map(tmp_path):
    path = tmp_path / "f.safetensors"
    arrays = {"w": np.random.rand(5, 7).astype(np.float32), "e": np.zeros((0, 3), np.float32)}
    wire.write(path, arrays)
    got, _ = wire.read(path)
    path.unlink()  # the ClientApp removes its task files once the worker has answered
    np.testing.assert_array_equal(got["w"], arrays["w"])
    got["w"][0, 0] = -1.0  # writable (torch.from_numpy needs that), private to this process
    assert torch.from_numpy(got["w"])[0, 0] == -1.0
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(WireError, match="shorter"):
        wire.read(empty)


def test_encode_refuses_what_safetensors_cannot_hold():
    with pytest.raises(TypeError, match="'bad'.*object"):
        wire.encode({"bad": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(TypeError, match="'c'.*complex"):
        wire.encode({"c": np.zeros(2, np.complex64)})
    with pytest.raises(TypeError, match="metadata must map str to str"):
        wire.encode({}, {"n": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="reserved"):
        wire.encode({"__metadata__": np.zeros(1)})


# --- Flower records --------------------------------------------------------------------------
def flower_round_trip(record: ArrayRecord) -> ArrayRecord:
    """What a receiver gets: the record deflated into Flower objects and inflated again."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}
    return inflate_object_from_contents(record.object_id, contents, keep_object_contents=False)


def test_record_survives_flowers_object_split_as_few_objects():
    rng = np.random.default_rng(1)
    arrays = {
        f"t{i}/{f}": rng.standard_normal((64, 4)).astype(np.float32) for i in range(150) for f in ("u", "v", "mean")
    }  # a low-rank payload's shape
    plain = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    record = wire.to_record(arrays, {"k": "v"})
    assert len(get_all_nested_objects(plain)) > 2 * len(arrays)  # an object per Array and chunk
    assert len(get_all_nested_objects(record)) <= 3  # the record, the Array, its one chunk
    received = flower_round_trip(record)
    assert wire.is_wire(received) and received[wire.KEY].stype == wire.STYPE
    got, meta = wire.read_record(received)
    assert_same(got, arrays) and meta == {"k": "v"}
    assert_same(st.load(received[wire.KEY].data), arrays)  # any safetensors reader opens it
    assert record.count_bytes() == len(record[wire.KEY].data) + len(wire.KEY)


def test_large_record_is_split_in_chunks_and_rebuilt_exactly():
    big = {"w": np.arange(3_000_000, dtype=np.float32), "b": np.ones(3, np.float16)}  # 12 MB: 3 chunks
    assert_same(wire.arrays_of(flower_round_trip(wire.to_record(big))), big)


def test_plain_records_read_as_views_without_metadata():
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.array(2.0)}
    got, meta = wire.read_record(ArrayRecord({k: Array(v) for k, v in arrays.items()}))
    assert_same(got, arrays) and meta == {} and not wire.is_wire(ArrayRecord({"x": Array(arrays["x"])}))


@pytest.mark.parametrize(
    "value",
    [
        np.random.rand(3, 4).astype(np.float32),
        np.random.rand(6).astype(np.float16),
        np.array(2.5),
        np.zeros((0, 3), np.float32),
        np.arange(5, dtype=">i4"),
        np.arange(24, dtype=np.int64).reshape(2, 3, 4),
        np.asfortranarray(np.random.rand(3, 2)),
    ],
)
def test_array_view_equals_flower_numpy_without_a_copy(value):
    arr = Array(value)
    view = wire.array_view(arr)
    ref = arr.numpy()
    assert view.dtype == ref.dtype and view.shape == ref.shape
    np.testing.assert_array_equal(view, ref)
    if not np.isfortran(value) or value.ndim < 2:  # C order: a view into Array.data itself
        assert not view.flags.owndata and not view.flags.writeable


def test_write_record_writes_a_wire_buffer_as_is_and_encodes_a_plain_record(tmp_path):
    arrays = {"w": np.ones((2, 3), np.float32)}
    record = wire.to_record(arrays, {"m": "1"})
    wire.write_record(tmp_path / "a", record)
    assert (tmp_path / "a").read_bytes() == record[wire.KEY].data
    wire.write_record(tmp_path / "b", ArrayRecord({"w": Array(arrays["w"])}))
    assert (tmp_path / "b").read_bytes() == wire.encode(arrays)


def test_decoding_a_payload_from_its_bytes_equals_decoding_the_record():
    rng = torch.Generator().manual_seed(0)
    delta = {"a": torch.randn(32, 24, generator=rng), "b": torch.randn(24, generator=rng)}
    record = get_compressor("pca", rank=4).encode_state(delta)
    direct = decode_state(record)
    data = flower_round_trip(record)[wire.KEY].data
    for via in (decode_state(data), decode_state(wire.decode(data)), decode_state(np.frombuffer(data, np.uint8))):
        for k in delta:
            torch.testing.assert_close(via[k], direct[k], rtol=0, atol=0)


def test_malformed_records_raise_a_wire_error():
    record = wire.to_record({"w": np.ones(2, np.float32)})
    record["extra"] = Array(np.ones(2, np.float32))
    with pytest.raises(WireError, match="only 'safetensors'"):
        wire.arrays_of(record)
    odd = ArrayRecord({wire.KEY: Array(np.zeros(8, np.uint8))})  # an np.save Array under the key
    with pytest.raises(WireError, match="stype 'numpy.ndarray'"):
        wire.arrays_of(odd)


# --- malformed buffers -----------------------------------------------------------------------
def _buffer(header: dict | bytes, data: bytes = b"\0" * 24) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def _t(dtype="F32", shape=(2, 3), offsets=(0, 24)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_the_reference_buffer_is_valid():
    """The buffers below differ from this one, which both readers accept, by one defect."""
    good = _buffer({"w": _t()})
    np.testing.assert_array_equal(wire.decode(good)[0]["w"], np.zeros((2, 3), np.float32))
    np.testing.assert_array_equal(st.load(good)["w"], np.zeros((2, 3), np.float32))


@pytest.mark.parametrize(
    "buffer, match",
    [
        (b"\x10\0\0", "shorter than its 8-byte header length"),
        (_buffer({"w": _t()})[:20], "header length .* exceeds"),  # truncated inside the header
        ((10**12).to_bytes(8, "little") + b"{}", "header length .* exceeds"),
        (_buffer(b'{"w": {"dtype": '), "not valid JSON"),
        (_buffer(b"\xff\xfe"), "not valid JSON"),
        (_buffer(b"[1, 2]"), "must be a JSON object"),
        (_buffer({"__metadata__": {"n": 1}, "w": _t()}), "must map names to text"),
        (_buffer({"w": [0, 24]}), "must have exactly the keys"),
        (_buffer({"w": {"dtype": "F32", "shape": [2, 3]}}), "must have exactly the keys"),
        (_buffer({"w": _t(dtype="BF16", shape=(12,))}), "dtype 'BF16' not accepted"),
        (_buffer({"w": _t(dtype="<f4")}), "dtype '<f4' not accepted"),
        (_buffer({"w": _t(shape=(2, -3))}), "shape .* is not a list of sizes"),
        (_buffer({"w": _t(shape=(2, True))}), "shape .* is not a list of sizes"),
        (_buffer({"w": _t(offsets=(24, 0))}), "0 <= begin <= end"),
        (_buffer({"w": _t(offsets=(-4, 20))}), "0 <= begin <= end"),
        (_buffer({"w": _t(offsets=(0, 24, 48))}), "0 <= begin <= end"),
        (_buffer({"w": _t(offsets=(0, 20))}), "needs 24 bytes"),
        (_buffer({"w": _t(shape=(2**40, 2**40))}), "needs .* bytes"),  # would wrap around in int64
        (_buffer({"w": _t()}, b"\0" * 23), "lie beyond the 23 data bytes"),  # truncated data
        (_buffer({"w": _t(offsets=(24, 48))}, b"\0" * 48), "gap after byte 0"),
        (_buffer({"w": _t(), "v": _t(offsets=(16, 40))}, b"\0" * 40), "'v'.* overlap tensor 'w'"),
        (_buffer({"w": _t()}, b"\0" * 32), "8 data bytes after the last tensor"),
    ],
)
def test_malformed_buffers_raise_a_wire_error(buffer, match):
    with pytest.raises(WireError, match=match):
        wire.decode(buffer)
    with pytest.raises(Exception):  # noqa: B017 - the reference reader refuses it as well
        st.load(buffer)


@pytest.mark.parametrize(
    "buffer, match",
    [
        (
            _buffer(
                b'{"w": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}, '
                b'"w": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}'
            ),
            "names 'w' twice",
        ),
        (_buffer({"w": {**_t(), "extra": 1}}), "must have exactly the keys"),
        (_buffer({"w": _t(dtype="C64", shape=(3,))}), "dtype 'C64' not accepted"),
    ],
)
def test_the_wire_is_stricter_than_the_library(buffer, match):
    """The library takes the last of two equal names, ignores unknown entry keys and reads
    complex numbers; a weight or a factor is none of these, so the wire refuses them."""
    st.load(buffer)
    with pytest.raises(WireError, match=match):
        wire.decode(buffer)


def test_decode_rejects_what_is_not_a_buffer():
    with pytest.raises(WireError, match="1-D uint8"):
        wire.decode(np.zeros(64, dtype=np.float32))
    with pytest.raises(WireError, match="bytes or a uint8 array"):
        wire.decode("text")  # type: ignore[arg-type]


def test_a_tensor_the_buffer_leaves_misaligned_is_copied_not_viewed():
    arrays = {"w": np.arange(6, dtype=np.float64), "b": np.array([True])}
    shifted = memoryview(b"x" + wire.encode(arrays))[1:]  # the data starts at an odd address
    got, _ = wire.decode(shifted)
    assert_same(got, arrays)
    assert got["w"].flags.aligned and got["w"].ctypes.data % 8 == 0
