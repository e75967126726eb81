"""fpsolve's own built-ins pass the conformance kit that plugin authors run.

The test classes are generated from the registry (every built-in name, aliases with presets
included), so a new built-in joins the suite by registering, like in the mix matrix.
"""

from __future__ import annotations

import torch

import fpsolve
from fpsolve.control import runs_sequentially
from fpsolve.registry import BUILTIN_PLUGINS, get_registry, resolve
from fpsolve.testing import (
    InitializerConformance,
    SamplerConformance,
    SolverConformance,
    StoppingRuleConformance,
)
from fpsolve.testing.checks import tight_stopping
from fpsolve.testing.problems import problem_sampler

#: tight configurations for parity (a stopping rule's defaults are deliberately loose)
TIGHT_RULES = {
    fpsolve.stopping.RMS: fpsolve.stopping.RMS(tol1=1e-12, tol2=1e-12),
    fpsolve.stopping.Paradigms: fpsolve.stopping.Paradigms(tol=1e-9),
    fpsolve.stopping.X0Change: fpsolve.stopping.X0Change(atol=1e-12, tol=1e-12),
    fpsolve.stopping.X0Forecast: fpsolve.stopping.X0Forecast(atol=1e-12, bound=1e-12, trust=1e-11, tol=1e-12),
}


def _builtin_entries(kind: str):
    entries = get_registry().entries[kind].values()
    return sorted((e for e in entries if e.plugin in BUILTIN_PLUGINS), key=lambda e: e.name)


def _class_name(name: str) -> str:
    return "Test" + "".join(part.capitalize() for part in name.replace("+", "p").split("_"))


def _solver_classes():
    for entry in _builtin_entries("solver"):
        solver = resolve("solver", entry.name)
        if runs_sequentially(solver) or (entry.alias_of and not entry.preset):
            continue  # the reference itself; an alias without a preset is the same solver again
        attributes = {"solver": solver, "expect_registered": True}
        default = tight_stopping(solver)
        if type(default) in TIGHT_RULES:  # a solver's own loose default (newton: x0), made tight
            attributes["stopping"] = TIGHT_RULES[type(default)]
        yield _class_name(entry.name), type("", (SolverConformance,), attributes)


def _sampler_classes():
    for entry in _builtin_entries("sampler"):
        if entry.alias_of:
            continue
        sampler = problem_sampler(entry.name, 10)  # its family's schedule (variance-preserving or flow)
        yield (
            _class_name(entry.name),
            type("", (SamplerConformance,), {"sampler": sampler, "expect_registered": True}),
        )


def _stopping_classes():
    for entry in _builtin_entries("stopping rule"):
        if entry.alias_of:
            continue
        attributes = {
            "rule": entry.cls(),
            "tight_rule": TIGHT_RULES.get(entry.cls),
            "expect_registered": True,
        }
        yield _class_name(entry.name), type("", (StoppingRuleConformance,), attributes)


class _PerturbedTrajectory(InitializerConformance):
    """The ``trajectory`` initializer needs a trajectory: the sequential one, perturbed."""

    def make_initializer(self, system):
        exact = fpsolve.solve(system, "sequential").trajectory
        noise = torch.randn(exact.shape, dtype=exact.dtype, generator=torch.Generator().manual_seed(3))
        return fpsolve.initializers.FromTrajectory(trajectory=exact + 0.1 * noise.to(exact.device))


class _Coarse(InitializerConformance):
    """``coarse``; at T = 1 its default of max(2, T // 5) coarse steps is capped at T (the kit
    found that it used to exceed T)."""


def _initializer_classes():
    special = {
        fpsolve.initializers.FromTrajectory: _PerturbedTrajectory,
        fpsolve.initializers.Coarse: _Coarse,
    }
    for entry in _builtin_entries("initializer"):
        if entry.alias_of:
            continue
        base = special.get(entry.cls, InitializerConformance)
        attributes = {"expect_registered": True}
        if base is InitializerConformance or base is _Coarse:
            attributes["initializer"] = entry.cls()
        yield _class_name(entry.name), type("", (base,), attributes)


for _name, _cls in [*_solver_classes(), *_sampler_classes(), *_stopping_classes(), *_initializer_classes()]:
    _cls.__name__ = _cls.__qualname__ = _name
    _cls.__module__ = __name__
    globals()[_name] = _cls
del _name, _cls
