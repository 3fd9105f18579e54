"""The code's shape, as ARCHITECTURE.md asks: modules of at most 400 lines, no import circle among
icepop's modules (lazy and type-checking imports count too). (That icepop.algo imports no framework
is tested in test_metrics_and_api.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "icepop"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """icepop module → the icepop modules it imports anywhere in its text."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names}
        graph[name] = {module for module in found if module in paths and module != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_module_is_longer_than_the_guide() -> None:
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}  # fmt: skip
    assert not long, f"split by responsibility (≤ {MAX_LINES} lines): {long}"


def test_no_import_circle() -> None:
    assert import_graph()["icepop.stages.rl"] >= {"icepop.stages.checkpoint", "icepop.config"}  # sees imports
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]  # finds circles
    assert cycles(import_graph()) == []


def placement_readers() -> set[str]:
    """The icepop modules whose code reads `<x>.cluster.placement` or `<x>.colocated`."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and (
                node.attr == "colocated"
                or (
                    node.attr == "placement"
                    and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "cluster"
                )
            ):
                found.add(module_name(path))
    return found


def test_only_the_engine_placements_read_the_placement() -> None:
    """cluster.placement is read once, by icepop.ray.engine_placement's factory; everything else asks
    the strategy it returns (the config package itself checks and describes its own field)."""
    readers = placement_readers()
    assert "icepop.ray.engine_placement" in readers  # the test sees what it looks for
    assert readers - {"icepop.ray.engine_placement"} <= {"icepop.config.rollout", "icepop.config.derived"}, (
        readers
    )


def test_the_probe_needs_nothing_from_ray() -> None:
    assert not any(module.startswith("icepop.ray") for module in import_graph()["icepop.weights"])
