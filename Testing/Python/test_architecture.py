"""The import structure of the ``basalseg`` package: imports run one way.

The graph is read statically (``ast``) from every ``.py`` file under ``BasalSegSAM/basalseg``:
every ``import`` and ``from ... import`` anywhere in a file counts, at module level or inside a
function (a lazy import is still a dependency; it only moves the moment it is paid), except
under ``if TYPE_CHECKING:``. Relative imports are resolved against the file's package;
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``. An
import of ``a.b.c`` is an edge to ``a.b.c`` only, not to the packages above it.

Checked:

* no import cycle between ``basalseg`` modules (every cycle is reported, one path per strongly
  connected group);
* the command line is the top layer: no module outside ``basalseg.commands`` imports
  ``basalseg.commands`` (or the old ``basalseg.cli``), and only ``basalseg.commands`` uses
  ``argparse`` (:data:`ARGPARSE_ALLOWED` names any exception, with its reason).

Run as a script (``python Testing/Python/test_architecture.py [PACKAGE_DIR]``) to print the
report for another tree, e.g. an older checkout.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "BasalSegSAM" / "basalseg"

#: modules outside ``basalseg.commands`` allowed to import argparse, with the reason. Empty: the
#: library modules take plain keyword arguments; the commands translate options into them.
ARGPARSE_ALLOWED: dict[str, str] = {}

#: the command-line layer: only it may import itself and argparse.
COMMANDS = "basalseg.commands"

#: entry points that may import the command layer, with the reason.
ENTRY_POINTS: dict[str, str] = {"basalseg.__main__": "``python -m basalseg`` is the command line"}


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``package_dir`` (a package's
    ``__init__.py`` is the package itself)."""
    root = package_dir.parent
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (never run)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imports_of(name: str, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """``(imported name, line)`` for every import in module ``name`` (absolute dotted names,
    including modules outside the package such as ``argparse``)."""
    tree = ast.parse(modules[name].read_text(encoding="utf-8"), filename=str(modules[name]))
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    skip = _type_checking_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in modules else target, node.lineno))
    return found


def import_graph(package_dir: Path = PACKAGE_DIR) -> tuple[dict[str, set[str]], dict[str, list[tuple[str, int]]]]:
    """``(edges, all_imports)``: module -> the package modules it imports; module -> every import."""
    modules = module_names(package_dir)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    every: dict[str, list[tuple[str, int]]] = {}
    for m in modules:
        every[m] = imports_of(m, modules)
        for target, _ in every[m]:
            if target in modules and target != m:
                edges[m].add(target)
    return edges, every


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles ``[a, b, ..., a]``: in each strongly connected group of more than one module
    (Tarjan), a shortest cycle through each of its modules (the same cycle listed once)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # recursion depth is bounded by the package's size
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    found, seen = [], set()
    for group in sorted(groups):
        for start in group:
            cycle = _shortest_cycle(start, set(group), edges)
            key = frozenset(zip(cycle, cycle[1:]))
            if key not in seen:
                seen.add(key)
                found.append(cycle)
    return found


def _shortest_cycle(start: str, members: set[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through ``start`` inside a strongly connected group (breadth first)."""
    previous: dict[str, str] = {}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges[v] & members):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, v, start]
            if w not in previous:
                previous[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover - a group always has one


def layer_violations(every: dict[str, list[tuple[str, int]]], modules: dict[str, Path]) -> list[str]:
    """Library modules importing the command layer, or argparse outside it."""
    problems = []
    for m, found in sorted(every.items()):
        if m == COMMANDS or m.startswith(COMMANDS + ".") or m in ENTRY_POINTS:
            continue
        for target, line in found:
            if target == COMMANDS or target.startswith(COMMANDS + ".") or target in ("basalseg.cli",):
                problems.append(f"{modules[m].name} ({m}) line {line} imports {target}: only the command layer may")
            elif target.split(".")[0] == "argparse" and m not in ARGPARSE_ALLOWED:
                problems.append(f"{modules[m].name} ({m}) line {line} imports argparse: options belong in {COMMANDS}")
    return problems


#: the layers of docs/ARCHITECTURE.md, lowest first: a module may import its own layer and the
#: layers below, never one above. A module is placed by its longest listed prefix; a new module
#: outside every prefix fails the test until it is given a layer (here and in the doc).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("basalseg", "errors", "options", "structures", "spatial", "imageio", "intensity", "metrics",
              "progress", "staging", "outputs", "download", "catalogue", "data.atlas", "data.cohort",
              "data.settings")),
    ("stages", ("prompter", "prompts", "foundation", "sdm", "student", "networks", "weights", "calibration",
                "uncertainty", "localise", "inputcheck", "scan_qc", "cohortqc", "icv")),
    ("pipeline", ("pipeline",)),
    ("results", ("results", "qc")),
    ("workflows", ("bids", "batch", "cluster", "longitudinal", "report", "evaluation", "bench", "bench_levers",
                   "benchmeter", "data",
                   "training")),
    ("commands", ("commands", "__main__")),
)


def layer_of(module: str) -> int | None:
    """Index in :data:`LAYERS` of a ``basalseg`` module (None: not placed)."""
    name = module[len("basalseg."):] if module.startswith("basalseg.") else module
    best, length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > length:
                best, length = index, len(prefix)
    return best


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    """Imports from a lower layer into a higher one, and modules no layer holds."""
    problems = []
    for m in sorted(edges):
        here = layer_of(m)
        if here is None:
            problems.append(f"{m} is in no layer (add it to LAYERS and docs/ARCHITECTURE.md)")
            continue
        for target in sorted(edges[m]):
            there = layer_of(target)
            if there is not None and there > here:
                problems.append(f"{m} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]}), a layer above it")
    return problems


# ---------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------


def test_the_graph_reader_sees_relative_lazy_and_submodule_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from ..a import x\nimport argparse\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\n")
    edges, every = import_graph(pkg)
    assert edges["pkg.a"] == {"pkg.b"} and edges["pkg.b"] == {"pkg.sub.c"} and edges["pkg.sub.c"] == {"pkg.a"}
    assert edges["pkg.d"] == set()  # TYPE_CHECKING only
    assert cycles(edges) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    assert ("argparse", 2) in every["pkg.sub.c"]


def test_no_import_cycle_in_the_package():
    edges, _ = import_graph()
    assert len(edges) > 30, sorted(edges)  # the package was found
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in found)


def test_only_the_command_layer_knows_the_command_line():
    modules = module_names(PACKAGE_DIR)
    assert COMMANDS in modules
    _, every = import_graph()
    problems = layer_violations(every, modules)
    assert not problems, "\n".join(problems)
    for name in [*ARGPARSE_ALLOWED, *ENTRY_POINTS]:  # an allowance for a module that no longer exists is stale
        assert name in modules, name


def test_imports_run_down_the_layers():
    edges, _ = import_graph()
    assert layer_of("basalseg.foundation.runner") == 1 and layer_of("basalseg.data.atlas") == 0
    assert layer_of("basalseg.data.synth") == 4 and layer_of("basalseg.commands.segment") == 5
    problems = upward_imports(edges)
    assert not problems, "\n".join(problems)
    assert upward_imports({"basalseg.spatial": {"basalseg.pipeline"}, "basalseg.new_thing": set()}) == [
        "basalseg.new_thing is in no layer (add it to LAYERS and docs/ARCHITECTURE.md)",
        "basalseg.spatial (base) imports basalseg.pipeline (pipeline), a layer above it"]


if __name__ == "__main__":  # pragma: no cover - a report for any tree
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE_DIR
    graph, imports = import_graph(folder)
    for c in cycles(graph):
        print("cycle:", " -> ".join(c))
    for problem in layer_violations(imports, module_names(folder)):
        print("layer:", problem)
    for problem in upward_imports(graph):
        print("layers:", problem)
