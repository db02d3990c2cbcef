"""Shared test fixtures: offline data paths (../shared/data) and a tiny offline config factory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from asyncfl.config import AppConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
TOKENIZER_DIR = DATA / "gpt2"
WIKITEXT_DIR = DATA / "wikitext-2-raw"

# The smallest useful offline run: tiny GPT-2, local tokenizer and WikiText, short blocks.
TINY_OFFLINE = {
    "model-preset": "tiny",
    "tokenizer": str(TOKENIZER_DIR),
    "data-dir": str(WIKITEXT_DIR),
    "device": "cpu",
    "block-size": 32,
    "batch-size": 4,
    "eval-batch-size": 8,
    "eval-max-blocks": 8,
    "max-train-blocks": 16,
    "local-steps": 4,
}


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared/ folder next to the repository (data, docs)."""
    if not DATA.is_dir():
        pytest.fail(f"offline data folder {DATA} is missing (see shared/data/README.md)")
    return SHARED


@pytest.fixture(scope="session")
def tokenizer_dir(shared_dir: Path) -> Path:
    return TOKENIZER_DIR


@pytest.fixture(scope="session")
def wikitext_dir(shared_dir: Path) -> Path:
    return WIKITEXT_DIR


def tiny_config(**overrides: Any) -> AppConfig:
    """An offline AppConfig: TINY_OFFLINE plus `overrides` (snake_case or kebab-case keys)."""
    run_config = dict(TINY_OFFLINE)
    run_config.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return AppConfig.from_run_config(run_config)


@pytest.fixture
def make_cfg(shared_dir: Path) -> Callable[..., AppConfig]:
    """Factory: `make_cfg(lora_rank=4, block_size=64)` -> validated offline AppConfig."""
    return tiny_config


@pytest.fixture(autouse=True)
def _token_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep asyncfl.data's on-disk token cache out of the home folder during tests."""
    import asyncfl.data

    monkeypatch.setattr(asyncfl.data, "DISK_CACHE_DIR", tmp_path_factory.getbasetemp() / "token-cache")


@pytest.fixture(autouse=True)
def _asyncfl_logs_reach_caplog(monkeypatch: pytest.MonkeyPatch) -> None:
    """`asyncfl.logs.setup_logging` (called by any test that runs an app) stops the "asyncfl"
    logger from propagating, after which `caplog` sees none of its records: every test starts
    with propagation on, whatever ran before it."""
    import logging

    monkeypatch.setattr(logging.getLogger("asyncfl"), "propagate", True)


@pytest.fixture
def task_identity():
    """Flower's runtime sets the process's task identity before an app runs (a Message built
    outside one needs it); do the same, and restore it afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
