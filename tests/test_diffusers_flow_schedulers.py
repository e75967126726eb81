"""Flow-matching scheduler adapters: fpsolve's parallel solve against diffusers' own loop.

For ``FlowMatchEulerDiscreteScheduler`` with every config option, ``FlowMatchHeunDiscreteScheduler``
and the flow options of UniPC / DPM-Solver / DEIS (``use_flow_sigmas``, ``flow_shift``,
``prediction_type="flow_prediction"``, dynamic shifting with a pipeline's ``mu``), the system
built by ``scheduler_system`` is solved with ``taa`` at a vanishing tolerance and compared with
``scheduler.step`` run sequentially by diffusers, driven by the same velocity model and
generator. What cannot be reproduced exactly is refused by name.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

import fpsolve
from fpsolve.errors import UnsupportedError
from fpsolve.integrations.diffusers import compile_scheduler, scheduler_system
from fpsolve.integrations.diffusers.testing import reference_loop
from fpsolve.testing.strategies import SmoothVelocity
from tests._diffusers_helpers import one_thread_per_module

SHAPE = (2, 3, 4)  # one sample: [C, H, W]
BATCH = 2
# Max abs difference to diffusers' float32 loop. diffusers rounds the state to float32 at every
# step; fpsolve keeps it in float64 (with the scheduler's own float32 coefficients), so the two
# differ by float32 rounding accumulated over the loop. Measured on this machine: <= 7.2e-7 for
# FlowMatchEuler, UniPC, DPM-Solver; 3.3e-6 for FlowMatchHeun; 8.0e-6 for DEIS (its larger
# multistep weights amplify rounding); in float64 the same DEIS cases agree to 2e-14. The bound
# leaves ~4x margin over the worst for another machine's rounding.
PARITY = 3e-5
# Both loops in float64 (the flow steps still upcast the sample to float32 inside step, which
# leaves ~1e-7 on FlowMatchEuler/Heun): measured <= 1.7e-7.
PARITY64 = 1e-6


_one_thread = one_thread_per_module()


def make(name: str, steps: int | None, config: dict | None = None, set_timesteps: dict | None = None):
    scheduler = getattr(diffusers, name)(**(config or {}))
    scheduler.set_timesteps(steps, **(set_timesteps or {}))
    return scheduler


def velocity_model(scheduler) -> SmoothVelocity:
    """The velocity model of a flow scheduler: sigma = t / num_train_timesteps."""
    return SmoothVelocity(seed=5, dim=24, num_train_timesteps=scheduler.config.num_train_timesteps)


def parity(scheduler, step_kwargs=None, seed=0, model_dtype=torch.float32, solver="taa"):
    """(max abs difference to diffusers' loop run in ``model_dtype``, solution)."""
    model = velocity_model(scheduler)
    scales = hasattr(scheduler, "scale_model_input")
    expected = reference_loop(scheduler, model, (BATCH, *SHAPE), torch.Generator().manual_seed(seed),
                              step_kwargs, scale_input=scales, dtype=model_dtype)
    system = scheduler_system(scheduler, model, shape=SHAPE, batch=BATCH,
                              generator=torch.Generator().manual_seed(seed), step_kwargs=step_kwargs,
                              model_dtype=model_dtype, input_scaling="model" if scales else "none")
    options = {} if solver == "sequential" else {"tol": 1e-9}
    solution = fpsolve.solve(system, solver, **options)
    assert solution.sample.shape == expected.shape
    return float((solution.sample.to(expected.dtype) - expected).abs().max()), solution


def flux_mu(scheduler, image_seq_len: int = 1024) -> float:
    """The mu FluxPipeline passes to set_timesteps (diffusers' own calculate_shift)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    return calculate_shift(image_seq_len, config.base_image_seq_len, config.max_image_seq_len,
                           config.base_shift, config.max_shift)


EULER = "FlowMatchEulerDiscreteScheduler"
FLUX = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "shift": 3.0}
CASES = [
    # FlowMatchEuler: every option that changes the sigmas, and the stochastic sampler
    (EULER, {}, None, None),
    (EULER, {"shift": 3.0}, None, None),  # SD3
    (EULER, {"shift": 3.0, "shift_terminal": 0.1}, None, None),  # LTX-Video
    (EULER, {"shift": 2.0, "use_karras_sigmas": True}, None, None),
    (EULER, {"shift": 2.0, "use_exponential_sigmas": True}, None, None),
    (EULER, {"use_beta_sigmas": True}, None, None),
    (EULER, {"invert_sigmas": True}, None, None),  # Mochi
    (EULER, {"stochastic_sampling": True, "shift": 3.0}, None, None),
    (EULER, {"shift": 5.0}, None, {"s_churn": 1.0}),  # churn arguments are ignored by this step
    # FlowMatchHeun: second-order, with and without churn noise
    ("FlowMatchHeunDiscreteScheduler", {}, None, None),
    ("FlowMatchHeunDiscreteScheduler", {"shift": 3.0}, None, {"s_churn": 0.0}),
    # multistep schedulers with flow sigmas (Wan, Sana, ...)
    ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0,
                                 "prediction_type": "flow_prediction", "solver_order": 1}, None, None),
    ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 5.0,
                                 "prediction_type": "flow_prediction"}, None, None),
    ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0, "solver_order": 3,
                                 "prediction_type": "flow_prediction", "solver_type": "bh1",
                                 "final_sigmas_type": "sigma_min"}, None, None),
    ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                 "use_karras_sigmas": False, "disable_corrector": [0, 1],
                                 "thresholding": True, "sample_max_value": 1.2}, None, None),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0,
                                     "prediction_type": "flow_prediction", "solver_order": 1}, None, None),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0,
                                     "prediction_type": "flow_prediction"}, None, None),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0, "solver_order": 3,
                                     "prediction_type": "flow_prediction"}, None, None),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0,
                                     "algorithm_type": "sde-dpmsolver++",
                                     "prediction_type": "flow_prediction"}, None, None),
    ("DPMSolverSinglestepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0, "solver_order": 2,
                                      "prediction_type": "flow_prediction"}, None, None),
    ("DEISMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0, "solver_order": 2,
                                "prediction_type": "flow_prediction"}, None, None),
    ("DEISMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0, "solver_order": 3,
                                "prediction_type": "flow_prediction"}, None, None),
]


@pytest.mark.parametrize("name, config, set_timesteps, step_kwargs", CASES,
                         ids=[f"{n}-{i}" for i, (n, _, _, _) in enumerate(CASES)])
def test_parallel_solve_matches_the_flow_schedulers_own_loop(name, config, set_timesteps, step_kwargs,
                                                             record_property):
    scheduler = make(name, 10, config, set_timesteps)
    error, solution = parity(scheduler, step_kwargs)
    record_property("max_abs_error", error)
    assert solution.converged
    assert error <= PARITY, f"{name} {config} {step_kwargs}: max abs difference {error:.2e}"


@pytest.mark.parametrize("name, config", [
    (EULER, FLUX),
    (EULER, dict(FLUX, time_shift_type="linear")),
    ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                 "use_dynamic_shifting": True}),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                     "use_dynamic_shifting": True}),
])
def test_dynamic_shifting_with_the_pipelines_mu(name, config, record_property):
    # base_shift / max_shift enter through the mu a pipeline computes from the image size
    scheduler = getattr(diffusers, name)(**config)
    mu = flux_mu(scheduler) if name == EULER else 0.9
    scheduler.set_timesteps(10, mu=mu)
    unshifted = getattr(diffusers, name)(**dict(config, use_dynamic_shifting=False))
    unshifted.set_timesteps(10)
    assert not torch.allclose(scheduler.sigmas.double(), unshifted.sigmas.double())  # mu matters
    error, solution = parity(scheduler)
    record_property("max_abs_error", error)
    assert solution.converged and error <= PARITY, error


def test_flux_style_custom_sigmas_with_mu(record_property):
    # FluxPipeline: set_timesteps(sigmas=linspace(1, 1/n, n), mu=calculate_shift(...))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX)
    steps = 12
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=flux_mu(scheduler, 4096))
    error, solution = parity(scheduler)
    record_property("max_abs_error", error)
    assert solution.converged and error <= PARITY, error


@pytest.mark.parametrize("set_timesteps", [
    {"timesteps": [1000.0, 800.0, 500.0, 200.0, 50.0]},  # custom timesteps, sigmas derived
    {"sigmas": [1.0, 0.8, 0.5, 0.2, 0.05]},  # custom sigmas, shifted
])
def test_custom_timesteps_and_sigmas(set_timesteps, record_property):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(**set_timesteps)
    error, solution = parity(scheduler)
    record_property("max_abs_error", error)
    assert solution.converged and error <= PARITY, error


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_flow_sigmas_with_other_prediction_types_in_float64(prediction, record_property):
    # an eps model on flow sigmas divides by alpha = 1 - sigma ~ 0 at the first step: diffusers' own
    # float32 loop is ill-conditioned there (1e-3 off its float64 run), so compare in float64 (measured 9e-12)
    scheduler = make("UniPCMultistepScheduler", 10, {"use_flow_sigmas": True, "flow_shift": 3.0,
                                                     "prediction_type": prediction})
    error, solution = parity(scheduler, model_dtype=torch.float64)
    record_property("max_abs_error", error)
    assert solution.converged and error <= PARITY64, error


@pytest.mark.parametrize("name, config", [
    (EULER, {"shift": 3.0}),
    (EULER, {"stochastic_sampling": True}),
    ("FlowMatchHeunDiscreteScheduler", {"shift": 3.0}),
    ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0, "solver_order": 3,
                                 "prediction_type": "flow_prediction"}),
    ("DEISMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0, "solver_order": 3,
                                "prediction_type": "flow_prediction"}),
])
@pytest.mark.parametrize("steps", [1, 2, 25])
def test_step_counts_in_float64(name, config, steps, record_property):
    error, solution = parity(make(name, steps, config), model_dtype=torch.float64)
    record_property("max_abs_error", error)
    assert solution.converged and error <= PARITY64, (name, steps, error)


def test_stochastic_sampling_draws_one_tensor_per_step_and_matters():
    stochastic = compile_scheduler(make(EULER, 6, {"stochastic_sampling": True}))
    assert all(d is not None for d in stochastic.probed.draws)
    form = stochastic.sampler.affine_form()
    sigmas = make(EULER, 6, {"stochastic_sampling": True}).sigmas.double()
    # x' = (1 - s') (x - s v) + s' xi: the noise coefficient is the next state's sigma
    torch.testing.assert_close(form.noise[1:], sigmas[1:], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(form.state[1:, 0], 1 - sigmas[1:], rtol=1e-6, atol=1e-7)
    assert all(d is None for d in compile_scheduler(make(EULER, 6)).probed.draws)
    # negative control: the same seed with and without the stochastic step gives other samples
    ode, _ = parity(make(EULER, 6), seed=1)
    assert ode <= PARITY
    model = velocity_model(make(EULER, 6))
    sde_loop = reference_loop(make(EULER, 6, {"stochastic_sampling": True}), model, (BATCH, *SHAPE),
                              torch.Generator().manual_seed(1), scale_input=False)
    ode_loop = reference_loop(make(EULER, 6), model, (BATCH, *SHAPE), torch.Generator().manual_seed(1),
                              scale_input=False)
    assert float((sde_loop - ode_loop).abs().max()) > 1e-2


def test_flow_noise_levels_and_euler_coefficients():
    scheduler = make(EULER, 8, {"shift": 3.0})
    sampler = compile_scheduler(scheduler).sampler
    sigmas = scheduler.sigmas.double()
    torch.testing.assert_close(sampler.state_sigmas(), sigmas)  # the noise level of each state
    form = sampler.affine_form()
    assert form.lags == 1
    torch.testing.assert_close(form.state[1:, 0], torch.ones(8, dtype=torch.float64))
    torch.testing.assert_close(form.output[1:, 0], sigmas[1:] - sigmas[:-1])  # x + (s' - s) v
    inverted = make(EULER, 8, {"invert_sigmas": True})
    levels = compile_scheduler(inverted).sampler.state_sigmas()
    torch.testing.assert_close(levels, 1 - inverted.sigmas.double())
    unipc = make("UniPCMultistepScheduler", 8, {"use_flow_sigmas": True, "flow_shift": 3.0,
                                                "prediction_type": "flow_prediction"})
    torch.testing.assert_close(compile_scheduler(unipc).sampler.state_sigmas(),
                               unipc.sigmas.double()[:9])
    variances = sampler.step_variances()
    assert variances[0] == 0 and (variances[1:-1] > 0).all() and variances[-1] == 0


def test_a_mismatched_flow_loop_is_detected():
    # negative control: the system replays shift 3 while diffusers steps with shift 1
    model = velocity_model(make(EULER, 8))
    expected = reference_loop(make(EULER, 8), model, (BATCH, *SHAPE), torch.Generator().manual_seed(0),
                              scale_input=False)
    system = scheduler_system(make(EULER, 8, {"shift": 3.0}), model, shape=SHAPE, batch=BATCH,
                              generator=torch.Generator().manual_seed(0), input_scaling="none")
    sample = fpsolve.solve(system, "taa", tol=1e-9).sample
    assert float((sample.to(torch.float32) - expected).abs().max()) > 1e-2


@pytest.mark.parametrize("name, config, option, value", [
    ("UniPCMultistepScheduler", {"prediction_type": "flow_prediction"}, "use_flow_sigmas", "False"),
    ("DPMSolverMultistepScheduler", {"prediction_type": "flow_prediction"}, "use_flow_sigmas", "False"),
    ("DEISMultistepScheduler", {"prediction_type": "flow_prediction"}, "use_flow_sigmas", "False"),
])
def test_flow_prediction_without_flow_sigmas_is_refused(name, config, option, value):
    with pytest.raises(UnsupportedError) as error:
        compile_scheduler(make(name, 6, config))
    message = str(error.value)
    assert f"{option}={value}" in message and "supported values" in message and name in message


def test_per_token_timesteps_are_refused_by_name():
    with pytest.raises(UnsupportedError) as error:
        compile_scheduler(make(EULER, 6), {"per_token_timesteps": torch.ones(1, 4)})
    message = str(error.value)
    assert "per_token_timesteps" in message and "supported values of per_token_timesteps: None" in message


def test_heun_churn_is_refused_by_name():
    with pytest.raises(UnsupportedError) as error:
        compile_scheduler(make("FlowMatchHeunDiscreteScheduler", 6), {"s_churn": 0.5})
    message = str(error.value)
    assert "s_churn=0.5" in message and "supported values of s_churn: 0" in message


def test_a_flow_configuration_diffusers_cannot_sample_with_is_refused():
    # UniPC bh1 on flow sigmas ending at sigma = 0: diffusers' own loop returns NaN
    scheduler = make("UniPCMultistepScheduler", 10, {"use_flow_sigmas": True, "flow_shift": 3.0,
                                                     "prediction_type": "flow_prediction",
                                                     "solver_type": "bh1"})
    reference = reference_loop(scheduler, velocity_model(scheduler), (BATCH, *SHAPE),
                               torch.Generator().manual_seed(0))
    assert not torch.isfinite(reference).all()
    with pytest.raises(UnsupportedError, match="non-finite"):
        compile_scheduler(scheduler)


def test_the_plugin_hook_builds_flow_systems():
    from fpsolve.integrations.diffusers import plugin

    scheduler = make(EULER, 8, {"shift": 3.0})
    model = velocity_model(scheduler)
    system = plugin.fpsolve_make_system(obj=scheduler, options=dict(
        model=model, shape=SHAPE, batch=BATCH, generator=torch.Generator().manual_seed(0),
        input_scaling="none"))
    expected = reference_loop(scheduler, model, (BATCH, *SHAPE), torch.Generator().manual_seed(0),
                              scale_input=False)
    assert float((fpsolve.solve(system, tol=1e-9).sample.float() - expected).abs().max()) <= PARITY
