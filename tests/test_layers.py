"""Layers: the asyncfl modules import one another top-down, with no cycle.

The import graph is read from the source (AST), so it holds every `import asyncfl...` and
`from asyncfl... import` (and relative) statement, at module level, inside functions and under
`if TYPE_CHECKING:` alike: a lazy import that closes a cycle still counts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "asyncfl"
SUBPACKAGES = ("asyncfl.client", "asyncfl.strategies", "asyncfl.compressors", "asyncfl.deploy")  # one layer each
CLIENT = ("asyncfl.client",)
SERVER = ("asyncfl.server_app", "asyncfl.strategies")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _owner(name: str, modules: dict[str, Path]) -> str:
    """The module a dotted import name lands in (`asyncfl.config.AppConfig` -> `asyncfl.config`)."""
    while name not in modules:
        name = name.rpartition(".")[0]
    return name


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """module -> the asyncfl modules it imports. Importing `asyncfl.strategies.rules` from
    outside `asyncfl.strategies` also runs `asyncfl/strategies/__init__.py`: an edge to it."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                names = [f"{prefix}.{a.name}" for a in node.names]  # a submodule or a name in it
            else:
                continue
            for name in names:
                if name.split(".")[0] != "asyncfl":
                    continue
                target = _owner(name, modules)
                for t in [*_ancestors(target), target]:
                    if t != "asyncfl" and t != mod and t not in _ancestors(mod):
                        graph[mod].add(t)
    return graph


def layer_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph with each subpackage collapsed into one node (edges inside it dropped)."""

    def layer(m: str) -> str:
        return next((p for p in SUBPACKAGES if m == p or m.startswith(p + ".")), m)

    out: dict[str, set[str]] = {}
    for m, targets in graph.items():
        out.setdefault(layer(m), set()).update(layer(t) for t in targets if layer(t) != layer(m))
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return path[path.index(t) :] + [t]
            if t not in state and (found := visit(t)) is not None:
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)) is not None:
            return found
    return None


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for t in graph[todo.pop()] - seen:
            seen.add(t)
            todo.append(t)
    return seen


def test_scanner_sees_lazy_relative_and_package_imports():
    graph = import_graph()
    assert "asyncfl.compressors.codec" in graph["asyncfl.compressors.base"]  # `from . import codec`
    assert "asyncfl.server_app" in graph["asyncfl.emulate"]  # inside a function
    assert "asyncfl.strategies" in graph["asyncfl.server_app"]  # the package's __init__ runs
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_modules_have_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_layers_have_no_import_cycle():
    """With asyncfl.strategies and asyncfl.compressors as one node each: no cycle either
    (e.g. config -> strategies -> config through another of its modules)."""
    cycle = find_cycle(layer_graph(import_graph()))
    assert cycle is None, "import cycle between layers: " + " -> ".join(cycle or [])


def _side(m: str, side: tuple[str, ...]) -> bool:
    return any(m == s or m.startswith(s + ".") for s in side)


def test_client_and_server_sides_do_not_import_each_other():
    """What both sides need (config, wire, protocol, tensors, compressors, ...) lies below
    both; only the emulator (and the tests) put them together."""
    graph = import_graph()
    for mine, other, what in ((CLIENT, SERVER, "server"), (SERVER, CLIENT, "client")):
        for m in [m for m in graph if _side(m, mine)]:
            bad = sorted(t for t in _reachable(graph, m) if _side(t, other))
            assert not bad, f"{m} imports {what} modules {bad}"


def test_client_app_module_loads_no_torch():
    """A per-message `flwr-clientapp` process imports the ClientApp module: it stays light."""
    code = "import asyncfl.client.app, sys; assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
