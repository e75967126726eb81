"""The built-in samplers against diffusers' own schedulers, step by step (sequential parity).

A shared denoiser drives both loops: diffusers' ``scheduler.step`` and fpsolve's sequential
solve. Any mistake in an affine coefficient shows up as a trajectory difference.
"""

from __future__ import annotations

import attrs
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

import fpsolve
from fpsolve.testing.strategies import SmoothDenoiser, SmoothVelocity


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


# -- flow matching: the core flow samplers against diffusers' flow schedulers (float64 input) --


def run_flow_diffusers(scheduler, model, noise: torch.Tensor, generator=None) -> torch.Tensor:
    """diffusers' loop with the model called at ``t = sigma * 1000`` (the core samplers' model time).

    The flow schedulers' integer or float32 timesteps are a rounding of the same time; calling the
    model at the exact float64 level isolates the step arithmetic under test.
    """
    sample = noise[0].clone()
    sigmas = scheduler.sigmas.to(torch.float64)
    for index, t in enumerate(scheduler.timesteps):
        velocity = model(sample, (sigmas[index] * 1000).expand(sample.shape[0]))
        extra = {"generator": generator} if generator is not None else {}
        sample = scheduler.step(velocity, t, sample, return_dict=False, **extra)[0].to(torch.float64)
    return sample


def flow_sigmas(scheduler) -> torch.Tensor:
    return scheduler.sigmas.to(torch.float64)[:len(scheduler.timesteps) + 1]


# FlowMatchEulerDiscreteScheduler upcasts the sample to float32 inside step (so the float64 loop
# is rounded to float32 once per step): measured <= 2.2e-7 on states of size ~1.
FLOW_EULER_PARITY = 2e-6


@pytest.mark.parametrize("config", [{}, {"shift": 3.0}, {"shift": 3.0, "use_karras_sigmas": True}])
@pytest.mark.parametrize("steps", [1, 7, 28])
def test_flow_euler_matches_diffusers(config, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(steps)
    sampler = fpsolve.samplers.FlowEuler(sigmas=flow_sigmas(scheduler), num_train_timesteps=1000)
    model = SmoothVelocity(4, 10)
    noise = torch.zeros(steps + 1, 3, 10, dtype=torch.float64)
    noise[0] = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = run_flow_diffusers(scheduler, model, noise)
    system, sample = solve_fpsolve(sampler, model, noise)
    assert system.timestep_tensor.dtype == torch.float64  # continuous model time
    torch.testing.assert_close(sample, expected, rtol=FLOW_EULER_PARITY, atol=FLOW_EULER_PARITY)


@pytest.mark.parametrize("steps", [1, 9])
def test_stochastic_flow_euler_matches_diffusers_stochastic_sampling(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.utils.torch_utils import randn_tensor

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    scheduler.set_timesteps(steps)
    sampler = fpsolve.samplers.StochasticFlowEuler(sigmas=flow_sigmas(scheduler))
    model = SmoothVelocity(6, 10)
    noise = torch.zeros(steps + 1, 3, 10, dtype=torch.float64)
    noise[0] = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # diffusers draws one float32 tensor per step (the upcast sample's dtype): replay the sequence
    replay = torch.Generator().manual_seed(8)
    for index in range(steps):
        noise[index + 1] = randn_tensor((3, 10), generator=replay, dtype=torch.float32).to(torch.float64)
    expected = run_flow_diffusers(scheduler, model, noise, generator=torch.Generator().manual_seed(8))
    _, sample = solve_fpsolve(sampler, model, noise)
    torch.testing.assert_close(sample, expected, rtol=FLOW_EULER_PARITY, atol=FLOW_EULER_PARITY)
    # negative control: the deterministic sampler on the same noise is far away (except for one
    # step from sigma 1 to 0, where both return x - v)
    _, ode = solve_fpsolve(fpsolve.samplers.FlowEuler(sigmas=flow_sigmas(scheduler)), model, noise)
    assert (ode - expected).abs().max() > (1e-2 if steps > 1 else -1)


@pytest.mark.parametrize("steps", [6, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_flow_dpm_solver_matches_diffusers_flow_sigmas(order, steps):
    scheduler = DPMSolverMultistepScheduler(solver_order=order, use_flow_sigmas=True, flow_shift=3.0,
                                            prediction_type="flow_prediction", lower_order_final=True)
    scheduler.set_timesteps(steps)
    sigmas = flow_sigmas(scheduler)
    assert sigmas[-1] == 0
    sampler = fpsolve.samplers.FlowDPMSolver(sigmas=sigmas, order=order, lower_order_final=True)
    model = SmoothVelocity(9, 9)
    noise = torch.randn(steps + 1, 2, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = run_flow_diffusers(scheduler, model, noise)
    _, sample = solve_fpsolve(sampler, model, noise)
    # diffusers computes its step coefficients (lambdas, exponentials) from float32 sigmas in
    # float32: agreement to that rounding (measured <= 1.1e-7 on states of size ~1)
    torch.testing.assert_close(sample, expected, rtol=2e-6, atol=2e-6)


def test_flow_samplers_declare_velocity_and_continuous_time():
    sigmas = torch.linspace(1, 0, 5)
    samplers = fpsolve.samplers
    for cls in (samplers.FlowEuler, samplers.StochasticFlowEuler, samplers.FlowDPMSolver, samplers.FlowUniPC):
        sampler = cls(sigmas=sigmas, num_train_timesteps=500)
        assert sampler.prediction == "velocity" and sampler.continuous_time
        assert sampler.timesteps == pytest.approx([500.0, 375.0, 250.0, 125.0])
        torch.testing.assert_close(sampler.state_sigmas(), sigmas.double())
    ddim = fpsolve.samplers.DDIM(alphas_cumprod=torch.linspace(0.99, 0.01, 10), timesteps=[9, 0])
    assert ddim.prediction == "epsilon" and not ddim.continuous_time


@pytest.mark.parametrize("sigmas, match", [
    ([1.0], "T >= 1"),
    ([1.0, 0.5, 0.5, 0.0], "strictly decreasing"),
    ([1.5, 0.0], r"\[0, 1\]"),
    ([[1.0, 0.0]], "1-D"),
])
def test_flow_sigmas_are_validated(sigmas, match):
    with pytest.raises(fpsolve.errors.InvalidOptionError, match=match):
        fpsolve.samplers.FlowEuler(sigmas=torch.tensor(sigmas))
    with pytest.raises(fpsolve.errors.InvalidOptionError, match="num_train_timesteps"):
        fpsolve.samplers.FlowEuler(sigmas=torch.tensor([1.0, 0.0]), num_train_timesteps=0)


def test_stopping_rules_read_each_states_noise_level_from_the_flow_sampler():
    seen = []

    @attrs.define(frozen=True, eq=False)
    class Recorder(fpsolve.stopping.StoppingRule):
        def converged(self, view):
            seen.append((view.lo, view.hi, view.sigmas.clone(), view.step_variances.clone()))
            return None

    sampler = fpsolve.samplers.FlowEuler(sigmas=torch.linspace(1, 0, 9, dtype=torch.float64) ** 2)
    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=SmoothVelocity(1, 3), shape=(3,),
                                      generator=torch.Generator().manual_seed(0))
    fpsolve.solve(system, "fp", window=4, stopping=Recorder() & fpsolve.stopping.RMS(tol1=1e-10, tol2=1e-10))
    assert seen
    levels, variances = sampler.state_sigmas(), sampler.step_variances()
    for lo, hi, sigmas, step_variances in seen:
        torch.testing.assert_close(sigmas, levels[lo:hi + 1])  # the flow sigma itself, not sqrt(1 - abar)
        torch.testing.assert_close(step_variances, variances[lo:hi + 1])
    # the flow levels map to a variance-preserving schedule for the ParaDiGMS scale: alpha = 1 - sigma
    alpha, sigma = 1 - levels, levels
    abar = alpha**2 / (alpha**2 + sigma**2)
    expected = (1 - abar[2]) / (1 - abar[1]) * (1 - abar[1] / abar[2]) * (alpha[2] ** 2 + sigma[2] ** 2)
    torch.testing.assert_close(variances[2], expected)


def test_flow_euler_calls_the_model_at_sigma_times_train_steps_and_steps_with_the_velocity():
    # the public contract, checked from outside with an arbitrary model: t = sigmas[i] * N (floats),
    # and x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, t_i)
    sigmas = torch.tensor([1.0, 0.7, 0.45, 0.2, 0.05, 0.0], dtype=torch.float64)
    calls = []

    def model(x, t):
        calls.append(t.clone())
        return torch.sin(3 * x) + t[:, None] / 250

    sampler = fpsolve.samplers.FlowEuler(sigmas=sigmas, num_train_timesteps=250)
    noise = torch.randn(6, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=model, shape=(3,), noise=noise)
    trajectory = fpsolve.solve(system, "sequential").trajectory
    seen = torch.cat(calls)
    assert seen.dtype == torch.float64
    torch.testing.assert_close(seen.unique().sort(descending=True).values, sigmas[:-1] * 250)
    x = noise[0]
    for i in range(5):
        t = (sigmas[i] * 250).expand(2)
        x = x + (sigmas[i + 1] - sigmas[i]) * (torch.sin(3 * x) + t[:, None] / 250)
        torch.testing.assert_close(trajectory[i + 1], x, rtol=0, atol=1e-14)
    parallel = fpsolve.solve(system, "taa", tol=1e-13)
    torch.testing.assert_close(parallel.sample, x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("steps", [2, 6, 20])
@pytest.mark.parametrize("order, disable_corrector", [(1, ()), (2, ()), (3, ()), (2, (0, 2)), (3, (1,))])
def test_flow_unipc_matches_diffusers_flow_unipc(order, disable_corrector, steps):
    scheduler = UniPCMultistepScheduler(solver_order=order, use_flow_sigmas=True, flow_shift=3.0,
                                        prediction_type="flow_prediction",
                                        disable_corrector=list(disable_corrector))
    scheduler.set_timesteps(steps)
    sampler = fpsolve.samplers.FlowUniPC(sigmas=flow_sigmas(scheduler), order=order,
                                         disable_corrector=disable_corrector)
    model = SmoothVelocity(9, 9)
    noise = torch.randn(steps + 1, 2, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = run_flow_diffusers(scheduler, model, noise)
    _, sample = solve_fpsolve(sampler, model, noise)
    # diffusers computes the UniPC coefficients from float32 sigmas: measured <= 5e-8
    torch.testing.assert_close(sample, expected, rtol=1e-6, atol=1e-6)
    if steps == 20 and order > 1:  # negative controls: one order lower, or no corrector, is far away
        _, lower = solve_fpsolve(attrs.evolve(sampler, order=order - 1), model, noise)
        no_corrector = attrs.evolve(sampler, disable_corrector=tuple(range(20)))
        _, uncorrected = solve_fpsolve(no_corrector, model, noise)
        assert (lower - expected).abs().max() > 1e-5 and (uncorrected - expected).abs().max() > 1e-5


def test_flow_unipc_refuses_a_high_order_final_step_to_zero():
    sampler = fpsolve.samplers.FlowUniPC(sigmas=torch.linspace(1, 0, 6), order=3, lower_order_final=False)
    with pytest.raises(fpsolve.errors.InvalidOptionError, match="lower_order_final=True"):
        sampler.affine_form()


def test_the_conformance_kit_checks_the_declared_model_convention():
    from fpsolve.testing import ConformanceError
    from fpsolve.testing.checks import check_sampler_interface

    sigmas = torch.linspace(1, 0, 4)
    check_sampler_interface(fpsolve.samplers.FlowEuler(sigmas=sigmas))

    @attrs.define(frozen=True, eq=False, kw_only=True)
    class NoiseNamed(fpsolve.samplers.FlowEuler):
        name = "noise_named"
        prediction = "noise"

    @attrs.define(frozen=True, eq=False, kw_only=True)
    class IntegerTime(fpsolve.samplers.FlowEuler):
        name = "integer_time"
        continuous_time = False

    with pytest.raises(ConformanceError, match="prediction must be one of"):
        check_sampler_interface(NoiseNamed(sigmas=sigmas))
    with pytest.raises(ConformanceError, match="fractional timesteps"):
        check_sampler_interface(IntegerTime(sigmas=torch.tensor([0.9999, 0.5, 0.0])))
