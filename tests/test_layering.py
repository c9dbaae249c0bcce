"""The tree is layered: model.pattern → kernels → model / parallel → trainer (and the tools above it).

Read from the source (every import, function-level ones too; no interpreter per module): a module
imports only its own layer's or lower layers' modules, the module graph has no cycle, a package's
submodules do not import the package's own ``__init__`` (a cycle through its re-exports), and the
runtime never imports the test-only oracles (transformers, datasets).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "kernels", "parallel", "trainer", "launch")
LAYERS = {"model.pattern": 0, "kernels": 1, "model": 2, "parallel": 2, "trainer": 3, "launch": 3}
SIBLINGS_APART = {("model", "parallel"), ("parallel", "model")}  # same layer, neither imports the other
TEST_ONLY = ("transformers", "datasets")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module name this file imports, anywhere in it; ``from a import b`` counts ``a.b`` when that
    is a module of the tree, else ``a``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def tree() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    mods = {module_name(p): p for p in files}
    return {m: {n for n in imports(p) if n in mods} for m, p in mods.items()}, {m: imports(p) for m, p in mods.items()}


def layer(mod: str) -> tuple[str, int]:
    """(group, layer) of a module: the longest prefix in LAYERS."""
    best = max((k for k in LAYERS if mod == k or mod.startswith(k + ".")), key=len)
    return best, LAYERS[best]


GRAPH, RAW = tree()


def test_the_tree_is_read():
    # the rules below mean something only if the walk found the packages and their edges
    assert {"kernels", "model.pattern", "parallel.sp_attention", "trainer.train"} <= set(GRAPH)
    assert "kernels.contract" in GRAPH["kernels"] and "model.pattern" in GRAPH["kernels.contract"] | GRAPH["kernels"]


@pytest.mark.parametrize("mod", sorted(m for m in GRAPH if not m.endswith("__main__")))  # commands may reach up
def test_imports_point_down(mod):
    group, lvl = layer(mod)
    bad = []
    for dep in sorted(GRAPH[mod]):
        dep_group, dep_lvl = layer(dep)
        if dep_lvl > lvl or (group, dep_group) in SIBLINGS_APART:
            bad.append(f"{mod} ({group}, layer {lvl}) imports {dep} ({dep_group}, layer {dep_lvl})")
    assert not bad, "; ".join(bad)


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(mod: str, path: tuple[str, ...]) -> None:
        if state.get(mod) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(mod):] + (mod,)))
        if state.get(mod) == 2:
            return
        state[mod] = 1
        for dep in sorted(GRAPH[mod]):
            visit(dep, path + (mod,))
        state[mod] = 2

    for mod in sorted(GRAPH):
        visit(mod, ())


def test_no_submodule_imports_its_package():
    offenders = [f"{mod} imports {pkg}" for mod, deps in GRAPH.items() for pkg in deps
                 if mod.startswith(pkg + ".") and (ROOT / pkg.replace(".", "/") / "__init__.py").read_text().strip()]
    assert not offenders, f"import the submodule, not the package __init__ that re-exports it: {offenders}"


def test_runtime_does_not_import_the_test_oracles():
    bad = [f"{mod} imports {n}" for mod, names in RAW.items() for n in names if n.split(".")[0] in TEST_ONLY]
    assert not bad, bad


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The walker sees function-level imports and the layer rule flags an upward edge."""
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from trainer.train import main\n")
    assert "trainer.train" in imports(f)
    assert layer("kernels.blocked") == ("kernels", 1) and layer("model.pattern.topk") == ("model.pattern", 0)
    assert layer("trainer.train")[1] > layer("parallel.halo")[1]


def test_trainer_rooms_form_no_cycle():
    """trainer/'s rooms (config, data, state, tools, hf and the top modules) depend one way: no two
    rooms import each other, however indirectly."""
    def room(m: str) -> str:
        return ".".join(m.split(".")[:2])

    edges: dict[str, set[str]] = {}
    for mod, deps in GRAPH.items():
        if mod.startswith("trainer."):
            edges.setdefault(room(mod), set()).update(room(d) for d in deps
                                                      if d.startswith("trainer.") and room(d) != room(mod))
    assert {"trainer.config", "trainer.data", "trainer.state", "trainer.tools"} <= set(edges)

    def reaches(a: str, b: str, seen: frozenset = frozenset()) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen | {n})) for n in edges.get(a, ()))

    loops = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if reaches(b, a))
    assert not loops, loops
