"""Cost of the wire format (`asyncfl/wire.py`) on the GPT-2 124M shape: build, read, node files.

    PYTHONPATH=$PWD python bench/wire_cost.py --repeats 5

Two records: the full trainable weights (148 fp32 tensors, 498 MB) and a PCA rank-10 payload
(fp16 factors of the 2-D tensors, the 1-D ones dense fp32; 4.7 MB, 248 arrays), with random
values (the format does not look at them). For each step of a message's path the median time
over `--repeats` calls (after one untimed call) and the peak of Python-tracked allocations
during one more call (`tracemalloc`: numpy buffers and bytes objects), i.e. the copies made:

* server, weights: `pack="on"` builds one wire Array (`wire.to_record`), `pack="off"` one
  Flower Array per tensor (`ArrayRecord`, Flower's `np.save` per tensor);
* receiver, weights: `wire.arrays_of` (views of the received bytes) of either record;
* ClientApp -> node worker: the received record written to the /dev/shm task file
  (`wire.write_record`: a wire record's bytes as they are, a plain one encoded) and mapped by
  the worker (`wire.read`: copy-on-write, validated);
* client, payload: the compressor's record (`codec.build_record`); node worker -> ClientApp:
  its bytes written to the reply file and read back into the reply record (`run_remote`'s
  steps: write, read, validate);
* server, payload: `codec.parse_record` (wire check + structure), and the whole
  `decode_state` (validation and rebuild of the dense delta: the math, not the format).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flwr.app import Array, ArrayRecord  # noqa: E402

from asyncfl import wire  # noqa: E402
from asyncfl.compressors import codec, decode_state, should_compress  # noqa: E402
from asyncfl.compressors.codec import Payload  # noqa: E402


def gpt2_shapes() -> dict[str, tuple[int, ...]]:
    """The trainable tensors of GPT-2 124M (tied output embedding): 148 tensors."""
    shapes: dict[str, tuple[int, ...]] = {"wte": (50257, 768), "wpe": (1024, 768)}
    for i in range(12):
        for name, shape in (
            ("ln_1.weight", (768,)),
            ("ln_1.bias", (768,)),
            ("attn.c_attn.weight", (768, 2304)),
            ("attn.c_attn.bias", (2304,)),
            ("attn.c_proj.weight", (768, 768)),
            ("attn.c_proj.bias", (768,)),
            ("ln_2.weight", (768,)),
            ("ln_2.bias", (768,)),
            ("mlp.c_fc.weight", (768, 3072)),
            ("mlp.c_fc.bias", (3072,)),
            ("mlp.c_proj.weight", (3072, 768)),
            ("mlp.c_proj.bias", (768,)),
        ):
            shapes[f"h.{i}.{name}"] = shape
    shapes.update({"ln_f.weight": (768,), "ln_f.bias": (768,)})
    return shapes


def pca_payloads(shapes: dict[str, tuple[int, ...]], rank: int, rng: np.random.Generator) -> dict[str, Payload]:
    out = {}
    for k, shape in shapes.items():
        if should_compress(shape, rank):
            m, n = shape
            factors = {
                "u": rng.standard_normal((m, rank)).astype(np.float16),
                "v": rng.standard_normal((n, rank)).astype(np.float16),
                "mean": rng.standard_normal(n).astype(np.float16),
            }
            out[k] = Payload("pca", shape, "float32", factors, {"u": -3, "v": -2, "mean": -9})
        else:
            out[k] = Payload("dense", shape, "float32", {"data": rng.standard_normal(shape, dtype=np.float32)})
    return out


def measure(rows: list, name: str, fn: Callable[[], Any], repeats: int) -> None:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    tracemalloc.start()
    out = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del out
    rows.append((name, 1e3 * statistics.median(times), peak / 1e6))
    print(f"| {name} | {rows[-1][1]:.1f} ms | {rows[-1][2]:.1f} MB |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per step (median)")
    ap.add_argument("--rank", type=int, default=10, help="PCA rank of the payload")
    args = ap.parse_args()
    if args.repeats < 1 or args.rank < 1:
        raise SystemExit(f"error: --repeats and --rank must be >= 1, got {args.repeats}, {args.rank}")
    rng = np.random.default_rng(0)
    shapes = gpt2_shapes()
    weights = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    payloads = pca_payloads(shapes, args.rank, rng)
    scratch = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    rows: list = []
    print(f"asyncfl from {wire.__file__}")
    print(
        f"weights: {len(weights)} tensors, {sum(a.nbytes for a in weights.values()) / 1e6:.1f} MB; "
        f"payload: {sum(len(p.factors) for p in payloads.values())} arrays, "
        f"{codec.record_nbytes(payloads, 'pca') / 1e6:.2f} MB"
    )
    print("| step | median | peak allocated |\n|---|---:|---:|")
    r = args.repeats
    measure(rows, "server builds the weights record, pack on (one wire Array)", lambda: wire.to_record(weights), r)
    measure(
        rows,
        "server builds the weights record, pack off (Array per tensor)",
        lambda: ArrayRecord({k: Array(v) for k, v in weights.items()}),
        r,
    )
    packed = wire.to_record(weights)
    plain = ArrayRecord({k: Array(v) for k, v in weights.items()})
    measure(rows, "receiver reads the weights, pack on (views)", lambda: wire.arrays_of(packed), r)
    measure(rows, "receiver reads the weights, pack off (views)", lambda: wire.arrays_of(plain), r)

    def to_worker(record):
        wire.write_record(scratch / "in.safetensors", record)
        return wire.read(scratch / "in.safetensors")

    measure(rows, "ClientApp -> worker file, weights, pack on (write as is + map)", lambda: to_worker(packed), r)
    measure(rows, "ClientApp -> worker file, weights, pack off (encode + map)", lambda: to_worker(plain), r)
    measure(rows, "client builds the payload record (build_record)", lambda: codec.build_record(payloads, "pca"), r)
    payload = codec.build_record(payloads, "pca")

    def from_worker():
        wire.write_record(scratch / "out.safetensors", payload)
        data = (scratch / "out.safetensors").read_bytes()
        wire.decode(data)
        return wire.record_of(data)

    measure(rows, "worker file -> ClientApp reply, payload (write + read + check)", from_worker, r)
    measure(rows, "server parses the payload (parse_record)", lambda: codec.parse_record(payload), r)
    measure(
        rows,
        "server decode_state of the payload (validate + rebuild, CPU)",
        lambda: decode_state(payload, reference=shapes),
        max(1, r // 2),
    )
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()


if __name__ == "__main__":
    main()
