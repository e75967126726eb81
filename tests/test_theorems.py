"""The mathematics of parallel sampling, as properties (float64, CPU).

* Theorem 2.2: the sequential trajectory zeroes the residual of every order k, and the order-k
  residual computed from first-order residuals is exactly the k-step frozen-output unrolling.
* Finite termination: fixed-point iteration on any order reaches the sequential trajectory
  within T iterations from any initial guess.
* TAA with history 1 is plain FP; the anchor strictly advances; the true trajectory is a fixed
  point reached in one iteration.
"""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fpsolve
from fpsolve.control import Controller
from fpsolve.testing import strategies as fst
from fpsolve.testing.problems import sampler_variants

from .conftest import make_sampler, make_system


def unrolled_residual(system: fpsolve.TriangularSystem, states: torch.Tensor, outputs: torch.Tensor,
                      row: int, order: int) -> torch.Tensor:
    """(E_k) by brute force: run the frozen-output sampler ``order`` steps from row - order."""
    form = system.affine_form
    start = max(row - order, 0)
    run = states.clone()
    for j in range(start + 1, row + 1):
        value = form.noise[j] * system.flat_noise[j]
        for lag in range(1, form.lags + 1):
            if j - lag >= 0:
                value = (value + form.state[j, lag - 1] * run[j - lag]
                         + form.output[j, lag - 1] * outputs[j - lag])
        run[j] = value
    return run[row] - states[row]


@given(system=fst.systems(max_steps=10), data=st.data())
def test_order_k_residual_is_the_unrolled_equation(system, data):
    steps = system.num_steps
    states = system.flat_noise.clone() + torch.randn_like(system.flat_noise)  # any trajectory
    states[0] = system.flat_noise[0]
    outputs = system.evaluate(states[:steps], list(range(steps)))
    first = system.first_order_rhs(states, outputs, 1, steps) - states[1:]
    order = data.draw(st.integers(1, steps))
    fast = system.order_residual(first, 1, order)
    for row in range(1, steps + 1):
        slow = unrolled_residual(system, states, outputs, row, order)
        torch.testing.assert_close(fast[row - 1], slow, rtol=1e-10, atol=1e-10)


@given(system=fst.systems(max_steps=10))
def test_sequential_trajectory_zeroes_every_order(system):
    steps = system.num_steps
    reference = fpsolve.solve(system, solver="sequential")
    states = reference.trajectory.reshape(steps + 1, system.num_samples, -1)
    outputs = system.evaluate(states[:steps], list(range(steps)))
    first = system.first_order_rhs(states, outputs, 1, steps) - states[1:]
    scale = 1 + states.abs().max()
    for order in range(1, steps + 1):
        residual = system.order_residual(first, 1, order)
        assert residual.abs().max() <= 1e-12 * scale, order


@given(system=fst.systems(max_steps=10), data=st.data())
def test_fp_on_every_order_reaches_sequential_within_T(system, data):
    steps = system.num_steps
    reference = fpsolve.solve(system, solver="sequential")
    order = data.draw(st.integers(1, steps), label="order")
    guess = torch.randn(reference.trajectory.shape, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))))
    window = data.draw(st.integers(1, steps), label="window")
    init = fpsolve.initializers.FromTrajectory(trajectory=guess)
    # No early acceptance at all: only the finite-termination argument makes it exact.
    worst = fpsolve.solve(system, "fp", order=order, window=window, initializer=init,
                          stopping=fpsolve.StoppingRule(), max_iters=steps + 1)
    assert worst.converged and worst.iterations == steps
    torch.testing.assert_close(worst.sample, reference.sample, rtol=0, atol=1e-10)
    early = fpsolve.solve(system, "fp", order=order, window=window, initializer=init, tol=1e-13)
    assert early.converged and early.iterations <= steps
    torch.testing.assert_close(early.sample, reference.sample, rtol=0, atol=1e-10)


# Every registered sampler, with one variant per structure-changing option value (ddim eta 0/1,
# multistep orders 2/3, ...): a new sampler joins these tests by registering.
SAMPLERS = sampler_variants()
SOLVERS = {
    "fp-k1": ("fp", {"order": 1}),
    "fp-k4": ("fp", {"order": 4}),
    "fp-kT": ("fp", {}),
    "taa-m2": ("taa", {"history": 2}),
    "taa-m3-k6": ("taa", {"history": 3, "order": 6}),
    "aa-safeguarded": ("aa", {"history": 3, "safeguard": True}),  # safeguard: the controller's
    "newton": ("newton", {}),
    "newton-k5": ("newton", {"order": 5}),
}


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("solver_id", list(SOLVERS))
@pytest.mark.parametrize("sampler_id", list(SAMPLERS))
def test_every_solver_returns_the_sequential_sample(sampler_id, solver_id, window):
    kind, options = SAMPLERS[sampler_id]
    system = make_system(make_sampler(kind, 20, **options), dim=6, batch=3)
    reference = fpsolve.solve(system, "sequential")
    name, solver_options = SOLVERS[solver_id]
    solver_options = dict(solver_options)
    safeguard = solver_options.pop("safeguard", None)
    policy = window if safeguard is None else Controller(window=window, safeguard=safeguard)
    solution = fpsolve.solve(system, name, window=policy, tol=1e-13, **solver_options)
    assert solution.converged, solution.message
    assert solution.iterations <= 20
    assert solution.sample.shape == (3, 6)
    torch.testing.assert_close(solution.sample, reference.sample, rtol=0, atol=1e-10)
    torch.testing.assert_close(solution.trajectory, reference.trajectory, rtol=0, atol=1e-10)


@pytest.mark.parametrize("sampler_id", ["ddim-eta0.0", "ddpm", "dpm_solver-order2", "flow_euler"])
def test_standard_anderson_reaches_the_sequential_sample_where_it_converges(sampler_id):
    kind, options = SAMPLERS[sampler_id]
    system = make_system(make_sampler(kind, 20, **options), dim=6, batch=2)
    reference = fpsolve.solve(system, "sequential")
    solution = fpsolve.solve(system, "aa", tol=1e-13, max_iters=60)
    assert solution.converged, solution.message
    torch.testing.assert_close(solution.sample, reference.sample, rtol=0, atol=1e-10)


@given(system=fst.systems(max_steps=12), data=st.data())
def test_taa_with_history_one_is_fp_exactly(system, data):
    order = data.draw(st.integers(1, system.num_steps))
    window = data.draw(st.integers(1, system.num_steps))
    taa = fpsolve.solve(system, "taa", history=1, order=order, window=window, tol=1e-4)
    fp = fpsolve.solve(system, "fp", order=order, window=window, tol=1e-4)
    assert taa.iterations == fp.iterations
    assert torch.equal(taa.trajectory, fp.trajectory)


@given(system=fst.systems(max_steps=12), data=st.data())
def test_anchor_strictly_advances(system, data):
    name = data.draw(st.sampled_from(["fp", "taa", "jacobi"]))
    history = {"taa": {"history": data.draw(st.integers(1, 4))}}.get(name, {})
    window = data.draw(st.integers(1, system.num_steps))
    solution = fpsolve.solve(system, name, window=window, tol=1e-6, **history)
    anchors = (0,) + solution.residuals.anchors
    assert all(b > a for a, b in zip(anchors, anchors[1:], strict=False))
    assert anchors[-1] == system.num_steps and solution.iterations <= system.num_steps


@pytest.mark.parametrize("solver", ["fp", "jacobi", "taa", "aa"])
@pytest.mark.parametrize("sampler_id", list(SAMPLERS))
def test_true_trajectory_is_a_fixed_point(sampler_id, solver):
    kind, options = SAMPLERS[sampler_id]
    system = make_system(make_sampler(kind, 15, **options), dim=5, batch=2)
    reference = fpsolve.solve(system, "sequential")
    init = fpsolve.initializers.FromTrajectory(trajectory=reference)
    solution = fpsolve.solve(system, solver, initializer=init, tol=1e-12)
    assert solution.iterations == 1
    assert solution.residuals.first_order[0, 1:].max() <= 1e-13
    torch.testing.assert_close(solution.trajectory, reference.trajectory, rtol=0, atol=1e-13)


def test_ddim_with_eta_one_is_ddpm():
    """Two derivations of ancestral sampling give the same coefficients (any stride)."""
    steps = [999, 900, 700, 650, 300, 51, 50, 0]
    ddpm = fpsolve.samplers.DDPM(alphas_cumprod=make_sampler("ddim", 2).alphas_cumprod, timesteps=steps)
    ddim = fpsolve.samplers.DDIM(alphas_cumprod=ddpm.alphas_cumprod, timesteps=steps, eta=1.0)
    a, b = ddpm.affine_form(), ddim.affine_form()
    for field in ("state", "output", "noise"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-12, atol=1e-12)


@attrs.define(frozen=True, eq=False, kw_only=True)
class UpdatingFP(fpsolve.solvers.FP):
    """FP whose accepted rows take the update too (ParaDiGMS' semantics)."""

    name = "updating_fp"


@pytest.mark.parametrize("sampler_id", ["ddim-eta1.0", "dpm_solver-order3", "flow_dpm_solver-order3"])
def test_solvers_that_update_accepted_rows_stay_exact(sampler_id):
    kind, options = SAMPLERS[sampler_id]
    system = make_system(make_sampler(kind, 20, **options), dim=4, batch=2)
    reference = fpsolve.solve(system, "sequential")
    solution = fpsolve.solve(system, UpdatingFP(), window=Controller(window=7, update_accepted=True),
                             tol=1e-13)
    assert solution.converged and solution.iterations <= 20
    torch.testing.assert_close(solution.trajectory, reference.trajectory, rtol=0, atol=1e-10)
    # multistep samplers re-evaluate the model at updated accepted rows they still read
    keep = fpsolve.solve(system, "fp", window=7, tol=1e-13)
    assert solution.model_evals >= keep.model_evals
