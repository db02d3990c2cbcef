"""asyncfl.flower_hooks: every Flower internal asyncfl uses exists on the installed flwr and
behaves as asyncfl expects; a missing one fails loudly when asked for and falls back quietly
otherwise; the deployment answers of the server and the client side.

CI runs this file (with tests/test_launcher.py, test_supernode.py, test_pulls.py) on flwr 1.41.0
as well as on the installed 1.42 (.ci/run).
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import time
import tomllib
import types
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from asyncfl import flower_hooks
from asyncfl.deploy import launcher, pulls, supernode
from asyncfl.flower_hooks import HookMissingError

ROOT = Path(__file__).resolve().parents[1]


def test_supported_range_is_the_pin_and_the_installed_flwr_is_in_it():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.startswith("flwr["))
    assert pin.endswith(flower_hooks.SUPPORTED), (pin, flower_hooks.SUPPORTED)
    spec = SpecifierSet(flower_hooks.SUPPORTED)
    assert all(v in spec for v in flower_hooks.VERIFIED)
    assert version("flwr") in spec and flower_hooks.flwr_version() == version("flwr")


@pytest.mark.parametrize("hook", flower_hooks.HOOKS, ids=lambda h: h.name)
def test_every_hook_is_present_on_the_installed_flwr(hook):
    assert flower_hooks.missing(hook) is None
    assert flower_hooks.available([hook], required=True)


def test_executor_hook_builds_flowers_executors_from_the_spec_asyncfl_reads():
    from flwr.supercore.constant import ExecutorType, TaskType
    from flwr.supercore.superexec import run_superexec as rs
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

    # the SuperExec calls the module global it imported (so replacing it there takes effect)
    assert re.search(r"\bget_executor\(\s*executor_type", inspect.getsource(rs.run_superexec))
    assert isinstance(rs.get_executor(ExecutorType.SUBPROCESS), SubprocessExecutor)
    spec = ExecutionSpec(
        task_type=TaskType.CLIENT_APP,
        runtime_api_address="127.0.0.1:1",
        token="t",
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        parent_pid=None,
        suppress_output=False,
        task_id=1,
    )
    assert {f: getattr(spec, f) for f in ("runtime_api_address", "token", "parent_pid")} == {
        "runtime_api_address": "127.0.0.1:1",
        "token": "t",
        "parent_pid": None,
    }
    assert LaunchResult.accepted().status == "accepted"


def test_clientapp_runtime_is_what_flwr_clientapp_runs():
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    flwr_clientapp = importlib.import_module("flwr.supernode.cli.flwr_clientapp")  # the command's module

    assert flwr_clientapp.run_clientapp is run_clientapp


def test_pull_hooks_are_the_function_their_modules_call():
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    for hook in (flower_hooks.SERVER_PULLS, flower_hooks.SUPERNODE_PULLS):
        module = importlib.import_module(hook.module)
        assert getattr(module.pull_objects, "asyncfl_original", module.pull_objects) is pull_objects
        assert "pull_objects(" in inspect.getsource(module), hook.module  # called by its global name


# ------------------------------------------------------------------------------------------
# A flwr without a hook: loud when asked for, one warning otherwise
# ------------------------------------------------------------------------------------------
def _assert_loud(exc: BaseException, hook: flower_hooks.Hook) -> None:
    text = str(exc)
    assert hook.where in text and f"flwr {version('flwr')}" in text and ">=1.41,<1.43" in text, text


def test_superexec_without_get_executor_fails_loudly_on_fork_on_and_falls_back_by_default(monkeypatch, capsys):
    from flwr.supercore.superexec import run_superexec as rs

    monkeypatch.delattr(rs, "get_executor")  # a flwr whose SuperExec builds its executor otherwise
    with pytest.raises(HookMissingError) as err:
        launcher.install_forking_executor(required=True)
    _assert_loud(err.value, flower_hooks.EXECUTOR)
    with pytest.raises(SystemExit, match="run_superexec.get_executor.*--fork off"):
        launcher.main(["--fork", "on", "--insecure"])  # exits before Flower's SuperExec starts
    capsys.readouterr()
    assert not launcher.install_forking_executor()  # auto: one warning, Flower unchanged
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and "running Flower's executor unchanged" in err_text
    assert flower_hooks.EXECUTOR.where in err_text and not hasattr(rs, "get_executor")


def test_superexec_needs_the_clientapp_runtime_too(monkeypatch):
    from flwr.supercore.superexec import run_superexec as rs
    from flwr.supernode.runtime import run_clientapp as rc

    monkeypatch.setattr(rs, "get_executor", rs.get_executor)
    before = rs.get_executor
    monkeypatch.setattr(rc, "run_clientapp", lambda runtime_api_address, token: None)  # other signature
    with pytest.raises(HookMissingError, match="certificates, parent_pid, runtime_dependency_install"):
        launcher.install_forking_executor(required=True)
    assert not launcher.install_forking_executor() and rs.get_executor is before


def test_fork_mode_tells_asked_from_default():
    assert launcher.fork_mode([], env={}) == ("auto", [])
    assert launcher.fork_mode(["--insecure"], env={launcher.FORK_ENV: "1"}) == ("on", ["--insecure"])
    assert launcher.fork_mode([], env={launcher.FORK_ENV: "off"}) == ("off", [])
    assert launcher.fork_mode(["--fork=on"], env={launcher.FORK_ENV: "0"}) == ("on", [])
    assert launcher.fork_mode(["--fork", "off"], env={launcher.FORK_ENV: "1"}) == ("off", [])


def test_supernode_without_the_sleeps_fails_loudly_when_a_poll_is_asked_for(monkeypatch):
    other = types.ModuleType(flower_hooks.SUPERNODE_POLLS.module)
    other.time = object()  # a loop that sleeps some other way
    monkeypatch.setitem(sys.modules, flower_hooks.SUPERNODE_POLLS.module, other)
    with pytest.raises(HookMissingError) as err:
        supernode.install_short_polls(0.1, 0.05, required=True)
    _assert_loud(err.value, flower_hooks.SUPERNODE_POLLS)
    monkeypatch.delenv(supernode.IDLE_ENV, raising=False)
    monkeypatch.delenv(supernode.REPLY_ENV, raising=False)
    with pytest.raises(SystemExit, match="start_client_internal.time"):
        supernode.main(["--idle-poll-s", "0.2", "--insecure"])  # exits before Flower's SuperNode starts
    assert not isinstance(other.time, supernode.ShortPollTime)


def test_polls_asked_means_a_flag_or_an_env():
    assert not supernode.polls_asked(["--insecure", "--superlink", "h:1"], env={})
    assert supernode.polls_asked(["--idle-poll-s", "0.2"], env={})
    assert supernode.polls_asked(["--reply-poll-s=0.02"], env={})
    assert supernode.polls_asked([], env={supernode.IDLE_ENV: "0.3"})


def test_pulls_without_the_hook_fail_loudly_when_the_retry_is_set(monkeypatch):
    module = types.ModuleType("no_hook_module")
    module.pull_objects = lambda object_ids, pull_object_fn: {}  # no initial_backoff parameter
    monkeypatch.setitem(sys.modules, "no_hook_module", module)
    with pytest.raises(HookMissingError, match=r"no_hook_module\.pull_objects.*initial_backoff"):
        pulls.install_fast_pulls("no_hook_module", 0.01, required=True)
    with pytest.raises(HookMissingError, match="cannot import"):
        pulls.install_fast_pulls("no_such_module_here", 0.01, required=True)
    assert not pulls.install_fast_pulls("no_such_module_here", 0.01)


def test_an_unexpected_shape_counts_as_missing(monkeypatch):
    from flwr.superlink.grid import http_grid

    monkeypatch.setattr(http_grid, "pull_objects", 42)
    assert "not callable" in flower_hooks.missing(flower_hooks.SERVER_PULLS)


# ------------------------------------------------------------------------------------------
# "Are we in deployment?"
# ------------------------------------------------------------------------------------------
def test_only_flowers_http_grid_is_deployment():
    from flwr.superlink.grid import HttpGrid, InMemoryGrid

    run_serverapp = importlib.import_module("flwr.superlink.runtime.run_serverapp")
    run_simulation = importlib.import_module("flwr.simulation.run_simulation")

    # the classes Flower's runtimes hand a ServerApp: flwr-serverapp and the simulation
    assert run_serverapp.HttpGrid is HttpGrid and run_simulation.InMemoryGrid is InMemoryGrid
    assert flower_hooks.grid_in_deployment(HttpGrid(insecure=True, token="t"))  # nothing connects
    in_memory = InMemoryGrid(state_factory=types.SimpleNamespace(state=lambda: None))
    assert not flower_hooks.grid_in_deployment(in_memory)

    class HttpGridLookalike:  # a name is not a grid type
        pass

    HttpGridLookalike.__name__ = "HttpGrid"
    assert not flower_hooks.grid_in_deployment(HttpGridLookalike())

    class Subclass(HttpGrid):
        pass

    assert flower_hooks.grid_in_deployment(Subclass(insecure=True, token="t"))


def test_a_clientapp_runs_in_deployment_only_inside_flowers_run_clientapp(monkeypatch):
    """Flower's real `run_clientapp`, its I/O replaced: what the ClientApp would see."""
    from flwr.supernode.runtime import run_clientapp as rc

    assert not flower_hooks.clientapp_in_deployment()  # pytest: no Flower runtime around
    seen = []

    def pull_task_input(client):  # the first call that would reach the SuperNode
        seen.append(flower_hooks.clientapp_in_deployment())
        raise RuntimeError("no SuperNode in this test")

    class NoHeartbeat:
        def __init__(self, fn):
            self.is_running = False

        def start(self):
            pass

    monkeypatch.setattr(rc, "pull_task_input", pull_task_input)
    monkeypatch.setattr(rc, "HeartbeatSender", NoHeartbeat)
    monkeypatch.setattr(rc, "register_signal_handlers", lambda **kw: None)
    monkeypatch.setattr(rc, "event", lambda *a, **kw: None)  # no telemetry
    monkeypatch.setattr(rc, "flwr_exit", lambda **kw: None)
    rc.run_clientapp(runtime_api_address="127.0.0.1:1", token="t", insecure=True)
    assert seen == [True]
    assert not flower_hooks.clientapp_in_deployment()  # and not after it returned


def test_simulation_clientapp_is_not_in_deployment():
    """A real ClientApp run the way the simulation's Ray actors run it (their `run`, called
    here in-process)."""
    from flwr.app import Context, Message, Metadata, RecordDict
    from flwr.app.message import make_message
    from flwr.clientapp import ClientApp
    from flwr.simulation.ray_transport.ray_actor import VirtualClientEngineActor

    seen = []
    app = ClientApp()

    @app.train()
    def train(msg, context):
        seen.append(flower_hooks.clientapp_in_deployment())
        return Message(RecordDict(), reply_to=msg)

    metadata = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=0,
        dst_node_id=5,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=60,
        message_type="train",
    )
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})

    class Actor(VirtualClientEngineActor):  # ClientAppActor without Ray
        pass

    _, reply, _ = Actor().run(lambda: app, make_message(metadata=metadata, content=RecordDict()), "5", context)
    assert reply.metadata.reply_to_message_id == "m1" and seen == [False]
