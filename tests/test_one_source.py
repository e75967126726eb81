"""One source for each thing (issue 12, item 4): the schedules and timestep grids, the step
coefficients' accessor and the shared validators, each checked against what it replaced."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fpsolve
from fpsolve.errors import InvalidOptionError
from fpsolve.models import digits
from fpsolve.schedules import linear_alphas_cumprod, shifted_flow_sigmas, spaced_timesteps
from fpsolve.testing import problems

from .conftest import make_sampler

# -- schedules: bit-identical to the formulas each copy wrote out --------------------------------


def old_linear(n, b0, b1):
    return torch.cumprod(1 - torch.linspace(b0, b1, n, dtype=torch.float64), 0)


def old_spaced(steps, n):
    return torch.linspace(n - 1, 0, steps).round().long().tolist()


def test_the_linear_schedule_is_ddpms_bit_for_bit():
    assert torch.equal(linear_alphas_cumprod(), old_linear(1000, 1e-4, 0.02))
    betas = torch.linspace(digits.BETA_START, digits.BETA_END, digits.NUM_TRAIN_TIMESTEPS, dtype=torch.float64)
    assert torch.equal(digits.digits_alphas_cumprod(), torch.cumprod(1.0 - betas, dim=0))  # digits' old lines
    assert linear_alphas_cumprod().dtype == torch.float64


@given(st.integers(1, 2000), st.floats(1e-5, 0.01), st.floats(0.0, 0.05))
def test_the_linear_schedule_matches_the_formula(n, b0, extra):
    assert torch.equal(linear_alphas_cumprod(n, b0, b0 + extra), old_linear(n, b0, b0 + extra))


@given(st.integers(1, 1000).flatmap(lambda n: st.tuples(st.integers(1, n), st.just(n))))
def test_spaced_timesteps_match_the_formula(case):
    steps, n = case
    assert spaced_timesteps(steps, n) == old_spaced(steps, n)
    assert spaced_timesteps(np.int64(steps), np.int32(n)) == old_spaced(steps, n)


@pytest.mark.parametrize("steps", [1, 2, 7, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 3])
def test_shifted_flow_sigmas_match_the_formula(steps, shift):
    even = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    assert torch.equal(shifted_flow_sigmas(steps, shift), shift * even / (1 + (shift - 1) * even))


def test_every_public_home_is_the_one_implementation():
    assert fpsolve.models.linear_alphas_cumprod is linear_alphas_cumprod
    assert fpsolve.models.spaced_timesteps is spaced_timesteps
    assert problems.linear_alphas_cumprod is linear_alphas_cumprod
    assert problems.spaced_timesteps is spaced_timesteps
    assert problems.shifted_flow_sigmas is shifted_flow_sigmas


@pytest.mark.parametrize("call, name", [
    (lambda: spaced_timesteps(0), "num_steps"),
    (lambda: spaced_timesteps(1001), "num_steps must lie in 1..1000"),
    (lambda: spaced_timesteps(True), "num_steps"),
    (lambda: spaced_timesteps(2.0), "num_steps"),
    (lambda: spaced_timesteps(10, 0), "num_train_steps"),
    (lambda: linear_alphas_cumprod(True), "num_train_steps"),
    (lambda: linear_alphas_cumprod(10, 0.0), "beta_start"),
    (lambda: linear_alphas_cumprod(10, 0.02, 0.01), "beta_start <= beta_end"),
    (lambda: shifted_flow_sigmas(4, 0.0), "shift"),
])
def test_bad_schedule_arguments_name_the_argument(call, name):
    with pytest.raises(InvalidOptionError, match=name):
        call()


# -- the step coefficients' accessor ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddim", "dpm_solver"])
def test_coefficients_are_the_affine_form_on_the_device(kind):
    sampler = make_sampler(kind, 9)
    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=problems.problem_denoiser(sampler, 4, 0),
                                      shape=(4,), dtype=torch.float32)
    coefficients = system.coefficients()
    form = system.affine_form
    for name in ("state", "output", "noise"):
        value = getattr(coefficients, name)
        assert value.dtype == torch.float32 and value.device == system.device
        assert torch.equal(value, getattr(form, name).to(torch.float32))
    state, output, noise = coefficients  # unpacks in this order
    assert state is coefficients.state and noise is coefficients.noise
    assert system.coefficients() is coefficients  # computed once
