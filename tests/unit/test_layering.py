"""moecore's layers import downward only (docs: /ARCHITECTURE.md, "Layers import downward only").

Every ``moecore`` module is read with ``ast`` (nothing is imported) and its moecore-internal
imports become edges of a module graph, both module-level ones (including those under ``try`` /
``if`` and in class bodies, which run at import) and function-level ones. The tests fail on

(a) an import cycle between modules,
(b) a function-local moecore import (they exist to dodge a cycle or a layer; fix the layering),
(c) a module of a lower layer importing one of an upper layer (:data:`LAYERS`).

Imports in :data:`ALLOWED_LOCAL_IMPORTS` are left out of all three checks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "moecore"

# Layer of each top-level part of the package ("" is moecore/__init__.py). A module may import
# its own layer and the layers below it, never one above. Bottom: kernels, backends,
# parallel_state, config (ARCHITECTURE.md), plus the leaf helpers collectives, memory and the
# dataset code, which import nothing of moecore. The middle tier of ARCHITECTURE.md
# (tensor_parallel, transformer, moe) is split: tensor_parallel is below the two it serves;
# transformer and moe share a layer (MoE experts are transformer MLPs, a transformer layer
# holds an MoE layer). The schedules and the optimizer drive models, next to them.
LAYERS: dict[str, int] = {
    "": 0,
    "backends": 0,
    "batch_rampup": 0,
    "collectives": 0,
    "config": 0,
    "data": 0,
    "fp8": 0,  # FP8 recipes, scaling state and autograd ops: built on kernels, used by all GEMMs
    "kernels": 0,
    "memory": 0,
    "parallel_state": 0,
    "tensor_parallel": 1,
    "moe": 2,
    "transformer": 2,
    "models": 3,
    "optimizer": 3,
    "pipeline_parallel": 3,
    "arguments": 4,
    "checkpointing": 4,
    "convert": 4,
    "inference": 4,
    "training": 4,
}

# Compiled modules (built from csrc/ by `pip install -e .`): leaves with no moecore imports.
EXTENSION_MODULES = frozenset({"moecore.data._helpers"})

# Function-local imports allowed despite the rule, as (importing module, imported module), each
# with its reason. Empty: every moecore import is at module level. An entry whose import is gone
# fails the test, so the list cannot go stale.
ALLOWED_LOCAL_IMPORTS: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Edge:
    """``src`` imports ``dst`` at ``src_file:line``; ``local`` when inside a function."""

    src: str
    dst: str
    line: int
    local: bool


def module_names(package_dir: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` under ``package_dir``."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
             known: set[str]) -> Iterator[str]:
    """The package's modules an import statement loads (``from pkg import sub`` -> ``pkg.sub``,
    ``from pkg import name`` -> ``pkg``)."""
    root = module.split(".")[0]
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names if a.name.split(".")[0] == root)
        return
    base = node.module or ""
    if node.level:  # relative: from the importing module's package
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        pkg = pkg[:len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    if base.split(".")[0] != root:
        return
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        yield sub if sub in known else base


def _walk(node: ast.AST, local: bool) -> Iterator[tuple[ast.AST, bool]]:
    for child in ast.iter_child_nodes(node):
        inside = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield child, inside
        yield from _walk(child, inside)


def import_edges(package_dir: Path, extensions=frozenset()) -> list[Edge]:
    """Every moecore-internal import of every module under ``package_dir``."""
    files = module_names(package_dir)
    known = set(files) | set(extensions)
    edges = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, local in _walk(tree, False):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for dst in _targets(node, module, path.name == "__init__.py", known):
                    if dst != module:
                        edges.append(Edge(module, dst, node.lineno, local))
    return list(dict.fromkeys(edges))  # `from m import a, b` is one edge


def find_cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.src, set()).add(e.dst)
        graph.setdefault(e.dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str, layers: dict[str, int]) -> int:
    parts = module.split(".")
    return layers[parts[1] if len(parts) > 1 else ""]


def upward_imports(edges: list[Edge], layers: dict[str, int]) -> list[Edge]:
    return [e for e in edges if layer_of(e.src, layers) < layer_of(e.dst, layers)]


def _checked(edges: list[Edge]) -> list[Edge]:
    return [e for e in edges if (e.src, e.dst) not in ALLOWED_LOCAL_IMPORTS]


def _show(edges: list[Edge]) -> str:
    return "\n".join(f"  {e.src}:{e.line} imports {e.dst}" for e in edges)


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    found = import_edges(PACKAGE_DIR, EXTENSION_MODULES)
    assert len(found) > 100, "the walker found too few moecore imports; is PACKAGE_DIR right?"
    return found


def test_every_part_of_the_package_has_a_layer(edges):
    parts = {m.split(".")[1] if "." in m else "" for m in module_names(PACKAGE_DIR)}
    missing = sorted(parts - set(LAYERS))
    assert not missing, f"add {missing} to LAYERS in tests/unit/test_layering.py"


def test_no_import_cycles(edges):
    cycles = find_cycles(_checked(edges))
    assert not cycles, "import cycles (each group imports itself through the others):\n" + \
        "\n".join("  " + " <-> ".join(c) for c in cycles)


def test_no_function_local_moecore_imports(edges):
    local = [e for e in _checked(edges) if e.local]
    assert not local, ("function-local moecore imports; import at module level and fix the "
                       "layering instead:\n" + _show(local))


def test_layers_import_downward_only(edges):
    up = upward_imports(_checked(edges), LAYERS)
    assert not up, "imports from a lower layer into an upper one (see LAYERS):\n" + _show(up)


def test_allow_list_has_no_stale_entries(edges):
    local = {(e.src, e.dst) for e in edges if e.local}
    stale = sorted(ALLOWED_LOCAL_IMPORTS - local)
    assert not stale, f"remove these from ALLOWED_LOCAL_IMPORTS (no longer imported): {stale}"


# ---- the checks themselves, on a small synthetic package ----------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checks_catch_cycles_local_and_upward_imports(tmp_path):
    root = _package(tmp_path, {
        "low/__init__.py": "",
        "low/a.py": "from pkg.low import b\n",
        "low/b.py": "try:\n    import pkg.low.a\nexcept ImportError:\n    pass\n",
        "low/c.py": "def f():\n    from pkg.high import d\n",
        "high/__init__.py": "",
        "high/d.py": "from . import e\nfrom ..low.c import f\n",
        "high/e.py": "class E:\n    from pkg.low import c\n",
    })
    edges = import_edges(root)
    got = {(e.src, e.dst, e.local) for e in edges}
    assert got == {
        ("pkg.low.a", "pkg.low.b", False), ("pkg.low.b", "pkg.low.a", False),
        ("pkg.low.c", "pkg.high.d", True), ("pkg.high.d", "pkg.high.e", False),
        ("pkg.high.d", "pkg.low.c", False), ("pkg.high.e", "pkg.low.c", False),
    }
    assert sorted(find_cycles(edges)) == [["pkg.high.d", "pkg.high.e", "pkg.low.c"],
                                          ["pkg.low.a", "pkg.low.b"]]
    up = upward_imports(edges, {"": 0, "low": 0, "high": 1})
    assert [(e.src, e.dst) for e in up] == [("pkg.low.c", "pkg.high.d")]
