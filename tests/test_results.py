"""Tests for asyncfl.results: event log, totals, results.md, plot, resume and the compare CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from asyncfl.results import (
    RunDataError,
    RunRecorder,
    main,
    ppl_at,
    read_events,
    time_to_ppl,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"mode": "async", "rule": "fedasync", "compressor": "pca", "rank": 10, "target-ppl": 50.0}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A scripted run: (seconds since start, recorder method, arguments). Hand-checkable totals:
# 3 updates, 2 drops, 400 B uploaded vs 3000 B dense (ratio 7.5), staleness 0, 1, 3 (mean 4/3,
# max 3), decode+apply 2, 4, 6 ms (mean 4 ms), target 50 first reached by the eval at t = 6.
SCRIPT = [
    (0.0, "log_eval", dict(version=0, round=0, loss=4.5, ppl=90.0, top1=0.20, top5=0.40)),
    (
        1.0,
        "log_update",
        dict(
            version=1,
            node=11,
            partition=0,
            staleness=0,
            weight=1.0,
            train_loss=4.0,
            bytes=100,
            dense_bytes=1000,
            rec_error=0.1,
            decode_apply_s=0.002,
        ),
    ),
    (
        2.0,
        "log_update",
        dict(
            version=2,
            node=12,
            partition=1,
            staleness=1,
            weight=0.7,
            train_loss=3.9,
            bytes=100,
            dense_bytes=1000,
            rec_error=0.2,
            decode_apply_s=0.004,
        ),
    ),
    (2.5, "log_drop", dict(node=13, partition=2, staleness=9, reason="stale")),
    (3.0, "log_eval", dict(version=2, round=1, loss=4.0, ppl=55.0, top1=0.25, top5=0.45)),
    (
        4.0,
        "log_update",
        dict(
            version=3,
            node=13,
            partition=2,
            staleness=3,
            weight=0.5,
            train_loss=3.8,
            bytes=200,
            dense_bytes=1000,
            rec_error=0.3,
            decode_apply_s=0.006,
            buffer_fill=1,
        ),
    ),
    (5.0, "log_event", dict(kind="node_retired", node=14, failures=3)),
    (6.0, "log_eval", dict(version=3, round=2, loss=3.9, ppl=50.0, top1=0.27, top5=0.47)),
    (7.0, "log_eval", dict(version=3, round=3, loss=3.8, ppl=45.0, top1=0.28, top5=0.48)),
    (7.5, "log_drop", dict(node=12, reason="invalid payload")),
]
FINISH_T = 8.0
T0 = 1000.0  # the fake clock's origin: t must not depend on it


class FakeClock:
    """A clock the test sets by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def recorder(run_dir: Path, clock: FakeClock, *, resume: bool = False, **overrides) -> RunRecorder:
    kwargs = dict(
        config=CONFIG,
        mode="async",
        compressor="pca",
        rule="fedasync",
        num_clients=3,
        eval_split="test",
        train_split="train",
        target_ppl=50.0,
    )
    kwargs.update(overrides)
    if resume:
        return RunRecorder.resume(run_dir, clock=clock, **kwargs)
    return RunRecorder(run_dir, clock=clock, **kwargs)


def play(rec: RunRecorder, clock: FakeClock, script, origin: float = T0) -> None:
    for t, method, kwargs in script:
        clock.now = origin + t
        getattr(rec, method)(**kwargs)


def run_script(run_dir: Path, script=SCRIPT, finish_t: float = FINISH_T, **overrides) -> dict:
    clock = FakeClock()
    rec = recorder(run_dir, clock, **overrides)
    play(rec, clock, script)
    clock.now = T0 + finish_t
    return rec.finish(stop_reason="max-updates", extra={"note": "test"})


def event_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, dict]:
    run_dir = tmp_path / "async-fedasync-pca"
    return run_dir, run_script(run_dir)


def test_every_event_line_parses_and_matches_what_was_logged(run):
    # Prepare / Execute: the fixture played SCRIPT
    run_dir, _ = run
    events = event_lines(run_dir)
    # Assert: a start line, one line per call in order, a finish line
    assert [e["event"] for e in events] == [
        "start",
        "eval",
        "update",
        "update",
        "drop",
        "eval",
        "update",
        "node_retired",
        "eval",
        "eval",
        "drop",
        "finish",
    ]
    assert events[0]["config"] == CONFIG and events[0]["mode"] == "async"
    for (t, _, kwargs), event in zip(SCRIPT, events[1:-1]):
        assert event["t"] == t
        assert isinstance(event["time"], float)
        for key, value in kwargs.items():
            assert event["event" if key == "kind" else key] == value
    assert events[-1]["t"] == FINISH_T and events[-1]["stop_reason"] == "max-updates"
    assert [e["updates"] for e in events if e["event"] == "eval"] == [0, 2, 3, 3]


def test_summary_totals_equal_recomputation_from_event_lines(run):
    run_dir, returned = run
    summary = json.loads((run_dir / "summary.json").read_text())
    events = event_lines(run_dir)
    updates = [e for e in events if e["event"] == "update"]
    evals = [e for e in events if e["event"] == "eval"]
    # Independent recomputation
    assert summary == returned
    assert summary["updates_applied"] == len(updates) == 3
    assert summary["updates_dropped"] == sum(e["event"] == "drop" for e in events) == 2
    assert summary["drop_reasons"] == {"stale": 1, "invalid payload": 1}
    assert summary["bytes_uploaded"] == sum(e["bytes"] for e in updates) == 400
    assert summary["bytes_uploaded_dense_equiv"] == sum(e["dense_bytes"] for e in updates) == 3000
    assert summary["compression_ratio"] == pytest.approx(7.5)
    staleness = [e["staleness"] for e in updates]
    assert summary["mean_staleness"] == pytest.approx(sum(staleness) / 3) == pytest.approx(4 / 3)
    assert summary["max_staleness"] == max(staleness) == 3
    assert summary["mean_decode_apply_ms"] == pytest.approx(4.0)
    assert summary["initial_eval_ppl"] == evals[0]["ppl"] == 90.0
    assert summary["final_eval_ppl"] == evals[-1]["ppl"] == 45.0
    assert (summary["final_eval_loss"], summary["final_eval_top1"], summary["final_eval_top5"]) == (3.8, 0.28, 0.48)
    assert summary["best_eval_ppl"] == min(e["ppl"] for e in evals)
    assert summary["wall_clock_s"] == events[-1]["t"] == FINISH_T
    assert summary["config"] == CONFIG and summary["extra"] == {"note": "test"}
    assert (summary["mode"], summary["rule"], summary["compressor"]) == ("async", "fedasync", "pca")
    assert summary["num_clients"] == 3
    assert (summary["train_split"], summary["eval_split"]) == ("train", "test")
    assert summary["stop_reason"] == "max-updates" and summary["target_ppl"] == 50.0


def test_time_to_target_is_first_eval_at_or_below_target(run):
    run_dir, summary = run
    events = read_events(run_dir / "events.jsonl")
    # ppl 55 at t=3 misses 50; ppl exactly 50 at t=6 counts; 45 at t=7 is later
    assert summary["time_to_target_s"] == 6.0
    assert time_to_ppl(events, 50.0) == 6.0
    assert time_to_ppl(events, 90.0) == 0.0
    assert time_to_ppl(events, 44.0) is None


@pytest.mark.parametrize("target", [None, 0.0])
def test_no_target_gives_null_time_to_target(tmp_path, target):
    summary = run_script(tmp_path / "run", target_ppl=target)
    assert summary["target_ppl"] is None and summary["time_to_target_s"] is None
    assert "no target" in (tmp_path / "run" / "results.md").read_text()


def test_ppl_at_is_last_eval_at_or_before_t(run):
    events = read_events(run[0] / "events.jsonl")
    assert ppl_at(events, -1.0) is None
    times = (0.0, 2.99, 3.0, 6.5, 100.0)
    assert [ppl_at(events, t) for t in times] == [90.0, 90.0, 55.0, 50.0, 45.0]


def test_results_md_table_rows_match_evals(run):
    run_dir, _ = run
    text = (run_dir / "results.md").read_text()
    lines = text.splitlines()
    header = "| round | updates | elapsed s | eval loss | eval ppl | top-1 acc | top-5 acc |"
    start = lines.index(header) + 2  # skip the alignment row
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in lines[start : start + 5] if line.startswith("|")
    ]
    assert rows == [
        ["0", "0", "0.0", "4.5000", "90.00", "0.2000", "0.4000"],
        ["1", "2", "3.0", "4.0000", "55.00", "0.2500", "0.4500"],
        ["2", "3", "6.0", "3.9000", "50.00", "0.2700", "0.4700"],
        ["3", "3", "7.0", "3.8000", "45.00", "0.2800", "0.4800"],
    ]
    assert lines[0].startswith("# async / fedasync / pca")
    assert "`train`" in text and "`test`" in text and "Offline" not in text
    for fragment in (
        "400 B vs 3.00 kB dense (compression ratio 7.5x)",
        "mean 1.33, max 3",
        "invalid payload: 1, stale: 1",
        "6.0 s (ppl <= 50)",
        "stop reason: max-updates",
    ):
        assert fragment in text


def test_results_md_says_when_training_on_validation(tmp_path):
    run_script(tmp_path / "offline", train_split="validation")
    text = (tmp_path / "offline" / "results.md").read_text()
    assert "`validation`" in text and "Offline run" in text


def test_plot_is_a_png(run):
    assert (run[0] / "plot.png").read_bytes()[:8] == PNG_MAGIC


def test_resume_continues_totals_and_t(tmp_path, run):
    # Prepare: play the first five calls, then "crash" mid-write (a torn last line)
    run_dir = tmp_path / "resumed"
    clock = FakeClock()
    rec = recorder(run_dir, clock)
    play(rec, clock, SCRIPT[:5])  # last logged t = 3.0
    rec.close()
    with open(run_dir / "events.jsonl", "a") as f:
        f.write('{"event": "upd')
    # Execute: resume on a clock with another origin, play the rest at the same offsets
    clock2 = FakeClock(now=50.0)
    rec2 = recorder(run_dir, clock2, resume=True)
    assert rec2.totals.updates == 2 and rec2.totals.drops == 1 and rec2.elapsed_s == 3.0
    rec2.log_event("resume", from_version=2)
    play(rec2, clock2, SCRIPT[5:], origin=50.0 - 3.0)
    clock2.now = 50.0 - 3.0 + FINISH_T
    resumed = rec2.finish(stop_reason="max-updates", extra={"note": "test"})
    # Assert: same totals and times as the uninterrupted run; log coherent
    assert resumed == run[1]
    events = event_lines(run_dir)  # every line parses: the torn one was cut
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 1 and kinds.count("resume") == 1
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)
    assert events[kinds.index("resume")]["t"] == 3.0


def test_nan_inf_and_numpy_values_become_json_safe(tmp_path):
    clock = FakeClock()
    rec = recorder(tmp_path / "nan", clock)
    rec.log_eval(
        version=np.int64(0),
        loss=float("nan"),
        ppl=np.float64(np.inf),
        top1=np.float32(0.5),
        arr=np.array([1.0, np.nan]),
        flags=(True, float("-inf")),
    )
    line = (tmp_path / "nan" / "events.jsonl").read_text().splitlines()[-1]
    assert "NaN" not in line and "Infinity" not in line
    event = json.loads(line)
    assert event["loss"] is None and event["ppl"] is None
    assert event["version"] == 0 and type(event["version"]) is int
    assert event["top1"] == 0.5 and event["arr"] == [1.0, None] and event["flags"] == [True, None]
    summary = rec.finish(stop_reason="diverged")

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    text = (tmp_path / "nan" / "summary.json").read_text()
    on_disk = json.loads(text, parse_constant=no_constants)
    assert on_disk == summary
    assert summary["initial_eval_ppl"] is None and summary["best_eval_ppl"] is None
    assert summary["compression_ratio"] is None and summary["mean_staleness"] is None


def test_torch_scalars_become_python_numbers(tmp_path):
    torch = pytest.importorskip("torch")
    rec = recorder(tmp_path / "torch", FakeClock())
    event = rec.log_eval(version=1, loss=torch.tensor(2.5), ppl=torch.tensor(float("nan")))
    assert event["loss"] == 2.5 and event["ppl"] is None
    rec.close()


def test_reserved_fields_and_logging_after_finish_raise(tmp_path):
    rec = recorder(tmp_path / "r", FakeClock())
    with pytest.raises(ValueError, match="'t'"):
        rec.log_event("checkpoint", t=5)
    rec.finish(stop_reason="done")
    with pytest.raises(RuntimeError, match="finished"):
        rec.log_drop(node=1, reason="stale")


def test_read_events_ignores_torn_tail_but_rejects_bad_middle_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "eval", "t": 1.0, "ppl": 3.0}\n{"event": "upd')
    assert read_events(path) == [{"event": "eval", "t": 1.0, "ppl": 3.0}]
    path.write_text('{"event": "eval"}\nnot json\n{"event": "eval"}\n')
    with pytest.raises(RunDataError, match=r"events\.jsonl:2:"):
        read_events(path)


def test_compare_writes_table_and_plot_listing_each_run(tmp_path, run, capsys):
    # Prepare: a second, shorter run (wall-clock 4 s) with its own ppl curve
    other = tmp_path / "sync-fedavg-none"
    run_script(
        other,
        script=[
            (0.0, "log_eval", dict(version=0, loss=4.4, ppl=80.0)),
            (1.0, "log_update", dict(version=1, node=1, staleness=0, bytes=1000, dense_bytes=1000)),
            (2.0, "log_eval", dict(version=1, loss=4.1, ppl=60.0)),
        ],
        finish_t=4.0,
        mode="sync",
        rule="fedavg",
        compressor="none",
    )
    out = tmp_path / "cmp"
    # Execute
    code = main(["compare", str(run[0]), str(other), "--out", str(out)])
    # Assert: both files; one row per run; ppl at equal wall-clock (4 s) = 55 and 60
    assert code == 0
    table = (out / "comparison.md").read_text()
    assert capsys.readouterr().out == table
    assert (out / "comparison.png").read_bytes()[:8] == PNG_MAGIC
    rows = {r[0]: r for r in ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:])}
    assert set(rows) == {"async-fedasync-pca", "sync-fedavg-none"}
    assert rows["async-fedasync-pca"][1:6] == ["async", "fedasync", "pca", "3", "8.0"]
    assert rows["async-fedasync-pca"][6:10] == ["90.00", "45.00", "45.00", "6.0"]
    assert rows["async-fedasync-pca"][11:] == ["7.5x", "55.00"]
    assert rows["sync-fedavg-none"][11:] == ["1.0x", "60.00"]
    assert "ppl @ 4.0 s" in table.splitlines()[0]


def test_compare_on_missing_dir_exits_2_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "asyncfl.results", "compare", str(missing)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "comparison.md").exists()


@pytest.mark.parametrize("summary_text", [None, "{not json", '{"mode": "async"}'])
def test_compare_on_unfinished_or_malformed_run_exits_2(tmp_path, run, capsys, summary_text):
    bad = tmp_path / "bad"
    bad.mkdir()
    if summary_text is not None:
        (bad / "summary.json").write_text(summary_text)
    assert main(["compare", str(run[0]), str(bad), "--out", str(tmp_path)]) == 2
    assert str(bad / "summary.json") in capsys.readouterr().err
    assert not (tmp_path / "comparison.md").exists()


def test_show_prints_results_md_and_fails_cleanly(tmp_path, run, capsys):
    assert main(["show", str(run[0])]) == 0
    assert capsys.readouterr().out == (run[0] / "results.md").read_text()
    assert main(["show", str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
