"""The import graph of src/dppo (issue 23): no circles between modules, and no import from a lower floor to a higher
one. Read from the source with ``ast`` (function-local imports count; imports under ``if TYPE_CHECKING:`` are type
hints, not dependencies, and are left out).

Floors, bottom up (a module may import its own floor and the floors below):
  0 core       the loss and its parts: dppo.<module> (divergence, trust_region, parts, methods, loss, fused, …, rollout)
  1 models     dppo.hf, dppo.tasks
  2 engines    dppo.engines
  3 rundir     dppo.rundir (the run directory's files)
  4 checkpoint dppo.checkpoint (one interface, the local and sharded stores)
  5 report     dppo.report
  6 run        dppo.run (the recipe: cli, config, validate, loop, trainer; and torchrun's distributed)
  7 apps       dppo.integrations, dppo.demo, dppo.__main__
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
FLOORS = {"hf": 1, "tasks": 1, "engines": 2, "rundir": 3, "checkpoint": 4, "report": 5, "run": 6,
          "integrations": 7, "demo": 7, "__main__": 7}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((SRC / "dppo").rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _runtime_imports(tree: ast.AST):
    """Import nodes, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def graph() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                targets = [a.name for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("dppo"):
                    deps.add(t)
        edges[name] = deps
    return edges


def floor(module: str) -> int:
    parts = module.split(".")
    return FLOORS.get(parts[1], 0) if len(parts) > 1 else 0


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    edges = graph()
    # a few known edges, so that an empty graph (a parser that reads nothing) cannot pass the tests below
    assert "dppo.methods" in edges["dppo.token_loss"]
    assert "dppo.checkpoint.store" in edges["dppo.checkpoint.sharded"]
    assert "dppo.report.plot" in edges["dppo.run.cli"]
    assert "dppo.methods" not in edges["dppo.parts"]  # a TYPE_CHECKING import only


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_upward_imports():
    edges = graph()
    upward = sorted(f"{m} (floor {floor(m)}) -> {d} (floor {floor(d)})" for m, ds in edges.items() for d in ds
                    if floor(d) > floor(m))
    assert upward == []


@pytest.mark.parametrize("module", ["dppo.loss", "dppo.divergence", "dppo.trust_region", "dppo.methods"])
def test_the_loss_needs_no_trainer(module):
    """A user who copies the loss into their own trainer needs the core floor only."""
    edges = graph()
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        for d in edges[m] - seen:
            seen.add(d)
            todo.append(d)
    assert {d for d in seen if floor(d) > 0} == set()
