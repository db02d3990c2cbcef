"""asyncfl.deploy.pulls: the short first retry of Flower's object pulls."""

from __future__ import annotations

import importlib
import time
import types

import pytest
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects

from asyncfl.deploy import pulls


def late_object_store(ready_after_s: float):
    """A pull function whose one object becomes available `ready_after_s` after the first try,
    as a reply's contents do when the receiver sees the message before its upload ends."""
    first: list[float] = []
    tries: list[float] = []

    def pull(object_id: str) -> bytes:
        now = time.monotonic()
        first.append(first[0] if first else now)
        tries.append(now)
        if now - first[0] < ready_after_s:
            raise ObjectUnavailableError(object_id)
        return b"content"

    return pull, tries


@pytest.fixture
def fake_module(monkeypatch):
    """A module that imported Flower's `pull_objects`, as http_grid and the SuperNode loop do."""
    module = types.ModuleType("fake_flower_module")
    module.pull_objects = pull_objects
    monkeypatch.setitem(importlib.sys.modules, "fake_flower_module", module)
    return module


def test_flower_waits_a_second_for_an_object_uploaded_shortly_after(fake_module):
    fn, tries = late_object_store(0.05)
    t0 = time.monotonic()
    assert fake_module.pull_objects(["a"], pull_object_fn=fn) == {"a": b"content"}
    assert time.monotonic() - t0 >= 0.75 and len(tries) == 2  # Flower's first retry: 1 s +- 20%


def test_installed_pulls_retry_soon_and_back_off_as_before(fake_module):
    assert pulls.hook_present(fake_module)
    assert pulls.install_fast_pulls("fake_flower_module", 0.01)
    fn, tries = late_object_store(0.05)
    t0 = time.monotonic()
    assert fake_module.pull_objects(["a"], pull_object_fn=fn) == {"a": b"content"}
    took = time.monotonic() - t0
    assert 0.05 <= took < 0.5
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    assert len(gaps) >= 2 and gaps[0] < 0.1
    assert all(later > earlier * 1.2 for earlier, later in zip(gaps, gaps[1:]))  # still doubling
    # a second install replaces the setting instead of wrapping the wrapper
    assert pulls.install_fast_pulls("fake_flower_module", 0.03)
    assert fake_module.pull_objects.asyncfl_initial_s == 0.03
    assert fake_module.pull_objects.asyncfl_original is pull_objects
    # an explicit backoff from the caller wins
    fn, tries = late_object_store(0.05)
    t0 = time.monotonic()
    fake_module.pull_objects(["a"], pull_object_fn=fn, initial_backoff=0.5)
    assert time.monotonic() - t0 >= 0.35


def test_flower_modules_have_the_hook():
    for name in (pulls.SERVER_MODULE, pulls.SUPERNODE_MODULE):
        assert pulls.hook_present(importlib.import_module(name)), name


def test_a_module_without_the_hook_is_left_alone(monkeypatch, caplog):
    module = types.ModuleType("no_hook_module")
    module.pull_objects = lambda object_ids, pull_object_fn: {}  # no initial_backoff parameter
    monkeypatch.setitem(importlib.sys.modules, "no_hook_module", module)
    before = module.pull_objects
    assert not pulls.install_fast_pulls("no_hook_module", 0.01)
    assert module.pull_objects is before
    assert "keep Flower's 1 s first retry" in caplog.text
    assert not pulls.install_fast_pulls("no_hook_module", 0.0)  # 0 = Flower's own


@pytest.mark.parametrize("text", ["-1", "11", "soon", "nan"])
def test_bad_retry_setting_is_named(text):
    with pytest.raises(ValueError, match=f"ASYNCFL_PULL_RETRY_S .* got '{text}'"):
        pulls.retry_from_env({pulls.ENV: text})
    assert pulls.retry_from_env({}) == pulls.DEFAULT_INITIAL_S
    assert pulls.retry_from_env({pulls.ENV: "0"}) == 0.0
