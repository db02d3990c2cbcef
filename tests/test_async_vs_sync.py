"""bench/async_vs_sync.py's deployment plumbing: one deployment per seed (`--share-deployment`).

The deployment itself is replaced by a stand-in that records the `local-deployment.sh` command
and writes a summary for each `--run`, as the real script's ServerApp does; the real script's
multi-run mode is exercised in tests/test_deployment.py.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import async_vs_sync as avs  # noqa: E402


@pytest.fixture
def fake_deployment(monkeypatch):
    """subprocess.run stand-in: parses the `--run` items and writes each run's summary.json."""
    calls: list[list[str]] = []

    class Done:
        stdout, stderr = "", ""

    def run(cmd, **_kw):
        calls.append(cmd)
        runs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--run"]
        for item in runs:
            kv = dict(part.split("=", 1) for part in shlex.split(item))
            run_dir = Path(kv["results-dir"]) / kv["run-name"]
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "summary.json").write_text(
                json.dumps(
                    {
                        "stop_reason": "time-budget-s 1 reached",
                        "updates_applied": 1,
                        "initial_eval_ppl": 2.0,
                        "final_eval_ppl": 1.0,
                        "wall_clock_s": 1.0,
                        "mode": kv["mode"],
                    }
                )
            )
        return Done()

    monkeypatch.setattr(avs.subprocess, "run", run)
    return calls


def run_names(cmd: list[str]) -> list[str]:
    return [shlex.split(cmd[i + 1])[-1].split("=", 1)[1] for i, a in enumerate(cmd) if a == "--run"]


def test_each_seed_runs_on_one_deployment_and_the_order_alternates(tmp_path, fake_deployment):
    args = avs.parse_args(
        ["--backend", "deployment", "--share-deployment", "--out", str(tmp_path), "--rules", "asgd", "--sync", "sync"]
    )
    first = avs.run_seed_in_one_deployment(11, ["sync", "asgd"], args, order=0)
    second = avs.run_seed_in_one_deployment(23, ["sync", "asgd"], args, order=1)
    assert len(fake_deployment) == 2  # one deployment per seed
    assert run_names(fake_deployment[0]) == ["sync-s11", "asgd-s11"]
    assert run_names(fake_deployment[1]) == ["asgd-s23", "sync-s23"]  # reversed every other seed
    assert first == {"sync": tmp_path / "runs" / "sync-s11", "asgd": tmp_path / "runs" / "asgd-s11"}
    assert json.loads((second["sync"] / "summary.json").read_text())["mode"] == "sync"
    # each run gets the whole configuration of its spec and seed, on the same ports
    assert all(("seed=11" in item) for i, item in enumerate(fake_deployment[0]) if fake_deployment[0][i - 1] == "--run")


def test_finished_runs_are_reused_and_a_missing_summary_is_an_error(tmp_path, fake_deployment, monkeypatch):
    args = avs.parse_args(["--backend", "deployment", "--share-deployment", "--reuse", "--out", str(tmp_path)])
    done = tmp_path / "runs" / "sync-s5"
    done.mkdir(parents=True)
    (done / "summary.json").write_text(
        json.dumps(
            {
                "stop_reason": "x",
                "updates_applied": 1,
                "initial_eval_ppl": 2.0,
                "final_eval_ppl": 1.0,
                "wall_clock_s": 1.0,
            }
        )
    )
    got = avs.run_seed_in_one_deployment(5, ["sync", "asgd"], args)
    assert run_names(fake_deployment[0]) == ["asgd-s5"]  # only the run not finished yet
    assert got["sync"] == done and got["asgd"] == tmp_path / "runs" / "asgd-s5"
    # a run whose ServerApp wrote nothing comes back as that run's error, not as a crash
    monkeypatch.setattr(avs.subprocess, "run", lambda cmd, **kw: type("Done", (), {"stdout": "boom", "stderr": ""})())
    failed = avs.run_seed_in_one_deployment(6, ["sync"], args)
    assert isinstance(failed["sync"], RuntimeError) and "sync-s6" in str(failed["sync"])
