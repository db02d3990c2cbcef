"""The one seam between asyncfl and Flower's internals (no torch; imports nothing of Flower
until a hook is used).

asyncfl uses a few parts of flwr that are not public API. Each is a `Hook` here, named once:
the module and attribute, what asyncfl expects of it, what uses it, and the flwr versions it was
verified on (`VERIFIED`; CI runs tests/test_flower_hooks.py on each). `install(hook, apply)` checks
the hook and applies asyncfl's change; on a flwr without the hook it either

* raises `HookMissingError` (the hook, the installed flwr, the supported range) when the user
  asked for the behaviour explicitly (`required=True`: e.g. `asyncfl-superexec --fork on`), or
* logs one warning and leaves Flower unchanged (the default).

The hooks:

* `EXECUTOR` and `CLIENTAPP_RUNTIME`: `asyncfl-superexec` (asyncfl/deploy/launcher.py) wraps the SuperExec's
  `get_executor` and runs ClientApp tasks through Flower's `run_clientapp` in forked children.
* `SUPERNODE_POLLS`: `asyncfl-supernode` (asyncfl/deploy/supernode.py) swaps the module-global `time` of
  the SuperNode loop to shorten its 3 s idle poll and 0.5 s reply poll.
* `SERVER_PULLS`, `SUPERNODE_PULLS`: asyncfl/deploy/pulls.py swaps the `pull_objects` of the ServerApp's
  HTTP grid and of the SuperNode loop for one with a short first retry.
* `HTTP_GRID`: the grid class of a deployed ServerApp (below).

"Are we in deployment?" is answered here, once per side:

* server: `grid_in_deployment(grid)`: the grid is (a subclass of) Flower's `HttpGrid`, the grid
  `flwr-serverapp` builds against the SuperLink; simulation hands an `InMemoryGrid`.
* client: `clientapp_in_deployment()`: this call runs inside Flower's `run_clientapp`, the
  function every deployed ClientApp process runs its task in (whatever started the process:
  `flwr-clientapp`, a Kubernetes pod, `asyncfl-superexec`'s fork); in simulation a Ray actor calls
  the ClientApp directly.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType, ModuleType
from typing import Any

SUPPORTED = ">=1.41,<1.43"  # pyproject.toml's flwr pin
VERIFIED = ("1.41.0", "1.42.0")  # tests/test_flower_hooks.py passes on each (.ci/run)

_log = logging.getLogger("asyncfl")


class HookMissingError(RuntimeError):
    """A Flower internal that an explicitly requested behaviour needs is missing."""


@dataclass(frozen=True)
class Hook:
    """One Flower internal asyncfl relies on."""

    name: str
    module: str
    attribute: str
    expects: str  # what asyncfl relies on, in words
    used_by: str  # the behaviour that needs it
    check: Callable[[ModuleType], str | None]  # None: as expected; else why not

    @property
    def where(self) -> str:
        return f"{self.module}.{self.attribute}"


def flwr_version() -> str:
    try:
        from importlib.metadata import version

        return version("flwr")
    except Exception:  # noqa: BLE001 - a version is only reported
        return "unknown"


def missing(hook: Hook) -> str | None:
    """Why the installed flwr lacks `hook` (None: it has it, as expected)."""
    try:
        module = importlib.import_module(hook.module)
    except ImportError as exc:
        return f"cannot import {hook.module}: {exc}"
    return missing_in(hook, module)


def missing_in(hook: Hook, module: Any) -> str | None:
    """Why `module` (the hook's module, or a stand-in for it) lacks `hook`; None: it has it."""
    if not hasattr(module, hook.attribute):
        return f"{hook.module} has no `{hook.attribute}`"
    try:
        return hook.check(module)
    except Exception as exc:  # noqa: BLE001 - an unexpected shape is a missing hook
        return f"unexpected {hook.where}: {type(exc).__name__}: {exc}"


def missing_message(hook: Hook, reason: str) -> str:
    return (
        f"{hook.used_by} needs Flower's {hook.where} ({hook.expects}); flwr {flwr_version()} "
        f"lacks it: {reason}. asyncfl supports flwr{SUPPORTED} (these hooks verified on "
        f"{', '.join(VERIFIED)})"
    )


def available(
    hooks: Sequence[Hook],
    *,
    required: bool = False,
    fallback: str = "running Flower unchanged",
    say: Callable[[str], Any] | None = None,
) -> bool:
    """True when the installed flwr has every hook in `hooks`. Otherwise: `HookMissingError`
    when `required`, else one warning through `say` (default: the "asyncfl" logger) ending in
    `fallback` (what happens instead), and False."""
    for hook in hooks:
        reason = missing(hook)
        if reason is None:
            continue
        text = missing_message(hook, reason)
        if required:
            raise HookMissingError(text)
        (say or _log.warning)(f"{text}; {fallback}")
        return False
    return True


def install(
    hook: Hook,
    apply: Callable[[ModuleType], None],
    *,
    needs: Sequence[Hook] = (),
    required: bool = False,
    fallback: str = "running Flower unchanged",
    say: Callable[[str], Any] | None = None,
) -> bool:
    """Check `hook` (and the hooks in `needs`), then `apply(module)` to `hook`'s module. True if
    applied; a missing hook raises or warns as in `available`, and Flower is left unchanged."""
    if not available([hook, *needs], required=required, fallback=fallback, say=say):
        return False
    apply(importlib.import_module(hook.module))
    return True


def _missing_params(fn: Any, names: Sequence[str], where: str) -> str | None:
    fn = getattr(fn, "asyncfl_original", fn)  # asyncfl's own wrapper: check what it wraps
    if not callable(fn):
        return f"{where} is not callable"
    params = inspect.signature(fn).parameters
    lacking = [n for n in names if n not in params]
    return f"{where}() has no parameter(s) {', '.join(lacking)}" if lacking else None


# ------------------------------------------------------------------------------------------
# The hooks
# ------------------------------------------------------------------------------------------
# what ForkingExecutor reads of every ExecutionSpec
SPEC_FIELDS = (
    "task_type",
    "runtime_api_address",
    "token",
    "insecure",
    "root_certificates_path",
    "parent_pid",
    "runtime_dependency_install",
)
RUN_CLIENTAPP_PARAMS = (
    "runtime_api_address",
    "token",
    "insecure",
    "certificates",
    "parent_pid",
    "runtime_dependency_install",
)


def _check_executor(module: ModuleType) -> str | None:
    from flwr.supercore import constant
    from flwr.supercore.superexec.executor import subprocess_executor, types

    if not hasattr(constant, "ExecutorType") or not hasattr(constant.ExecutorType, "SUBPROCESS"):
        return "flwr.supercore.constant has no ExecutorType.SUBPROCESS"
    if not hasattr(getattr(constant, "TaskType", None), "CLIENT_APP"):
        return "flwr.supercore.constant has no TaskType.CLIENT_APP"
    if not inspect.isclass(getattr(subprocess_executor, "SubprocessExecutor", None)):
        return "flwr.supercore.superexec.executor.subprocess_executor has no SubprocessExecutor"
    result = getattr(types, "LaunchResult", None)
    if not callable(getattr(result, "accepted", None)):
        return "flwr.supercore.superexec.executor.types has no LaunchResult.accepted()"
    spec = getattr(types, "ExecutionSpec", None)
    fields = {f.name for f in dataclasses.fields(spec)} if dataclasses.is_dataclass(spec) else set()
    lacking = [f for f in SPEC_FIELDS if f not in fields]
    if lacking:
        return f"ExecutionSpec has no field(s) {', '.join(lacking)}"
    fn = getattr(module.get_executor, "asyncfl_original", module.get_executor)
    if not callable(fn):
        return "get_executor is not callable"
    first = next(iter(inspect.signature(fn).parameters.values()), None)
    if first is None or first.kind not in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD):
        return "get_executor() does not take the executor type as its first argument"
    return None


EXECUTOR = Hook(
    name="superexec-executor",
    module="flwr.supercore.superexec.run_superexec",
    attribute="get_executor",
    expects="called by the SuperExec as get_executor(executor_type, ...) to build its executor, "
    "SubprocessExecutor for ExecutorType.SUBPROCESS, with ExecutionSpec fields "
    f"{', '.join(SPEC_FIELDS)} and LaunchResult.accepted()",
    used_by="asyncfl-superexec's forked ClientApp processes (--fork on, ASYNCFL_FORK)",
    check=_check_executor,
)

CLIENTAPP_RUNTIME = Hook(
    name="clientapp-runtime",
    module="flwr.supernode.runtime.run_clientapp",
    attribute="run_clientapp",
    expects=f"the function a deployed ClientApp process runs its task in, taking {', '.join(RUN_CLIENTAPP_PARAMS)}",
    used_by="asyncfl-superexec's forked ClientApp processes and the ClientApp's deployment check",
    check=lambda m: _missing_params(m.run_clientapp, RUN_CLIENTAPP_PARAMS, "run_clientapp"),
)

FLOWER_IDLE_POLL_S = 3.0  # the sleeps in flwr/supernode/start_client_internal.py (1.41, 1.42)
FLOWER_REPLY_POLL_S = 0.5


def _check_polls(module: ModuleType) -> str | None:
    current = module.time
    if getattr(current, "asyncfl_real", current) is not time:  # asyncfl's stand-in wraps `time`
        return f"its `time` is {current!r}, not the time module"
    source = inspect.getsource(module)
    for s in (FLOWER_IDLE_POLL_S, FLOWER_REPLY_POLL_S):
        if f"time.sleep({s:g})" not in source:
            return f"no `time.sleep({s:g})` in its source"
    return None


SUPERNODE_POLLS = Hook(
    name="supernode-polls",
    module="flwr.supernode.start_client_internal",
    attribute="time",
    expects=f"the SuperNode loop sleeps through its module-global `time`: time.sleep({FLOWER_IDLE_POLL_S:g}) "
    f"when idle, time.sleep({FLOWER_REPLY_POLL_S:g}) between reply and object polls",
    used_by="asyncfl-supernode's short polls (--idle-poll-s, --reply-poll-s)",
    check=_check_polls,
)


def pull_objects_hook(module: str, used_by: str) -> Hook:
    """The `pull_objects` that `module` imported from flwr.supercore.inflatable.inflatable_utils."""
    return Hook(
        name=f"pull-objects:{module}",
        module=module,
        attribute="pull_objects",
        expects="the function it pulls a message's objects with, taking initial_backoff (its first "
        "retry, 1 s) and doubling it",
        used_by=used_by,
        check=lambda m: _missing_params(m.pull_objects, ("initial_backoff",), "pull_objects"),
    )


SERVER_PULLS = pull_objects_hook(
    "flwr.superlink.grid.http_grid", "the ServerApp's short first retry of object pulls (ASYNCFL_PULL_RETRY_S)"
)
SUPERNODE_PULLS = pull_objects_hook(
    "flwr.supernode.start_client_internal",
    "asyncfl-supernode's short first retry of object pulls (ASYNCFL_PULL_RETRY_S)",
)

HTTP_GRID = Hook(
    name="http-grid",
    module="flwr.superlink.grid",
    attribute="HttpGrid",
    expects="the Grid class flwr-serverapp hands a ServerApp in deployment (simulation: InMemoryGrid)",
    used_by="the ServerApp's deployment check (prefetch, pack and downlink 'auto', object-pull retry)",
    check=lambda m: None if inspect.isclass(m.HttpGrid) else "HttpGrid is not a class",
)

HOOKS = (EXECUTOR, CLIENTAPP_RUNTIME, SUPERNODE_POLLS, SERVER_PULLS, SUPERNODE_PULLS, HTTP_GRID)


# ------------------------------------------------------------------------------------------
# "Are we in deployment?"
# ------------------------------------------------------------------------------------------
_warned: set[str] = set()


def grid_in_deployment(grid: Any) -> bool:
    """The ServerApp's grid talks to a SuperLink (`flwr-serverapp`, deployment): it is Flower's
    `HttpGrid`. Simulation's `InMemoryGrid` and any other grid (tests, the emulator) are not."""
    if missing(HTTP_GRID) is not None:
        if HTTP_GRID.name not in _warned:
            _warned.add(HTTP_GRID.name)
            available([HTTP_GRID], fallback="treating the grid as simulation's")
        return False
    from flwr.superlink.grid import HttpGrid

    return isinstance(grid, HttpGrid)


def clientapp_in_deployment() -> bool:
    """This call runs inside Flower's `run_clientapp`, i.e. in a per-task ClientApp process of
    the deployment runtime (not in a simulation's long-lived Ray actor)."""
    module = sys.modules.get(CLIENTAPP_RUNTIME.module)  # never imported: not a ClientApp process
    code = getattr(getattr(module, CLIENTAPP_RUNTIME.attribute, None), "__code__", None)
    if code is None:
        return False
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False
