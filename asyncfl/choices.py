"""The name sets that the run config and the registries share, each written once as a `Literal`.

A run-config key whose value is one of these names (`rule`, `compressor`, `staleness`,
`selection`, `compress-method`, `wire-dtype`, `row-select`) has the alias as its type in
`asyncfl.config`, and the registry that builds the named object (`asyncfl.strategies.registry`,
`asyncfl.strategies.staleness`, `asyncfl.strategies.selection`, `asyncfl.compressors`) checks at
import that its names are the alias's arguments, in the same order. `choices(alias)` gives the
names as a tuple; `check_choice` is the one "must be one of" message of the config and of the
library builders. The module imports nothing (no torch): the ClientApp loads it through the config.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

RuleName = Literal["fedasync", "fedbuff", "asgd", "dn", "fadas", "shifted", "saga", "saga-est", "page"]
"""The async rules (`rule`); sync mode uses FedAvg."""
CompressorName = Literal["none", "pca", "qrcp", "cur"]
"""Delta encodings (`compressor`); "none" sends every tensor dense."""
CompressMethod = Literal["exact", "randomized"]
"""How the low-rank factors are computed (`compress-method`, compressor option `method`)."""
WireDtype = Literal["fp16", "fp32"]
"""Dtype of the factors on the wire (`wire-dtype`, compressor option `dtype`)."""
RowSelect = Literal["greedy", "pivoted", "uniform", "leverage"]
"""CUR row selection (`row-select`, compressor option `row_select`)."""
StalenessKind = Literal["constant", "polynomial", "hinge"]
"""Staleness weights s(tau) (`staleness`)."""
SelectionName = Literal["same", "uniform", "loss-biased", "time-aware"]
"""Client selectors (`selection`)."""


def choices(alias: Any) -> tuple[str, ...]:
    """The names of a `Literal` alias, in the order written."""
    return tuple(get_args(alias))


def one_of(names: tuple[str, ...]) -> str:
    """What a choice accepts, as every message says it: "one of 'a', 'b'"."""
    return "one of " + ", ".join(repr(n) for n in names)


def check_choice(what: str, value: object, names: tuple[str, ...]) -> None:
    """Raise `ValueError` "`what` must be one of 'a', 'b', got 'x'" unless `value` is in `names`."""
    if value not in names:
        raise ValueError(f"{what} must be {one_of(names)}, got {value!r}")
