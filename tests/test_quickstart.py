"""Tests for the quick start, `asyncfl-demo` (asyncfl/demo.py): arguments, the two run configs,
the environment `flwr run` gets (own FLWR_HOME and ports, no runtime dependency installation),
the run/compare/headline flow with `flwr run` faked, and cleanup of FLWR_HOME's processes.

One real run (two `flwr run` simulations with a 10 s budget, about 70 s on 2 cores) is marked
slow; like the other real-process tests it runs in CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from asyncfl import demo
from asyncfl.config import AppConfig, merged_toml
from asyncfl.results import RunRecorder

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BASE = ROOT / "configs" / "offline-tiny.toml"


def args_for(tmp_path: Path, *extra: str):
    return demo.parse_args(["--out", str(tmp_path / "out"), *extra])


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the app is this checkout wherever the command is run from
    args = demo.parse_args([])
    assert args.app == ROOT and args.base == BASE and args.out == ROOT / "results" / "quickstart"
    assert (args.budget_s, args.speeds, args.supernodes, args.overrides) == (30.0, "1,1,2,4", 4, "")
    assert (args.threads, args.dry_run) == (1, False)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budget-s", "0"], "--budget-s must be a number > 0"),
        (["--budget-s", "-5"], "--budget-s must be a number > 0"),
        (["--budget-s", "nan"], "--budget-s must be a number > 0"),
        (["--budget-s", "soon"], "invalid float value"),
        (["--supernodes", "1"], "--supernodes must be at least 2"),
        (["--timeout-s", "0"], "--timeout-s must be > 0"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_app_must_be_the_flower_app(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--app", str(tmp_path)])
    assert "is not the asyncfl Flower app" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The two run configs
# ---------------------------------------------------------------------------------------------
def read_toml(path: Path) -> dict:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def test_run_configs_differ_only_in_mode_and_eval_cadence(tmp_path):
    args = args_for(tmp_path, "--budget-s", "12.5", "--speeds", "1,3")
    paths = demo.write_run_configs(args)
    assert paths == {"async": args.out / "async.toml", "sync": args.out / "sync.toml"}
    a, s = read_toml(paths["async"]), read_toml(paths["sync"])
    for cfg, mode in ((a, "async"), (s, "sync")):
        assert cfg["mode"] == mode and cfg["run-name"] == mode
        assert cfg["time-budget-s"] == 12.5 and cfg["max-updates"] == 0  # the budget stops it
        assert cfg["client-speeds"] == "1,3" and cfg["min-nodes"] == 4
        assert cfg["results-dir"] == str(args.out)
        assert cfg["model-preset"] == "tiny" and cfg["compressor"] == "pca"  # the base file
        assert (cfg["local-steps"], cfg["batch-size"], cfg["max-train-blocks"], cfg["eval-max-blocks"]) == (4, 4, 0, 16)
        assert cfg["task-s"] == 3
        # relative local paths of the base file are made absolute (the SuperLink's cwd is not ours)
        assert cfg["tokenizer"] == str((ROOT / "../shared/data/gpt2").resolve())
        assert cfg["data-dir"] == str((ROOT / "../shared/data/wikitext-2-raw").resolve())
        AppConfig.from_run_config(cfg)  # valid as a whole
    assert a["eval-every"] == 4 and s["eval-every"] == 1  # both evaluate every 4 updates
    assert {k: v for k, v in a.items() if k not in ("mode", "run-name", "eval-every")} == {
        k: v for k, v in s.items() if k not in ("mode", "run-name", "eval-every")
    }


def test_run_config_is_what_config_merge_writes(tmp_path):
    """The files are `python -m asyncfl.config --merge BASE 'overrides'` (paths made absolute)."""
    args = args_for(tmp_path)
    paths = demo.write_run_configs(args)
    for mode, path in paths.items():
        cli = subprocess.run(
            [sys.executable, "-m", "asyncfl.config", "--merge", str(BASE), demo.run_overrides(mode, args)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert cli == merged_toml(str(BASE), demo.run_overrides(mode, args))
        assert read_toml(path) == tomllib.loads(demo.absolute_paths(cli, ROOT))
        assert list(read_toml(path)) == list(tomllib.loads(cli))  # same keys, same order


def test_set_overrides_demo_keys_but_not_what_the_runs_are(tmp_path):
    args = args_for(tmp_path, "--set", 'local-steps=2 compressor="qrcp" mode="sync" time-budget-s=999')
    a = read_toml(demo.write_run_configs(args)["async"])
    assert a["local-steps"] == 2 and a["compressor"] == "qrcp"
    assert a["mode"] == "async" and a["time-budget-s"] == 30.0


def test_hub_ids_and_absolute_paths_are_left_alone(tmp_path):
    text = 'tokenizer = "gpt2"\ndata-dir = "/data/wiki"\nmodel = "configs"\nrank = 8\n'
    out = tomllib.loads(demo.absolute_paths(text, ROOT))
    assert out == {"tokenizer": "gpt2", "data-dir": "/data/wiki", "model": str(ROOT / "configs"), "rank": 8}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--speeds", "1,0.5"], "client-speeds"),
        (["--set", "lr=-1"], "run config key `lr` must be a number > 0"),
        (["--set", "no-such-key=1"], "unknown run config key(s) no-such-key"),
        (["--set", "mode=sync"], "is not key=value with a TOML value"),
    ],
)
def test_bad_config_stops_before_flower(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(demo.subprocess, "Popen", lambda *a, **k: pytest.fail("flwr must not run"))
    assert demo.main(["--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Flower's environment and command
# ---------------------------------------------------------------------------------------------
def test_flwr_env_private_home_ports_and_no_dependency_installation(tmp_path):
    base = {"PATH": "/bin", "OMP_NUM_THREADS": "3"}
    before = dict(os.environ)
    env = demo.flwr_env(tmp_path / "home", threads=1, base=base, ports=[5000, 5000])
    assert env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    http, control = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"], env["FLWR_LOCAL_CONTROL_API_PORT"]
    assert http == "5000" and control != http and int(control) > 0  # a clash is re-picked
    assert env["OMP_NUM_THREADS"] == "3" and env["MKL_NUM_THREADS"] == "1"  # the user's value wins
    bindir = str(Path(sys.executable).parent)  # this environment's flwr comes first
    assert env["PATH"] == (f"{bindir}:/bin" if (Path(bindir) / "flwr").exists() else "/bin")
    assert base == {"PATH": "/bin", "OMP_NUM_THREADS": "3"}
    assert "MKL_NUM_THREADS" not in demo.flwr_env(tmp_path, threads=0, base={})
    assert dict(os.environ) == before  # the demo's own process environment is untouched


def test_flwr_command(tmp_path):
    assert demo.flwr_command(ROOT, tmp_path / "a.toml", 3) == [
        "flwr",
        "run",
        str(ROOT),
        "--stream",
        "--run-config",
        str(tmp_path / "a.toml"),
        "--federation-config",
        "num-supernodes=3 client-resources-num-cpus=1 init-args-num-cpus=3",
    ]


def test_dry_run_prints_commands_with_their_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo.subprocess, "Popen", lambda *a, **k: pytest.fail("dry run must not run"))
    assert demo.main(["--out", str(tmp_path / "out"), "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " flwr run " in ln]
    assert len(lines) == 2 and "async.toml" in lines[0] and "sync.toml" in lines[1]
    for line in lines:
        assert line.startswith(
            f"FLWR_HOME={tmp_path / 'out' / 'flwr-home'} "
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_LOCAL_SUPERLINK_HTTP_API_PORT="
        )


def test_console_script_is_registered_and_is_the_readme_quick_start():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["asyncfl-demo"] == "asyncfl.demo:main"
    readme = (ROOT / "README.md").read_text()
    quick = readme[readme.index("## Quick start") : readme.index("### Offline use")]
    commands = quick.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [c.split("#")[0].strip() for c in commands] == [
        'pip install torch==2.13.0 && pip install -e ".[test]"',
        "asyncfl-demo",
    ]


# ---------------------------------------------------------------------------------------------
# The whole flow with `flwr run` faked
# ---------------------------------------------------------------------------------------------
# Eval curves (t, ppl) of the fake runs: async gets to sync's final 80 at t = 10
CURVES = {
    "async": [(0.0, 500.0), (5.0, 120.0), (10.0, 75.0), (15.0, 60.0)],
    "sync": [(0.0, 500.0), (8.0, 200.0), (16.0, 110.0), (24.0, 80.0)],
}


def write_fake_run(run_dir: Path, mode: str) -> None:
    """A finished run as the ServerApp writes it (RunRecorder, a fake clock)."""
    now = [0.0]
    rec = RunRecorder(
        run_dir,
        config={"mode": mode},
        mode=mode,
        compressor="pca",
        rule="asgd" if mode == "async" else "fedavg",
        num_clients=4,
        eval_split="test",
        train_split="validation",
        target_ppl=None,
        clock=lambda: now[0],
    )
    for i, (t, ppl) in enumerate(CURVES[mode]):
        now[0] = t
        if i:
            rec.log_update(version=i, node=1, staleness=0, bytes=10, dense_bytes=100)
        rec.log_eval(version=i, loss=1.0, ppl=ppl)
    rec.finish(stop_reason="time-budget-s reached")


class FakeFlwr:
    """Stands in for `subprocess.Popen(["flwr", "run", ...])`: records the call, writes the
    run folder named by the --run-config file (unless `write` is False), prints like flwr."""

    calls: list[dict] = []
    write = True

    def __init__(self, cmd, env, cwd, stdout, stderr, text, errors):
        cfg = read_toml(Path(cmd[cmd.index("--run-config") + 1]))
        FakeFlwr.calls.append({"cmd": cmd, "env": env, "cwd": cwd, "cfg": cfg})
        if FakeFlwr.write:
            write_fake_run(Path(cfg["results-dir"]) / cfg["run-name"], cfg["mode"])
        r, w = os.pipe()
        os.write(w, f"Successfully started run {len(FakeFlwr.calls)}\n".encode())
        os.close(w)
        self.stdout = os.fdopen(r, "r")
        self.returncode = 0

    def wait(self, timeout=None):
        return 0

    def kill(self):
        pass


@pytest.fixture
def fake_flwr(monkeypatch):
    FakeFlwr.calls, FakeFlwr.write = [], True
    stopped: list[Path] = []
    monkeypatch.setattr(demo.subprocess, "Popen", FakeFlwr)
    monkeypatch.setattr(demo, "run_status", lambda env, cwd, run_id: "finished:failed")
    monkeypatch.setattr(demo, "stop_processes_of", lambda home, grace_s=15.0: stopped.append(home) or [])
    return stopped


def test_main_runs_async_then_sync_then_compares(tmp_path, fake_flwr, capsys):
    out = tmp_path / "out"
    assert demo.main(["--out", str(out), "--budget-s", "20"]) == 0
    calls = FakeFlwr.calls
    assert [c["cfg"]["mode"] for c in calls] == ["async", "sync"]
    for c in calls:
        assert c["cmd"] == demo.flwr_command(ROOT, out / f"{c['cfg']['mode']}.toml", 4)
        assert c["cwd"] == ROOT
        env = c["env"]
        assert env["FLWR_HOME"] == str(out / "flwr-home")
        assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
        assert env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] == calls[0]["env"]["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
        assert c["cfg"]["time-budget-s"] == 20.0
    # a leftover SuperLink of this FLWR_HOME is stopped before, and ours after
    assert fake_flwr == [out / "flwr-home", out / "flwr-home"]
    assert (out / "compare" / "comparison.md").exists()
    assert (out / "compare" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "Successfully started run 1" in (out / "async.log").read_text()
    text = capsys.readouterr().out
    assert "| async | async | asgd | pca | 3 |" in text and "| sync | sync | fedavg | pca | 3 |" in text
    assert "async (asgd): final ppl 60.0 after 3 updates in 15.0 s" in text
    assert "sync (FedAvg): final ppl 80.0 after 3 updates in 24.0 s (ppl 200.0 at 15.0 s)" in text
    assert "async reached sync's final ppl 80.0 at 10.0 s, sync at 24.0 s: 2.4x sooner" in text
    assert f"plot: {out / 'compare' / 'comparison.png'}" in text


def test_a_run_without_summary_fails_and_still_stops_flower(tmp_path, fake_flwr, capsys):
    out = tmp_path / "out"
    write_fake_run(out / "async", "async")  # an earlier demo's result must not count
    old = time.time() - 3600
    os.utime(out / "async" / "summary.json", (old, old))
    FakeFlwr.write = False
    assert demo.main(["--out", str(out)]) == 1
    assert len(FakeFlwr.calls) == 1  # sync is not started after a failed async run
    err = capsys.readouterr().err
    assert f"the run wrote no {out / 'async' / 'summary.json'} (run status: finished:failed)" in err
    assert fake_flwr == [out / "flwr-home", out / "flwr-home"]


def test_headline_when_async_does_not_reach_sync(tmp_path, monkeypatch):
    monkeypatch.setitem(CURVES, "async", [(0.0, 500.0), (30.0, 90.0)])
    for mode in ("async", "sync"):
        write_fake_run(tmp_path / mode, mode)
    lines = demo.headline(tmp_path / "async", tmp_path / "sync")
    assert lines[1] == "sync (FedAvg): final ppl 80.0 after 3 updates in 24.0 s"  # not longer than async
    assert lines[2] == "async did not reach sync's final ppl 80.0 within its budget"


def test_headline_when_sync_completes_no_round(tmp_path, monkeypatch):
    """A budget shorter than sync's first round (the slowest client's task) leaves sync at the
    initial model: the headline says so instead of comparing against it."""
    monkeypatch.setitem(CURVES, "sync", [(0.0, 500.0)])
    for mode in ("async", "sync"):
        write_fake_run(tmp_path / mode, mode)
    lines = demo.headline(tmp_path / "async", tmp_path / "sync")
    assert lines[1].startswith("sync (FedAvg): final ppl 500.0 after 0 updates")
    assert lines[2].startswith("sync completed no round within") and "raise --budget-s" in lines[2]
    assert len(lines) == 3


def test_wait_for_summary_follows_a_run_after_the_stream_ends(tmp_path, monkeypatch):
    """`flwr run --stream` may return before the run ends: the summary written later counts."""
    calls = []

    def status(env, cwd, run_id):
        assert run_id == "42"
        calls.append(run_id)
        if len(calls) == 3:  # the ServerApp finishes a while after the stream ended
            write_fake_run(tmp_path / "async", "async")
        return "running"

    monkeypatch.setattr(demo, "run_status", status)
    got = demo.wait_for_summary(
        tmp_path / "async", time.time() - 1, "Successfully started run 42", {}, ROOT, timeout_s=30, poll_s=0.01
    )
    assert got == tmp_path / "async" / "summary.json" and len(calls) == 3


def test_wait_for_summary_gives_up(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "run_status", lambda env, cwd, run_id: "running")
    with pytest.raises(demo.DemoError, match="run status: running"):
        demo.wait_for_summary(
            tmp_path, time.time(), "Successfully started run 1", {}, ROOT, timeout_s=0.05, poll_s=0.01
        )
    with pytest.raises(demo.DemoError, match="run status: not started"):
        demo.wait_for_summary(tmp_path, time.time(), "Failed to start run", {}, ROOT, timeout_s=5)


def test_run_streamed_copies_output_and_kills_on_timeout(tmp_path, capsys):
    out = demo.run_streamed(
        [sys.executable, "-c", "print('hello'); import sys; print('err', file=sys.stderr)"],
        os.environ,
        tmp_path,
        tmp_path / "a.log",
        timeout_s=60,
    )
    assert "hello" in out and "err" in out and "hello" in capsys.readouterr().out
    t0 = time.monotonic()
    with pytest.raises(demo.DemoError, match="still running after 1 s"):
        demo.run_streamed(
            [sys.executable, "-c", "import time; time.sleep(60)"], os.environ, tmp_path, tmp_path / "b.log", timeout_s=1
        )
    assert time.monotonic() - t0 < 30


# ---------------------------------------------------------------------------------------------
# Stopping what Flower started for our FLWR_HOME
# ---------------------------------------------------------------------------------------------
def test_stop_processes_of_stops_only_that_home(tmp_path):
    home, other = tmp_path / "home", tmp_path / "other"
    sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
    ours = subprocess.Popen(sleep, env={**os.environ, "FLWR_HOME": str(home)})
    by_cmdline = subprocess.Popen([*sleep, str(home)])  # names the folder on its command line
    theirs = subprocess.Popen(sleep, env={**os.environ, "FLWR_HOME": str(other)})
    try:
        deadline = time.monotonic() + 10
        while set(demo.processes_of(home)) != {ours.pid, by_cmdline.pid} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(demo.processes_of(home)) == {ours.pid, by_cmdline.pid}
        assert demo.stop_processes_of(home, grace_s=10) == []
        assert ours.wait(10) is not None and by_cmdline.wait(10) is not None
        assert theirs.poll() is None and demo.processes_of(home) == {}
    finally:
        for p in (ours, by_cmdline, theirs):
            if p.poll() is None:
                p.kill()
                p.wait()


# ---------------------------------------------------------------------------------------------
# The real thing (two `flwr run` simulations)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data beside the repo")
def test_real_quick_start(tmp_path):
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "asyncfl.demo", "--out", str(out), "--budget-s", "25"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-6000:]
    for mode in ("async", "sync"):
        summary = json.loads((out / mode / "summary.json").read_text())
        assert summary["mode"] == mode and summary["stop_reason"].startswith("time-budget-s 25")
        assert summary["final_eval_ppl"] < summary["initial_eval_ppl"]
        assert summary["config"]["client-speeds"] == "1,1,2,4"
    assert (out / "compare" / "comparison.png").exists()
    # the headline is printed either way; which one depends on a 25 s run's noise
    assert "async reached sync's final ppl" in log or "async did not reach" in log
    # Flower used this environment: nothing installed per run, and nothing left running
    assert "Installing application dependencies" not in log
    assert not (out / "flwr-home" / "runtime-envs").exists()
    assert demo.processes_of(out / "flwr-home") == {}
