"""The controller owns the loop policy (issue 12): the window (clipped to T in one place), the
one iteration cap, the safeguard, the boundary row's value and whether accepted rows move; a
preset (solver + controller + stopping rule) brings a method's own policy, registered through
``fpsolve_register_presets`` by built-ins and third-party plugins alike. Observers see a copy
of the iterate; ``StoppingView.system`` carries the system."""

from __future__ import annotations

import ast
import inspect

import attrs
import numpy as np
import pytest
import torch

import fpsolve
import fpsolve.api
from fpsolve.api import resolve_controller
from fpsolve.control import Controller, Preset, runs_sequentially
from fpsolve.errors import InvalidOptionError, PluginConflictError
from fpsolve.gpu import AutoWindow
from fpsolve.registry import preset_for, register_plugin, unregister_plugin

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
    """FP published with its own window and rule (its preset below)."""

    name = "opinionated"


RULE_SEEN: list = []


class OpinionatedPlugin:
    """A third-party plugin: a solver and the preset it is published with."""

    @fpsolve.hookimpl
    def fpsolve_register_solvers(self):
        return [Opinionated]

    @fpsolve.hookimpl
    def fpsolve_register_presets(self):
        return [Preset(name="opinionated", solver=Opinionated, controller=Controller(window=4),
                       stopping=Recording(tol1=1e-9, tol2=1e-9, seen=RULE_SEEN)),
                Preset(name="opinionated_jacobi", solver=Opinionated, options={"order": 1},
                       controller=Controller(window=3, max_iters=40))]


@pytest.fixture
def opinionated():
    name = register_plugin(OpinionatedPlugin(), name="test-opinionated")
    RULE_SEEN.clear()
    try:
        yield
    finally:
        unregister_plugin(name=name)


def widest(solution):
    """The widest window of a solve (windows narrow near x_0)."""
    return max(hi - lo + 1 for lo, hi in solution.residuals.windows)


# -- presets ---------------------------------------------------------------------------------------

def test_a_third_party_preset_applies_when_the_caller_gives_nothing(ddim_system, opinionated):
    solution = fpsolve.solve(ddim_system, "opinionated")
    assert widest(solution) == 4 and solution.window == 4
    assert RULE_SEEN and all(view.system is ddim_system for view in RULE_SEEN)
    reference = fpsolve.solve(ddim_system, "sequential")
    torch.testing.assert_close(solution.sample, reference.sample, rtol=0, atol=1e-8)
    # an instance (and the class) of the preset's solver gets the preset named after the class
    RULE_SEEN.clear()
    assert widest(fpsolve.solve(ddim_system, Opinionated())) == 4 and RULE_SEEN
    assert widest(fpsolve.solve(ddim_system, Opinionated)) == 4


def test_the_caller_overrides_each_part_of_a_preset(ddim_system, opinionated):
    assert widest(fpsolve.solve(ddim_system, "opinionated", window=7)) == 7
    assert RULE_SEEN  # the parts are independent: the rule still applies
    RULE_SEEN.clear()
    fpsolve.solve(ddim_system, "opinionated", tol=1e-3)  # tol= always means the rms rule
    fpsolve.solve(ddim_system, "opinionated", stopping="rms")
    assert not RULE_SEEN
    with pytest.raises(InvalidOptionError, match="not both"):
        fpsolve.solve(ddim_system, "opinionated", tol=1e-3, stopping="rms")
    with pytest.warns(fpsolve.NotConvergedWarning):
        capped = fpsolve.solve(ddim_system, "opinionated", max_iters=2)
    assert capped.iterations == 2 and capped.status is fpsolve.Status.MAX_ITERS
    assert widest(capped) == 4  # max_iters= replaced the cap only


def test_a_preset_fixes_its_solver_options(ddim_system, opinionated):
    solution = fpsolve.solve(ddim_system, "opinionated_jacobi")
    assert solution.solver.order == 1 and widest(solution) == 3
    with pytest.raises(InvalidOptionError, match=r"preset 'opinionated_jacobi' fixes the solver option"):
        fpsolve.solve(ddim_system, "opinionated_jacobi", order=3)


def test_two_plugins_registering_one_preset_name_conflict(opinionated):
    class Again:
        @fpsolve.hookimpl
        def fpsolve_register_presets(self):
            return [Preset(name="opinionated", solver=fpsolve.solvers.FP)]

    name = register_plugin(Again(), name="test-again")
    try:
        with pytest.raises(PluginConflictError, match="preset name 'opinionated' is registered twice"):
            fpsolve.registry.get_registry()
    finally:
        unregister_plugin(name=name)


def test_a_preset_is_checked_at_construction():
    with pytest.raises(InvalidOptionError, match="solver must be a FixedPointSolver subclass"):
        Preset(name="x", solver="taa")
    with pytest.raises(InvalidOptionError, match="controller must be an fpsolve.control.Controller"):
        Preset(name="x", solver=fpsolve.solvers.FP, controller={"window": 3})


def test_built_in_presets_keep_the_old_defaults(ddim_system):
    # what the solvers carried as members before: newton's x0 rule, aa unsafeguarded, the rest plain
    assert isinstance(preset_for(fpsolve.solvers.QuasiNewton).stopping, fpsolve.stopping.X0Change)
    assert preset_for(fpsolve.solvers.AA).controller == Controller(safeguard=False)
    for cls in (fpsolve.solvers.FP, fpsolve.solvers.TAA, fpsolve.solvers.DiagonalNewton):
        assert preset_for(cls) is None
    assert widest(fpsolve.solve(ddim_system, "taa")) == ddim_system.num_steps
    # an alias gets its class's preset, and a subclass that registers none its base's
    by_alias = fpsolve.solve(ddim_system, "quasi_newton")
    assert by_alias.iterations == fpsolve.solve(ddim_system, "newton").iterations

    @attrs.define(frozen=True, eq=False, kw_only=True)
    class Tuned(fpsolve.solvers.QuasiNewton):
        pass

    assert preset_for(Tuned) is preset_for(fpsolve.solvers.QuasiNewton)


def test_the_sequential_solver_is_recognised_in_one_place():
    assert runs_sequentially(fpsolve.solvers.Sequential())
    assert not any(runs_sequentially(cls()) for cls in (fpsolve.solvers.FP, fpsolve.solvers.TAA))
    for member in ("safeguarded", "update_accepted", "final_step", "default_window", "default_stopping",
                   "sequential"):
        assert not hasattr(fpsolve.FixedPointSolver, member), member


# -- the controller --------------------------------------------------------------------------------

@pytest.mark.parametrize(("make", "match"), [
    (lambda: Controller(window=0), r"window must be an int >= 1 \(positions solved per iteration\) or None"),
    (lambda: Controller(window=True), "window must be an int >= 1"),
    (lambda: Controller(window=2.0), "window must be an int >= 1"),
    (lambda: Controller(max_iters=0), "max_iters must be an int >= 1"),
    (lambda: Controller(max_iters=False), "max_iters must be an int >= 1"),
    (lambda: Controller(safeguard="yes"), "safeguard must be True or False; got 'yes'"),
    (lambda: Controller(update_accepted=1), "update_accepted must be True or False"),
    (lambda: Controller(boundary="picard"), r"boundary must be one of 'exact': .*'proposal': .*got 'picard'"),
])
def test_the_controller_is_validated(make, match):
    with pytest.raises(InvalidOptionError, match=match):
        make()


def test_numpy_integers_are_accepted():
    controller = Controller(window=np.int64(5), max_iters=np.int32(7))
    assert (controller.window, controller.max_iters) == (5, 7)
    assert type(controller.window) is int and type(controller.max_iters) is int


def test_the_window_is_clipped_to_T_in_one_place(ddim_system):
    steps = ddim_system.num_steps
    assert Controller(window=steps + 30).window_for(steps) == steps
    assert Controller().window_for(steps) == steps and Controller(window=3).window_for(steps) == 3
    wide = fpsolve.solve(ddim_system, "taa", window=steps + 30)
    exact = fpsolve.solve(ddim_system, "taa", window=steps)
    assert wide.window == steps and torch.equal(wide.trajectory, exact.trajectory)
    assert fpsolve.solve(ddim_system, "sequential").window is None


def test_one_cap(ddim_system):
    assert Controller().cap_for(20) == 20 and Controller(max_iters=3).cap_for(20) == 3
    with pytest.warns(fpsolve.NotConvergedWarning):
        capped = fpsolve.solve(ddim_system, "taa", tol=1e-12, max_iters=3)
    assert capped.iterations == 3 and capped.status is fpsolve.Status.MAX_ITERS
    with pytest.raises(InvalidOptionError, match=r"MaxIters stopping rule is gone .* max_iters=n"):
        fpsolve.stopping.MaxIters(3)
    with pytest.raises(InvalidOptionError, match="MaxIters stopping rule is gone"):
        fpsolve.solve(ddim_system, "taa", stopping="max_iters")
    assert "max_iters" not in fpsolve.registry.get_registry().names("stopping rule")


def test_a_controller_replaces_the_presets_policy(ddim_system):
    unguarded = fpsolve.solve(ddim_system, "aa")
    guarded = fpsolve.solve(ddim_system, "aa", window=Controller(safeguard=True))
    anchors = (0,) + guarded.residuals.anchors
    assert all(b > a for a, b in zip(anchors, anchors[1:], strict=False))  # advances every iteration
    assert guarded.iterations <= ddim_system.num_steps
    assert not torch.equal(guarded.trajectory, unguarded.trajectory)
    with pytest.raises(InvalidOptionError, match=r"window must be an int >= 1 .* got 'fast'"):
        fpsolve.solve(ddim_system, "taa", window="fast")


@attrs.define(frozen=True, eq=False, kw_only=True)
class Marked(fpsolve.solvers.FP):
    """Proposes the fixed-point step plus 1, so the rows that take the proposal show."""

    name = "marked"

    def step(self, view, state):
        return view.rhs + 1.0, state


def test_the_boundary_row_takes_the_exact_step_or_the_proposal():
    system = make_system(make_sampler("ddim", 6), dim=3)
    reference = fpsolve.solve(system, "sequential")
    never = fpsolve.StoppingRule()  # judges no row: each iteration the first window row is row U
    exact = fpsolve.solve(system, Marked(), stopping=never)
    proposal = fpsolve.solve(system, Marked(), stopping=never, window=Controller(boundary="proposal"))
    assert exact.iterations == proposal.iterations == 6  # the safeguard holds either way
    assert (exact.trajectory[1] - reference.trajectory[1]).abs().max() == pytest.approx(0.0, abs=1e-12)
    assert (proposal.trajectory[1] - reference.trajectory[1]).abs().max() == pytest.approx(1.0)
    # every row accepted in one iteration: only x_0 is made final, the same way
    init = fpsolve.initializers.FromTrajectory(trajectory=reference)
    exact = fpsolve.solve(system, Marked(), initializer=init, tol=1e-6)
    proposal = fpsolve.solve(system, Marked(), initializer=init, tol=1e-6,
                             window=Controller(boundary="proposal"))
    assert exact.iterations == proposal.iterations == 1
    assert (exact.sample - reference.sample).abs().max() < 1e-6
    assert (proposal.sample - reference.sample).abs().max() == pytest.approx(1.0, abs=1e-6)


def test_update_accepted_moves_accepted_rows_too():
    system = make_system(make_sampler("ddim", 6), dim=3)
    reference = fpsolve.solve(system, "sequential")
    init = fpsolve.initializers.FromTrajectory(trajectory=reference)
    kept = fpsolve.solve(system, Marked(), initializer=init, tol=1e-6)
    moved = fpsolve.solve(system, Marked(), initializer=init, tol=1e-6,
                          window=Controller(update_accepted=True))
    assert (kept.trajectory[1:-1] - reference.trajectory[1:-1]).abs().max() < 1e-12
    assert (moved.trajectory[1:-1] - reference.trajectory[1:-1]).abs().max() == pytest.approx(1.0)


# -- what observers and rules see ------------------------------------------------------------------

def test_observers_get_a_copy_of_the_iterate(ddim_system):
    seen = []

    def scribble(info):
        states = info.states
        seen.append(states.clone())
        states.fill_(float("nan"))  # harmless: a copy

    observed = fpsolve.solve(ddim_system, "taa", observers=[scribble])
    plain = fpsolve.solve(ddim_system, "taa")
    assert torch.equal(observed.trajectory, plain.trajectory) and observed.iterations == plain.iterations
    assert len(seen) == plain.iterations
    torch.testing.assert_close(ddim_system.unflatten(seen[-1]), plain.trajectory, rtol=0, atol=0)


def test_stopping_views_carry_the_system(ddim_system):
    rule = Recording()
    fpsolve.solve(ddim_system, "taa", stopping=rule)
    assert rule.seen and all(view.system is ddim_system for view in rule.seen)


def test_auto_is_a_registered_controller_that_keeps_the_presets_policy():
    auto = resolve_controller("auto", 7, preset_for(fpsolve.solvers.AA))
    assert type(auto) is AutoWindow and auto.safeguard is False and auto.max_iters == 7
    assert fpsolve.registry.get_registry().lookup("controller", "auto").plugin == "fpsolve.gpu.auto"
    # the api resolves the name through the registry: it imports nothing of fpsolve.gpu.auto
    tree = ast.parse(inspect.getsource(fpsolve.api))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name and name.startswith("gpu.auto") for name in imported), imported
