"""The package's import graph (issue 11, point 6): the store has no import cycle, and the
backbones do not import the store (a layer's shape lives in :mod:`qpacknet.layerspec`)."""

from __future__ import annotations

import ast
from pathlib import Path

import qpacknet

ROOT = Path(qpacknet.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every qpacknet module ``path`` imports, at any depth of the file (lazy imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qpacknet"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("qpacknet"))
    return found


def _graph(package: str) -> dict[str, set[str]]:
    files = {_module(p): p for p in (ROOT.parent / package.replace(".", "/")).rglob("*.py")}
    return {m: {i for i in _imports(p) if i in files and i != m} for m, p in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_store_modules_import_each_other_one_way_only() -> None:
    graph = _graph("qpacknet.store")
    assert graph["qpacknet.store"], "the package re-exports its modules"
    assert "qpacknet.store.packed" in graph and "qpacknet.store.fileformat" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_backbones_do_not_import_the_store() -> None:
    for path in (ROOT / "nets").rglob("*.py"):
        store = sorted(i for i in _imports(path) if i.startswith("qpacknet.store"))
        assert not store, f"{path.name} imports {store}"
