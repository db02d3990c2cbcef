"""Tokens/s of the bare local training loop vs the same work through the ClientApp train handler.

    python bench/train_throughput.py --device cpu --preset tiny --steps 10
    python bench/train_throughput.py --device cuda --preset small --batch-size 16 --block-size 1024 --compile

1. bare: `asyncfl.train.train_local` on a model built by `asyncfl.model.build_model`;
2. in FL: `asyncfl.client.app.handle_train(Message, Context)` with the global trainable state
   in an `ArrayRecord` (deserialize, load, train, delta, encode, reply), same config and data.
Each path gets a warm-up call (model build, data, torch.compile), then `--repeats` timed calls
of `--steps` steps each, the two paths alternating so both see the same machine load; device
synchronized. Reported: median (and best) wall-clock tokens/s per call, and the FL overhead
ratio = median over paired calls of bare time / in-FL time.

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
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on for CUDA, off for CPU; the FL handler uses the default)",
    )
    p.add_argument("--tokenizer", default=str(SHARED / "gpt2") if SHARED else "")
    p.add_argument("--data-dir", default=str(SHARED / "wikitext-2-raw") if SHARED else "")
    p.add_argument("--no-fl", action="store_true", help="skip the ClientApp part")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return p.parse_args()


def run_config(args: argparse.Namespace, steps: int) -> dict:
    """The run config both paths use (kebab-case keys, as `context.run_config` holds them)."""
    return {
        "model-preset": args.preset,
        "tokenizer": args.tokenizer,
        "data-dir": args.data_dir,
        "device": args.device,
        "compile": args.compile,
        "lora-rank": args.lora_rank,
        "batch-size": args.batch_size,
        "block-size": args.block_size,
        "local-steps": steps,
        "max-train-blocks": max(args.batch_size * 8, 64),
        "compressor": "none",
    }


def has_data(args: argparse.Namespace) -> bool:
    return bool(args.tokenizer and args.data_dir and Path(args.tokenizer).is_dir() and Path(args.data_dir).is_dir())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bare_loop(args: argparse.Namespace):
    """Set up `train_local` on its own; returns (timed call: steps -> (wall s, tokens), info)."""
    cfg = lambda steps: AppConfig.from_run_config(run_config(args, steps))  # noqa: E731
    model = build_model(cfg(args.steps)).to(args.device)
    if has_data(args):
        from asyncfl.data import load_partition

        blocks = load_partition(cfg(args.steps), 0, 1)
    else:
        g = torch.Generator().manual_seed(0)
        blocks = torch.randint(0, 50257, (max(args.batch_size * 8, 64), args.block_size), generator=g)
    seeds = iter(range(10**6))

    def call(steps: int) -> tuple[float, int]:
        sync(args.device)
        t0 = time.perf_counter()
        res = train_local(model, blocks, cfg(steps), args.device, generator_seed=next(seeds), bf16=args.bf16)
        sync(args.device)
        return time.perf_counter() - t0, res.tokens

    trainable, total = count_params(model)
    return call, {
        "params_trainable": trainable,
        "params_total": total,
        "data": "wikitext" if has_data(args) else "random",
    }


def fl_handler(args: argparse.Namespace):
    """Set up `client_app.handle_train` on a synthetic train Message; returns a timed call like
    `bare_loop`, or None when the ClientApp cannot be imported."""
    try:
        from asyncfl.client.app import handle_train
    except ImportError as exc:
        print(f"client_app not available ({exc})")
        return None
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

    global_state = {
        k: v.clone()
        for k, v in trainable_state(build_model(AppConfig.from_run_config(run_config(args, args.steps)))).items()
    }
    ids = iter(range(10**6))

    def call(steps: int) -> tuple[float, int]:
        content = RecordDict({"arrays": ArrayRecord(global_state), "config": ConfigRecord({"run-key": "bench"})})
        meta = Metadata(
            run_id=1,
            message_id=f"bench-{next(ids)}",
            src_node_id=0,
            dst_node_id=1,
            reply_to_message_id="",
            group_id="",
            created_at=time.time(),
            ttl=3600.0,
            message_type=MessageType.TRAIN,
        )
        context = Context(
            run_id=1,
            node_id=1,
            node_config={"partition-id": 0, "num-partitions": 1},
            state=RecordDict(),
            run_config=run_config(args, steps),
        )
        sync(args.device)
        t0 = time.perf_counter()
        handle_train(Message(content, metadata=meta), context)  # the server would serialize the reply
        sync(args.device)
        return time.perf_counter() - t0, steps * args.batch_size * args.block_size

    return call


def summarize(walls: list[float], tokens: int, steps: int) -> dict:
    return {
        "tokens_per_s": tokens / statistics.median(walls),
        "best_tokens_per_s": tokens / min(walls),
        "ms_per_step": 1e3 * statistics.median(walls) / steps,
        "walls_s": walls,
    }


def measure(args: argparse.Namespace, bare, fl) -> tuple[dict[str, list[float]], int]:
    """Warm up each path, then alternate timed calls so both see the same machine load."""
    bare(args.warmup)
    if fl is not None:
        fl(args.warmup)
    walls: dict[str, list[float]] = {"bare": [], "fl": []}
    for _ in range(args.repeats):
        wall, tokens = bare(args.steps)
        walls["bare"].append(wall)
        if fl is not None:
            walls["fl"].append(fl(args.steps)[0])
    return walls, tokens


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    amp = args.bf16 if args.bf16 is not None else args.device == "cuda"
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(
        f"device {name} | preset {args.preset} lora-rank {args.lora_rank} | batch {args.batch_size} x "
        f"block {args.block_size} | {'bf16' if amp else 'fp32'} | compile {args.compile and args.device == 'cuda'}"
    )
    bare, info = bare_loop(args)
    fl = None
    if not args.no_fl and not has_data(args):
        print("FL handler: skipped (needs --tokenizer and --data-dir folders: the handler loads its own data)")
    elif not args.no_fl:
        fl = fl_handler(args)
    walls, tokens = measure(args, bare, fl)
    results = {"bare": {**summarize(walls["bare"], tokens, args.steps), **info}}
    b = results["bare"]
    print(
        f"bare loop : {b['tokens_per_s']:>12,.0f} tokens/s  {b['ms_per_step']:8.1f} ms/step  (best "
        f"{b['best_tokens_per_s']:,.0f}; {b['params_trainable']:,} trainable of {b['params_total']:,} params; "
        f"{b['data']} data)"
    )
    if fl is not None:
        f = results["fl"] = summarize(walls["fl"], tokens, args.steps)
        f["ratio"] = statistics.median([w_b / w_f for w_b, w_f in zip(walls["bare"], walls["fl"])])
        note = "" if args.bf16 is None else " (the handler always uses the default precision)"
        print(
            f"in FL     : {f['tokens_per_s']:>12,.0f} tokens/s  {f['ms_per_step']:8.1f} ms/step  (best "
            f"{f['best_tokens_per_s']:,.0f}); in-FL / bare = {f['ratio']:.3f} (median of paired calls){note}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "device": name, **results}, indent=2)
        )


if __name__ == "__main__":
    main()
