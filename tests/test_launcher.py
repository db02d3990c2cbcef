"""asyncfl-superexec: the zygote forks real children, the executor hook and its fallbacks.

The whole path (a SuperNode in process isolation, ClientApp tasks forked from the zygote, a run
to completion) is covered by tests/test_deployment.py, whose local deployment uses it by default.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from asyncfl.deploy import launcher


def _gone(pid: int) -> bool:
    """The process no longer exists (a zombie counts as alive: nobody reaped it)."""
    return not Path(f"/proc/{pid}").exists()


def test_fork_flag_is_parsed_and_stripped(monkeypatch):
    monkeypatch.delenv(launcher.FORK_ENV, raising=False)
    assert launcher.fork_enabled(["--insecure", "--runtime-api-address", "h:1"]) == (
        True,
        ["--insecure", "--runtime-api-address", "h:1"],
    )
    assert launcher.fork_enabled(["--fork", "off", "--insecure"]) == (False, ["--insecure"])
    assert launcher.fork_enabled(["--fork=on"]) == (True, [])
    monkeypatch.setenv(launcher.FORK_ENV, "0")
    assert launcher.fork_enabled([])[0] is False
    assert launcher.fork_enabled(["--fork", "on"])[0] is True  # the flag wins over the env
    with pytest.raises(SystemExit, match="on or off, got 'maybe'"):
        launcher.fork_enabled(["--fork", "maybe"])
    with pytest.raises(SystemExit, match="needs a value"):
        launcher.fork_enabled(["--fork"])


def test_child_argv_is_what_flwr_clientapp_would_have_had():
    req = {
        "address": "127.0.0.1:9101",
        "token": "secret",
        "insecure": False,
        "root_certificates": "/c/ca.crt",
        "parent_pid": 42,
    }
    argv = launcher.clientapp_argv(req)
    assert argv == [
        "flwr-clientapp",
        "--runtime-api-address",
        "127.0.0.1:9101",
        "--token",
        "***",
        "--root-certificates",
        "/c/ca.crt",
        "--parent-pid",
        "42",
    ]


def test_zygote_forks_children_that_run_the_task_and_are_reaped():
    zygote = launcher.Zygote()
    try:
        assert zygote.alive()
        # A task whose CA file does not exist: the child gets as far as Flower's TLS setup,
        # fails there and exits; the zygote must reap it and keep serving.
        bad = {
            "address": "127.0.0.1:1",
            "token": "t",
            "insecure": False,
            "root_certificates": "/nonexistent/ca.crt",
            "parent_pid": os.getpid(),
        }
        pids = [zygote.fork(bad) for _ in range(3)]
        assert len(set(pids)) == 3 and zygote.proc.pid not in pids
        deadline = time.monotonic() + 30
        while not all(map(_gone, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(map(_gone, pids)), "children not reaped"
        assert zygote.alive()
    finally:
        zygote.close()
    assert zygote.proc.returncode == 0  # EOF on its socket ended it (not the kill after 5 s)


class _Spec:
    def __init__(self, task_type):
        from flwr.supercore.constant import TaskType

        self.task_type = getattr(TaskType, task_type)
        self.runtime_api_address, self.token, self.insecure = "127.0.0.1:1", "t", True
        self.root_certificates_path, self.parent_pid = None, None
        self.runtime_dependency_install, self.task_id = False, 1


class _Fallback:
    def __init__(self):
        self.launched, self.closed = [], False

    def launch(self, spec):
        self.launched.append(spec.task_type)
        return "fallback"

    def close(self):
        self.closed = True


def test_executor_forks_clientapps_and_hands_other_tasks_to_flower(monkeypatch):
    forked = []

    class FakeZygote:
        def __init__(self):
            self.proc = type("P", (), {"pid": 1, "returncode": None})()

        def alive(self):
            return True

        def fork(self, req):
            forked.append(req)
            return 99

        def close(self):
            pass

    monkeypatch.setattr(launcher, "Zygote", FakeZygote)
    fallback = _Fallback()
    ex = launcher.ForkingExecutor(fallback)
    assert ex.launch(_Spec("SERVER_APP")) == "fallback"
    result = ex.launch(_Spec("CLIENT_APP"))
    assert result.status == "accepted" and ex.forked == 1
    assert forked[0]["token"] == "t" and forked[0]["address"] == "127.0.0.1:1"
    assert [str(t) for t in fallback.launched] == ["flwr-serverapp"]
    ex.close()
    assert fallback.closed


def test_executor_falls_back_to_flower_when_the_zygote_cannot_start(monkeypatch, capsys):
    def broken():
        raise launcher.ZygoteError("no python here")

    monkeypatch.setattr(launcher, "Zygote", broken)
    fallback = _Fallback()
    ex = launcher.ForkingExecutor(fallback)
    assert ex.launch(_Spec("CLIENT_APP")) == "fallback"
    assert ex.launch(_Spec("CLIENT_APP")) == "fallback"  # not retried for every task
    assert ex.broken and ex.forked == 0 and len(fallback.launched) == 2
    assert capsys.readouterr().err.count("zygote unavailable (no python here)") == 1


def test_executor_hook_replaces_only_flowers_subprocess_executor(monkeypatch):
    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.superexec import run_superexec as rs

    monkeypatch.setattr(rs, "get_executor", rs.get_executor)  # undone after the test
    assert launcher.install_forking_executor()
    ex = rs.get_executor(ExecutorType.SUBPROCESS)
    assert isinstance(ex, launcher.ForkingExecutor)
    ex.close()
    with pytest.raises(ValueError, match="[Kk]ubernetes"):  # other executors: Flower's, untouched
        rs.get_executor(ExecutorType.KUBERNETES)
