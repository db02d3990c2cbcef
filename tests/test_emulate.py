"""The emulator: the real loop and real (tiny) client training on a virtual clock.

Timelines are checked against a hand-worked schedule; every rule's saved model is evaluated
again, independently, and must have the run's final perplexity.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from asyncfl.config import AppConfig
from asyncfl.emulate import EmulatedGrid, VirtualClock, run_emulated
from asyncfl.strategies import RULES
from tests.conftest import TINY_OFFLINE

BASE = {**TINY_OFFLINE, "compressor": "pca", "rank": 2, "min-nodes": 2, "save-model": False}


def updates(run_dir):
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "update"]


def emulate(tmp_path, name, nodes=2, **kw):
    cfg = {
        **BASE,
        "results-dir": str(tmp_path),
        "run-name": name,
        "client-speeds": "1,2",
        "rule": "asgd",
        "server-lr": 0.5,
        "max-updates": 4,
        "eval-every": 1000,
        **kw.pop("run_config", {}),
    }
    summary = run_emulated(cfg, nodes, server_time=False, **kw)
    return summary, updates(tmp_path / name)


def test_virtual_clock_sleeps_without_sleeping_and_pauses_exclude_real_time():
    clock = VirtualClock(server_time=False)
    clock.sleep(100.0)
    assert clock.now() == 100.0
    real = VirtualClock(server_time=True)
    with real.paused():
        torch.randn(300, 300) @ torch.randn(300, 300)
    assert real.now() < 0.05  # the paused work did not count


def test_idle_supernodes_find_tasks_at_their_next_poll(tmp_path):
    # task 1 s of compute, 0.5 s overhead, speeds 1 and 2, idle poll 3 s, no prefetch:
    # node p0: 0 -> 1.5; its next task is noticed at the poll 1.5 + 3 -> ends 4.5 + 1.5 = 6.0
    # node p1: 0 -> 2.5; next noticed at 5.5 -> ends 5.5 + 2 + 0.5 = 8.0
    summary, ups = emulate(tmp_path, "poll", task_s=1.0, overhead_s=0.5, poll_s=3.0, run_config={"prefetch": "off"})
    assert [u["partition"] for u in ups] == [0, 1, 0, 1]
    for got, want in zip([u["t"] for u in ups], [1.5, 2.5, 6.0, 8.0]):
        assert want <= got < want + 0.06  # the loop polls every 0.05 virtual s
    assert [u["staleness"] for u in ups] == [0, 1, 1, 1]
    # the server sees the slowness in the handler time, as in a deployment
    assert [u["client_s"] for u in ups] == [1.0, 2.0, 1.0, 2.0]
    assert summary["emulation"]["tasks"] >= 4  # tasks still out at the end are not waited for


def test_the_run_configs_task_s_is_the_emulated_task_length_and_no_client_sleeps(tmp_path):
    # the schedule of the test above, with the fixed task length from the run config
    grid = EmulatedGrid({**BASE, "client-speeds": "1,2", "task-s": 1.0}, 2, VirtualClock(server_time=False))
    assert grid.task_s == 1.0 and grid.client_run_config["task-s"] == 0.0
    assert grid.client_run_config["client-speeds"] == ""
    _, ups = emulate(tmp_path, "cfg-task-s", overhead_s=0.5, poll_s=3.0, run_config={"prefetch": "off", "task-s": 1.0})
    for got, want in zip([u["t"] for u in ups], [1.5, 2.5, 6.0, 8.0]):
        assert want <= got < want + 0.06
    assert [u["client_s"] for u in ups] == [1.0, 2.0, 1.0, 2.0]
    assert [u["sleep_s"] for u in ups] == [0.0, 1.0, 0.0, 1.0]  # the events carry the slowness
    assert [u["overrun_s"] for u in ups] == [0.0] * 4


def test_without_poll_the_next_task_starts_at_once_and_prefetch_hides_the_poll(tmp_path):
    _, ups = emulate(
        tmp_path, "nopoll", task_s=1.0, overhead_s=0.5, poll_s=0.0, run_config={"prefetch": "off", "max-updates": 3}
    )
    for got, want in zip([u["t"] for u in ups], [1.5, 2.5, 3.0]):
        assert want <= got < want + 0.06
    # with prefetch the queued task is there when the node replies: no 3 s poll after the first
    _, pre = emulate(
        tmp_path,
        "prefetch",
        task_s=1.0,
        overhead_s=0.5,
        poll_s=3.0,
        run_config={"prefetch": "on", "prefetch-lead-s": 0.5, "max-updates": 6},
    )
    later = [u for u in pre if u["prefetched"]]
    assert later and all(u["service_s"] < 2.6 for u in later)


def test_prefetch_auto_queues_ahead_only_for_nodes_with_flowers_slow_poll(tmp_path):
    # a 3 s idle poll (Flower's flower-supernode, which reports nothing): tasks are queued ahead;
    # a 0.1 s poll (asyncfl-supernode, whose nodes report it): none are, and no poll is paid
    kw = dict(task_s=1.0, overhead_s=0.5, run_config={"prefetch": "auto", "prefetch-lead-s": 0.5, "max-updates": 6})
    _, slow = emulate(tmp_path, "slow", poll_s=3.0, **kw)
    _, quick = emulate(tmp_path, "quick", poll_s=0.1, **kw)
    assert any(u["prefetched"] for u in slow)
    assert not any(u["prefetched"] for u in quick)
    # p0 (speed 1) without queuing: 1.5 s per task plus at most one 0.1 s poll between tasks
    p0 = [u["t"] for u in quick if u["partition"] == 0]
    assert len(p0) >= 3 and all(1.5 <= b - a <= 1.5 + 0.1 + 0.06 for a, b in zip(p0, p0[1:]))


def test_emulated_runs_are_reproducible(tmp_path):
    kw = dict(
        task_s=1.0,
        overhead_s=0.2,
        poll_s=3.0,
        jitter=0.3,
        run_config={"prefetch": "on", "max-updates": 6, "eval-every": 3},
    )
    a, ups_a = emulate(tmp_path, "a", **kw)
    b, ups_b = emulate(tmp_path, "b", **kw)
    assert [u["t"] for u in ups_a] == [u["t"] for u in ups_b]
    assert a["final_eval_ppl"] == b["final_eval_ppl"] and a["final_eval_ppl"] < a["initial_eval_ppl"]


def test_grid_rejects_bad_timing_values():
    with pytest.raises(ValueError, match="overhead_s"):
        EmulatedGrid(BASE, 2, VirtualClock(), overhead_s=-1.0)
    with pytest.raises(ValueError, match="num_nodes"):
        EmulatedGrid(BASE, 0, VirtualClock())


def independent_ppl(model_dir, cfg: AppConfig) -> float:
    """Perplexity of a saved model, recomputed with plain transformers + torch: the same eval
    blocks, mean next-token cross-entropy over all of them."""
    from transformers import AutoModelForCausalLM

    from asyncfl.data import load_eval_blocks

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    blocks = load_eval_blocks(cfg)
    total, count = 0.0, 0
    with torch.no_grad():
        for block in blocks:
            logits = model(input_ids=block[None]).logits[0, :-1].double()
            total += float(F.cross_entropy(logits, block[1:], reduction="sum"))
            count += block.numel() - 1
    return math.exp(total / count)


CASES = [(rule, 0) for rule in RULES] + [("sync", 0), ("fedbuff", 4)]


@pytest.mark.parametrize(("rule", "lora"), CASES)
def test_the_saved_model_has_the_final_perplexity(tmp_path, rule, lora):
    # 3 updates: fedbuff (K=2) and fadas end with a partial buffer that is flushed before the
    # final evaluation; sync runs 2 rounds
    run_config = {
        "rule": rule if rule != "sync" else "asgd",
        "mode": "sync" if rule == "sync" else "async",
        "buffer-size": 2,
        "server-lr": 0.5 if rule != "fadas" else 1e-3,
        "max-updates": 3,
        "num-rounds": 2,
        "save-model": True,
        "lora-rank": lora,
        "eval-every": 2,
        "local-steps": 1,
        "server-momentum": 0.5 if rule in ("fedbuff", "dn", "sync") else 0.0,
    }
    summary, ups = emulate(tmp_path, f"saved-{rule}-{lora}", task_s=1.0, run_config=run_config)
    assert ups
    cfg = AppConfig.from_run_config({**BASE, **run_config})
    ppl = independent_ppl(tmp_path / f"saved-{rule}-{lora}" / "model", cfg)
    assert ppl == pytest.approx(summary["final_eval_ppl"], rel=2e-4)
