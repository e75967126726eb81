"""fpsolve's import graph obeys its layers (``fpsolve._layers``): no cycles, nothing imports
upward, and no function imports an fpsolve module to dodge a cycle.

The graph is read from the source (``ast``), not from ``sys.modules``, so an import inside a
function or under ``if TYPE_CHECKING:`` counts exactly like one at the top of a module. Importing
``fpsolve.a.b`` also runs the package ``fpsolve.a``'s ``__init__``: that edge is in the graph too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fpsolve._layers import LAYERS, OPTIONAL_MODULES, layer_of

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "fpsolve"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _existing(name: str) -> str | None:
    """``name`` or the closest enclosing module that exists (``fpsolve.api.solve`` -> ``fpsolve.api``)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in MODULES else None


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The fpsolve modules one import statement of ``module`` loads."""
    named: list[str] = []
    if isinstance(node, ast.Import):
        named = [alias.name for alias in node.names]
    else:
        if node.level:
            package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        # ``from pkg import name`` loads pkg.name when that is a module, else pkg itself
        named = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                 for alias in node.names]
    found = []
    for name in named:
        if name == "fpsolve" or name.startswith("fpsolve."):
            target = _existing(name)
            if target is not None:
                found.append(target)
    return found


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


Edge = tuple[str, str, int, bool, str]


def _module_imports(module: str, tree: ast.AST) -> list[Edge]:
    """Every (importer, loaded, line, inside a function, the module the statement names) edge of
    one module; ``loaded`` is that module or a package above it."""
    edges: list[Edge] = []
    own_packages = set(_parents(module + ".x"))  # a module's own packages are already loading

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, child):
                    for loaded in [*_parents(target), target]:
                        if loaded != module and loaded not in own_packages and loaded in MODULES:
                            edges.append((module, loaded, child.lineno, in_function, target))
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(tree, False)
    return edges


def _imports() -> list[Edge]:
    """Every import edge of the package."""
    edges: list[Edge] = []
    for module, path in MODULES.items():
        edges += _module_imports(module, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return edges


EDGES = _imports()


def _cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for source, target, *_ in edges:
        graph[source].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def test_the_walk_sees_the_package():
    # a walk that found nothing would pass every check below
    assert len(MODULES) > 50 and len(EDGES) > 100
    assert ("fpsolve.api", "fpsolve.driver") in {(a, b) for a, b, *_ in EDGES}
    assert ("fpsolve.cli.bench", "fpsolve.bench.plots") in {(a, b) for a, b, _, inner, _ in EDGES if inner}


def test_imports_inside_functions_and_for_type_checking_are_seen():
    tree = ast.parse("from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from .registry import resolve\n"
                     "def f():\n    from .api import solve\n    from .gpu.auto import AutoChoice\n")
    edges = _module_imports("fpsolve.driver", tree)
    assert ("fpsolve.driver", "fpsolve.registry", 3, False, "fpsolve.registry") in edges
    assert ("fpsolve.driver", "fpsolve.api", 5, True, "fpsolve.api") in edges
    # importing fpsolve.gpu.auto runs the package fpsolve.gpu first
    assert ("fpsolve.driver", "fpsolve.gpu", 6, True, "fpsolve.gpu.auto") in edges
    assert layer_of("fpsolve.api") > layer_of("fpsolve.driver")  # so both would be upward


def test_the_cycle_finder_finds_a_cycle():
    fake = [("fpsolve.api", "fpsolve.driver", 1, False, "fpsolve.driver"),
            ("fpsolve.driver", "fpsolve.api", 1, True, "fpsolve.api")]
    assert _cycles(fake) == [["fpsolve.api", "fpsolve.driver"]]


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)  # raises, naming the module, if the table does not place it
    with pytest.raises(ValueError, match="fpsolve.brand_new"):
        layer_of("fpsolve.brand_new")


def test_no_import_cycles():
    assert _cycles(EDGES) == []


def test_no_upward_imports():
    upward = [
        f"{source} (layer {LAYERS[layer_of(source)][0]!r}) imports {target} "
        f"(layer {LAYERS[layer_of(target)][0]!r}) at line {line}"
        for source, target, line, *_ in EDGES
        if layer_of(target) > layer_of(source)
    ]
    assert upward == []


def test_no_function_imports_an_fpsolve_module_except_optional_ones():
    local = [f"{source} imports {target} inside a function at line {line}"
             for source, target, line, inner, named in EDGES if inner and named not in OPTIONAL_MODULES]
    assert local == []


@pytest.mark.parametrize("module", sorted(OPTIONAL_MODULES))
def test_optional_modules_really_need_their_package(module):
    # the exemption holds only while the module imports the optional package at module level
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import)
           for alias in node.names}
    top |= {(node.module or "").split(".")[0] for node in tree.body
            if isinstance(node, ast.ImportFrom) and not node.level}
    assert OPTIONAL_MODULES[module] in top


def layer_table() -> str:
    """The markdown table of the layers that docs/architecture.md shows."""
    rows = ["| layer | holds | modules |", "| --- | --- | --- |"]
    for name, holds, members in reversed(LAYERS):
        rows.append(f"| {name} | {holds} | {', '.join(f'`{m}`' for m in members)} |")
    return "\n".join(rows)


def test_the_architecture_page_shows_the_layer_table():
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert layer_table() in page, "docs/architecture.md: paste the table of test_architecture.layer_table()"


# -- modules loaded by name ------------------------------------------------------------------------
# The registry imports its built-in plugin modules (and the kinds' base classes) by NAME when the
# plugin manager is made, as pytest loads its default plugins: that is the one by-name import the
# layers allow, so the built-in "auto" controller of fpsolve.gpu registers without an upward
# import. These edges still count for cycles: a plugin module that imported the registry back
# would close a loop.


def _by_name_edges() -> list[Edge]:
    from fpsolve.registry import BUILTIN_PLUGINS, KINDS

    named = list(BUILTIN_PLUGINS) + [path.partition(":")[0] for _, path in KINDS.values()]
    return [("fpsolve.registry", module, 0, False, module) for module in named]


def test_the_registry_loads_only_modules_that_exist_by_name():
    assert all(target in MODULES for _, target, *_ in _by_name_edges())
    assert "fpsolve.gpu.auto" in {target for _, target, *_ in _by_name_edges()}


def test_no_cycle_through_the_modules_the_registry_loads_by_name():
    assert _cycles(EDGES + _by_name_edges()) == []


def test_a_by_name_load_that_closes_a_loop_is_a_cycle():
    back = [("fpsolve.gpu.auto", "fpsolve.registry", 1, False, "fpsolve.registry")]
    assert ["fpsolve.gpu.auto", "fpsolve.registry"] in _cycles(back + _by_name_edges())


def test_below_the_entry_points_only_the_registry_imports_by_name():
    # the entry points (the command line's subcommands, fpsolve.models on first use) sit at the
    # top, where a by-name import cannot point upward
    top = len(LAYERS) - 1
    by_name = [module for module, path in MODULES.items()
               if module != "fpsolve.registry" and layer_of(module) < top
               and "import_module(" in path.read_text(encoding="utf-8")]
    assert by_name == []
