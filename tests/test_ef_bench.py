"""bench/error_feedback.py --merge: the joint table of per-seed --out files, and its errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import error_feedback  # noqa: E402


def _run(seed: int, method: str, ef: str, ppl: list[float]) -> dict:
    return {
        "seed": seed,
        "method": method,
        "ef": ef,
        "rank": 10,
        "ppl": ppl,
        "bytes": 10 if method != "none" else 1000,
        "dense_bytes": 1000,
        "rec_error": 0.5 if method != "none" else 0.0,
        "ef_norm_last": [0.2, 0.4] if ef == "ef" else [],
        "seconds": 1.0,
    }


def _out(path: Path, seed: int, dense: list[float], pca: list[float], rounds: int = 2) -> str:
    doc = {
        "args": {"rounds": rounds},
        "env": {"torch": "x"},
        "runs": [_run(seed, "none", "none", dense), _run(seed, "pca", "ef", pca)],
    }
    path.write_text(json.dumps(doc))
    return str(path)


def test_merge_pools_the_seeds_and_compares_each_with_its_own_dense(tmp_path, capsys):
    a = _out(tmp_path / "a.json", 0, [100.0, 50.0, 40.0], [100.0, 55.0, 44.0])  # +10% final
    b = _out(tmp_path / "b.json", 1, [100.0, 60.0, 50.0], [100.0, 60.0, 60.0])  # +20% final
    merged = tmp_path / "m.json"
    error_feedback.main(["--merge", f"{a},{b}", "--out", str(merged)])
    rows = {line.split(" | ")[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("| 10 ")}
    cells = rows["pca"].split(" | ")
    assert cells[3] == "52.0 (44.0..60.0)"  # final ppl over the two seeds
    assert cells[4] == "15.0 (10.0..20.0)"  # each seed against its own dense run
    # last 2 rounds: seed 0 (55+44)/(50+40) - 1 = 10%; seed 1 120/110 - 1 = 9.09%
    assert cells[5] == "9.5 (9.1..10.0)"
    assert cells[-1].rstrip(" |") == "0.30"  # mean residual norm of the last round
    assert len(json.loads(merged.read_text())["runs"]) == 4


def test_merge_refuses_files_of_different_lengths_and_unreadable_ones(tmp_path):
    a = _out(tmp_path / "a.json", 0, [1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    b = _out(tmp_path / "b.json", 1, [1.0, 2.0], [1.0, 2.0], rounds=1)
    with pytest.raises(SystemExit, match=r"different --rounds \[1, 2\]"):
        error_feedback.main(["--merge", f"{a},{b}"])
    with pytest.raises(SystemExit, match="missing.json"):
        error_feedback.main(["--merge", f"{a},{tmp_path / 'missing.json'}"])
    with pytest.raises(SystemExit, match="no --out files given"):
        error_feedback.main(["--merge", ","])


def test_no_dense_skips_the_dense_run_and_every_finished_run_is_on_disk(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run(args, seed, method, ef, rank):
        calls.append((seed, method, ef))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the sweep is cut after two runs
        return _run(seed, method, ef, [100.0, 55.0 if ef == "ef" else 60.0])

    monkeypatch.setattr(error_feedback, "one_run", fake_run)
    out = tmp_path / "part.json"
    argv = ["--no-dense", "--methods", "pca,qrcp", "--ef", "none,ef", "--seeds", "0", "--rounds", "1"]
    with pytest.raises(KeyboardInterrupt):
        error_feedback.main([*argv, "--out", str(out)])
    assert calls == [(0, "pca", "none"), (0, "pca", "ef"), (0, "qrcp", "none")]  # no dense run first
    assert [(r["method"], r["ef"]) for r in json.loads(out.read_text())["runs"]] == [("pca", "none"), ("pca", "ef")]
    # merged with another process's dense run of the same seed, the compressed runs compare with it
    dense = tmp_path / "dense.json"
    dense.write_text(json.dumps({"args": {"rounds": 1}, "env": {}, "runs": [_run(0, "none", "none", [100.0, 50.0])]}))
    error_feedback.main(["--merge", f"{out},{dense}"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 10 ")]
    assert {(r[2], r[4]) for r in rows} == {("none", "20.0"), ("ef", "10.0")}
    error_feedback.main(["--merge", str(out)])  # alone: no dense run to compare with, and it says so
    assert "- (no dense run)" in capsys.readouterr().out
