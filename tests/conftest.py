"""Shared fixtures and hypothesis profiles (``dev`` locally, ``ci`` under CI=true)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import fpsolve
from fpsolve.schedules import linear_alphas_cumprod, spaced_timesteps
from fpsolve.testing.problems import problem_denoiser, problem_sampler

settings.register_profile("dev", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

ALPHAS_CUMPROD = linear_alphas_cumprod()  # DDPM's linear betas 1e-4..0.02 over 1000 steps
spaced = spaced_timesteps  # ``steps`` evenly spaced descending timesteps from 999 to 0


def make_sampler(kind, steps: int, **options):
    """Any registered sampler by name (or a sampler class): variance-preserving ones on the linear
    schedule (evenly spaced timesteps), flow-matching ones on the shifted flow grid (see
    fpsolve.testing.problems)."""
    return problem_sampler(kind, steps, **options)


def make_system(sampler, dim: int = 8, batch=None, seed: int = 0, **options):
    """A float64 system with a smooth nonlinear model returning what the sampler declares."""
    denoiser = problem_denoiser(sampler, dim, seed + 17)
    return fpsolve.TriangularSystem(sampler=sampler, denoiser=denoiser, shape=(dim,), batch=batch,
                                    generator=torch.Generator().manual_seed(seed), dtype=torch.float64,
                                    **options)


@pytest.fixture
def ddim_system():
    """DDIM-20 (eta 0) on an 8-dimensional smooth denoiser."""
    # by class, not name: building the fixture must not build the registry (tests that register
    # plugins set up their entry points after the fixtures)
    return make_system(make_sampler(fpsolve.samplers.DDIM, 20))
