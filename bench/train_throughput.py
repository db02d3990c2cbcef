"""Tokens/s of the bare local training loop vs the same work through the ClientApp train handler.

    python bench/train_throughput.py --device cpu --preset tiny --steps 10
    python bench/train_throughput.py --device cuda --preset small --batch-size 16 --block-size 1024 --compile

1. bare: `asyncfl.train.train_local` on a model built by `asyncfl.model.build_model`;
2. in FL: `asyncfl.client_app.handle_train(Message, Context)` with the global trainable state
   in an `ArrayRecord` (deserialize, load, train, delta, encode, reply), same config and data.
Each path gets a warm-up call (model build, data, torch.compile), then `--repeats` timed calls
of `--steps` steps, device synchronized; the median call is reported. The FL overhead ratio
is in-FL tokens/s over bare tokens/s, both from wall-clock time per call.

Data: the first partition of `--data-dir` (WikiText, tokenized with `--tokenizer`) when both
exist, else random tokens (bare part only: the FL handler loads its own data).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = next((p for p in (ROOT.parent / "shared" / "data", ROOT / "shared" / "data") if p.is_dir()), None)

from asyncfl.config import AppConfig  # noqa: E402
from asyncfl.model import build_model, count_params, trainable_state  # noqa: E402
from asyncfl.train import train_local  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per call")
    p.add_argument("--warmup", type=int, default=3, help="optimizer steps of the warm-up call")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per path (median reported)")
    p.add_argument("--compile", action="store_true", help="torch.compile (CUDA only)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off for CPU; the FL handler uses the default)")
    p.add_argument("--tokenizer", default=str(SHARED / "gpt2") if SHARED else "")
    p.add_argument("--data-dir", default=str(SHARED / "wikitext-2-raw") if SHARED else "")
    p.add_argument("--no-fl", action="store_true", help="skip the ClientApp part")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return p.parse_args()


def run_config(args: argparse.Namespace, steps: int) -> dict:
    """The run config both paths use (kebab-case keys, as `context.run_config` holds them)."""
    return {
        "model-preset": args.preset, "tokenizer": args.tokenizer, "data-dir": args.data_dir,
        "device": args.device, "compile": args.compile, "lora-rank": args.lora_rank,
        "batch-size": args.batch_size, "block-size": args.block_size, "local-steps": steps,
        "max-train-blocks": max(args.batch_size * 8, 64), "compressor": "none",
    }


def has_data(args: argparse.Namespace) -> bool:
    return bool(args.tokenizer and args.data_dir and Path(args.tokenizer).is_dir() and Path(args.data_dir).is_dir())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bare_loop(args: argparse.Namespace) -> dict:
    """Median wall-clock tokens/s of `train_local` calls (plus its own loop-only figure)."""
    model = build_model(AppConfig.from_run_config(run_config(args, args.warmup))).to(args.device)
    if has_data(args):
        from asyncfl.data import load_partition

        blocks = load_partition(AppConfig.from_run_config(run_config(args, args.warmup)), 0, 1)
    else:
        g = torch.Generator().manual_seed(0)
        blocks = torch.randint(0, 50257, (max(args.batch_size * 8, 64), args.block_size), generator=g)
    train_local(model, blocks, AppConfig.from_run_config(run_config(args, args.warmup)), args.device,
                generator_seed=0, bf16=args.bf16)
    cfg = AppConfig.from_run_config(run_config(args, args.steps))
    walls, loops = [], []
    for r in range(args.repeats):
        sync(args.device)
        t0 = time.perf_counter()
        res = train_local(model, blocks, cfg, args.device, generator_seed=r + 1, bf16=args.bf16)
        sync(args.device)
        walls.append(time.perf_counter() - t0)
        loops.append(res.tokens_per_s)
    wall = statistics.median(walls)
    trainable, total = count_params(model)
    return {"tokens_per_s": res.tokens / wall, "loop_tokens_per_s": statistics.median(loops),
            "ms_per_step": 1e3 * wall / args.steps, "tokens_per_call": res.tokens,
            "params_trainable": trainable, "params_total": total, "data": "wikitext" if has_data(args) else "random"}


def fl_handler(args: argparse.Namespace) -> dict | None:
    """Median wall-clock tokens/s of `client_app.handle_train` on a synthetic train Message."""
    try:
        from asyncfl.client_app import handle_train
    except ImportError as exc:
        print(f"client_app not available ({exc})")
        return None
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, MessageType, RecordDict

    global_state = {k: v.clone() for k, v in trainable_state(
        build_model(AppConfig.from_run_config(run_config(args, args.steps)))).items()}

    def call(steps: int, i: int) -> tuple[float, Message]:
        content = RecordDict({"arrays": ArrayRecord(global_state), "config": ConfigRecord({"run-key": "bench"})})
        meta = Metadata(run_id=1, message_id=f"bench-{i}", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=3600.0, message_type=MessageType.TRAIN)
        context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1},
                          state=RecordDict(), run_config=run_config(args, steps))
        sync(args.device)
        t0 = time.perf_counter()
        reply = handle_train(Message(content, metadata=meta), context)
        sync(args.device)
        return time.perf_counter() - t0, reply

    call(args.warmup, 0)
    walls, metrics = [], {}
    for r in range(args.repeats):
        wall, reply = call(args.steps, r + 1)
        walls.append(wall)
        metrics = dict(reply.content["metrics"]) if "metrics" in reply.content else {}
    wall = statistics.median(walls)
    tokens = args.steps * args.batch_size * args.block_size
    return {"tokens_per_s": tokens / wall, "ms_per_step": 1e3 * wall / args.steps,
            "handler_reported_train_tokens_per_s": metrics.get("tokens-per-s")}


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    amp = args.bf16 if args.bf16 is not None else args.device == "cuda"
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"device {name} | preset {args.preset} lora-rank {args.lora_rank} | batch {args.batch_size} x "
          f"block {args.block_size} | {'bf16' if amp else 'fp32'} | compile {args.compile and args.device == 'cuda'}")
    bare = bare_loop(args)
    print(f"bare loop : {bare['tokens_per_s']:>12,.0f} tokens/s  {bare['ms_per_step']:8.1f} ms/step  "
          f"(loop only {bare['loop_tokens_per_s']:,.0f} tokens/s; {bare['params_trainable']:,} trainable "
          f"of {bare['params_total']:,} params; {bare['data']} data)")
    fl = None
    if args.no_fl:
        pass
    elif not has_data(args):
        print("FL handler: skipped (needs --tokenizer and --data-dir folders: the handler loads its own data)")
    else:
        fl = fl_handler(args)
        if fl is not None:
            note = "" if args.bf16 is None else " (the handler always uses the default precision)"
            print(f"in FL     : {fl['tokens_per_s']:>12,.0f} tokens/s  {fl['ms_per_step']:8.1f} ms/step  "
                  f"ratio {fl['tokens_per_s'] / bare['tokens_per_s']:.3f} of bare{note}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "device": name,
                                         "bare": bare, "fl": fl}, indent=2))


if __name__ == "__main__":
    main()
