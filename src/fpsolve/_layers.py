"""fpsolve's layers, lowest first: the one table that ``tests/test_architecture.py`` enforces.

A module may import modules of its own layer or of a layer below it, never one above; no two
modules may import each other, directly or around a loop; and no function imports an fpsolve
module to dodge a cycle. A module is placed by the longest entry that names it or a package
above it (the root package ``fpsolve`` names only itself, so each module must be placed).
``docs/architecture.md`` shows this table (the test checks the page against it).
"""

from __future__ import annotations

__all__ = ["LAYERS", "OPTIONAL_MODULES", "layer_of"]

#: (layer name, what it holds, modules and packages in it), lowest first.
LAYERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("data", "plain data, errors, validators, the plugin marker, per-denoiser memory",
     ("fpsolve._layers", "fpsolve.errors", "fpsolve.solution", "fpsolve.validators", "fpsolve.plugin_marks",
      "fpsolve.progress", "fpsolve.cli_output", "fpsolve._identity")),
    ("samplers", "pure math: the samplers' affine forms, the schedules and timestep grids",
     ("fpsolve.samplers", "fpsolve.schedules")),
    ("system", "TriangularSystem: residuals, evaluation, the one sequential loop",
     ("fpsolve.system",)),
    ("components", "solvers propose, stopping rules judge, initializers start",
     ("fpsolve.solvers", "fpsolve.stopping", "fpsolve.initializers")),
    ("driver", "the controller (window, safeguard, boundary row, cap, presets) and the parallel loop",
     ("fpsolve.control", "fpsolve.driver")),
    ("evaluators", "plain, chunked (OOM-safe) and sharded (torch.distributed) evaluators, and the one choice",
     ("fpsolve.evaluators",)),
    ("registry", "names -> classes, the hook specifications, plugins",
     ("fpsolve.registry", "fpsolve.hookspecs")),
    ("api", "solve(), make_system(), inversion and the adjoint",
     ("fpsolve.api", "fpsolve.inversion", "fpsolve.adjoint")),
    ("tools", "everything that uses the api",
     ("fpsolve.distributed", "fpsolve.gpu", "fpsolve.integrations", "fpsolve.models", "fpsolve.bench",
      "fpsolve.testing")),
    ("entry points", "the package's front door and the command line",
     ("fpsolve", "fpsolve.__main__", "fpsolve.cli")),
)

#: fpsolve modules that import an optional third-party package at module level (module ->
#: that package): the only fpsolve modules a function may import, so that what needs an extra
#: is loaded on use (``fpsolve bench --no-plots`` runs without matplotlib).
OPTIONAL_MODULES: dict[str, str] = {
    "fpsolve.bench.plots": "matplotlib",
}


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of a dotted fpsolve module name (``ValueError`` if unplaced)."""
    best, best_len = -1, -1
    for index, (_, _, members) in enumerate(LAYERS):
        for member in members:
            # the root package names only itself: a new module must be placed, not fall to the top
            inside = module.startswith(member + ".") and member != "fpsolve"
            if (module == member or inside) and len(member) > best_len:
                best, best_len = index, len(member)
    if best < 0:
        raise ValueError(f"module {module!r} is in no layer of fpsolve._layers.LAYERS; place it there.")
    return best
