"""Scheduler adapters: fpsolve's parallel solve against diffusers' own sequential loop.

For every supported scheduler and every config option that changes its math, the system built by
``scheduler_system`` is solved with ``taa`` at a vanishing tolerance and compared with
``scheduler.step`` run sequentially by diffusers (same model, same generator). Refused options
must raise ``UnsupportedError`` naming the option, its value and the supported values.
"""

from __future__ import annotations

import subprocess
import sys

import diffusers
import pytest
import torch

import fpsolve
from fpsolve.errors import UnsupportedError
from fpsolve.integrations.diffusers import compile_scheduler, scheduler_sampler, scheduler_system
from fpsolve.integrations.diffusers.testing import GaussianDenoiser, reference_loop
from tests._diffusers_helpers import one_thread_per_module

SHAPE = (2, 3, 4)  # one sample: [C, H, W]
BATCH = 2
# Max abs difference to diffusers' float32 loop. The noise floor is float32 rounding of the loop's
# own steps (fpsolve keeps a float64 state): 1.2e-7 per step at |x| ~ 1, amplified little because
# the GaussianDenoiser loop contracts (no clipping, no random network). Measured over the 55 scheduler
# cases on a 2-core x86_64 CPU (torch 2.13): at most 2.7e-6 (EulerDiscreteScheduler), median 2e-7,
# so 1e-5 leaves 3.7x for machines that round differently.
PARITY = 1e-5


_one_thread = one_thread_per_module()


def make(name: str, steps: int, config: dict | None = None, set_timesteps: dict | None = None):
    scheduler = getattr(diffusers, name)(**(config or {}))
    scheduler.set_timesteps(steps, **(set_timesteps or {}))
    return scheduler


def parity(scheduler, step_kwargs=None, seed=0, solver="taa", model_dtype=torch.float32, **solve_options):
    """(max abs difference to diffusers' loop run in ``model_dtype``, solution)."""
    prediction = scheduler.config.prediction_type
    model = GaussianDenoiser(scheduler.alphas_cumprod, size=24,
                             prediction_type="sample" if prediction == "original_sample" else prediction)
    expected = reference_loop(scheduler, model, (BATCH, *SHAPE), torch.Generator().manual_seed(seed),
                              step_kwargs,
                              dtype=model_dtype)
    system = scheduler_system(scheduler, model, shape=SHAPE, batch=BATCH,
                              generator=torch.Generator().manual_seed(seed),
                              step_kwargs=step_kwargs, model_dtype=model_dtype)
    solution = fpsolve.solve(system, solver, **({"tol": 1e-9} if solver != "sequential" else {}),
                             **solve_options)
    assert solution.sample.shape == expected.shape
    return float((solution.sample.to(expected.dtype) - expected).abs().max()), solution


CASES = [
    # DDIM: schedules, spacings, offsets, final alpha, prediction types, clipping, eta
    ("DDIMScheduler", {"clip_sample": False}, None),
    ("DDIMScheduler", {"beta_schedule": "scaled_linear", "clip_sample": False}, None),
    ("DDIMScheduler", {"beta_schedule": "squaredcos_cap_v2", "clip_sample": False}, None),
    ("DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False,
                       "clip_sample": False}, None),
    ("DDIMScheduler", {"timestep_spacing": "linspace", "set_alpha_to_one": False, "clip_sample": False},
     None),
    ("DDIMScheduler", {"timestep_spacing": "trailing", "clip_sample": False}, None),
    ("DDIMScheduler", {"prediction_type": "v_prediction", "clip_sample": False}, None),
    ("DDIMScheduler", {"prediction_type": "sample"}, None),
    ("DDIMScheduler", {"clip_sample": True, "clip_sample_range": 0.5}, None),
    ("DDIMScheduler", {"clip_sample": True, "clip_sample_range": 0.5}, {"use_clipped_model_output": True}),
    ("DDIMScheduler", {"thresholding": True, "sample_max_value": 1.2, "dynamic_thresholding_ratio": 0.9},
     None),
    ("DDIMScheduler", {"clip_sample": True, "prediction_type": "v_prediction", "clip_sample_range": 0.6},
     None),
    ("DDIMScheduler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                       "timestep_spacing": "trailing", "clip_sample": False}, None),
    ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}, {"eta": 1.0}),
    ("DDIMScheduler", {"clip_sample": True, "timestep_spacing": "linspace"}, {"eta": 0.5}),
    # DDPM: variance types, prediction types, clipping, spacings
    ("DDPMScheduler", {}, None),
    ("DDPMScheduler", {"variance_type": "fixed_small_log", "clip_sample": False}, None),
    ("DDPMScheduler", {"variance_type": "fixed_large", "timestep_spacing": "trailing"}, None),
    ("DDPMScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "linspace"}, None),
    ("DDPMScheduler", {"prediction_type": "sample", "clip_sample_range": 0.5}, None),
    ("DDPMScheduler", {"thresholding": True, "sample_max_value": 1.2, "beta_schedule": "squaredcos_cap_v2"},
     None),
    ("DDPMScheduler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                       "timestep_spacing": "trailing"}, None),
    # DPM-Solver(++), multistep and singlestep
    ("DPMSolverMultistepScheduler", {"solver_order": 1}, None),
    ("DPMSolverMultistepScheduler", {"solver_order": 2, "lower_order_final": False}, None),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, None),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "lower_order_final": False,
                                     "final_sigmas_type": "sigma_min"},
     None),
    ("DPMSolverMultistepScheduler", {"solver_type": "heun", "use_karras_sigmas": True}, None),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, None),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, None),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"},
     None),
    ("DPMSolverMultistepScheduler", {"thresholding": True, "sample_max_value": 1.2,
                                     "prediction_type": "v_prediction"}, None),
    ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True, "euler_at_final": True,
                                     "timestep_spacing": "trailing"},
     None),
    ("DPMSolverMultistepScheduler", {"prediction_type": "sample", "beta_schedule": "scaled_linear"}, None),
    ("DPMSolverSinglestepScheduler", {"solver_order": 2}, None),
    ("DPMSolverSinglestepScheduler", {"solver_order": 3, "use_karras_sigmas": True}, None),
    # UniPC and DEIS
    ("UniPCMultistepScheduler", {}, None),
    ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
     None),
    ("UniPCMultistepScheduler", {"predict_x0": False, "use_karras_sigmas": True,
                                 "final_sigmas_type": "sigma_min"},
     None),
    ("UniPCMultistepScheduler", {"disable_corrector": [0, 1], "thresholding": True,
                                 "sample_max_value": 1.2}, None),
    ("DEISMultistepScheduler", {"solver_order": 3}, None),
    ("DEISMultistepScheduler", {"thresholding": True, "sample_max_value": 1.2,
                                "timestep_spacing": "trailing"}, None),
    # Euler family, Heun, LMS, PNDM
    ("EulerDiscreteScheduler", {}, None),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, None),
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing", "prediction_type": "v_prediction",
                                "rescale_betas_zero_snr": True}, None),
    ("EulerDiscreteScheduler", {"interpolation_type": "log_linear", "timestep_spacing": "leading",
                                "steps_offset": 1}, None),
    ("EulerDiscreteScheduler", {}, {"s_churn": 0.5}),
    ("EulerAncestralDiscreteScheduler", {}, None),
    ("EulerAncestralDiscreteScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
     None),
    ("HeunDiscreteScheduler", {}, None),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True}, None),
    ("LMSDiscreteScheduler", {}, None),
    ("PNDMScheduler", {}, None),
    ("PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1}, None),
    ("DDIMParallelScheduler", {"set_alpha_to_one": False, "timestep_spacing": "trailing"}, None),
    ("DDPMParallelScheduler", {"timestep_spacing": "linspace"}, None),
]


@pytest.mark.parametrize("name, config, step_kwargs", CASES,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)])
def test_parallel_solve_matches_the_schedulers_own_loop(name, config, step_kwargs, record_property):
    scheduler = make(name, 10, config)
    error, solution = parity(scheduler, step_kwargs)
    record_property("max_abs_error", error)
    assert solution.converged
    assert error <= PARITY, f"{name} {config} {step_kwargs}: max abs difference {error:.2e}"


@pytest.mark.parametrize("steps", [1, 2, 25])
def test_step_counts_and_multistep_orders(steps):
    # One step from sigma 157 to 0 divides by alpha = 1/157: diffusers' own float32 loop is only good
    # to ~1e-5 there, so this test runs both loops in float64.
    for name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DDIMScheduler"):
        config = {"solver_order": 3} if "Multistep" in name else {"clip_sample": False}
        error, _ = parity(make(name, steps, config), model_dtype=torch.float64)
        assert error <= PARITY, (name, steps, error)


def test_custom_timesteps_and_sigmas():
    error, _ = parity(_custom("DDPMScheduler", timesteps=[950, 700, 420, 300, 90, 5]))
    assert error <= PARITY
    error, _ = parity(_custom("EulerDiscreteScheduler", sigmas=[14.0, 6.0, 2.5, 1.0, 0.3, 0.05]))
    assert error <= PARITY


def _custom(name, **set_timesteps):
    scheduler = getattr(diffusers, name)()
    scheduler.set_timesteps(**set_timesteps)
    return scheduler


def test_sequential_solver_agrees_too():
    error, solution = parity(make("DPMSolverMultistepScheduler", 12, {"solver_order": 3}),
                             solver="sequential")
    assert error <= PARITY and solution.iterations == 12


def test_a_mismatched_loop_is_detected():
    # negative control: the system replays eta=0 while diffusers steps with eta=1
    scheduler = make("DDIMScheduler", 10, {"clip_sample": False})
    model = GaussianDenoiser(scheduler.alphas_cumprod, size=24)
    expected = reference_loop(scheduler, model, (BATCH, *SHAPE), torch.Generator().manual_seed(0),
                              {"eta": 1.0})
    system = scheduler_system(scheduler, model, shape=SHAPE, batch=BATCH,
                              generator=torch.Generator().manual_seed(0))
    sample = fpsolve.solve(system, "taa", tol=1e-9).sample
    assert float((sample.to(torch.float32) - expected).abs().max()) > 1e-2


def test_noise_draws_follow_the_loop():
    # DDPM draws only for t > 0; DDIM draws every step when eta > 0; DPM-Solver++ never
    ddpm = compile_scheduler(make("DDPMScheduler", 10, {"timestep_spacing": "linspace"}))
    assert [d is not None for d in ddpm.probed.draws] == [t > 0 for t in ddpm.probed.timesteps.tolist()]
    ddim = compile_scheduler(make("DDIMScheduler", 6), {"eta": 0.3})
    assert all(d == "model" for d in ddim.probed.draws)
    assert all(d is None for d in compile_scheduler(make("DPMSolverMultistepScheduler", 6)).probed.draws)
    sde = compile_scheduler(make("DPMSolverMultistepScheduler", 6, {"algorithm_type": "sde-dpmsolver++"}))
    assert all(d == "float32" for d in sde.probed.draws)  # diffusers draws SDE noise in float32


def test_list_of_generators_draws_per_sample():
    scheduler = make("DDPMScheduler", 8)
    model = GaussianDenoiser(scheduler.alphas_cumprod, size=24)
    seeds = [3, 11]
    expected = reference_loop(scheduler, model, (BATCH, *SHAPE),
                              [torch.Generator().manual_seed(s) for s in seeds])
    system = scheduler_system(scheduler, model, shape=SHAPE, batch=BATCH,
                              generator=[torch.Generator().manual_seed(s) for s in seeds])
    sample = fpsolve.solve(system, "taa", tol=1e-9).sample
    assert float((sample.to(torch.float32) - expected).abs().max()) <= PARITY


def test_the_sampler_and_its_coefficients():
    scheduler = make("DDIMScheduler", 10, {"clip_sample": False, "set_alpha_to_one": False})
    sampler = scheduler_sampler(scheduler)
    form = sampler.affine_form()
    assert form.num_steps == 10 and form.lags == 1
    abar = scheduler.alphas_cumprod.double()
    t, prev = int(scheduler.timesteps[0]), int(scheduler.timesteps[1])
    assert float(form.state[1, 0]) == pytest.approx(float((abar[prev] / abar[t]).sqrt()), rel=1e-6)
    # the last step goes to final_alpha_cumprod = abar[0] (set_alpha_to_one=False)
    last = int(scheduler.timesteps[-1])
    assert float(form.state[-1, 0]) == pytest.approx(float((abar[0] / abar[last]).sqrt()), rel=1e-6)
    assert sampler.timesteps == tuple(scheduler.timesteps.tolist())
    assert sampler.state_sigmas()[-1] == pytest.approx(float((1 - abar[0]).sqrt()))


def test_sampler_refuses_a_scheduler_that_needs_the_denoiser_fold():
    with pytest.raises(UnsupportedError, match="clip_sample=True.*scheduler_system"):
        scheduler_sampler(make("DDIMScheduler", 10))


@pytest.mark.parametrize("name, config, option, value", [
    ("DDPMScheduler", {"variance_type": "learned_range"}, "variance_type", "'learned_range'"),
    ("DDPMScheduler", {"variance_type": "learned"}, "variance_type", "'learned'"),
    # diffusers takes sqrt(log(beta)) < 0 here: its own loop returns NaN
    ("DDPMScheduler", {"variance_type": "fixed_large_log"}, "variance_type", "'fixed_large_log'"),
    ("DPMSolverMultistepScheduler", {"variance_type": "learned_range"}, "variance_type", "'learned_range'"),
    # flow sigmas are supported (tests/test_diffusers_flow_schedulers.py); a velocity without them is not
    ("DPMSolverMultistepScheduler", {"prediction_type": "flow_prediction"}, "use_flow_sigmas", "False"),
    ("HeunDiscreteScheduler", {"clip_sample": True}, "clip_sample", "True"),
])
def test_refused_options_name_option_value_and_supported_values(name, config, option, value):
    with pytest.raises(UnsupportedError) as error:
        compile_scheduler(make(name, 6, config))
    message = str(error.value)
    assert f"{option}={value}" in message and "supported values" in message and name in message


@pytest.mark.parametrize("name, config", [
    # zero terminal SNR with an eps model: x0 = (x - eps) / 0 at t = 999
    ("DDIMScheduler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "clip_sample": False}),
    # noise prediction divided by sigma = 0 at the final step
    ("UniPCMultistepScheduler", {"predict_x0": False, "use_karras_sigmas": True}),
])
def test_configurations_diffusers_cannot_sample_with_are_refused(name, config):
    scheduler = make(name, 10, config)
    model = GaussianDenoiser(scheduler.alphas_cumprod, size=24)
    reference = reference_loop(scheduler, model, (BATCH, *SHAPE), torch.Generator().manual_seed(0))
    assert not torch.isfinite(reference).all()  # diffusers' own loop fails too
    with pytest.raises(UnsupportedError, match="non-finite"):
        compile_scheduler(scheduler)


def test_unsupported_schedulers_are_named_with_the_supported_ones():
    with pytest.raises(UnsupportedError) as error:
        compile_scheduler(make("KDPM2DiscreteScheduler", 6))
    assert "KDPM2DiscreteScheduler" in str(error.value) and "DPMSolverMultistepScheduler" in str(error.value)


def test_non_affine_steps_are_refused_by_the_linearity_check():
    class ClippingDDIM(diffusers.DDIMScheduler):
        """Clips the sample outside the clip_sample option: only the probe can notice."""

        def step(self, model_output, timestep, sample, *args, **kwargs):
            return super().step(model_output, timestep, sample.clamp(-1, 1), *args, **kwargs)

    scheduler = ClippingDDIM(clip_sample=False)
    scheduler.set_timesteps(6)
    with pytest.raises(UnsupportedError, match="not affine"):
        compile_scheduler(scheduler)


def test_noise_outside_the_generator_is_refused():
    class GlobalNoiseDDIM(diffusers.DDIMScheduler):
        def step(self, model_output, timestep, sample, *args, **kwargs):
            result = super().step(model_output, timestep, sample, *args, **kwargs)
            return (result[0] + 0.1 * torch.randn_like(sample),) if not kwargs.get("return_dict",
                                                                                   True) else result

    scheduler = GlobalNoiseDDIM(clip_sample=False)
    scheduler.set_timesteps(6)
    with pytest.raises(UnsupportedError, match="global random generator"):
        compile_scheduler(scheduler)


def test_plugin_module_is_import_light_and_adapts_schedulers():
    code = ("import sys, fpsolve.integrations.diffusers.plugin, fpsolve.integrations.diffusers; "
            "assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    from fpsolve.integrations.diffusers import plugin

    assert plugin.fpsolve_make_system(obj=object(), options={}) is None
    scheduler = make("EulerDiscreteScheduler", 8)
    model = GaussianDenoiser(scheduler.alphas_cumprod, size=24)
    system = plugin.fpsolve_make_system(obj=scheduler, options=dict(model=model, shape=SHAPE, batch=BATCH,
                                                                   generator=torch.Generator().manual_seed(0)))
    expected = reference_loop(scheduler, model, (BATCH, *SHAPE), torch.Generator().manual_seed(0))
    assert float((fpsolve.solve(system, tol=1e-9).sample.float() - expected).abs().max()) <= PARITY
