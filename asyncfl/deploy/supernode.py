"""`asyncfl-supernode`: Flower's SuperNode with short polls.

A deployed SuperNode (flwr 1.41-1.42, `flwr/supernode/start_client_internal.py`) runs one loop:
pull a message from the SuperLink; if there was none, `time.sleep(3)`; else wait for the
ClientApp's reply, checking every 0.5 s, and push it. An asynchronous server hands a client its
next task the moment its reply arrives, but by then that SuperNode has already asked, found
nothing and gone to sleep: every task that is not queued ahead waits 1.5 s on average (up to 3 s)
before the node even sees it, and every reply waits 0.25 s more. Queuing the next task ahead
(`prefetch`) hides the first wait at the price of staleness: the queued task starts from a model
one or more versions older.

This command is `flower-supernode` (Flower's own parser and code; every flag works the same)
with those sleeps shortened: the idle poll to `--idle-poll-s` (default 0.1 s) and the reply and
object polls to `--reply-poll-s` (default 0.05 s). Each idle poll is one small request to the
SuperLink. Env `ASYNCFL_SUPERNODE_IDLE_POLL_S` / `ASYNCFL_SUPERNODE_REPLY_POLL_S` set the same.

How: that module calls the sleeps through its module global `time`; `install_short_polls`
gives it a stand-in whose `sleep` maps Flower's 3 s idle poll and its 0.5 s polls to the short
ones and forwards everything else to `time` (hook `SUPERNODE_POLLS` of `asyncfl.flower_hooks`).
On a Flower without those sleeps it exits with an error naming the hook when a poll was asked
for (a flag or env above); otherwise it warns once and runs Flower's SuperNode unchanged. When
the polls are short it adds `idle-poll-s=<S>` to the node's `--node-config`; the ClientApp reports
it with every reply, and `prefetch = "auto"` queues no tasks ahead for such a node.

It also makes the loop's object pulls retry after 0.02 s instead of 1 s when it sees a task
before the server has finished uploading it (`asyncfl.deploy.pulls`; env `ASYNCFL_PULL_RETRY_S`).
"""

from __future__ import annotations

import os
import sys
import time as _time
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from asyncfl import flower_hooks

IDLE_ENV = "ASYNCFL_SUPERNODE_IDLE_POLL_S"
REPLY_ENV = "ASYNCFL_SUPERNODE_REPLY_POLL_S"
DEFAULT_IDLE_POLL_S = 0.1
DEFAULT_REPLY_POLL_S = 0.05
FLOWER_IDLE_POLL_S = flower_hooks.FLOWER_IDLE_POLL_S  # Flower's sleeps (3 s, 0.5 s)
FLOWER_REPLY_POLL_S = flower_hooks.FLOWER_REPLY_POLL_S
_MODULE = flower_hooks.SUPERNODE_POLLS.module
NODE_CONFIG_KEY = "idle-poll-s"  # what the node's ClientApps report (metric of the same name)


def _log(msg: str) -> None:
    print(f"[asyncfl-supernode] {msg}", file=sys.stderr, flush=True)


class ShortPollTime:
    """Stands in for the `time` module inside Flower's SuperNode loop: Flower's idle poll
    (`sleep(3)`) sleeps `idle_s`, its reply/object polls (`sleep(0.5)`) sleep `reply_s`;
    any other duration, and every other attribute, is the real `time`'s."""

    def __init__(self, idle_s: float, reply_s: float, real: Any = _time) -> None:
        self.idle_s, self.reply_s, self._real = idle_s, reply_s, real
        self.asyncfl_real = real  # what `flower_hooks` checks the stand-in against

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_POLL_S:
            seconds = self.idle_s
        elif seconds == FLOWER_REPLY_POLL_S:
            seconds = self.reply_s
        self._real.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def hook_present(module: ModuleType) -> bool:
    """Does this Flower's SuperNode loop sleep through a module-global `time` with the polls
    this command shortens? (`flower_hooks.SUPERNODE_POLLS` on `module`)"""
    return flower_hooks.missing_in(flower_hooks.SUPERNODE_POLLS, module) is None


def install_short_polls(idle_s: float, reply_s: float, required: bool = False) -> bool:
    """Shorten the SuperNode's polls in this process. Where this Flower's SuperNode has no such
    sleeps: `flower_hooks.HookMissingError` if `required`, else a message and False."""

    def apply(module: ModuleType) -> None:
        module.time = ShortPollTime(idle_s, reply_s)  # type: ignore[attr-defined]

    return flower_hooks.install(
        flower_hooks.SUPERNODE_POLLS,
        apply,
        required=required,
        say=_log,
        fallback="running Flower's SuperNode unchanged",
    )


def polls_asked(argv: list[str], env: Mapping[str, str] | None = None) -> bool:
    """Did the user set a poll (`--idle-poll-s`, `--reply-poll-s` or their env)?"""
    env = os.environ if env is None else env
    return (
        IDLE_ENV in env
        or REPLY_ENV in env
        or any(a.partition("=")[0] in ("--idle-poll-s", "--reply-poll-s") for a in argv)
    )


def _seconds(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.01 <= value <= 60:
        raise SystemExit(f"asyncfl-supernode: {what} must be a number of seconds in [0.01, 60], got {text!r}")
    return value


def parse_polls(argv: list[str], env: Mapping[str, str] | None = None) -> tuple[float, float, list[str]]:
    """Take `--idle-poll-s S` and `--reply-poll-s S` (or `--flag=S`) out of argv; the rest
    goes to `flower-supernode`."""
    env = os.environ if env is None else env
    values = {
        "--idle-poll-s": env.get(IDLE_ENV, str(DEFAULT_IDLE_POLL_S)),
        "--reply-poll-s": env.get(REPLY_ENV, str(DEFAULT_REPLY_POLL_S)),
    }
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, value = arg.partition("=")
        if flag in values:
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"asyncfl-supernode: {flag} needs a value (seconds)")
                i += 1
                value = argv[i]
            values[flag] = value
        else:
            rest.append(arg)
        i += 1
    return (
        _seconds(values["--idle-poll-s"], "--idle-poll-s"),
        _seconds(values["--reply-poll-s"], "--reply-poll-s"),
        rest,
    )


def announce_poll(argv: list[str], idle_s: float) -> list[str]:
    """Add `idle-poll-s=<idle_s>` to the SuperNode's `--node-config`, so its ClientApps can tell
    the server that this node notices a new task within `idle_s` (the server then has no reason
    to queue tasks ahead for it; see `prefetch` in the README)."""
    entry = f"{NODE_CONFIG_KEY}={idle_s:g}"
    out, found = list(argv), False
    for i, arg in enumerate(out):
        if arg == "--node-config" and i + 1 < len(out):
            out[i + 1] = f"{out[i + 1]} {entry}".strip()
            found = True
        elif arg.startswith("--node-config="):
            out[i] = f"{arg} {entry}"
            found = True
    return out if found else [*out, "--node-config", entry]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    idle_s, reply_s, rest = parse_polls(argv)
    if any(a in ("-h", "--help") for a in rest):
        print(
            "asyncfl-supernode: flower-supernode with short polls. Extra flags: --idle-poll-s S\n"
            f"(default {DEFAULT_IDLE_POLL_S}; Flower: 3) and --reply-poll-s S (default "
            f"{DEFAULT_REPLY_POLL_S}; Flower: 0.5).\nAll other flags are flower-supernode's:\n",
            flush=True,
        )
    try:
        installed = install_short_polls(idle_s, reply_s, required=polls_asked(argv))
    except flower_hooks.HookMissingError as exc:
        raise SystemExit(f"asyncfl-supernode: {exc}; run flower-supernode for Flower's own polls") from None
    if installed:
        _log(f"idle poll {idle_s:g} s, reply poll {reply_s:g} s (Flower's: 3 s, 0.5 s)")
        from asyncfl.deploy.pulls import ENV, SUPERNODE_MODULE, install_fast_pulls, retry_from_env

        try:
            retry_s = retry_from_env()
            fast = install_fast_pulls(SUPERNODE_MODULE, retry_s, required=ENV in os.environ)
        except (ValueError, flower_hooks.HookMissingError) as exc:
            raise SystemExit(f"asyncfl-supernode: {exc}") from None
        if fast:
            _log(f"task objects not yet uploaded are retried after {retry_s:g} s (Flower: 1 s)")
        if not any(a in ("-h", "--help") for a in rest):
            rest = announce_poll(rest, idle_s)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
