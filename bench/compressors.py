"""Benchmark the delta compressors on a real GPT-2 delta: time, error and bytes per method.

Builds a GPT-2 (124M shape, or a tiny one) from scratch, runs a few AdamW steps on WikiText-2
text, and compresses the delta (after - before) with every method x path. Reports encode and
decode time (median of repeats, CUDA synchronized), mean relative error, error over the
optimal rank-k error (exact SVD of each matrix) and bytes against dense fp32.

    python bench/compressors.py --preset tiny                       # quick CPU run
    python bench/compressors.py --device cuda --out results.json    # 124M on a GPU

Data: `--data-dir` (a folder with `wiki.valid.raw`) and `--tokenizer` (a GPT-2 tokenizer
folder), by default `../shared/data/wikitext-2-raw` and `../shared/data/gpt2` beside the
repository; `--tokens FILE.npy` (once written) replaces both.

Needs torch, transformers, numpy, scipy; flwr only to build the real ArrayRecord (without it
the exact byte count is computed by `codec.record_nbytes`, which the tests tie to flwr's).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timing  # noqa: E402  (bench/timing.py)

from asyncfl.compressors import codec, get_compressor, should_compress  # noqa: E402
from asyncfl.compressors.base import _metrics  # noqa: E402  (errors from the timed encode)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared beside the repo
PRESETS = {"small": dict(n_layer=12, n_embd=768, n_head=12), "tiny": dict(n_layer=2, n_embd=128, n_head=2)}
METHODS = "none,pca,qrcp,cur,cur:pivoted,cur:leverage,cur:uniform"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="small", choices=list(PRESETS))
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--steps", type=int, default=3, help="AdamW steps that make the delta")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=8, help="blocks of 128 tokens per step")
    p.add_argument("--methods", default=METHODS, help="comma list; cur:<row_select> variants")
    p.add_argument("--paths", default="exact,randomized")
    p.add_argument("--wire", default="fp16", choices=["fp16", "fp32"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--exact-repeats", type=int, default=1, help="repeats of the exact paths")
    p.add_argument("--skip-exact-on-cpu", action="store_true")
    p.add_argument(
        "--data-dir",
        default=str(SHARED_DATA / "wikitext-2-raw"),
        help="folder with wiki.valid.raw (default: ../shared/data beside the repository)",
    )
    p.add_argument(
        "--tokenizer",
        default=str(SHARED_DATA / "gpt2"),
        help="GPT-2 tokenizer folder (default: ../shared/data beside the repository)",
    )
    p.add_argument("--tokens", default="", help=".npy of token ids (skips the tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-delta", default="", help="also torch.save the delta here")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if not (args.tokens and Path(args.tokens).exists()):  # the text and tokenizer are needed
        for what, path, need in (
            ("--data-dir", args.data_dir, "wiki.valid.raw"),
            ("--tokenizer", args.tokenizer, "vocab.json"),
        ):
            if not (Path(path) / need).is_file():
                p.error(f"{what} {path!r} has no {need}: pass the folder, or --tokens with a cached .npy of token ids")
    return args


def load_tokens(args: argparse.Namespace, n_tokens: int) -> torch.Tensor:
    """Token ids of the first WikiText-2 validation text (or a cached .npy)."""
    if args.tokens and Path(args.tokens).exists():
        return torch.from_numpy(np.load(args.tokens)[:n_tokens].astype(np.int64))
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(args.tokenizer)
    text = (Path(args.data_dir) / "wiki.valid.raw").read_text(encoding="utf-8")[: n_tokens * 8]
    ids = np.asarray(tok(text)["input_ids"][:n_tokens], dtype=np.int64)
    if args.tokens:
        np.save(args.tokens, ids)
    return torch.from_numpy(ids)


def make_delta(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """Delta (after - before) of a from-scratch GPT-2 after a few AdamW steps on real text."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    cfg = GPT2Config(vocab_size=50257, **PRESETS[args.preset])
    model = GPT2LMHeadModel(cfg).to(device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}  # wte tied: once
    blocks = load_tokens(args, args.steps * args.batch_size * 128).view(-1, 128).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    for step in range(args.steps):
        batch = blocks[step * args.batch_size : (step + 1) * args.batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"step {step}: loss {loss.item():.3f}", flush=True)
    delta = {n: (p.detach() - before[n]).contiguous() for n, p in model.named_parameters()}
    if args.save_delta:
        torch.save(delta, args.save_delta)
    return delta


def optimal_errors(delta: dict[str, torch.Tensor], rank: int) -> dict[str, float]:
    """Optimal rank-k relative error ||S - S_k||_F / ||S||_F of every factorized matrix."""
    out = {}
    for name, t in delta.items():
        if should_compress(tuple(t.shape), rank):
            s = torch.linalg.svdvals(t.reshape(t.shape[0], -1).double()).cpu()
            out[name] = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
    return out


def timed(fn, device: torch.device, repeats: int, burn_in: bool = True):
    """(last result, median ms, best ms) of `repeats` calls, after one untimed call if
    `burn_in`."""
    times, result = timing.timed(fn, device, repeats, warmup=burn_in)
    return result, statistics.median(times), min(times)


def run_one(spec: str, path: str, args, delta, optimal, device) -> dict:
    """Encode + decode the delta with one method and path; errors from the timed encode."""
    name, _, row_select = spec.partition(":")
    opts = dict(rank=args.rank, method=path, dtype=args.wire, seed=args.seed)
    comp = get_compressor(name, **opts, **({"row_select": row_select} if row_select else {}))
    repeats = args.exact_repeats if path == "exact" else args.repeats
    have_flwr = importlib.util.find_spec("flwr") is not None

    def encode():  # = Compressor.encode_state minus its metrics; no flwr: no Array wrapping
        payloads, groups = comp._encode_many(delta)
        return payloads, groups, codec.build_record(payloads, name) if have_flwr else None

    (payloads, groups, record), enc_ms, enc_best = timed(encode, device, repeats, path != "exact")
    nbytes = record.count_bytes() if have_flwr else codec.record_nbytes(payloads, name)
    if have_flwr:
        decode = lambda: codec.decode_state(record, device=device)  # noqa: E731
    else:
        decode = lambda: codec.decode_payloads(payloads, device=device)  # noqa: E731
    _, dec_ms, _ = timed(decode, device, args.repeats)
    metrics = _metrics(delta, payloads, groups, name)
    rel = {k: metrics["rel_error"][k] for k in optimal}
    ratio = [rel[k] / optimal[k] for k in optimal if optimal[k] > 0]
    dense = sum(4 * t.numel() for t in delta.values())
    return {
        "method": spec,
        "path": path,
        "encode_ms": enc_ms,
        "encode_best_ms": enc_best,
        "decode_ms": dec_ms,
        "mean_rel_error": float(np.mean(list(rel.values()))) if rel else 0.0,
        "err_over_opt": float(np.mean(ratio)) if ratio else 1.0,
        "mean_fro_error": metrics["mean_fro_error"],
        "bytes": nbytes,
        "dense_fp32_bytes": dense,
        "ratio": nbytes / dense,
        "repeats": repeats,
        "flwr_record": have_flwr,
    }


def table(rows: list[dict]) -> str:
    head = (
        "| method | path | encode ms | decode ms | mean rel err | err / opt | MB | "
        "bytes / fp32 |\n|---|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [
        f"| {r['method']} | {r['path']} | {r['encode_ms']:.1f} | {r['decode_ms']:.1f} | "
        f"{r['mean_rel_error']:.4f} | {r['err_over_opt']:.3f} | {r['bytes'] / 1e6:.3f} | "
        f"{r['ratio']:.4f} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def environment(device: torch.device) -> dict:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        sha = out.stdout.strip() if out.returncode == 0 else ""
    except OSError:
        sha = ""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return {
        "git_sha": sha,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": gpu,
        "cpu_threads": torch.get_num_threads(),
        "numpy": np.__version__,
    }


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    delta = make_delta(args, device)
    optimal = optimal_errors(delta, args.rank)
    n2d = sum(t.ndim >= 2 for t in delta.values())
    print(
        f"{len(delta)} tensors, {n2d} matrices, {len(optimal)} factorized at rank {args.rank}; "
        f"mean optimal rel error {np.mean(list(optimal.values())):.4f}",
        flush=True,
    )
    rows = []
    for spec in args.methods.split(","):
        for path in ["-"] if spec == "none" else args.paths.split(","):
            if path == "exact" and device.type == "cpu" and args.skip_exact_on_cpu:
                continue
            rows.append(run_one(spec, "randomized" if path == "-" else path, args, delta, optimal, device))
            if spec == "none":
                rows[-1]["path"] = "-"
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.out:
        out = {
            "config": vars(args),
            "env": environment(device),
            "results": rows,
            "optimal_mean_rel_error": float(np.mean(list(optimal.values()))),
        }
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
