"""bench/paper.py: the grid, its arguments and errors, and one real tiny emulated run whose
results.json is checked against an independent reading of the run folders."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import paper  # noqa: E402

from tests.conftest import DATA  # noqa: E402


def test_defaults_give_the_full_grid_with_dense_sync_first():
    args = paper.parse_args([])
    assert args.compressor_list == ["none", "pca", "qrcp", "cur"]
    assert args.mode_list == ["sync", "async"]
    assert args.client_list == [2, 4] and args.seed_list == [11, 23, 37]
    assert args.backend == "emulate" and args.rank == 10
    jobs = paper.grid(args)
    assert len(jobs) == 4 * 2 * 2 * 3 and len(set(jobs)) == len(jobs)
    # within each (seed, federation) block, dense sync (the target) runs first
    for i in range(0, len(jobs), 8):
        assert jobs[i][1:3] == ("none", "sync")
        assert len({(n, s) for n, _, _, s in jobs[i : i + 8]}) == 1


def test_cells_configs_and_overrides():
    args = paper.parse_args(
        [
            "--compressors",
            "cur,pca",
            "--modes",
            "async",
            "--clients",
            "4",
            "--seeds",
            "5",
            "--rank",
            "3",
            "--set",
            "block-size=32 local-steps=2",
        ]
    )
    args.tokenizer_dir, args.wiki_dir = Path("tok"), Path("wiki")
    assert paper.grid(args) == [(4, "cur", "async", 5), (4, "pca", "async", 5)]
    cfg = paper.config_for(args, 4, "cur", "async", 5)
    assert cfg["client-speeds"] == "1,1,2,4" and cfg["min-nodes"] == 4 and cfg["rank"] == 3
    assert cfg["mode"] == "async" and cfg["eval-every"] == 4 and cfg["seed"] == 5
    assert cfg["block-size"] == 32 and cfg["local-steps"] == 2 and cfg["compressor"] == "cur"
    sync = paper.config_for(args, 2, "none", "sync", 5)
    assert sync["mode"] == "sync" and sync["client-speeds"] == "" and sync["min-nodes"] == 2
    assert paper.run_name(4, "cur", "async", 5) == "n4-cur-async-s5"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--compressors", "pca,svd"], ["'svd'", "none, pca, qrcp, cur"]),
        (["--modes", "sync,semi"], ["'semi'", "sync, async"]),
        (["--clients", "3"], ["[3]", "2 (", "4 ("]),
        (["--clients", "two"], ["--clients", "'two'"]),
        (["--seeds", ""], ["no seeds"]),
        (["--rank", "0"], ["--rank"]),
    ],
)
def test_bad_arguments_name_the_value_and_what_is_accepted(argv, words):
    with pytest.raises(SystemExit) as exc:
        paper.parse_args(argv)
    for w in words:
        assert w in str(exc.value)


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="does not exist.*--data-dir"):
        paper.resolve_data(tmp_path / "nope", "")
    (tmp_path / "wikitext-2-raw").mkdir()
    with pytest.raises(SystemExit, match="wiki.test.raw"):
        paper.resolve_data(tmp_path, "")
    tok, wiki = paper.resolve_data(DATA, "")
    assert wiki == DATA / "wikitext-2-raw" and tok == DATA / "gpt2"


def _spread(xs):
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


@pytest.mark.slow
def test_one_tiny_emulated_grid_end_to_end(tmp_path, capsys):
    out = tmp_path / "paper"
    md_path = tmp_path / "docs" / "results.md"
    rc = paper.main(
        [
            "--clients",
            "2",
            "--compressors",
            "none,pca",
            "--modes",
            "sync,async",
            "--seeds",
            "11",
            "--time-budget-s",
            "3",
            "--out",
            str(out),
            "--results-md",
            str(md_path),
            "--emulate-args",
            "--task-s 0.5 --no-server-time",
            "--set",
            "block-size=32 max-train-blocks=8 eval-max-blocks=8 local-steps=2",
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    for name in ("n2-none-sync-s11", "n2-none-async-s11", "n2-pca-sync-s11", "n2-pca-async-s11"):
        assert f"{name}: final ppl" in err  # progress: name, final ppl
    md = (out / "results.md").read_text()
    assert "## Setup" in md and "## Comparison with the paper" in md and "## 2 clients" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    cells = [tuple(c.strip() for c in line.split("|")[1:3]) for line in table[1:]]
    assert cells == [("none", "sync"), ("none", "async"), ("pca", "sync"), ("pca", "async")]
    assert "encode time is not recorded" not in md and "not recorded" not in md
    assert "client encode ms" in table[0] and "MB downloaded" in table[0] and "MB uploaded" in table[0]
    assert md_path.is_file() and "](figures/paper-2clients-ppl-vs-time.png)" in md_path.read_text()
    for name in ("paper-2clients-ppl-vs-time.png", "paper-2clients-ppl-vs-bytes.png"):
        assert (out / name).stat().st_size > 1000 and (md_path.parent / "figures" / name).is_file()

    # every number in results.json, recomputed from the run folders
    result = json.loads((out / "results.json").read_text())
    (fed,) = result["federations"]
    runs = out / "runs"
    dense = json.loads((runs / "n2-none-sync-s11" / "summary.json").read_text())
    target = dense["final_eval_ppl"]
    assert fed["targets"] == {"11": target}
    assert len(fed["rows"]) == 4
    for row in fed["rows"]:
        run = runs / f"n2-{row['compressor']}-{row['mode']}-s11"
        s = json.loads((run / "summary.json").read_text())
        events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
        evals = [e for e in events if e["event"] == "eval"]
        ups = [e for e in events if e["event"] == "update"]
        hit = [e["t"] for e in evals if e["ppl"] is not None and e["ppl"] <= target]
        want = {
            "final_ppl": evals[-1]["ppl"],
            "best_ppl": min(e["ppl"] for e in evals),
            "final_top1": evals[-1]["top1"],
            "bytes_uploaded": sum(u["bytes"] for u in ups),
            "mean_staleness": sum(u["staleness"] for u in ups) / len(ups),
            "updates": len(ups),
            "time_to_target_s": min(hit) if hit else None,
            "decode_apply_ms": 1e3 * sum(u["decode_apply_s"] for u in ups) / len(ups),
            # the two columns from the update events: the worker's `encode-s` and the task
            # messages' arrays (the full weights: the emulator keeps the update log off)
            "encode_ms": 1e3 * sum(u["encode_s"] for u in ups) / len(ups),
            "bytes_downloaded": sum(u["bytes_down"] for u in ups),
        }
        assert all(u["encode_s"] > 0 and u["bytes_down"] > 0 for u in ups)
        assert want["bytes_downloaded"] == s["bytes_down_total"]
        assert want["encode_ms"] == pytest.approx(1e3 * s["mean_encode_s"], rel=1e-9)
        assert want["final_ppl"] == s["final_eval_ppl"] and want["bytes_uploaded"] == s["bytes_uploaded"]
        (per,) = row["per_seed"]
        for key, value in want.items():
            mean, std = _spread([value])
            if value is None:
                assert per[key] is None and row[key]["mean"] is None
            else:
                assert per[key] == pytest.approx(value, rel=1e-9)
                assert row[key]["mean"] == pytest.approx(mean, rel=1e-9) and row[key]["std"] == std
    by = {(r["compressor"], r["mode"]): r for r in fed["rows"]}
    assert by[("none", "sync")]["per_seed"][0]["time_to_target_s"] is not None
    assert by[("pca", "sync")]["bytes_uploaded"]["mean"] < by[("none", "sync")]["bytes_uploaded"]["mean"]
    assert by[("none", "async")]["mean_staleness"]["mean"] > 0 == by[("none", "sync")]["mean_staleness"]["mean"]
