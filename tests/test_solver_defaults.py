"""The core extension for solvers that reproduce a published method whole (e.g. ParaDiGMS):
``default_window`` / ``default_stopping`` used by ``solve`` when the caller gives none,
``final_step`` for the row the driver makes final, and ``StoppingView.system``."""

from __future__ import annotations

import attrs
import pytest
import torch

import fpsolve
from fpsolve.errors import InvalidOptionError

from .conftest import make_sampler, make_system


@attrs.define(frozen=True)
class Recording(fpsolve.stopping.RMS):
    """The rms rule, recording what it is shown."""

    name = "recording"
    seen: list = attrs.field(factory=list, eq=False)

    def converged(self, view):
        self.seen.append(view)
        return super().converged(view)


@attrs.define(frozen=True, eq=False, kw_only=True)
class Opinionated(fpsolve.solvers.FP):
    """FP that brings its own window and rule."""

    name = "opinionated"
    rule: fpsolve.StoppingRule = attrs.field(factory=lambda: Recording(tol1=1e-9, tol2=1e-9))

    def default_window(self):
        return 4

    def default_stopping(self):
        return self.rule


def widest(solution):
    """The widest window of a solve (windows narrow near x_0)."""
    return max(hi - lo + 1 for lo, hi in solution.residuals.windows)


def test_the_solver_defaults_apply_when_the_caller_gives_none(ddim_system):
    solver = Opinionated()
    solution = fpsolve.solve(ddim_system, solver)
    assert widest(solution) == 4
    assert solver.rule.seen and all(view.system is ddim_system for view in solver.rule.seen)
    reference = fpsolve.solve(ddim_system, "sequential")
    torch.testing.assert_close(solution.sample, reference.sample, rtol=0, atol=1e-8)


def test_the_caller_overrides_the_solver_defaults(ddim_system):
    solver = Opinionated()
    assert widest(fpsolve.solve(ddim_system, solver, window=7)) == 7
    assert solver.rule.seen  # the two defaults are independent: the rule still applies
    solver.rule.seen.clear()
    fpsolve.solve(ddim_system, solver, tol=1e-3)  # tol= always means the rms rule
    fpsolve.solve(ddim_system, solver, stopping="max_iters")
    assert not solver.rule.seen
    with pytest.raises(InvalidOptionError, match="not both"):
        fpsolve.solve(ddim_system, solver, tol=1e-3, stopping="rms")


def test_built_in_solvers_keep_the_old_defaults(ddim_system):
    for name in ("fp", "taa", "aa"):
        solver = fpsolve.registry.resolve("solver", name)
        assert solver.default_window() is None and solver.default_stopping() is None
    assert widest(fpsolve.solve(ddim_system, "taa")) == ddim_system.num_steps


@attrs.define(frozen=True, eq=False, kw_only=True)
class MarkedFinal(fpsolve.solvers.FP):
    """Makes rows final with its proposal plus a marker, to see where final_step is used."""

    name = "marked_final"
    calls: list = attrs.field(factory=list)

    def final_step(self, view, proposal, row):
        self.calls.append(view.lo + row)
        return view.rhs[row] + 1.0


def test_final_step_sets_the_boundary_row_and_x0():
    system = make_system(make_sampler("ddim", 6), dim=3)
    solver = MarkedFinal()
    # MaxIters judges no row: each iteration the first window row is the boundary row
    solution = fpsolve.solve(system, solver, stopping=fpsolve.stopping.MaxIters(10))
    assert solver.calls == [1, 2, 3, 4, 5, 6]
    reference = fpsolve.solve(system, "sequential")
    assert (solution.trajectory[1] - reference.trajectory[1]).abs().max() == pytest.approx(1.0)
    # every row accepted in one iteration: only x_0 is made final
    accepted = MarkedFinal()
    init = fpsolve.initializers.FromTrajectory(trajectory=reference)
    fpsolve.solve(system, accepted, initializer=init, tol=1e-6)
    assert accepted.calls == [6]


def test_stopping_views_carry_the_system(ddim_system):
    rule = Recording()
    fpsolve.solve(ddim_system, "taa", stopping=rule)
    assert rule.seen and all(view.system is ddim_system for view in rule.seen)
