"""The package's modules import each other without cycles (data flows model -> generate -> quantize -> export,
and the CLI and the demo sit side by side on top of zsq_fast.pipeline).

Static: every import statement of every module under zsq_fast/, those inside functions too (a lazy
import hides a cycle from the interpreter but not from the design), resolved to modules; the graph must
be acyclic. Dynamic: each of the modules that used to be in a cycle imported first in a fresh interpreter.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "zsq_fast"


def module_files(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """dotted module name -> (file, is_package)."""
    mods = {}
    for path in (root / PKG).rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def import_graph(mods: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """module -> the package modules it imports (`from .pkg import name` is the submodule pkg.name when
    that is a module, else pkg). A submodule's implicit import of its parent package is not an edge."""
    graph = {}
    for name, (path, is_pkg) in mods.items():
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    targets.add(sub if sub in mods else target)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, grey/black marking)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = visit(v)
                if found:
                    return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state:
            found = visit(u)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_resolves_relative_and_lazy_imports():
    graph = import_graph(module_files())
    assert "zsq_fast.pipeline" in graph["zsq_fast.cli"]
    assert "zsq_fast.pipeline" in graph["zsq_fast.demo.run"]
    assert "zsq_fast.quantize.onnx_qdq" in graph["zsq_fast.quantize.modules"]  # imported inside forward()


def test_no_import_cycles():
    cycle = find_cycle(import_graph(module_files()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_demo_does_not_import_the_cli():
    """The CLI runs the demo; the demo uses what it shares with the CLI from zsq_fast.pipeline."""
    graph = import_graph(module_files())
    demo_imports = {t for m, ts in graph.items() if m.startswith("zsq_fast.demo") for t in ts}
    assert "zsq_fast.cli" not in demo_imports


def test_finds_the_old_demo_cli_cycle(tmp_path):
    """The check sees a cycle of the kind that existed (demo.run importing the CLI lazily)."""
    pkg = tmp_path / PKG
    (pkg / "demo").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("def cmd_demo():\n    from .demo import run_demo\n")
    (pkg / "demo" / "__init__.py").write_text("from .run import run_demo\n")
    (pkg / "demo" / "run.py").write_text("def run_demo():\n    from ..cli import parse_bits\n")
    cycle = find_cycle(import_graph(module_files(tmp_path)))
    assert cycle is not None and "zsq_fast.cli" in cycle and "zsq_fast.demo.run" in cycle


@pytest.mark.parametrize("first", ["zsq_fast.demo.run", "zsq_fast.pipeline", "zsq_fast.report",
                                   "zsq_fast.quantize.export", "zsq_fast.quantize.modules"])
def test_fresh_interpreter_imports_module_first(first):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = f"import importlib; importlib.import_module({first!r}); import zsq_fast.cli, zsq_fast.demo"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
