"""Testing helpers for fpsolve and its plugins.

* :mod:`~fpsolve.testing.strategies`: hypothesis strategies for random triangular problems;
* :mod:`~fpsolve.testing.problems`: small standard problems (``make_system("ddpm", batch=3)``);
* :mod:`~fpsolve.testing.checks`: the conformance checks as functions (``check_solver(solver)``);
* :mod:`~fpsolve.testing.conformance`: the same checks as test-class mixins
  (``class TestMySolver(SolverConformance): solver = MySolver()``);
* :mod:`~fpsolve.testing.pytest_plugin`: the pytest plugin (fixtures ``fpsolve_conformance``,
  ``fpsolve_problem``; option ``--fpsolve-device``), registered under the ``pytest11`` entry point.

This package needs pytest and hypothesis (the ``test`` extra); ``import fpsolve`` never imports it.
"""

from __future__ import annotations

from . import checks, problems, strategies
from .checks import (
    ConformanceError,
    check_initializer,
    check_sampler,
    check_solver,
    check_stopping_rule,
)
from .conformance import (
    InitializerConformance,
    SamplerConformance,
    SolverConformance,
    StoppingRuleConformance,
)

__all__ = [
    "strategies",
    "problems",
    "checks",
    "ConformanceError",
    "check_solver",
    "check_sampler",
    "check_stopping_rule",
    "check_initializer",
    "SolverConformance",
    "SamplerConformance",
    "StoppingRuleConformance",
    "InitializerConformance",
]
