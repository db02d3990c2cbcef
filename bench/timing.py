"""Timing helpers shared by the benchmarks (run as `python bench/<name>.py`, so this folder is
on the import path)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: bool = True) -> tuple[list[float], Any]:
    """Milliseconds of `repeats` device-synchronized calls (after one untimed call if `warmup`)
    and the last result."""
    out = fn() if warmup else None
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return times, out
