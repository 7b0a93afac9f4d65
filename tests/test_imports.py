"""Layers point down (DESIGN.md principle 10): the package's import graph, read from
its source with ``ast`` (imports inside functions included), has no cycle; and the
shard store's files stay under 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "offline_rlhf"


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def imported(node: ast.AST, package: str, mods: dict) -> set[str]:
    """The package's modules one import statement loads (``from . import x`` of a
    submodule x depends on x, not on the package it sits in)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in mods}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods}
    whole = {target} if target in mods and len(subs) < len(node.names) else set()
    return subs | whole


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, (f, is_pkg) in mods.items():
        package = name if is_pkg else name.rpartition(".")[0]
        graph[name] = {m for node in ast.walk(ast.parse(f.read_text()))
                       for m in imported(node, package, mods)} - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_is_read_from_the_source():
    graph = import_graph()
    assert "offline_rlhf.storage" in graph["offline_rlhf.shards"]
    assert "offline_rlhf.shards" in graph["offline_rlhf.pipeline"]   # inside a function


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_backends_do_not_import_stages():
    graph = import_graph()
    stages = {"offline_rlhf.generation", "offline_rlhf.logprobs", "offline_rlhf.pairs",
              "offline_rlhf.rewards.score", "offline_rlhf.pipeline"}
    for name in ("offline_rlhf.backends.hf", "offline_rlhf.backends.vllm"):
        assert not graph[name] & stages, (name, graph[name] & stages)


def test_store_files_are_short():
    for name in ("shards.py", "dataset.py", "manifest.py", "storage.py", "datafiles.py"):
        lines = len((PACKAGE / name).read_text().splitlines())
        assert lines < 500, (name, lines)
