"""The paper's experiment, one command: compressors x sync/async x two federations, over seeds.

Grid: compressors none / pca / qrcp / cur (rank `--rank`, default 10, the paper's k) x modes
sync (FedAvg, a barrier per round) / async (the app's default rule) for two federations: 2
clients of equal speed (the paper's) and 4 clients with `client-speeds` "1,1,2,4" (a client with
factor f sleeps (f - 1) x its compute time). Every run gets the same `--time-budget-s`; every
configuration runs each of `--seeds`.

Runs go through bench/async_vs_sync.py's runners (`--backend emulate` by default: the real
loop and real training on a virtual clock; `simulation`: `flwr run .`; `deployment`:
scripts/local-deployment.sh). Numbers are read back from each run's summary.json and
events.jsonl only. Per cell (compressor x mode x federation), over the seeds, mean ± std
(min-max) of: final and best perplexity, final top-1, time to the target (per federation and
seed: the final perplexity of dense `none` sync of that seed), client encode ms (the mean of the
update events' `encode_s`) and the server's decode+apply ms, bytes uploaded (`bytes`) and
downloaded (`bytes_down`: the task messages of the applied updates), mean staleness, updates.
Runs logged before `encode_s`/`bytes_down` existed show "not recorded" there.

    # CPU, tiny preset, emulated, the whole grid over 3 seeds (docs/results.md)
    python bench/paper.py --preset tiny --time-budget-s 8 --results-md docs/results.md
    # GPU, the 124M shape
    python bench/paper.py --preset small --device cuda --time-budget-s 300 --out results/paper-small

Outputs in `--out` (default results/paper): runs/<name>/ (the run folders), results.json
(every number, per seed and aggregated, and the configs), results.md (one table per
federation, laid out like the paper's Tables 4-5, with a Setup and a Comparison paragraph) and
per federation two PNGs: perplexity vs wall-clock and vs bytes uploaded (mean over seeds).
`--results-md PATH` writes results.md there too, with its figures in PATH's folder/figures/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import async_vs_sync as avs  # noqa: E402

from asyncfl.results import load_run, time_to_ppl  # noqa: E402

ROOT = avs.ROOT
COMPRESSORS = ("none", "pca", "qrcp", "cur")
MODES = ("sync", "async")
# the federations: number of clients -> `client-speeds`
FEDERATIONS: dict[int, str] = {2: "", 4: "1,1,2,4"}
DEFAULT_DATA = ROOT.parent / "shared" / "data"


def log(msg: str) -> None:
    print(f"[paper] {msg}", file=sys.stderr, flush=True)


def fed_title(n: int) -> str:
    speeds = FEDERATIONS[n]
    return f"{n} clients" + (f", speeds {speeds}" if speeds else ", equal speeds (the paper's)")


# ---------------------------------------------------------------------------------------------
# Arguments and the grid
# ---------------------------------------------------------------------------------------------
def _choices(text: str, accepted: tuple[str, ...], what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in accepted]
    if bad or not items:
        raise SystemExit(
            f"error: unknown {what} {', '.join(map(repr, bad)) or '(none given)'}; accepted: {', '.join(accepted)}"
        )
    return list(dict.fromkeys(items))


def _ints(text: str, what: str) -> list[int]:
    try:
        items = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"error: {what} must be a comma list of integers, got {text!r}") from None
    if not items:
        raise SystemExit(f"error: no {what} given")
    return list(dict.fromkeys(items))


def resolve_data(data_dir: Path, tokenizer: str) -> tuple[Path, Path]:
    """(tokenizer folder, WikiText folder) from `--data-dir` (a folder holding gpt2/ and
    wikitext-2-raw/, or a WikiText folder itself) and `--tokenizer`; exits naming what is missing."""
    wiki = data_dir if (data_dir / "wiki.test.raw").is_file() else data_dir / "wikitext-2-raw"
    tok = Path(tokenizer) if tokenizer else data_dir / "gpt2"
    if not data_dir.is_dir():
        raise SystemExit(
            f"error: data folder {data_dir} does not exist; pass --data-dir (a folder "
            "with gpt2/ and wikitext-2-raw/, e.g. ../shared/data)"
        )
    missing = [str(p) for p in (wiki / "wiki.test.raw", tok / "vocab.json", tok / "merges.txt") if not p.is_file()]
    if missing:
        raise SystemExit(
            f"error: offline data missing under {data_dir}: {', '.join(missing)} "
            "(--data-dir: a folder with wikitext-2-raw/wiki.*.raw and gpt2/; "
            "--tokenizer: a folder with vocab.json and merges.txt)"
        )
    return tok, wiki


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--backend", default="emulate", choices=["simulation", "emulate", "deployment"])
    p.add_argument("--preset", default="tiny", choices=list(avs.PRESETS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--seeds", default="11,23,37", help="comma list; every configuration runs each")
    p.add_argument("--time-budget-s", type=float, default=60.0, help="wall-clock budget of every run")
    p.add_argument("--rank", type=int, default=10, help="rank of the low-rank payloads (the paper's k)")
    p.add_argument("--compressors", default=",".join(COMPRESSORS), help="comma list of " + ", ".join(COMPRESSORS))
    p.add_argument("--modes", default=",".join(MODES), help="comma list of sync, async")
    p.add_argument(
        "--clients",
        default=",".join(map(str, FEDERATIONS)),
        help="federations, by number of clients: 2 (equal speeds) and/or 4 (speeds 1,1,2,4)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="async: evaluate every N updates (0: N = the number of clients, one sync "
        "round's worth); sync evaluates every round",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA,
        help="folder with gpt2/ (tokenizer) and wikitext-2-raw/ (default ../shared/data)",
    )
    p.add_argument("--tokenizer", default="", help="tokenizer folder (default DATA_DIR/gpt2)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar='"k=v ..."',
        help="extra run-config for every run (repeatable; wins over the preset)",
    )
    p.add_argument(
        "--emulate-args",
        default="",
        help='arguments for python -m asyncfl.emulate, e.g. "--task-s 1.2 --overhead-s 1.3"',
    )
    p.add_argument("--deployment-args", default="", help="deployment: extra local-deployment.sh arguments")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP/MKL threads per process (0: leave alone; default 1 on cpu, else 0)",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--timeout-s", type=float, default=0.0, help="kill a run after this long (default budget + 600)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "paper")
    p.add_argument("--reuse", action="store_true", help="keep runs already finished in --out/runs")
    p.add_argument(
        "--results-md",
        type=Path,
        default=None,
        help="also write results.md here (e.g. docs/results.md), figures in its folder/figures/",
    )
    args = p.parse_args(argv)
    args.compressor_list = _choices(args.compressors, COMPRESSORS, "compressor(s)")
    args.mode_list = _choices(args.modes, MODES, "mode(s)")
    args.seed_list = _ints(args.seeds, "seeds")
    args.client_list = _ints(args.clients, "--clients")
    bad = [n for n in args.client_list if n not in FEDERATIONS]
    if bad:
        raise SystemExit(
            f"error: no federation of {bad} clients; accepted --clients: "
            + ", ".join(f"{n} ({fed_title(n)})" for n in FEDERATIONS)
        )
    if args.rank < 1:
        raise SystemExit(f"error: --rank must be >= 1, got {args.rank}")
    if not args.time_budget_s > 0:
        raise SystemExit(f"error: --time-budget-s must be > 0, got {args.time_budget_s}")
    args.extra = avs.parse_kv(args.set)
    args.out = args.out.resolve()
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    args.timeout_s = args.timeout_s or args.time_budget_s + 600
    return args


def config_for(args: argparse.Namespace, n: int, compressor: str, mode: str, seed: int) -> dict[str, Any]:
    """The run config of one cell and seed: the preset, the cell, then `--set`."""
    cfg: dict[str, Any] = dict(avs.PRESETS[args.preset])
    cfg.update(
        {
            "device": args.device,
            "compressor": compressor,
            "rank": args.rank,
            "client-speeds": FEDERATIONS[n],
            "min-nodes": n,
            "save-model": False,
            "seed": seed,
            "time-budget-s": args.time_budget_s,
            "tokenizer": str(args.tokenizer_dir),
            "data-dir": str(args.wiki_dir),
        }
    )
    if mode == "sync":
        cfg.update(avs.SYNC_DEFAULTS)
    else:
        cfg.update({**avs.ASYNC_DEFAULTS, "eval-every": args.eval_every or n})
    cfg.update(args.extra)
    return cfg


def run_name(n: int, compressor: str, mode: str, seed: int) -> str:
    return f"n{n}-{compressor}-{mode}-s{seed}"


def grid(args: argparse.Namespace) -> list[tuple[int, str, str, int]]:
    """(clients, compressor, mode, seed) of every run; dense sync first within each federation
    and seed (it sets the target)."""
    cells = [(c, m) for c in args.compressor_list for m in args.mode_list]
    cells.sort(key=lambda cm: (cm != ("none", "sync"),))
    return [(n, c, m, s) for s in args.seed_list for n in args.client_list for c, m in cells]


# ---------------------------------------------------------------------------------------------
# Metrics of one run, from its files
# ---------------------------------------------------------------------------------------------
def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def run_metrics(run_dir: Path, target: float | None) -> dict[str, Any]:
    """What the tables report for one run, read from summary.json and events.jsonl."""
    summary, events = load_run(run_dir)
    updates = [e for e in events if e.get("event") == "update"]
    enc = [float(e["encode_s"]) for e in updates if e.get("encode_s") is not None]
    downs = [int(e["bytes_down"]) for e in updates if e.get("bytes_down") is not None]
    down = sum(downs) if downs else None  # None: a log from before `bytes_down` was recorded
    return {
        "dir": str(run_dir),
        "final_ppl": summary["final_eval_ppl"],
        "best_ppl": summary["best_eval_ppl"],
        "initial_ppl": summary["initial_eval_ppl"],
        "final_top1": summary.get("final_eval_top1"),
        "target_ppl": target,
        "time_to_target_s": time_to_ppl(events, target) if target is not None else None,
        "encode_ms": 1e3 * _mean(enc) if enc else None,
        "decode_apply_ms": summary.get("mean_decode_apply_ms"),
        "bytes_uploaded": summary["bytes_uploaded"],
        "bytes_downloaded": down,
        "mean_staleness": summary["mean_staleness"],
        "updates": summary["updates_applied"],
        "wall_clock_s": summary["wall_clock_s"],
        "stop_reason": summary["stop_reason"],
        "train_split": summary.get("train_split"),
        "eval_split": summary.get("eval_split"),
    }


METRICS = (
    "final_ppl",
    "best_ppl",
    "final_top1",
    "time_to_target_s",
    "encode_ms",
    "decode_apply_ms",
    "bytes_uploaded",
    "bytes_downloaded",
    "mean_staleness",
    "updates",
    "wall_clock_s",
)


def analyse(dirs: dict[tuple[int, str, str, int], Path], args: argparse.Namespace) -> dict[str, Any]:
    """Per federation: the targets per seed and, per cell, per-seed metrics and their spread."""
    feds = []
    for n in args.client_list:
        targets: dict[int, float | None] = {}
        for seed in args.seed_list:
            dense = dirs.get((n, "none", "sync", seed))
            targets[seed] = load_run(dense)[0]["final_eval_ppl"] if dense else None
        rows = []
        for c in args.compressor_list:
            for m in args.mode_list:
                per_seed = [
                    {"seed": s, **run_metrics(dirs[(n, c, m, s)], targets[s])}
                    for s in args.seed_list
                    if (n, c, m, s) in dirs
                ]
                rows.append(
                    {
                        "compressor": c,
                        "mode": m,
                        "seeds_run": len(per_seed),
                        "per_seed": per_seed,
                        **{
                            k: avs.spread([r[k] for r in per_seed] if per_seed else [None] * len(args.seed_list))
                            for k in METRICS
                        },
                    }
                )
        feds.append(
            {
                "clients": n,
                "client_speeds": FEDERATIONS[n],
                "title": fed_title(n),
                "targets": {str(s): t for s, t in targets.items()},
                "rows": rows,
            }
        )
    return {"federations": feds}


# ---------------------------------------------------------------------------------------------
# Tables and figures
# ---------------------------------------------------------------------------------------------
def _mb(s: dict[str, Any]) -> dict[str, Any]:
    return {k: (v / 1e6 if k in ("mean", "std", "min", "max") and v is not None else v) for k, v in s.items()}


def fed_table(fed: dict[str, Any]) -> str:
    rows = fed["rows"]
    have_encode = any(r["encode_ms"]["n"] for r in rows)
    have_down = any(r["bytes_downloaded"]["n"] for r in rows)
    head = [
        "compressor",
        "mode",
        "final ppl",
        "best ppl",
        "final top-1 %",
        "time to target s",
        "client encode ms",
        "server decode+apply ms",
        "MB uploaded",
        "MB downloaded",
        "mean staleness",
        "updates",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|---" + "|---:" * (len(head) - 2) + "|"]
    for r in rows:
        top1 = {
            k: (v * 100 if k in ("mean", "std", "min", "max") and v is not None else v)
            for k, v in r["final_top1"].items()
        }
        cells = [
            r["compressor"],
            r["mode"],
            avs._ms(r["final_ppl"], ".1f"),
            avs._ms(r["best_ppl"], ".1f"),
            avs._ms(top1, ".2f"),
            avs._ms(r["time_to_target_s"], ".1f"),
            avs._ms(r["encode_ms"], ".1f") if have_encode else "not recorded",
            avs._ms(r["decode_apply_ms"], ".1f"),
            avs._ms(_mb(r["bytes_uploaded"]), ".1f"),
            avs._ms(_mb(r["bytes_downloaded"]), ".1f") if have_down else "not recorded",
            avs._ms(r["mean_staleness"], ".2f"),
            avs._ms(r["updates"], ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curves_of(run_dir: Path) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(ppl vs run-clock seconds, ppl vs cumulative bytes uploaded) of one run's evaluations."""
    _, events = load_run(run_dir)
    up, by_t, by_b = 0, [], []
    for e in events:
        if e.get("event") == "update":
            up += e.get("bytes") or 0
        elif e.get("event") == "eval" and e.get("ppl") is not None and e.get("t") is not None:
            by_t.append((float(e["t"]), float(e["ppl"])))
            by_b.append((float(up), float(e["ppl"])))
    return by_t, by_b


def mean_curve(
    runs: list[list[tuple[float, float]]], points: int = 200, log_x: bool = False
) -> tuple[list[float], list[float]]:
    """Geometric mean over seeds of step curves (last value at or before x), up to the
    shortest run's last point; `log_x`: on a geometric grid from the first positive x."""
    runs = [r for r in runs if r]
    if not runs:
        return [], []
    end = min(r[-1][0] for r in runs)
    lo = min((x for r in runs for x, _ in r if x > 0), default=0.0)
    if log_x and 0 < lo < end:
        xs = [lo * (end / lo) ** (i / points) for i in range(points + 1)]
    else:
        xs = [end * i / points for i in range(points + 1)]
    ys = []
    for x in xs:
        vals = [next((p for xx, p in reversed(r) if xx <= x), None) for r in runs]
        ys.append(math.exp(sum(math.log(v) for v in vals) / len(vals)) if all(vals) else math.nan)
    return xs, ys


def plot_fed(
    path: Path,
    curves: dict[tuple[str, str], list[list[tuple[float, float]]]],
    xlabel: str,
    title: str,
    xscale: float = 1.0,
    log_x: bool = False,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(COMPRESSORS, ("black", "tab:blue", "tab:orange", "tab:green")))
    fig, ax = plt.subplots(figsize=(8, 5))
    for (c, m), runs in curves.items():
        xs, ys = mean_curve(runs, log_x=log_x)
        if xs:
            ax.plot(
                [x * xscale for x in xs],
                ys,
                color=colors[c],
                ls="-" if m == "async" else "--",
                lw=1.8,
                label=f"{c} {m} (mean of {len([r for r in runs if r])})",
            )
    ax.set_yscale("log")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("eval perplexity (geometric mean over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figures(dirs: dict[tuple[int, str, str, int], Path], args: argparse.Namespace) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for n in args.client_list:
        by_t: dict[tuple[str, str], list] = {}
        by_b: dict[tuple[str, str], list] = {}
        for c in args.compressor_list:
            for m in args.mode_list:
                cs = [curves_of(dirs[(n, c, m, s)]) for s in args.seed_list if (n, c, m, s) in dirs]
                by_t[(c, m)], by_b[(c, m)] = [t for t, _ in cs], [b for _, b in cs]
        title = f"{fed_title(n)}; {args.preset}, {args.backend}, budget {args.time_budget_s:g} s"
        names = [f"paper-{n}clients-ppl-vs-time.png", f"paper-{n}clients-ppl-vs-bytes.png"]
        plot_fed(args.out / names[0], by_t, "wall-clock s (run clock, after the warm-up)", title)
        plot_fed(
            args.out / names[1],
            by_b,
            "MB uploaded (cumulative, all clients; log scale)",
            title,
            xscale=1e-6,
            log_x=True,
        )
        out[n] = names
    return out


def _first(rows: list[dict[str, Any]], key: str) -> Any:
    return next((r[key] for f in rows for row in f["rows"] for r in row["per_seed"] if r.get(key)), None)


def results_markdown(
    result: dict[str, Any], args: argparse.Namespace, figs: dict[int, list[str]], fig_prefix: str = ""
) -> str:
    feds = result["federations"]
    train, evs = _first(feds, "train_split"), _first(feds, "eval_split")
    preset = avs.PRESETS[args.preset]
    cfg_text = ", ".join(f"{k}={v}" for k, v in {**preset, **args.extra}.items())
    has_encode = any(r["encode_ms"]["n"] for f in feds for r in f["rows"])
    has_down = any(r["bytes_downloaded"]["n"] for f in feds for r in f["rows"])
    emul = f" (`python -m asyncfl.emulate {args.emulate_args}`)" if args.emulate_args else ""
    wire = args.extra.get("wire-dtype", "fp16")
    method = args.extra.get("compress-method", "randomized")
    took = (
        f" The {result['runs']} runs took {result['elapsed_s'] / 60:.1f} min in all (their "
        f"processes, one at a time, on a machine with {os.cpu_count()} CPU cores)."
        if result.get("elapsed_s")
        else ""
    )
    lines = [
        "# The paper's experiment: compressors x sync/async",
        "",
        f"Generated by `bench/paper.py` ({time.strftime('%Y-%m-%d')}); every number below is read from "
        "the run folders' summary.json and events.jsonl (`results.json` keeps them per seed).",
        "",
        "## Setup",
        "",
        f"GPT-2 `{args.preset}` preset built from scratch (no pretrained weights), {cfg_text}; "
        f"rank {args.rank} payloads for pca/qrcp/cur ({wire} factors, {method} methods), dense fp32 "
        f"for `none`. Data offline: trains on WikiText-2 `{train or '?'}` and evaluates on `{evs or '?'}` "
        "(the offline copy has no train split), so perplexities are far above the paper's. "
        f"Backend `{args.backend}`{emul}"
        + (
            ": the real server loop and real client training on a virtual clock (a task takes its "
            "measured compute time, times its client's speed factor; the server's own work counts too)"
            if args.backend == "emulate"
            else ""
        )
        + f", device `{args.device}`. Every run stops at a budget of {args.time_budget_s:g} s of "
        f"run clock{' (virtual seconds)' if args.backend == 'emulate' else ''}; "
        f"seeds {', '.join(map(str, args.seed_list))}. sync = FedAvg (a barrier per round, "
        "evaluated every round); async = the app's default rule (asgd, each delta weighted 1/n), "
        f"evaluated every {args.eval_every or 'n (the number of clients)'} updates. "
        "Cells: mean ± std (min-max) over the seeds, `[k/n]` when only k seeds had a value. "
        "Time to target: first evaluation at or below the target, which per federation and seed is "
        "dense (`none`) sync's final perplexity; `-` where a run never reached it. "
        + (
            "Client encode ms: the clients' mean encode time per applied update (events.jsonl "
            "`encode_s`, as the worker reports it). "
            if has_encode
            else "Client encode time is not recorded in these runs' events.jsonl (logs written before "
            "`encode_s` was added). "
        )
        + "Server decode+apply ms: the server's mean per applied update (summary "
        "`mean_decode_apply_ms`). "
        + (
            "MB downloaded: the task messages' arrays (the full weights or an update log) of the "
            "applied updates (events.jsonl `bytes_down`); MB uploaded: their payloads (`bytes`). "
            if has_down
            else "Bytes downloaded are not recorded in these runs' events.jsonl (logs written before "
            "`bytes_down` was added). "
        )
        + "Top-1: next-token accuracy of the final evaluation."
        + took,
        "",
        "## Comparison with the paper",
        "",
        "The paper fine-tunes GPT-2 (its Table 1 lists the 124M model's shapes: token embedding 50257 x "
        "768, so pretrained weights) with 2 clients, synchronous federated averaging, five rounds of one "
        "local epoch each, k = 10, averaged over six trials. Its Tables 4-5 list per round the elapsed "
        "time and a column labelled accuracy (%) that falls from round to round (PCA: 114.42 s / 54.38 "
        "after round 1, 623.72 s / 48.55 after round 5; QRCP: 354.658 s / 54.380 and 1578.228 s / "
        "48.551), and its CUR figure two rounds (242.07 s / 7944.8, 567.01 s / 7043.1); it finds PCA "
        "fastest in wall-clock with accuracy comparable to QRCP, and CUR stopping after two rounds at a "
        "much worse value. Here the model starts from random weights (the Hub is not reachable), trains "
        "on the validation split and runs for a fixed time budget instead of five epochs, and adds an "
        "asynchronous mode and a heterogeneous 4-client federation; so only the ordering of the methods, "
        "not the values, can be compared.",
        "",
    ]
    for f in feds:
        n = f["clients"]
        tg = [t for t in f["targets"].values() if t is not None]
        lines += [
            f"## {f['title']}",
            "",
            "Target (dense sync's final ppl) per seed: "
            + (
                ", ".join(f"{s}: {t:.1f}" for s, t in f["targets"].items() if t is not None)
                if tg
                else "none (dense sync not in the grid)"
            )
            + ".",
            "",
            fed_table(f),
        ]
        if n in figs:
            lines += [
                f"![{n} clients, ppl vs wall-clock]({fig_prefix}{figs[n][0]}) "
                f"![{n} clients, ppl vs bytes uploaded]({fig_prefix}{figs[n][1]})",
                "",
            ]
    if result.get("failed"):
        lines += ["## Failed runs", "", *[f"- {x}" for x in result["failed"]], ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.tokenizer_dir, args.wiki_dir = resolve_data(args.data_dir.resolve(), args.tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = grid(args)
    log(
        f"{len(jobs)} runs: clients {args.client_list} x compressors {args.compressor_list} x modes "
        f"{args.mode_list} x seeds {args.seed_list}; backend {args.backend}, preset {args.preset}, "
        f"budget {args.time_budget_s:g} s"
    )
    dirs: dict[tuple[int, str, str, int], Path] = {}
    failed: list[str] = []
    slots = list(range(max(args.jobs, 1)))
    t_all = time.monotonic()

    # seconds per run (process), kept across --reuse so the total stays that of the real runs
    timing_file = args.out / "run_seconds.json"
    seconds: dict[str, float] = json.loads(timing_file.read_text()) if timing_file.is_file() else {}

    def work(job: tuple[int, str, str, int]) -> Path:
        n, c, m, s = job
        slot, t0, name = slots.pop(), time.monotonic(), run_name(*job)
        reused = args.reuse and (args.out / "runs" / name / "summary.json").is_file()
        try:
            return avs.run_one(name, config_for(args, n, c, m, s), args, slot, num_clients=n)
        finally:
            slots.append(slot)
            if not (reused and name in seconds):
                seconds[name] = time.monotonic() - t0

    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        futures = [(job, time.monotonic(), pool.submit(work, job)) for job in jobs]
        for i, (job, _, future) in enumerate(futures, 1):
            name = run_name(*job)
            try:
                dirs[job] = future.result()
                s = json.loads((dirs[job] / "summary.json").read_text())
                log(
                    f"{i}/{len(jobs)} {name}: final ppl {s['final_eval_ppl']:.1f}, "
                    f"{s['updates_applied']} updates, {time.monotonic() - t_all:.0f} s since start"
                )
            except RuntimeError as exc:
                failed.append(f"{name}: {str(exc)[:300]}")
                log(f"{i}/{len(jobs)} {name}: FAILED: {str(exc)[:300]}")
    if not dirs:
        raise SystemExit("error: no run finished; see the errors above")
    result = analyse(dirs, args)
    result["failed"] = failed
    timing_file.write_text(json.dumps(seconds, indent=1))
    result["runs"] = len(jobs)
    result["elapsed_s"] = sum(seconds.get(run_name(*j), 0.0) for j in jobs)
    figs = figures(dirs, args)
    md = results_markdown(result, args, figs)
    (args.out / "results.md").write_text(md)
    if args.results_md:
        dest = args.results_md.resolve()
        (dest.parent / "figures").mkdir(parents=True, exist_ok=True)
        for names in figs.values():
            for name in names:
                shutil.copyfile(args.out / name, dest.parent / "figures" / name)
        dest.write_text(results_markdown(result, args, figs, fig_prefix="figures/"))
    out = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **result,
        "configs": {run_name(*j): config_for(args, *j) for j in jobs},
        "env": avs.environment(),
    }
    (args.out / "results.json").write_text(json.dumps(out, indent=2, default=str))
    for f in result["federations"]:
        print(f"## {f['title']}\n\n{fed_table(f)}")
    log(
        f"done in {time.monotonic() - t_all:.0f} s; outputs in {args.out}"
        + (f" and {args.results_md}" if args.results_md else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
