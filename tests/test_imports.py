"""No import cycles in the package: a static check of the import graph, and a real import of every module.

A cycle hides easily behind imports inside functions (``vist2.cli`` importing a sub-command
that imports ``vist2.cli`` back works until someone moves an import to the top). The static check
reads every ``import`` in ``src/vist2`` -- at module level and inside functions -- and fails on
any cycle; the runtime check imports every module in a fresh interpreter, in a fixed order.
"""

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# modules of an optional extra -> the package they need: imported only where it is installed
OPTIONAL = {"vist2.serve.cluster": "ray"}
PACKAGE = "vist2"


def module_names(src: Path = SRC) -> dict[str, Path]:
    """``{"vist2.engine.cache": path, "vist2.engine": path/__init__.py, ...}`` for every module."""
    out = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body (top level or in a function)."""
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]  # the package relative imports start from
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module
                targets.add(base)
                # `from pkg import sub` imports the submodule pkg.sub
                targets.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (depth-first search, nodes in sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": set(), "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_import_graph_reads_relative_and_function_level_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("from .sub import tool\n")
    (pkg / "sub" / "__init__.py").write_text("from . import tool\n")
    (pkg / "sub" / "tool.py").write_text("def f():\n    from ..cli import main\n")
    graph = import_graph(module_names(tmp_path))
    assert graph == {"vist2": set(), "vist2.cli": {"vist2.sub", "vist2.sub.tool"},
                     "vist2.sub": {"vist2.sub.tool"}, "vist2.sub.tool": {"vist2.cli"}}
    assert find_cycle(graph) == ["vist2.cli", "vist2.sub", "vist2.sub.tool", "vist2.cli"]


def test_no_import_cycle_in_the_package():
    modules = module_names()
    graph = import_graph(modules)
    assert len(modules) > 30 and graph["vist2.cli"] >= {"vist2.errors", "vist2.runtime", "vist2.samples"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_every_module_imports_in_a_fresh_interpreter(order):
    """Importing each module first (in a fresh process) is where a cycle breaks; two fixed orders
    make each leaf module come before, and after, the modules that import it. (``__main__`` modules
    run their program when imported; the static check covers them.)"""
    names = sorted(n for n in module_names() if not n.endswith(".__main__")
                   and (n not in OPTIONAL or importlib.util.find_spec(OPTIONAL[n]) is not None))
    if order == "reversed":
        names.reverse()
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    r = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
