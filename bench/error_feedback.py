"""Error feedback: per-round eval perplexity of compressed sync FedAvg with and without EF.

In-process (no Flower transport, no Ray): each client task is `asyncfl.client.worker.Worker.run_task`,
the same code a ClientApp runs, so the error-feedback residual goes through its real store
(node-local disk under a temporary `ASYNCFL_NODE_DIR`, as in simulation). The server half is
the sync loop's arithmetic: every client trains from the global weights, its payload is
decoded with `decode_state` (reference shapes, `max_rank` = rank), the decoded deltas are
averaged with `fedavg_mean` weighted by `num-examples`, `x += server-lr * mean`, and the model
is evaluated with `asyncfl.train.evaluate` on the eval blocks after every round.

    python bench/error_feedback.py --out ef.json        # tiny preset, CPU: 21 runs, 10-50 min
    python bench/error_feedback.py --ranks 1,2 --seeds 0,1,2,3,4
    python bench/error_feedback.py --methods pca --rounds 2 --seeds 0   # smoke test, ~1 min

Every (method, error feedback) pair runs once per seed; a seed fixes the model init, the
partition and the batches, so within a seed every variant starts from the same weights and
sees the same data. The table gives the mean and the spread (min..max over seeds) of the
perplexity after the last round and its excess over dense (`compressor = "none"`) of the same
seed, the same for the mean perplexity of the last three rounds (less sensitive to one
round's swing), the per-round mean, the uplink bytes against dense, the mean relative reconstruction
error of a payload (`rec-error`: of what was sent, i.e. delta + residual with EF) and the
residual carried after the last round (`ef-norm` = ||e|| / ||delta||).

Data: `--data-dir` (WikiText-2 raw folder) and `--tokenizer` (GPT-2 tokenizer folder), by
default `../shared/data/wikitext-2-raw` and `../shared/data/gpt2` beside the repository. As in
every offline run here, clients train on the validation split and the server evaluates on test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--methods", default="pca,qrcp,cur", help="comma list of compressors (dense runs too)")
    p.add_argument(
        "--no-dense",
        action="store_true",
        help="skip the dense run (when another process of the same seeds runs it; see --merge)",
    )
    p.add_argument("--ef", default="none,ef", help="comma list of error-feedback values")
    p.add_argument("--ranks", default="2", help="comma list of ranks")
    p.add_argument("--seeds", default="0,1,2", help="comma list of run seeds")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--eval-max-blocks", type=int, default=64)
    p.add_argument("--wire", default="fp16", choices=["fp16", "fp32"])
    p.add_argument("--data-dir", default=str(SHARED_DATA / "wikitext-2-raw"))
    p.add_argument("--tokenizer", default=str(SHARED_DATA / "gpt2"))
    p.add_argument("--out", default="", help="write all figures as JSON here")
    p.add_argument(
        "--merge",
        default="",
        help="comma list of --out files (e.g. one per seed, run side by side): print their joint table, run nothing",
    )
    args = p.parse_args(argv)
    if args.merge:
        return args
    for what, path, need in (
        ("--data-dir", args.data_dir, "wiki.test.raw"),
        ("--tokenizer", args.tokenizer, "vocab.json"),
    ):
        if not (Path(path) / need).is_file():
            p.error(f"{what} {path!r} has no {need}; pass the folder (default: ../shared/data beside the repository)")
    return args


def run_config(args: argparse.Namespace, seed: int, method: str, ef: str, rank: int) -> dict:
    return {
        "model-preset": args.preset,
        "tokenizer": args.tokenizer,
        "data-dir": args.data_dir,
        "device": args.device,
        "block-size": args.block_size,
        "batch-size": args.batch_size,
        "local-steps": args.local_steps,
        "lr": args.lr,
        "server-lr": args.server_lr,
        "eval-max-blocks": args.eval_max_blocks,
        "seed": seed,
        "mode": "sync",
        "compressor": method,
        "rank": rank,
        "wire-dtype": args.wire,
        "error-feedback": ef,
    }


def one_run(args: argparse.Namespace, seed: int, method: str, ef: str, rank: int) -> dict:
    """Sync FedAvg for `args.rounds` rounds; eval perplexity before and after every round."""
    import torch

    from asyncfl.client.worker import get_worker
    from asyncfl.compressors import decode_state
    from asyncfl.config import AppConfig
    from asyncfl.data import load_eval_blocks
    from asyncfl.model import build_model, load_trainable_state, trainable_state
    from asyncfl.strategies.rules import fedavg_mean
    from asyncfl.train import evaluate

    cfg = AppConfig.from_run_config(run_config(args, seed, method, ef, rank))
    device = torch.device(args.device)
    server_model = build_model(cfg).to(device)  # the same init for every variant of a seed
    x = {k: v.detach().clone() for k, v in trainable_state(server_model).items()}
    shapes = {k: v.shape for k, v in x.items()}
    blocks = load_eval_blocks(cfg)
    worker = get_worker(cfg)
    run_key = f"{method}-{ef}-r{rank}-s{seed}-{os.getpid()}-{time.monotonic_ns()}"
    ppl = [evaluate(server_model, blocks, cfg.train.eval_batch_size, device)["ppl"]]
    sent = dense = 0
    rec, efn = [], []
    t0 = time.perf_counter()
    for rnd in range(args.rounds):
        updates, weights = [], []
        for pid in range(args.clients):
            result = worker.run_task(cfg, x, pid, args.clients, run_key=run_key, version=rnd)
            m = result.metrics
            updates.append(decode_state(result.record, reference=shapes, device=device, max_rank=rank))
            weights.append(float(m["num-examples"]))
            sent, dense = sent + m["bytes"], dense + m["dense-bytes"]
            if method != "none":
                rec.append(m["rec-error"])
            if "ef-norm" in m:
                efn.append(m["ef-norm"])
        mean = fedavg_mean(updates, weights)
        with torch.no_grad():
            for k, v in x.items():
                v.add_(mean[k], alpha=cfg.server.server_lr)
        load_trainable_state(server_model, x)
        ppl.append(evaluate(server_model, blocks, cfg.train.eval_batch_size, device)["ppl"])
    return {
        "seed": seed,
        "method": method,
        "ef": ef,
        "rank": rank,
        "ppl": ppl,
        "bytes": sent,
        "dense_bytes": dense,
        "rec_error": statistics.fmean(rec) if rec else 0.0,
        "ef_norm_last": efn[-args.clients :] if efn else [],
        "seconds": time.perf_counter() - t0,
    }


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.1f} ({min(values):.1f}..{max(values):.1f})" if len(values) > 1 else f"{mean:.1f}"


def table(runs: list[dict], rounds: int) -> str:
    dense = {r["seed"]: r for r in runs if r["method"] == "none"}
    last = min(3, rounds)
    head = [
        "rank",
        "method",
        "error feedback",
        "final ppl: mean (min..max)",
        "vs dense %: mean (min..max)",
        f"last {last} rounds vs dense %: mean (min..max)",
        *[f"r{i}" for i in range(1, rounds + 1)],
        "bytes / dense",
        "rec-error",
        "ef-norm (last)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["rank"] if r["method"] != "none" else 0, r["method"], r["ef"]), []).append(r)
    for (rank, method, ef), rs in sorted(groups.items(), key=lambda kv: (kv[0][1] != "none", kv[0])):
        final = [r["ppl"][-1] for r in rs]
        excess = [100 * (r["ppl"][-1] / dense[r["seed"]]["ppl"][-1] - 1) for r in rs if r["seed"] in dense]
        tail = [
            100 * (statistics.fmean(r["ppl"][-last:]) / statistics.fmean(dense[r["seed"]]["ppl"][-last:]) - 1)
            for r in rs
            if r["seed"] in dense
        ]
        per_round = [statistics.fmean(r["ppl"][i] for r in rs) for i in range(1, rounds + 1)]
        efn = [statistics.fmean(r["ef_norm_last"]) for r in rs if r["ef_norm_last"]]
        row = [
            str(rank or "-"),
            method if method != "none" else "none (dense)",
            ef if method != "none" else "-",
            spread(final),
            "0" if method == "none" else spread(excess) if excess else "- (no dense run)",
            "0" if method == "none" else spread(tail) if tail else "-",
            *[f"{p:.0f}" for p in per_round],
            f"{statistics.fmean(r['bytes'] / r['dense_bytes'] for r in rs):.4f}",
            f"{statistics.fmean(r['rec_error'] for r in rs):.3f}" if method != "none" else "-",
            f"{statistics.fmean(efn):.2f}" if efn else "-",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_out(path: str, args: dict, env: dict, runs: list[dict]) -> None:
    """The `--out` file: the arguments, the environment and every run so far."""
    Path(path).write_text(json.dumps({"args": args, "env": env, "runs": runs}, indent=1))


def merge(paths: list[str], out: str) -> None:
    """Print (and with `out`, write) the table of several `--out` files of one setting."""
    if not paths:
        sys.exit("--merge: no --out files given (did every run fail? see their logs)")
    docs = []
    for path in paths:
        try:
            docs.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            sys.exit(f"--merge: cannot read {path!r} as an --out file: {exc}")
    rounds = {d["args"]["rounds"] for d in docs}
    if len(rounds) != 1:
        sys.exit(f"--merge: the files ran different --rounds {sorted(rounds)}; merge runs of one setting")
    runs = [r for d in docs for r in d["runs"]]
    print(table(runs, rounds.pop()))
    if out:
        write_out(out, docs[0]["args"], docs[0]["env"], runs)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.merge:
        merge([m for m in args.merge.split(",") if m], args.out)
        return
    import torch

    methods = [m for m in args.methods.split(",") if m and m != "none"]
    efs = [e for e in args.ef.split(",") if e]
    ranks = [int(k) for k in args.ranks.split(",") if k]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="asyncfl-ef-bench-") as node_dir:
        os.environ["ASYNCFL_NODE_DIR"] = node_dir  # residuals on disk, as in simulation
        for seed in seeds:
            plan = [] if args.no_dense else [("none", "none", ranks[0])]
            plan += [(m, e, k) for k in ranks for m in methods for e in efs]
            for method, ef, rank in plan:
                r = one_run(args, seed, method, ef, rank)
                runs.append(r)
                print(
                    f"seed {seed} rank {rank} {method:>4} ef={ef:<4} ppl "
                    + " ".join(f"{p:.0f}" for p in r["ppl"])
                    + f"  ({r['seconds']:.0f} s)",
                    flush=True,
                )
                if args.out:  # after every run, so that an interrupted sweep keeps what finished
                    write_out(args.out, vars(args), env, runs)
    print()
    print(table(runs, args.rounds))


if __name__ == "__main__":
    main()
