"""``newton_aa`` (issue 14, round 3): newton's proposals Anderson-mixed over m iterates.

What is asserted: m = 1 is exactly ``newton``; with the driver's safeguard (the first unconverged
row takes the exact step) it reaches the sequential trajectory within T iterations on any toy
problem; as the tolerance goes to zero its sample is the sequential one (float64, exact to
rounding); bad options are refused by name.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fpsolve
from fpsolve.errors import InvalidOptionError
from fpsolve.registry import get_registry
from fpsolve.solvers import AndersonNewton, QuasiNewton
from fpsolve.stopping import RMS
from fpsolve.testing.problems import make_system


def test_newton_aa_is_registered_with_its_alias():
    registry = get_registry()
    assert registry.lookup("solver", "newton_aa").cls is AndersonNewton
    assert registry.lookup("solver", "anderson_newton").cls is AndersonNewton


@pytest.mark.parametrize("kind", ["ddim", "ddpm", "dpm_solver"])
def test_one_iterate_of_history_is_exactly_newton(kind):
    system = make_system(kind, steps=12)
    mixed = fpsolve.solve(system, AndersonNewton(history=1), tol=1e-8)
    plain = fpsolve.solve(system, QuasiNewton(), tol=1e-8)
    assert mixed.iterations == plain.iterations
    torch.testing.assert_close(mixed.trajectory, plain.trajectory, rtol=0, atol=0)


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(["ddim", "ddpm", "dpm_solver"]), steps=st.integers(2, 14),
       history=st.integers(2, 4), mode=st.sampled_from(["triangular", "stacked"]),
       fit=st.sampled_from(["correction", "residual"]), seed=st.integers(0, 50))
def test_newton_aa_reaches_the_sequential_trajectory_within_T_iterations(kind, steps, history, mode, fit,
                                                                         seed):
    """The safeguard makes one more row exact every iteration, whatever the mixing proposes."""
    system = make_system(kind, steps=steps, seed=seed)
    exact = fpsolve.solve(system, "sequential").trajectory
    solver = AndersonNewton(history=history, mode=mode, fit=fit)
    solution = fpsolve.solve(system, solver, stopping=RMS(tol1=1e-12, tol2=0.0), max_iters=steps)
    assert solution.iterations <= steps
    # float64: rows accepted at RMS 1e-12 differ from the exact ones by rounding-level amounts
    torch.testing.assert_close(solution.trajectory, exact, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ["ddim", "ddpm", "dpm_solver"])
@pytest.mark.parametrize("mode", ["triangular", "stacked"])
def test_newton_aa_sample_tends_to_the_sequential_sample(kind, mode):
    system = make_system(kind, steps=12)
    exact = fpsolve.solve(system, "sequential").sample
    errors = [float((fpsolve.solve(system, AndersonNewton(mode=mode), tol=tol).sample - exact).abs().max())
              for tol in (1e-3, 1e-6, 1e-11)]
    assert errors[-1] < 1e-9
    assert errors[-1] <= errors[0]


def test_newton_aa_without_a_rule_stops_like_newton():
    """A subclass of QuasiNewton registers no preset, so it keeps newton's x0_forecast rule."""
    system = make_system("ddim", steps=12)
    plain = fpsolve.solve(system, "newton")
    assert fpsolve.solve(system, AndersonNewton(history=1)).iterations == plain.iterations


@pytest.mark.parametrize("options, name", [(dict(mode="diagonal"), "mode"), (dict(fit="x0"), "fit"),
                                           (dict(max_ratio=0.0), "max_ratio"), (dict(history=0), "history"),
                                           (dict(ridge=-1.0), "ridge")])
def test_newton_aa_refuses_bad_options(options, name):
    with pytest.raises(InvalidOptionError, match=name):
        AndersonNewton(**options)
