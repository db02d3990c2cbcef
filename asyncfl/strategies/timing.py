"""Where the server's wall-clock time goes: a small accumulator of named phases.

The loop is one thread: while it decodes, applies, evaluates or pushes a task, replies wait.
`PhaseTimer` sums the seconds spent in each phase (`pull`: fetching replies from the grid,
`decode`, `apply`, `eval`, `dispatch`: building and pushing task messages, `idle`: sleeping
between polls) so a run can say whether the server or the network is what clients wait for.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = ("pull", "decode", "apply", "eval", "dispatch", "idle")


class PhaseTimer:
    """Seconds and counts per phase; `phase(name)` times a block, `add` records a measured span."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.counts: dict[str, int] = dict.fromkeys(PHASES, 0)

    def add(self, name: str, seconds: float) -> None:
        if name not in self.seconds:
            raise KeyError(f"unknown server phase {name!r}; known: {', '.join(PHASES)}")
        self.seconds[name] += max(0.0, seconds)
        self.counts[name] += 1

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def summary(self) -> dict[str, dict[str, float]]:
        """{phase: {"s": total seconds, "n": times entered}} for the phases that were entered."""
        return {k: {"s": round(self.seconds[k], 3), "n": self.counts[k]} for k in PHASES if self.counts[k]}

    def describe(self, wall_s: float) -> str:
        """One log line: each phase's seconds and share of `wall_s`."""
        parts = [
            f"{k} {v['s']:.1f} s ({100 * v['s'] / wall_s:.0f}%)" if wall_s > 0 else f"{k} {v['s']:.1f} s"
            for k, v in self.summary().items()
        ]
        return ", ".join(parts) or "nothing timed"
