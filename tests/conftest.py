"""Shared fixtures and hypothesis profiles (``dev`` locally, ``ci`` under CI=true)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import fpsolve
from fpsolve.testing.strategies import SmoothDenoiser

settings.register_profile("dev", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
ALPHAS_CUMPROD = torch.cumprod(1 - BETAS, 0)


def spaced(steps: int) -> list[int]:
    """``steps`` evenly spaced descending timesteps from 999 to 0."""
    return torch.linspace(999, 0, steps).round().long().tolist()


def make_sampler(kind: str, steps: int, **options):
    """A built-in sampler on the linear schedule."""
    classes = {"ddim": fpsolve.samplers.DDIM, "ddpm": fpsolve.samplers.DDPM,
               "dpm_solver": fpsolve.samplers.DPMSolver}
    return classes[kind](alphas_cumprod=ALPHAS_CUMPROD, timesteps=spaced(steps), **options)


def make_system(sampler, dim: int = 8, batch=None, seed: int = 0, **options):
    """A float64 system with a smooth nonlinear denoiser."""
    denoiser = SmoothDenoiser(seed + 17, dim, ALPHAS_CUMPROD)
    return fpsolve.TriangularSystem(sampler=sampler, denoiser=denoiser, shape=(dim,), batch=batch,
                                    generator=torch.Generator().manual_seed(seed), dtype=torch.float64,
                                    **options)


@pytest.fixture
def ddim_system():
    """DDIM-20 (eta 0) on an 8-dimensional smooth denoiser."""
    return make_system(make_sampler("ddim", 20))
