"""Checks and copies of state dicts (name -> tensor) and of their coefficients.

Shared by the server's update rules (`asyncfl.strategies.rules`) and the client's state
(`asyncfl.client.state`), so neither imports the other for them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, overload

from torch import Tensor

State = dict[str, Tensor]
Tensors = Mapping[str, Tensor]


def aligned(ref: Tensors, other: Any, what: str) -> list[Tensor]:
    """Validate ``other`` against ``ref``; its tensors in ref's order/device/dtype."""
    if not ref:
        raise ValueError("the global state is empty: no trainable tensors to update")
    if not isinstance(other, Mapping):
        kind = type(other).__name__
        raise ValueError(f"{what} must be a dict of tensors, got {kind}")
    missing = [k for k in ref if k not in other]
    extra = [k for k in other if k not in ref]
    if missing or extra:
        raise ValueError(f"{what} keys differ from the global state: missing {missing[:5]}, unexpected {extra[:5]}")
    out = []
    for k, r in ref.items():
        t = other[k]
        if not isinstance(t, Tensor):
            raise ValueError(f"{what}[{k!r}] must be a tensor, got {type(t).__name__}")
        if t.shape != r.shape:
            raise ValueError(f"{what}[{k!r}] has shape {tuple(t.shape)}, the global tensor has {tuple(r.shape)}")
        out.append(t.to(device=r.device, dtype=r.dtype))
    return out


def check_real(name: str, value: Any, low: float, high: float, open_low: bool) -> float:
    """`value` as a float, checked to be a real number in [low, high] ((low, high] with
    `open_low`); a ValueError naming `name` otherwise."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (low < value if open_low else low <= value)
    if not ok or not value <= high:
        interval = "(" if open_low else "["
        interval += f"{low}, {high}" + ("]" if high < math.inf else ")")
        raise ValueError(f"`{name}` must be in {interval}, got {value!r}")
    return float(value)


@overload
def copy_state(d: Tensors) -> State: ...
@overload
def copy_state(d: None) -> None: ...
@overload
def copy_state(d: Tensors | None) -> State | None: ...
def copy_state(d: Tensors | None) -> State | None:
    """Detached copies of the tensors (None stays None)."""
    return None if d is None else {k: v.detach().clone() for k, v in d.items()}
