"""Initializers: noise copy, a given trajectory (with a frozen prefix), a coarse warm start."""

from __future__ import annotations

import pytest
import torch

import fpsolve
from fpsolve.errors import InvalidOptionError, ShapeError
from fpsolve.testing.strategies import SmoothDenoiser

from .conftest import ALPHAS_CUMPROD, make_sampler, make_system


def sequential_from(system: fpsolve.TriangularSystem, frozen: torch.Tensor, anchor: int) -> torch.Tensor:
    """The sampler run step by step from rows ``0..anchor`` of ``frozen`` (brute force)."""
    states = frozen.reshape(system.flat_noise.shape).clone()
    outputs = system.evaluate(states[: anchor + 1], list(range(anchor + 1)))
    outputs = torch.cat([outputs, torch.zeros(system.num_steps - anchor - 1, *outputs.shape[1:],
                                              dtype=outputs.dtype)])
    for row in range(anchor + 1, system.num_steps + 1):
        states[row] = system.first_order_rhs(states, outputs, row, row)[0]
        if row < system.num_steps:
            outputs[row] = system.evaluate(states[row:row + 1], [row])[0]
    return system.unflatten(states)


@pytest.mark.parametrize("kind,options", [("ddim", {}), ("ddpm", {}), ("dpm_solver", {"order": 3})])
def test_frozen_prefix_solves_only_the_last_steps(kind, options):
    """A neighbouring problem (another denoiser, same noise) reuses the first prompt's trajectory."""
    sampler = make_sampler(kind, 30, **options)
    first = make_system(sampler, dim=5, batch=2, seed=3)
    first_solution = fpsolve.solve(first, "taa", tol=1e-12)
    second = fpsolve.TriangularSystem(sampler=sampler,
                                      denoiser=SmoothDenoiser(99, 5, ALPHAS_CUMPROD, gain=0.9),
                                      shape=(5,), batch=2, noise=first.unflatten(first.flat_noise))
    init = fpsolve.initializers.FromTrajectory(trajectory=first_solution, solve_last=12)
    solution = fpsolve.solve(second, "taa", initializer=init, tol=1e-12)
    assert solution.converged and solution.iterations <= 12
    assert min(w[0] for w in solution.residuals.windows) == 30 - 12 + 1
    expected = sequential_from(second, first_solution.trajectory, 30 - 12)
    torch.testing.assert_close(solution.trajectory, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(solution.trajectory[:19], first_solution.trajectory[:19], rtol=0, atol=0)


def test_trajectory_initializer_validates_its_input(ddim_system):
    with pytest.raises(InvalidOptionError, match="needs trajectory="):
        fpsolve.solve(ddim_system, "taa", initializer="trajectory")
    with pytest.raises(ShapeError, match="T\\+1 = 21 states"):
        fpsolve.solve(ddim_system, "taa", initializer=fpsolve.initializers.FromTrajectory(
            trajectory=torch.zeros(20, 8)))
    with pytest.raises(InvalidOptionError, match="solve_last must lie in 1..T"):
        fpsolve.solve(ddim_system, "taa", initializer=fpsolve.initializers.FromTrajectory(
            trajectory=torch.zeros(21, 8), solve_last=0))


def test_coarse_initializer_counts_its_warm_up_and_reaches_the_sequential_sample():
    system = make_system(make_sampler("ddim", 40), dim=6)
    reference = fpsolve.solve(system, "sequential")
    solution = fpsolve.solve(system, "taa", initializer=fpsolve.initializers.Coarse(steps=8), tol=1e-12)
    assert solution.iterations == 8 + len(solution.residuals)
    assert solution.model_evals == 8 + sum(solution.residuals.evaluations)
    torch.testing.assert_close(solution.sample, reference.sample, rtol=0, atol=1e-10)


def test_coarse_guess_interpolates_between_coarse_states():
    sampler = make_sampler("ddim", 40)
    system = make_system(sampler, dim=6)
    guess = fpsolve.initializers.Coarse(steps=5).initialize(system)
    coarse_sampler = sampler.coarsened(5)
    coarse = fpsolve.solve(fpsolve.TriangularSystem(
        sampler=coarse_sampler, denoiser=system.denoiser, shape=(6,),
        noise=torch.cat([system.flat_noise[:1, 0], torch.zeros(5, 6, dtype=torch.float64)])), "sequential")
    fine_steps = list(sampler.timesteps)
    for index, t in enumerate(coarse_sampler.timesteps):
        torch.testing.assert_close(guess.trajectory[fine_steps.index(t), 0], coarse.trajectory[index])
    torch.testing.assert_close(guess.trajectory[-1, 0], coarse.trajectory[-1])
    assert guess.iterations == 5 and guess.valid_upto == 40


def test_noise_copy_fills_rows_lazily_with_the_lowest_initialised_state():
    system = make_system(make_sampler("ddim", 12), dim=3)
    seen = []
    solution = fpsolve.solve(system, "fp", window=4, tol=1e-10,
                             observers=[lambda info: seen.append((info.lo, info.hi))])
    assert seen[0] == (1, 4) and all(hi - lo + 1 <= 4 for lo, hi in seen)
    assert solution.converged


def test_coarse_initializer_keeps_the_sample_shape():
    """Denoisers may insist on their input shape (image models do): the coarse solve keeps it."""
    sampler = make_sampler("ddim", 20)
    inner = SmoothDenoiser(4, 12, ALPHAS_CUMPROD)

    def image_denoiser(x, t):
        assert x.shape[1:] == (3, 2, 2), x.shape
        return inner(x, t)

    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=image_denoiser, shape=(3, 2, 2), batch=2,
                                      generator=torch.Generator().manual_seed(0))
    reference = fpsolve.solve(system, "sequential")
    solution = fpsolve.solve(system, "taa", initializer=fpsolve.initializers.Coarse(steps=4), tol=1e-12)
    torch.testing.assert_close(solution.sample, reference.sample, rtol=0, atol=1e-10)
