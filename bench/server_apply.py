"""Server cost per client update for the GPT-2 124M shape: decode + rule apply, and the global record.

What the async server loop does for every reply (`ServerLoop._decode` + `AsyncLoop._handle_async_reply`):
`decode_state(record, reference=shapes, device=device)` rebuilds the dense delta from its
low-rank factors (validating the wire bytes and every payload; the factors are views of the
received bytes), then `rule.apply(x, update, staleness, node, base)`
folds it into the global trainable state in place. Once per new global version the server also
builds the outgoing `ArrayRecord` of the global state (`_global_record`, fp32 on the host).

    python bench/server_apply.py --device cpu --repeats 5 --out results.json
    python bench/server_apply.py --device cuda --repeats 20 --out results.json

The delta: `--delta real` (default) runs `--steps` AdamW steps of the from-scratch 124M model on
WikiText-2 tokens and takes after - before (as bench/compressors.py does); `--delta random` is
a random rank-`--rank` matrix plus 1% Gaussian noise per tensor (no training: fast on a CPU).
Each compressor encodes it once (client side, not timed); the server side is timed per rule:
decode, apply and decode+apply (the loop's `decode_apply_s`), device synchronized, median over
`--repeats` after one warm-up. fedasync also needs the copy-on-write snapshot of the global state
that the loop takes when x changes while tasks still reference its version (one clone of x per
version, i.e. per update with 4 busy clients): shown as its own column and included in
"total". "fedavg (sync)" is the sync baseline: decode 4 replies, `fedavg_mean`, one add, per update.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from timing import sync, timed  # noqa: E402  (bench/timing.py)

from asyncfl.compressors import decode_state, get_compressor  # noqa: E402
from asyncfl.config import AppConfig  # noqa: E402
from asyncfl.model import build_model, trainable_state  # noqa: E402
from asyncfl.strategies.build import build_rule  # noqa: E402
from asyncfl.strategies.rules import fedavg_mean  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
RULES = "fedasync,fedbuff,asgd,shifted,saga,fedavg"
COMPRESSORS = "none,pca,qrcp,cur"
NUM_CLIENTS = 4


def load_tokens(n: int, tokenizer: str, data: str) -> torch.Tensor:
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(tokenizer)
    text = Path(data).read_text(encoding="utf-8")[: n * 8]
    ids = tok(text)["input_ids"][:n]
    if len(ids) < n:
        raise SystemExit(f"error: {data} gave {len(ids)} tokens, need {n}")
    return torch.tensor(ids, dtype=torch.int64)


def real_delta(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """after - before of `--steps` AdamW steps on WikiText-2 (the model keeps the after state)."""
    block = 128
    tokens = load_tokens(args.steps * args.batch_size * block, args.tokenizer, args.data)
    blocks = tokens.view(-1, block).to(device)
    x = trainable_state(model)
    before = {k: v.clone() for k, v in x.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    for step in range(args.steps):
        t0 = time.perf_counter()
        batch = blocks[step * args.batch_size : (step + 1) * args.batch_size]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"  step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.1f} s)", flush=True)
    del opt
    return {k: (v - before[k]).contiguous() for k, v in x.items()}


def random_delta(x: dict[str, torch.Tensor], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """Per tensor: a random rank-`rank` matrix (unit Frobenius norm) plus 1% Gaussian noise."""
    g = torch.Generator(device=next(iter(x.values())).device).manual_seed(seed)
    out = {}
    for k, v in x.items():
        dev = v.device
        if v.ndim >= 2:
            m, n = v.shape[0], v.numel() // v.shape[0]
            r = min(rank, m, n)
            low = torch.randn(m, r, generator=g, device=dev) @ torch.randn(r, n, generator=g, device=dev)
            low /= low.norm()
            noise = torch.randn(m, n, generator=g, device=dev)
            d = low + 0.01 * noise / noise.norm()
        else:
            d = torch.randn(v.shape, generator=g, device=dev)
            d /= d.norm()
        out[k] = (1e-3 * d).reshape(v.shape)
    return out


def make_compressor(name: str, rank: int):
    return get_compressor("none") if name == "none" else get_compressor(name, rank=rank)


def bench_rule(
    rule_name: str, record, x: dict[str, torch.Tensor], shapes: dict, device: torch.device, repeats: int, base_cfg: dict
) -> dict[str, Any]:
    """decode, apply, decode+apply (and fedasync's snapshot) timings of one rule on one record."""
    decode = lambda: decode_state(record, reference=shapes, device=device)  # noqa: E731
    dec_ms, update = timed(decode, device, repeats)
    row: dict[str, Any] = {"rule": rule_name, "decode_ms": statistics.median(dec_ms), "decode_all_ms": dec_ms}
    snapshot = lambda: {k: v.clone() for k, v in x.items()}  # noqa: E731
    if rule_name == "fedavg":  # the sync round: 4 decodes, mean, one add; reported per update
        weights = [1.0] * NUM_CLIENTS

        def apply_mean() -> None:
            mean = fedavg_mean([update] * NUM_CLIENTS, weights)
            with torch.no_grad():
                for k, v in x.items():
                    v.add_(mean[k], alpha=1.0)

        def round_() -> None:
            ups = [decode() for _ in range(NUM_CLIENTS)]
            mean = fedavg_mean(ups, weights)
            with torch.no_grad():
                for k, v in x.items():
                    v.add_(mean[k], alpha=1.0)

        app_ms, _ = timed(apply_mean, device, repeats)
        tot_ms, _ = timed(round_, device, repeats)
        row.update(
            apply_ms=statistics.median(app_ms) / NUM_CLIENTS,
            snapshot_ms=0.0,
            decode_apply_ms=statistics.median(tot_ms) / NUM_CLIENTS,
            decode_apply_min_ms=min(tot_ms) / NUM_CLIENTS,
        )
        row["total_ms"] = row["decode_apply_ms"]
        row["decode_apply_all_ms"] = [t / NUM_CLIENTS for t in tot_ms]
        return row
    cfg = AppConfig.from_run_config({**base_cfg, "rule": rule_name})
    rule = build_rule(cfg, num_clients=NUM_CLIENTS)
    base = snapshot() if rule.needs_base else None
    node = iter(range(10**9))

    def apply() -> None:
        rule.apply(x, update, staleness=1, node=next(node) % NUM_CLIENTS, base=base)

    def decode_apply() -> None:
        rule.apply(x, decode(), staleness=1, node=next(node) % NUM_CLIENTS, base=base)

    app_ms, _ = timed(apply, device, repeats)
    tot_ms, _ = timed(decode_apply, device, repeats)
    snap_ms, _ = timed(snapshot, device, repeats) if rule.needs_base else ([0.0], None)
    row.update(
        apply_ms=statistics.median(app_ms),
        snapshot_ms=statistics.median(snap_ms),
        decode_apply_ms=statistics.median(tot_ms),
        decode_apply_min_ms=min(tot_ms),
        decode_apply_all_ms=tot_ms,
    )
    row["total_ms"] = row["decode_apply_ms"] + row["snapshot_ms"]
    return row


def global_record_ms(x: dict[str, torch.Tensor], device: torch.device, repeats: int) -> dict:
    """`_global_record`: the fp32 host copy of x wrapped in an ArrayRecord (once per version)."""
    from flwr.app import ArrayRecord

    build = lambda: ArrayRecord({k: v.detach().float().cpu() for k, v in x.items()})  # noqa: E731
    ms, rec = timed(build, device, repeats)
    host = lambda: {k: v.detach().float().cpu() for k, v in x.items()}  # noqa: E731
    host_ms, _ = timed(host, device, repeats)
    return {"ms": statistics.median(ms), "to_host_ms": statistics.median(host_ms), "bytes": rec.count_bytes()}


def environment(device: torch.device) -> dict[str, Any]:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    import os

    return {
        "git_sha": sha,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "numpy": np.__version__,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| compressor | MB on the wire | rule | decode ms | apply ms | decode+apply ms "
        "(median) | decode+apply ms (best) | snapshot ms | total ms |\n"
        "|---|---:|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [
        f"| {r['compressor']} | {r['bytes'] / 1e6:.2f} | {r['rule']} | {r['decode_ms']:.1f} | "
        f"{r['apply_ms']:.1f} | {r['decode_apply_ms']:.1f} | {r['decode_apply_min_ms']:.1f} | "
        f"{r['snapshot_ms']:.1f} | {r['total_ms']:.1f} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="small", choices=["small", "tiny"], help="model shape (small = GPT-2 124M)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--compressors", default=COMPRESSORS)
    p.add_argument("--rules", default=RULES, help="comma list; fedavg = the sync baseline")
    p.add_argument("--delta", default="real", choices=["real", "random"])
    p.add_argument("--steps", type=int, default=2, help="AdamW steps for --delta real")
    p.add_argument("--batch-size", type=int, default=4, help="blocks of 128 tokens per step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--tokenizer", default=str(SHARED / "gpt2"))
    p.add_argument("--data", default=str(SHARED / "wikitext-2-raw" / "wiki.valid.raw"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write all timings as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    base_cfg = {"model-preset": args.preset, "device": args.device, "rank": args.rank}
    cfg = AppConfig.from_run_config(base_cfg)
    t0 = time.perf_counter()
    model = build_model(cfg).to(device)
    x = trainable_state(model)  # the live tensors the server's rules update in place
    shapes = {k: v.shape for k, v in x.items()}
    n_params = sum(v.numel() for v in x.values())
    print(
        f"model {args.preset}: {len(x)} tensors, {n_params / 1e6:.1f}M trainable parameters, "
        f"built in {time.perf_counter() - t0:.1f} s on {device}",
        flush=True,
    )
    t0 = time.perf_counter()
    if args.delta == "real":
        delta = real_delta(model, args, device)
    else:
        delta = random_delta(x, args.rank, args.seed)
    print(f"delta ({args.delta}) in {time.perf_counter() - t0:.1f} s", flush=True)
    model.zero_grad(set_to_none=True)

    rows: list[dict[str, Any]] = []
    for cname in args.compressors.split(","):
        comp = make_compressor(cname, args.rank)
        t0 = time.perf_counter()
        record = comp.encode_state(delta)
        sync(device)
        enc_s = time.perf_counter() - t0
        nbytes = record.count_bytes()
        for rule in args.rules.split(","):
            row = bench_rule(rule, record, x, shapes, device, args.repeats, base_cfg)
            row.update(compressor=cname, bytes=nbytes, encode_s=enc_s)
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
        del record
    glob = global_record_ms(x, device, args.repeats)
    print()
    print(table(rows))
    print(
        f"\nglobal ArrayRecord (once per version): {glob['ms']:.1f} ms "
        f"(of which device->host fp32 copy {glob['to_host_ms']:.1f} ms), "
        f"{glob['bytes'] / 1e6:.1f} MB"
    )
    if args.out:
        out = {
            "config": vars(args),
            "env": environment(device),
            "n_params": n_params,
            "results": rows,
            "global_record": glob,
        }
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
