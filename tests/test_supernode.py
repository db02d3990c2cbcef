"""asyncfl-supernode: Flower's SuperNode with short polls, and what the server does with them.

The whole path (real SuperNodes started through it, a run to completion with no task queued
ahead) is covered by tests/test_deployment.py, whose local deployment uses it by default.
"""

from __future__ import annotations

import importlib
import types

import pytest

from asyncfl.client.node import node_report
from asyncfl.deploy import supernode
from asyncfl.strategies.nodes import NodeInfo


class FakeTime:
    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def monotonic(self) -> float:
        return 12.5


def test_short_poll_time_maps_flowers_polls_and_forwards_the_rest():
    fake = FakeTime()
    t = supernode.ShortPollTime(0.1, 0.05, real=fake)
    t.sleep(3)  # the idle poll
    t.sleep(0.5)  # the reply / object polls
    t.sleep(7.0)  # anything else is untouched
    assert fake.slept == [0.1, 0.05, 7.0]
    assert t.monotonic() == 12.5  # every other attribute is the real module's


def test_the_installed_flower_has_the_hook_and_installing_swaps_only_its_time(monkeypatch):
    module = importlib.import_module("flwr.supernode.start_client_internal")
    assert supernode.hook_present(module), "this flwr's SuperNode loop changed: revisit asyncfl/deploy/supernode.py"
    import time as real_time

    monkeypatch.setattr(module, "time", real_time)  # restored after the test
    assert supernode.install_short_polls(0.2, 0.01)
    assert isinstance(module.time, supernode.ShortPollTime)
    assert (module.time.idle_s, module.time.reply_s) == (0.2, 0.01)
    assert real_time.sleep is not module.time.sleep  # the global time module is untouched


def test_a_flower_without_the_hook_runs_unchanged(monkeypatch, capsys):
    other = types.ModuleType("flwr.supernode.start_client_internal")
    other.time = object()  # e.g. a loop that imports sleep directly
    monkeypatch.setitem(__import__("sys").modules, "flwr.supernode.start_client_internal", other)
    assert not supernode.install_short_polls(0.1, 0.05)
    assert not isinstance(other.time, supernode.ShortPollTime)
    assert "running Flower's SuperNode unchanged" in capsys.readouterr().err


def test_poll_flags_are_parsed_validated_and_stripped():
    idle, reply, rest = supernode.parse_polls(
        ["--insecure", "--idle-poll-s", "0.3", "--reply-poll-s=0.02", "--superlink", "h:1"], env={}
    )
    assert (idle, reply, rest) == (0.3, 0.02, ["--insecure", "--superlink", "h:1"])
    assert supernode.parse_polls([], env={supernode.IDLE_ENV: "0.5"})[:2] == (0.5, supernode.DEFAULT_REPLY_POLL_S)
    assert supernode.parse_polls(["--idle-poll-s", "1"], env={supernode.IDLE_ENV: "0.5"})[0] == 1.0
    for bad in ("0", "abc", "100"):
        with pytest.raises(SystemExit, match=rf"--idle-poll-s must be .*\[0.01, 60\], got '{bad}'"):
            supernode.parse_polls(["--idle-poll-s", bad], env={})
    with pytest.raises(SystemExit, match="needs a value"):
        supernode.parse_polls(["--reply-poll-s"], env={})


def test_the_poll_is_announced_in_the_node_config_and_reported_by_the_clientapp():
    argv = ["--superlink", "h:1", "--node-config", "partition-id=0 num-partitions=2"]
    out = supernode.announce_poll(argv, 0.1)
    assert out[-1] == "partition-id=0 num-partitions=2 idle-poll-s=0.1" and argv[-1].endswith("=2")
    assert supernode.announce_poll(["--node-config=partition-id=1"], 0.25) == [
        "--node-config=partition-id=1 idle-poll-s=0.25"
    ]
    assert supernode.announce_poll(["--insecure"], 0.1) == ["--insecure", "--node-config", "idle-poll-s=0.1"]
    # Flower parses the node config into typed values; the ClientApp passes the poll on
    assert node_report({"partition-id": 0, "idle-poll-s": 0.1}) == {"idle-poll-s": 0.1}
    assert node_report({"partition-id": 0}) == {}  # Flower's flower-supernode: unknown
    assert node_report({"idle-poll-s": "soon"}) == {}


def test_nodes_that_poll_quickly_are_not_worth_queuing_ahead_for():
    node = NodeInfo()
    assert not node.polls_quickly()  # unknown: assume Flower's 3 s poll
    node.observe_poll(0.1)
    assert node.polls_quickly()
    node.observe_poll(3.0)
    assert not node.polls_quickly()
    node.observe_poll("x")  # ignored
    node.observe_poll(-1.0)
    assert node.idle_poll_s == 3.0
