"""A short first retry when Flower pulls a message's objects before they are all uploaded.

In deployment (flwr 1.41-1.42) a message travels in two steps: the sender registers it (with
its tree of object ids) and then uploads the objects' contents. A receiver that polls often,
as the asynchronous server (every `poll-interval-s`) and `asyncfl-supernode` (every 0.1 s) do,
usually sees the message between the two steps; `flwr.supercore.inflatable.inflatable_utils
.pull_objects` then finds an object not there yet and retries after `PULL_INITIAL_BACKOFF`
= 1 s (doubling up to 10 s). The upload itself takes a few milliseconds to a fraction of a
second, so nearly every reply reached the server ~1 s late, and many tasks reached their node
~1 s late: measured on the 124M shape (4.7 MB replies), 1.1-1.4 s from reply to server.

`install_fast_pulls(module, initial_s)` swaps the `pull_objects` that `module` imported for
one whose first retry comes after `initial_s` (default `DEFAULT_INITIAL_S`; doubling as
before, so a really slow upload costs a handful more requests, never a failure). The ServerApp
installs it for its grid (`flwr.superlink.grid.http_grid`), `asyncfl-supernode` for its
SuperNode loop (`flwr.supernode.start_client_internal`): hooks `SERVER_PULLS` and
`SUPERNODE_PULLS` of `asyncfl.flower_hooks`. Env `ASYNCFL_PULL_RETRY_S` sets the first retry
(0 = Flower's own 1 s). On a Flower whose module has no such `pull_objects`, a set
`ASYNCFL_PULL_RETRY_S` makes it an error naming the hook; unset, it logs why and leaves Flower
unchanged.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

from asyncfl import flower_hooks

ENV = "ASYNCFL_PULL_RETRY_S"
DEFAULT_INITIAL_S = 0.02
SERVER_MODULE = flower_hooks.SERVER_PULLS.module  # flwr.superlink.grid.http_grid
SUPERNODE_MODULE = flower_hooks.SUPERNODE_PULLS.module  # flwr.supernode.start_client_internal

log = logging.getLogger(__name__)


def retry_from_env(env: dict[str, str] | None = None) -> float:
    """The first retry in seconds from `ASYNCFL_PULL_RETRY_S` (default `DEFAULT_INITIAL_S`;
    0 keeps Flower's); a clear error for anything else than a number in [0, 10]."""
    text = (os.environ if env is None else env).get(ENV, str(DEFAULT_INITIAL_S))
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 10:
        raise ValueError(f"{ENV} must be a number of seconds in [0, 10] (0 = Flower's 1 s), got {text!r}")
    return value


def _wrapped(original: Callable[..., Any], initial_s: float) -> Callable[..., Any]:
    @functools.wraps(original)
    def pull_objects(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("initial_backoff", initial_s)
        return original(*args, **kwargs)

    pull_objects.asyncfl_initial_s = initial_s  # type: ignore[attr-defined]
    pull_objects.asyncfl_original = original  # type: ignore[attr-defined]
    return pull_objects


def _hook(module_name: str) -> flower_hooks.Hook:
    for hook in (flower_hooks.SERVER_PULLS, flower_hooks.SUPERNODE_PULLS):
        if hook.module == module_name:
            return hook
    return flower_hooks.pull_objects_hook(module_name, f"a short first retry of {module_name}'s object pulls")


def hook_present(module: Any) -> bool:
    """Does `module` call a `pull_objects` that takes `initial_backoff` (flwr 1.41-1.42)?"""
    return flower_hooks.missing_in(_hook(getattr(module, "__name__", "")), module) is None


def install_fast_pulls(module_name: str, initial_s: float | None = None, required: bool = False) -> bool:
    """Make `module_name`'s object pulls retry first after `initial_s`; True if installed.
    Idempotent (a second call replaces the first's setting). Where the module has no such
    `pull_objects`: `flower_hooks.HookMissingError` if `required` (the user set
    `ASYNCFL_PULL_RETRY_S`), else a warning and False."""
    initial_s = retry_from_env() if initial_s is None else initial_s
    if initial_s <= 0:
        return False

    def apply(module: Any) -> None:
        original = getattr(module.pull_objects, "asyncfl_original", module.pull_objects)
        module.pull_objects = _wrapped(original, initial_s)

    return flower_hooks.install(
        _hook(module_name),
        apply,
        required=required,
        say=log.warning,
        fallback="object pulls keep Flower's 1 s first retry",
    )
