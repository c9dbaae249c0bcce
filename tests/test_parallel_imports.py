"""Imports inside ``parallel/`` point one way.

``parallel/__init__.py`` re-exports the entry points, so it imports most submodules; a submodule
that imports the package itself (``from parallel import x``) closes a cycle through that
``__init__``. Submodules import each other by full path, and those imports form no cycle either.
Read from the source (no interpreter per module): fast, and it names the offending edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "parallel"


def _module_name(path: Path) -> str:
    return "parallel" if path.stem == "__init__" else f"parallel.{path.stem}"


def _parallel_imports(path: Path) -> set[str]:
    """Every ``parallel`` module this file imports, anywhere in it (function-level imports too)."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        deps |= {n for n in names if n == "parallel" or n.startswith("parallel.")}
    return deps


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _parallel_imports(p) for p in sorted(PACKAGE.glob("*.py"))}


def test_no_submodule_imports_the_package():
    offenders = {mod: "parallel" for mod, deps in _graph().items() if mod != "parallel" and "parallel" in deps}
    assert not offenders, f"submodules importing the package __init__ (import the submodule instead): {offenders}"


def test_submodule_imports_form_no_cycle():
    graph = _graph()
    assert set().union(*graph.values()) <= set(graph), "an import names a module that is not in parallel/"
    done: set[str] = set()

    def visit(mod: str, path: tuple[str, ...]) -> None:
        if mod in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(mod):] + (mod,)))
        if mod in done:
            return
        for dep in sorted(graph[mod]):
            visit(dep, path + (mod,))
        done.add(mod)

    for mod in graph:
        visit(mod, ())
    assert done == set(graph)
