"""How the package's modules import each other: the graph, lazy imports included, has no cycle
(../shared/DESIGN.md, "Target layout"), and every module imports on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "scaling_search"

# Cycles allowed to remain: none (the last ones went with the CLI's shared helpers and the
# network package, issue 15). A new one fails the test.
KNOWN_CYCLES: set[frozenset[str]] = set()


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `path` imports when it runs, at its top or inside functions
    (imports only for type checkers left out)."""
    found: set[str] = set()

    def target(name: str) -> None:
        # The module itself, or the package whose attribute it is.
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for statement in node.orelse:
                visit(statement)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                target(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                target(submodule if submodule in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {other for other in _imports(path, modules) if other != name}
        for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_graph_sees_lazy_imports_and_not_a_type_checkers(tmp_path: Path) -> None:
    graph = import_graph()
    # The network package imports its torch modules only when asked for them; train at its top.
    assert "scaling_search.network.modules" in graph["scaling_search.network"]
    assert "scaling_search.network.modules" in graph["scaling_search.train"]
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from scaling_search.report.publish import LiveDashboard\n"
        "def f():\n"
        "    from scaling_search.study import ledger\n"
        "    import scaling_search.driver._run\n",
        encoding="utf-8",
    )
    found = _imports(source, _modules())
    assert found == {"scaling_search.study.ledger", "scaling_search.driver._run"}


def test_cycle_finding_finds_a_cycle_and_only_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == {frozenset({"a", "b", "c"})}


def test_no_import_cycles_but_the_known_ones() -> None:
    assert cycles(import_graph()) == KNOWN_CYCLES


# The package's layers, top to bottom (../shared/DESIGN.md, "Target layout"; where the code
# departs from its table the departure is said here). A module imports only from its own layer
# or below. Each name is the first part of a module's path under scaling_search/.
LAYERS: tuple[frozenset[str], ...] = tuple(
    frozenset(layer.split())
    for layer in (
        "cli",
        "driver",  # the only package that imports Ray
        "report",
        "results",
        "study",
        "train objective memory",  # one trial, Ray-free; memory: what a trial needs, in a worker
        "data",
        "sampling _hooks",  # how a point is chosen (the samplers' coordinates, network keys)
        "space",
        "config _config_errors _yamlfile",
        "network",  # below space and config: both count networks (the design's table has it above)
        # Leaves: the bounds, password masking, process start-up, private library names.
        "limits _redact _startup _compat",
    )
)


def _layer(module: str) -> int:
    top = module.split(".")[1]
    [index] = [i for i, layer in enumerate(LAYERS) if top in layer]
    return index


def test_every_module_has_a_layer() -> None:
    tops = {name.split(".")[1] for name in import_graph() if name != "scaling_search"}
    assert tops == set().union(*LAYERS)


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The imports of a module from a layer above its own."""
    # The package's own __init__ re-exports build_model for other projects, above every layer.
    return sorted(
        (name, other)
        for name, imported in graph.items()
        if name != "scaling_search"
        for other in imported
        if _layer(other) < _layer(name)
    )


def test_imports_flow_down_the_layers() -> None:
    assert upward(import_graph()) == []


def test_the_layer_check_sees_an_upward_import() -> None:
    graph = {
        "scaling_search.study.ledger": {"scaling_search.results.ranking", "scaling_search.space"},
        "scaling_search.config": {"scaling_search.network.spec"},
        "scaling_search.results.ranking": {"scaling_search.study.ledger"},
    }
    assert upward(graph) == [("scaling_search.study.ledger", "scaling_search.results.ranking")]


def test_the_driver_knows_nothing_of_the_report() -> None:
    # The CLI hands run_study the live dashboard (a callback); the driver draws nothing.
    report = {
        "scaling_search.report.publish",
        "scaling_search.report.data",
        "scaling_search.report.figures",
    }
    graph = import_graph()
    reached = {
        (name, other)
        for name, imported in graph.items()
        if name.startswith("scaling_search.driver")
        for other in imported & report
    }
    assert reached == set()


@pytest.mark.slow
def test_every_module_imports_on_its_own() -> None:
    # Each in a fresh interpreter: an import that works only after another module was loaded
    # first fails here.
    def load(module: str) -> tuple[str, int, str]:
        result = subprocess.run(
            [sys.executable, "-c", f"import {module}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        return module, result.returncode, result.stderr[-1500:]

    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = [run for run in pool.map(load, sorted(_modules())) if run[1] != 0]
    assert failed == []
