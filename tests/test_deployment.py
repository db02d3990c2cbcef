"""The real Flower deployment on 127.0.0.1: certificates, SuperNode auth, a full run, a node crash.

Every test runs real `flower-superlink` / `flower-supernode` processes (TLS, SuperNode
authentication) on free ports, with the tiny GPT-2 preset on CPU and the offline data in
../shared/data. The slow ones take about a minute each (the node-crash test longer: a killed
SuperNode is noticed only when its heartbeats stop, ~60 s); they run in CI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from asyncfl.deploy import local as ld

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SCRIPT = ROOT / "scripts" / "local-deployment.sh"

from test_docker import free_port_block  # noqa: E402


def tiny_run_config(results: Path, **extra) -> str:
    cfg = {
        "model-preset": "tiny",
        "tokenizer": str(SHARED_DATA / "gpt2"),
        "data-dir": str(SHARED_DATA / "wikitext-2-raw"),
        "num-rounds": 2,
        "block-size": 32,
        "max-train-blocks": 8,
        "eval-max-blocks": 8,
        "local-steps": 2,
        "mode": "async",
        "device": "cpu",
        "save-model": False,
        "results-dir": str(results),
        "run-name": "run",
        **extra,
    }
    return " ".join(f"{k}={json.dumps(v)}" for k, v in cfg.items())


def run_script(tmp_path: Path, nodes: int, run_config: str, *extra: str, timeout: float = 420):
    assert SHARED_DATA.is_dir(), f"needs the offline data in {SHARED_DATA}"
    base = free_port_block(nodes + 1)
    env = {**os.environ, "ASYNCFL_SUPERLINK_PORT": str(base), "ASYNCFL_SUPERNODE_PORT": str(base + 1)}
    cmd = [str(SCRIPT), str(nodes), "--work-dir", str(tmp_path / "work"), "--run-config", run_config, *extra]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return res, base


def processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line or environment contains `text` (e.g. a work dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmdline and (text in cmdline or text in environ):
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


def read_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def registered_ids(stderr: str) -> dict[int, int]:
    """{node index: SuperLink node id} from the script's 'registered keys/node-I.pub' lines."""
    return {int(i): int(n) for i, n in re.findall(r"registered keys/node-(\d+)\.pub as SuperNode (\d+)", stderr)}


def explain(res: subprocess.CompletedProcess) -> str:
    return (
        f"exit {res.returncode}\n--- stdout (tail) ---\n{res.stdout[-5000:]}\n"
        f"--- stderr (tail) ---\n{res.stderr[-8000:]}"
    )


# --------------------------------------------------------------------------------------------
def test_make_certs_gives_a_ca_a_server_cert_with_sans_and_ssh_node_keys(tmp_path):
    out = tmp_path / "certs"
    subprocess.run(
        [str(ld.MAKE_CERTS), "-d", str(out), "-n", "2", "localhost", "127.0.0.1", "superlink"],
        check=True,
        capture_output=True,
    )
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", out / "ca.crt", out / "server.pem"], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    sans = subprocess.run(
        ["openssl", "x509", "-in", out / "server.pem", "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "DNS:localhost" in sans and "IP Address:127.0.0.1" in sans and "DNS:superlink" in sans
    for i in (1, 2):  # the formats flower-supernode and `flwr supernode register` read
        key = load_ssh_private_key((out / "keys" / f"node-{i}").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        pub = load_ssh_public_key((out / "keys" / f"node-{i}.pub").read_bytes())
        assert pub.public_numbers() == key.public_key().public_numbers()
        assert (out / "keys" / f"node-{i}").stat().st_mode & 0o077 == 0  # private: owner only
    assert (out / "server.key").stat().st_mode & 0o077 == 0
    # Re-running keeps the CA and the existing keys, adds the missing ones.
    ca, key1 = (out / "ca.crt").read_bytes(), (out / "keys" / "node-1").read_bytes()
    subprocess.run([str(ld.MAKE_CERTS), "-d", str(out), "-n", "3"], check=True, capture_output=True)
    assert (out / "ca.crt").read_bytes() == ca and (out / "keys" / "node-1").read_bytes() == key1
    assert (out / "keys" / "node-3.pub").is_file()
    bad = subprocess.run([str(ld.MAKE_CERTS), "-d", str(out), "not a name"], capture_output=True, text=True)
    assert bad.returncode != 0 and "neither an IP address nor a host name" in bad.stderr


@pytest.mark.slow
def test_local_deployment_completes_and_cleans_up(tmp_path):
    results = tmp_path / "results"
    # asgd + low-rank payloads: in deployment the tasks after a node's first come as update logs
    cfg = tiny_run_config(results, **{"rule": "asgd", "compressor": "pca", "num-rounds": 3})
    # two runs on the one deployment (`--run`): the async run, then a sync run of the same model
    res, base = run_script(
        tmp_path, 2, cfg, "--run", 'run-name="run"', "--run", 'run-name="run2" mode="sync" num-rounds=2'
    )
    assert res.returncode == 0, explain(res)
    run_dir = results / "run"
    assert res.stdout.index(f"RUN_DIR={run_dir}") < res.stdout.index(f"RUN_DIR={results / 'run2'}")
    second = json.loads((results / "run2" / "summary.json").read_text())
    assert second["mode"] == "sync" and second["extra"]["rounds"] == 2 and second["updates_applied"] == 4
    # the second run found the node workers warm: its warm-up started no process and built no
    # model (the first one's did both: a Python start, torch import and model build per node)
    assert second["extra"]["warmup_s"] < json.loads((run_dir / "summary.json").read_text())["extra"]["warmup_s"] / 2
    assert (tmp_path / "work" / "logs" / "flwr-run-2.log").is_file()
    assert (run_dir / "summary.json").is_file()
    events = read_events(run_dir)
    updates = [e for e in events if e["event"] == "update"]
    assert len(updates) >= 6  # async: num-rounds x nodes
    assert {u["partition"] for u in updates} == {0, 1}  # both SuperNodes worked
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["extra"]["log_tasks"] >= 4 and not [e for e in events if e["event"] in ("drop", "need_full")]
    # both nodes warmed up (model built in the node worker) before the run clock started
    warm = [e for e in events if e["event"] == "warmup"]
    assert len(warm) == 1 and warm[0]["nodes"] == 2 and summary["extra"]["warmup_s"] > 0
    # Everything the script started is gone, and its ports are free again.
    work = str(tmp_path / "work")
    assert processes_mentioning(work) == []
    assert all(ld.port_is_free(base + k) for k in range(3))
    # TLS and node auth were on: the SuperLink log shows HTTPS, and no --insecure was used.
    superlink_log = (tmp_path / "work" / "logs" / "superlink.log").read_text()
    assert "--enable-supernode-auth" in superlink_log and "https://" in superlink_log
    assert "--insecure" not in superlink_log
    # The SuperNodes ran in process isolation next to asyncfl-superexec, and every ClientApp
    # task ran in a process forked from its warm zygote (no silent fallback to Flower's).
    forked = 0
    for i in (1, 2):
        log = (tmp_path / "work" / "logs" / f"superexec-{i}.log").read_text()
        assert "zygote ready" in log and "zygote unavailable" not in log and "fork failed" not in log
        forked += int(re.search(r"stopping: (\d+) ClientApp task\(s\) ran in forked processes", log).group(1))
    assert forked >= len(updates)  # (a task queued ahead may still have started at the end)
    # The SuperNodes were asyncfl-supernode (idle poll 0.1 s, announced to the ClientApps), so
    # prefetch "auto" queued no task ahead: each node's next task went out when it replied.
    for i in (1, 2):
        log = (tmp_path / "work" / "logs" / f"supernode-{i}.log").read_text()
        assert "[asyncfl-supernode] idle poll 0.1 s" in log
    assert not any(u["prefetched"] for u in updates)


@pytest.mark.slow
def test_supernode_with_an_unregistered_key_is_refused(tmp_path):
    base = free_port_block(3)
    # One registered node; key pair 2 is made but never registered.
    with ld.Deployment(tmp_path / "work", 1, superlink_port=base, node_port=base + 1, extra_keys=1) as dep:
        dep.prepare()
        dep.start_superlink()
        good_id = dep.register(1)
        dep.start_supernode(1, partition_id=0)
        intruder = dep.start_supernode(2, partition_id=0, name="unregistered")
        try:
            code = intruder.popen.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(
                "the SuperNode with an unregistered key is still running after 90 s:\n" + ld.tail(intruder.log_path)
            )
        log = intruder.log_path.read_text()
        assert code != 0, log
        assert "Failed to initialize the connection to the SuperLink" in log, log
        assert "Failed to activate SuperNode" in log, log
        # The registered node is online; the SuperLink knows no other node.
        dep.wait_nodes_online([1])
        nodes = dep.list_nodes()
        assert [int(n["node-id"]) for n in nodes] == [good_id], nodes
        assert nodes[0]["status"] == "online"


@pytest.mark.slow
def test_killed_supernode_is_retired_and_the_others_finish_the_run(tmp_path):
    results = tmp_path / "results"
    # Node 2 is SIGKILLed (with its SuperExec and ClientApp) right after it receives its first
    # task. The SuperLink marks it offline once its heartbeats lapse (~60 s in flwr 1.41), then
    # the server loop gets NODE_UNAVAILABLE / sees it gone and retires it. A time budget keeps
    # the run going past that point however fast the updates are.
    cfg = tiny_run_config(results, **{"max-updates": 10_000, "time-budget-s": 110.0, "eval-every": 5})
    res, _ = run_script(tmp_path, 2, cfg, "--kill-node", "2", "--kill-after", "0", "--kill-signal", "KILL", timeout=480)
    assert res.returncode == 0, explain(res)
    assert "killing supernode-2" in res.stderr
    killed = registered_ids(res.stderr)[2]
    run_dir = results / "run"
    assert (run_dir / "summary.json").is_file()
    events = read_events(run_dir)
    retired = [i for i, e in enumerate(events) if e["event"] == "node_retired"]
    assert [events[i]["node"] for i in retired] == [killed], [events[i] for i in retired]
    after = [e for e in events[retired[0] :] if e["event"] == "update"]
    assert after and all(e["node"] != killed for e in after), "no update after the node was retired"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert str(summary.get("stop_reason")).startswith("time-budget-s"), summary
    # the SuperNodes are asyncfl-supernode (0.1 s idle poll, reported), so prefetch "auto"
    # queued nothing ahead, before or after the failure
    assert summary["extra"]["prefetched_tasks"] == 0 and not any(e["prefetched"] for e in after), summary


def test_gpu_placement_one_gpu_per_node_and_the_server_on_its_own(tmp_path):
    """Issue 15's layout, checked without GPUs: 8 SuperNodes on GPUs 0-7 round robin, 2 per GPU
    with 4 GPUs, and the ServerApp (started by the SuperLink) on the GPU given to it alone."""
    eight = ld.Deployment(tmp_path / "a", 8, gpus=[str(i) for i in range(8)], server_gpu="7")
    assert [eight.node_env(i)["CUDA_VISIBLE_DEVICES"] for i in range(1, 9)] == [str(i) for i in range(8)]
    assert eight.superlink_env() == {"CUDA_VISIBLE_DEVICES": "7"}
    four = ld.Deployment(tmp_path / "b", 8, gpus=["0", "1", "2", "3"])
    assert [four.node_env(i)["CUDA_VISIBLE_DEVICES"] for i in range(1, 9)] == ["0", "1", "2", "3"] * 2
    assert four.superlink_env() == {} and ld.Deployment(tmp_path / "c", 2).node_env(1) == {}
