"""End to end: `flwr run .` in local simulation, offline, tiny preset.

Each test uses a private FLWR_HOME, so the background SuperLink that `flwr run` starts is
its own; when the test ends it and whatever it spawned (found in /proc by that FLWR_HOME) are
terminated, and the test waits until they are gone.
`flwr run` exits 0 even when the ServerApp fails, so success is judged by the files written.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from asyncfl.demo import flwr_env, stop_processes_of

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data beside the repo")


def offline_config(results: Path, **extra) -> str:
    cfg = {
        "model-preset": "tiny",
        "tokenizer": str(SHARED / "gpt2"),
        "data-dir": str(SHARED / "wikitext-2-raw"),
        "block-size": 32,
        "max-train-blocks": 48,
        "eval-max-blocks": 48,
        "local-steps": 6,
        "batch-size": 8,
        "lr": 3e-3,
        "results-dir": str(results),
        "run-name": "run",
        "device": "cpu",
        **extra,
    }
    return " ".join(f"{k}={json.dumps(v)}" for k, v in cfg.items())


def flwr_run(tmp_path: Path, run_config: str, supernodes: int, timeout: int = 420) -> str:
    home = tmp_path / "flwr-home"
    # private FLWR_HOME and ports: never touch ~/.flwr or another run's local SuperLink
    env = flwr_env(home, threads=0)  # asyncfl-demo's: no runtime installs, free SuperLink ports
    fed = f"num-supernodes={supernodes} client-resources-num-cpus=1 init-args-num-cpus={supernodes}"
    cmd = ["flwr", "run", str(ROOT), "--stream", "--run-config", run_config, "--federation-config", fed]
    try:
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        return out.stdout + out.stderr
    finally:
        # no SuperLink (or app process) of this run outlives the test
        survivors = stop_processes_of(home, grace_s=30.0)
        assert not survivors, f"processes of FLWR_HOME={home} survived SIGKILL: {survivors}"


def read_run(results: Path, log: str) -> tuple[dict, list[dict]]:
    run_dir = results / "run"
    assert (run_dir / "summary.json").exists(), f"no summary.json; flwr output:\n{log[-6000:]}"
    summary = json.loads((run_dir / "summary.json").read_text())
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return summary, events


def test_sync_fedavg_two_clients_two_rounds(tmp_path):
    results = tmp_path / "results"
    log = flwr_run(tmp_path, offline_config(results, mode="sync", **{"num-rounds": 2}), supernodes=2)
    summary, events = read_run(results, log)
    run_dir = results / "run"
    for name in ("events.jsonl", "summary.json", "results.md", "plot.png", "model/config.json"):
        assert (run_dir / name).exists(), name
    assert summary["mode"] == "sync" and summary["updates_applied"] == 4
    assert summary["final_eval_ppl"] < summary["initial_eval_ppl"]
    assert summary["train_split"] == "validation" and summary["eval_split"] == "test"
    # the ServerApp says which splits it used, and the data loader why it trains on validation
    assert f"asyncfl: run dir {run_dir}; training on split 'validation', evaluating on 'test' (48 blocks)" in log
    assert (
        f'`data-dir` = "{SHARED / "wikitext-2-raw"}" has no wiki.train.raw: offline runs TRAIN ON '
        '"validation" and evaluate on `eval-split` = "test"'
    ) in log
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert model.config.n_layer == 2


def test_async_three_clients_one_slowed_with_low_rank_payloads(tmp_path):
    results = tmp_path / "results"
    extra = {
        "mode": "async",
        "rule": "fedasync",
        "compressor": "pca",
        "rank": 4,
        "client-speeds": "1,1,3",
        "max-updates": 14,
        "eval-every": 3,
        "min-nodes": 3,
    }
    log = flwr_run(tmp_path, offline_config(results, **extra), supernodes=3)
    summary, events = read_run(results, log)
    updates = [e for e in events if e["event"] == "update"]
    assert summary["updates_applied"] == 14 == len(updates)
    assert summary["final_eval_ppl"] < summary["initial_eval_ppl"]
    assert summary["bytes_uploaded"] < summary["bytes_uploaded_dense_equiv"]
    # the slowed client (partition 2) finishes fewer tasks and its updates arrive stale
    per_partition = {p: sum(u["partition"] == p for u in updates) for p in (0, 1, 2)}
    assert per_partition[2] < per_partition[0] and per_partition[2] < per_partition[1]
    assert max(u["staleness"] for u in updates if u["partition"] == 2) >= 1


def test_bad_run_config_stops_with_one_clear_message(tmp_path):
    results = tmp_path / "results"
    log = flwr_run(tmp_path, offline_config(results, lr=-1.0), supernodes=2, timeout=120)
    assert "run config key `lr` must be a number > 0, got -1.0" in log
    assert not (results / "run" / "summary.json").exists()
