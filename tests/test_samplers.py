"""The built-in samplers against diffusers' own schedulers, step by step (sequential parity).

A shared denoiser drives both loops: diffusers' ``scheduler.step`` and fpsolve's sequential
solve. Any mistake in an affine coefficient shows up as a trajectory difference.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

import fpsolve
from fpsolve.testing.strategies import SmoothDenoiser


def run_diffusers(scheduler, denoiser, noise: torch.Tensor, eta: float = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """diffusers' own loop in float64; DDIM takes ``noise[i]`` as step i's variance noise."""
    sample = noise[0].clone()
    for index, t in enumerate(scheduler.timesteps):
        eps = denoiser(sample, t.expand(sample.shape[0]))
        if isinstance(scheduler, DDIMScheduler):
            out = scheduler.step(eps, t, sample, eta=eta, variance_noise=noise[index + 1])
        elif isinstance(scheduler, DDPMScheduler):
            out = scheduler.step(eps, t, sample, generator=generator)
        else:
            out = scheduler.step(eps, t, sample)
        sample = out.prev_sample
    return sample


def solve_fpsolve(sampler, denoiser, noise):
    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=denoiser, shape=noise.shape[2:],
                                      noise=noise, dtype=torch.float64)
    return system, fpsolve.solve(system, "sequential").sample


def _abar(scheduler) -> torch.Tensor:
    return scheduler.alphas_cumprod.to(torch.float64)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_diffusers(eta, set_alpha_to_one, spacing):
    # DDIMScheduler steps to t - 1000 // n, so the core sampler matches it where the timestep
    # stride is uniform (20 steps); other spacings are the diffusers adapter's job.
    scheduler = DDIMScheduler(set_alpha_to_one=set_alpha_to_one, timestep_spacing=spacing, clip_sample=False,
                              steps_offset=1 if spacing == "leading" else 0)
    scheduler.set_timesteps(20)
    abar = _abar(scheduler)
    final = 1.0 if set_alpha_to_one else float(abar[0])
    sampler = fpsolve.samplers.DDIM(alphas_cumprod=abar, timesteps=scheduler.timesteps, eta=eta,
                                    final_alpha_cumprod=final, noise_final_step=True)
    denoiser = SmoothDenoiser(3, 12, abar)
    noise = torch.randn(21, 2, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = run_diffusers(scheduler, denoiser, noise, eta=eta)
    _, sample = solve_fpsolve(sampler, denoiser, noise)
    torch.testing.assert_close(sample, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddpm_matches_diffusers(spacing):
    scheduler = DDPMScheduler(clip_sample=False, timestep_spacing=spacing)
    scheduler.set_timesteps(20)
    abar = _abar(scheduler)
    sampler = fpsolve.samplers.DDPM(alphas_cumprod=abar, timesteps=scheduler.timesteps)
    denoiser = SmoothDenoiser(5, 10, abar)
    noise = torch.zeros(21, 3, 10, dtype=torch.float64)
    noise[0] = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # DDPMScheduler draws one randn per step with t > 0 from the generator: replay that sequence.
    replay = torch.Generator().manual_seed(4)
    for index, t in enumerate(scheduler.timesteps.tolist()):
        if t > 0:
            noise[index + 1] = torch.randn(3, 10, dtype=torch.float64, generator=replay)
    expected = run_diffusers(scheduler, denoiser, noise, generator=torch.Generator().manual_seed(4))
    _, sample = solve_fpsolve(sampler, denoiser, noise)
    # diffusers computes the DDPM coefficients from float32 alphas: agreement to that rounding.
    torch.testing.assert_close(sample, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("steps", [8, 25])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_solver_matches_diffusers(order, steps):
    scheduler = DPMSolverMultistepScheduler(solver_order=order, algorithm_type="dpmsolver++",
                                            final_sigmas_type="zero", lower_order_final=True)
    scheduler.set_timesteps(steps)
    abar = _abar(scheduler)
    sampler = fpsolve.samplers.DPMSolver(alphas_cumprod=abar, timesteps=scheduler.timesteps, order=order,
                                         lower_order_final=True, final_alpha_cumprod=1.0)
    denoiser = SmoothDenoiser(7, 9, abar)
    noise = torch.randn(steps + 1, 2, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = run_diffusers(scheduler, denoiser, noise)
    _, sample = solve_fpsolve(sampler, denoiser, noise)
    # diffusers keeps its sigmas in float32: agreement to float32 rounding.
    torch.testing.assert_close(sample, expected, rtol=2e-5, atol=2e-5)


def test_dpm_solver_step_orders_follow_diffusers_rule():
    orders = fpsolve.samplers.DPMSolver(alphas_cumprod=torch.linspace(0.999, 0.01, 1000, dtype=torch.float64),
                                        timesteps=list(range(990, -1, -90)), order=3).step_orders()
    assert len(orders) == 12 and orders == [1, 2] + [3] * 8 + [2, 1]
