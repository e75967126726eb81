"""Pipeline adapters: ``sample(pipe, ...)`` against ``pipe(...)`` with the same generator.

Tiny random components stand in for trained ones (their output layers are scaled down so that
the sampling loop does not amplify rounding the way an untrained network does). At a vanishing
tolerance the parallel result must equal the pipeline's own output to its float32 noise floor;
at the default tolerance the image-space error is reported (``record_property``) and bounded.

The noise floor. fpsolve keeps a float64 state while the pipeline rounds every step to float32,
so the two differ by rounding the loop amplifies. How much is measured, not assumed: diffusers'
own output for the SAME noise moves when the sample shares its batch with other samples (batched
kernels round differently), and :func:`own_spread` measures that spread in the test itself.
Where the loop is near-chaotic (DDIM with its default ``clip_sample=True`` on a random UNet), the
spread and fpsolve's error are of one size: on a 2-core x86_64 CPU (torch 2.13) the DDIM batch-1
case measured a spread of 9.8e-6 and an error of 1.03e-5 (ratio 1.05), which is why a fixed 1e-5
failed on another machine. Those tests bound the error by ``FLOOR_FACTOR`` times the measured
spread (never below ``PARITY``). Everywhere else the measured errors are at most 6.6e-7 (Stable
Diffusion, DiT, DDPM without clipping): 15x below ``PARITY``, margin for any float32 machine.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

import fpsolve
from fpsolve.errors import InvalidOptionError, UnsupportedError
from fpsolve.integrations.diffusers import sample
from fpsolve.integrations.diffusers.testing import (
    psnr,
    tiny_dit_pipeline,
    tiny_sd_pipeline,
    tiny_unet_pipeline,
)
from tests._diffusers_helpers import EXACT, assert_same_output, images_of, one_thread_per_module, run_both

PARITY = 1e-5  # images in [0, 1]; 80 float32 ulps of 1.0: the floor of the bound
FLOOR_FACTOR = 4  # measured error / spread was at most 1.05 (module docstring): 4x leaves margin


_one_thread = one_thread_per_module()


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    # v-prediction: a small random output is then close to the ideal denoiser of unit-variance data
    # (v = 0), so latents stay O(1); with eps-prediction a random UNet drives them to ~250, where
    # float32 resolution alone is 1.5e-5.
    return tiny_sd_pipeline(diffusers.DDIMScheduler(prediction_type="v_prediction"),
                            tmp_path_factory.mktemp("tokenizer"))


def own_spread(pipe, **call):
    """diffusers' own float32 noise floor for ``pipe(**call)``: the largest change of sample 0's
    image when it is generated alone or in a batch of three (same generator, so the same noise)."""
    def images(batch):
        generators = [torch.Generator().manual_seed(seed) for seed in (0, 11, 12)[:batch]]
        with torch.no_grad():
            return images_of(pipe(generator=generators, batch_size=batch, **call))
    return float(np.abs(images(1)[0] - images(3)[0]).max())


def floor_limit(pipe, **call):
    """The parity bound of a near-chaotic loop: ``FLOOR_FACTOR`` x its measured spread (>= ``PARITY``)."""
    return max(PARITY, FLOOR_FACTOR * own_spread(pipe, **call))


# -- DDPM / DDIM pipelines -----------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", [
    diffusers.DDPMScheduler(),
    diffusers.DDPMScheduler(variance_type="fixed_large", timestep_spacing="trailing",
                            prediction_type="v_prediction"),
    diffusers.DDIMScheduler(),  # swapped into DDPMPipeline
    diffusers.DPMSolverMultistepScheduler(solver_order=3),
    diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"),
], ids=["ddpm", "ddpm-vpred-large", "ddim-swapped", "dpm3-swapped", "sde-dpm-swapped"])
def test_ddpm_pipeline(scheduler, record_property):
    pipe = tiny_unet_pipeline("ddpm", scheduler)
    reference, out, solution = run_both(pipe, batch_size=2, num_inference_steps=12, output_type="np", **EXACT)
    # ddim-swapped clips x0 (DDIM's default): measured 5.4e-6, half of PARITY, so it rests on the spread.
    limit = floor_limit(pipe, num_inference_steps=12, output_type="np") if scheduler.config.get(
        "clip_sample") and isinstance(scheduler, diffusers.DDIMScheduler) else PARITY
    record_property("max_abs_error", assert_same_output(reference, out, limit))
    assert solution.converged


@pytest.mark.parametrize("options", [
    dict(eta=0.0),
    dict(eta=1.0),
    dict(eta=0.5, use_clipped_model_output=True),
], ids=["eta0", "eta1", "eta-half-clipped-output"])
def test_ddim_pipeline(options, record_property):
    pipe = tiny_unet_pipeline("ddim", diffusers.DDIMScheduler(set_alpha_to_one=False, steps_offset=1))
    reference, out, _ = run_both(pipe, batch_size=2, num_inference_steps=15, output_type="np", **options,
                                 **EXACT)
    # DDIM clips x0 by default: eta0 measured 4.7e-6, so the bound rests on the measured spread.
    limit = floor_limit(pipe, num_inference_steps=15, output_type="np", **options)
    record_property("max_abs_error", assert_same_output(reference, out, limit))


def test_ddim_pipeline_with_a_list_of_generators_and_every_output_type():
    pipe = tiny_unet_pipeline("ddim", diffusers.DDIMScheduler(timestep_spacing="trailing"), channels=3)
    # DDIM's default clip_sample makes this loop near-chaotic: the bounds rest on the measured spread
    # of diffusers' own output (9.8e-6 here for the batch-1 call, whose error was 1.03e-5).
    limit = floor_limit(pipe, num_inference_steps=10, eta=1.0, output_type="np")
    for output_type in ("np", "pt", "pil"):
        reference, out, _ = run_both(pipe, generator_list=[5, 9, 2], batch_size=3, num_inference_steps=10,
                                     eta=1.0,
                                     output_type=output_type, **EXACT)
        assert_same_output(reference, out, limit=limit if output_type != "pil" else 1 / 255)
    reference, out, _ = run_both(pipe, batch_size=1, num_inference_steps=10, return_dict=False,
                                 output_type="np",
                                 **EXACT)
    assert isinstance(out, tuple) and len(out) == 1
    assert_same_output(reference, out, floor_limit(pipe, num_inference_steps=10, output_type="np"))


# -- DiT -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler, learned_sigma, guidance", [
    (diffusers.DPMSolverMultistepScheduler(), True, 4.0),
    (diffusers.DPMSolverMultistepScheduler(), False, 1.0),
    (diffusers.EulerDiscreteScheduler(), True, 3.0),
    (diffusers.DDPMScheduler(), True, 2.5),  # step noise from torch's global generator, doubled batch
], ids=["dpm-guided", "dpm-unguided", "euler-guided", "ddpm-guided"])
def test_dit_pipeline(scheduler, learned_sigma, guidance, record_property):
    pipe = tiny_dit_pipeline(scheduler, learned_sigma=learned_sigma)
    reference, out, _ = run_both(pipe, global_seed=7, class_labels=[1, 7, 1], guidance_scale=guidance,
                                 num_inference_steps=10, output_type="np", **EXACT)
    record_property("max_abs_error", assert_same_output(reference, out, PARITY))


# -- Stable Diffusion ----------------------------------------------------------------------------

SD_SCHEDULERS = {
    "ddim": lambda config: diffusers.DDIMScheduler.from_config(config),
    "euler": lambda config: diffusers.EulerDiscreteScheduler.from_config(config),
    "dpm-karras": lambda config: diffusers.DPMSolverMultistepScheduler.from_config(config,
                                                                                   use_karras_sigmas=True),
    "unipc": lambda config: diffusers.UniPCMultistepScheduler.from_config(config),
    "euler-ancestral": lambda config: diffusers.EulerAncestralDiscreteScheduler.from_config(config),
    "pndm": lambda config: diffusers.PNDMScheduler.from_config(config, skip_prk_steps=True),
}


@pytest.mark.parametrize("name", list(SD_SCHEDULERS))
def test_stable_diffusion_guided_batch(sd, name, record_property):
    sd.scheduler = SD_SCHEDULERS[name](sd.scheduler.config)
    reference, out, solution = run_both(sd, prompt=["a cat", "a red dog"], negative_prompt=["blur", "dark"],
                                        guidance_scale=6.0, num_inference_steps=10, output_type="np", **EXACT)
    record_property("max_abs_error", assert_same_output(reference, out, PARITY))
    assert solution.sample.shape == (2, 4, 8, 8)


@pytest.mark.parametrize("scheduler, case", [
    ("ddim", dict(prompt="a cat", num_images_per_prompt=2, guidance_rescale=0.7, eta=0.6, output_type="pt")),
    ("ddim", dict(prompt=["a cat"], guidance_scale=1.0, output_type="latent")),  # no guidance
    ("ddpm", dict(prompt="a cat", timesteps=[901, 700, 501, 300, 101], output_type="np", return_dict=False)),
    ("euler", dict(prompt="a cat", sigmas=[14.0, 5.0, 2.0, 0.7, 0.2], output_type="np")),
    ("ddim", dict(prompt="a cat", height=16, width=16, output_type="pil")),
], ids=["images-per-prompt-rescale-eta", "unguided-latent", "custom-timesteps", "custom-sigmas", "size-pil"])
def test_stable_diffusion_options(sd, scheduler, case):
    cls = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler,
           "euler": diffusers.EulerDiscreteScheduler}
    sd.scheduler = cls[scheduler].from_config(sd.scheduler.config)
    if "timesteps" not in case and "sigmas" not in case:
        case = dict(case, num_inference_steps=8)
    reference, out, _ = run_both(sd, **case, **EXACT)
    assert_same_output(reference, out, limit=PARITY if case["output_type"] != "pil" else 1 / 255)


def test_stable_diffusion_prompt_embeds_and_user_latents(sd):
    sd.scheduler = diffusers.EulerDiscreteScheduler.from_config(sd.scheduler.config)
    generator = torch.Generator().manual_seed(3)
    embeds = torch.randn(2, 16, 16, generator=generator)
    negative = torch.randn(2, 16, 16, generator=generator)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    reference, out, _ = run_both(sd, prompt_embeds=embeds, negative_prompt_embeds=negative, latents=latents,
                                 num_inference_steps=8, output_type="np", **EXACT)
    assert_same_output(reference, out, PARITY)


def test_one_batched_model_call_per_iteration_with_guidance(sd):
    sd.scheduler = diffusers.DDIMScheduler.from_config(sd.scheduler.config)
    batches = []
    handle = sd.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        _, solution = sample(sd, generator=torch.Generator().manual_seed(0), prompt=["a", "b"],
                             num_inference_steps=8,
                             output_type="latent")
    finally:
        handle.remove()
    assert len(batches) == solution.iterations
    # two samples, x2 for guidance, one row per evaluated position
    assert sum(batches) == 2 * solution.model_evals
    assert all(b % 4 == 0 for b in batches)


# -- default tolerance: the error is reported and bounded ----------------------------------------

@pytest.mark.parametrize("kind", ["ddpm", "ddim", "dit", "sd"])
def test_default_tolerance_error_in_image_space(kind, sd, record_property):
    if kind == "sd":
        sd.scheduler = diffusers.DDIMScheduler.from_config(sd.scheduler.config)
        pipe, kwargs = sd, dict(prompt=["a cat", "a dog"], num_inference_steps=25)
    elif kind == "dit":
        pipe, kwargs = tiny_dit_pipeline(diffusers.DPMSolverMultistepScheduler()), dict(class_labels=[3, 4],
                                                                                      num_inference_steps=25)
    else:
        scheduler = diffusers.DDPMScheduler() if kind == "ddpm" else diffusers.DDIMScheduler()
        pipe, kwargs = tiny_unet_pipeline(kind, scheduler, channels=3), dict(batch_size=2,
                                                                             num_inference_steps=25)
    reference, out, solution = run_both(pipe, global_seed=1, output_type="np", **kwargs)
    a, b = images_of(out), images_of(reference)
    max_abs_255 = float(np.abs(a - b).max() * 255)
    quality = psnr(a, b)
    record_property("max_abs_error_255", max_abs_255)
    record_property("psnr_db", quality)
    record_property("iterations", solution.iterations)
    print(f"{kind}: default tolerance, {solution.iterations} iterations for 25 steps, "
          f"max abs error {max_abs_255:.3f}/255, PSNR {quality:.1f} dB")
    assert solution.converged
    if kind == "ddim":
        # The random UNet with DDIM's default clip_sample is near-chaotic: at the default rms
        # tolerance (2e-4) the anchor advances one row per iteration, the safeguard's bound.
        assert solution.iterations <= 25
    else:
        assert solution.iterations < 25
    assert max_abs_255 <= 1.0 and quality >= 50.0


# -- errors --------------------------------------------------------------------------------------

def test_unsupported_scheduler_in_a_pipeline_is_named(sd):
    sd.scheduler = diffusers.KDPM2DiscreteScheduler.from_config(sd.scheduler.config)
    with pytest.raises(UnsupportedError) as error:
        sample(sd, generator=torch.Generator().manual_seed(0), prompt="a", num_inference_steps=4)
    assert "KDPM2DiscreteScheduler" in str(error.value) and "EulerDiscreteScheduler" in str(error.value)
    sd.scheduler = diffusers.DDIMScheduler.from_config(sd.scheduler.config)


def test_unsupported_pipeline_and_arguments_are_refused(sd):
    class OtherPipeline(diffusers.DiffusionPipeline):
        def __call__(self):
            return None

    with pytest.raises(UnsupportedError, match="OtherPipeline.*DDIMPipeline, DDPMPipeline, DiTPipeline"):
        sample(OtherPipeline())
    with pytest.raises(UnsupportedError, match="callback_on_step_end"):
        sample(sd, prompt="a", num_inference_steps=4, callback_on_step_end=lambda *a: {})
    with pytest.raises(InvalidOptionError, match="tolerance"):
        sample(sd, prompt="a", num_inference_steps=4, tolerance=0.1)


def test_make_system_through_the_plugin_hook():
    from fpsolve.integrations.diffusers import plugin

    pipe = tiny_unet_pipeline("ddpm", diffusers.DDPMScheduler())
    registered = fpsolve.registry.get_plugin_manager().is_registered(plugin)
    if not registered:  # the entry point is not installed in this environment
        fpsolve.register_plugin(plugin, name="diffusers-test")
    try:
        system = fpsolve.make_system(pipe, generator=torch.Generator().manual_seed(0), batch_size=2,
                                     num_inference_steps=10)
    finally:
        if not registered:
            fpsolve.unregister_plugin(plugin)
    assert isinstance(system, fpsolve.TriangularSystem) and system.num_steps == 10
    _, solution = sample(pipe, generator=torch.Generator().manual_seed(0), batch_size=2,
                         num_inference_steps=10,
                         output_type="np")
    # the same initial latents as sample() (and so as the pipeline)
    assert torch.equal(system.flat_noise[0], solution.trajectory[0].reshape(2, -1))


# -- nothing silently wrong (issue 10) -------------------------------------------------------------

def test_an_unconverged_solve_raises_with_the_partial_result():
    pipe = tiny_unet_pipeline("ddpm", diffusers.DDPMScheduler())
    call = dict(batch_size=2, num_inference_steps=10, output_type="np")
    with pytest.warns(fpsolve.NotConvergedWarning), pytest.raises(fpsolve.NotConvergedError,
                                                                     match="did not converge") as error:
        sample(pipe, generator=torch.Generator().manual_seed(0), max_iters=2, tol=1e-9, **call)
    assert error.value.solution.status is fpsolve.Status.MAX_ITERS
    assert error.value.output.images.shape == (2, 8, 8, 1)  # the decoded partial output
    with pytest.warns(fpsolve.NotConvergedWarning):
        out, solution = sample(pipe, generator=torch.Generator().manual_seed(0), max_iters=2, tol=1e-9,
                               allow_unconverged=True, **call)
    assert not solution.converged and np.array_equal(out.images, error.value.output.images)
    with pytest.raises(InvalidOptionError, match="allow_unconverged must be True or False"):
        sample(pipe, allow_unconverged="yes", **call)


@pytest.mark.parametrize(("call", "match"), [
    (dict(num_inference_steps=0), "num_inference_steps must be an int >= 1"),  # was ZeroDivisionError
    (dict(num_inference_steps=-5), "num_inference_steps must be an int >= 1"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be an int >= 1"),
    (dict(generator=0), "generator must be a torch.Generator, a list of them"),
    (dict(num_inference_step=10), r"For 'num_inference_step', did you mean 'num_inference_steps'"),
    (dict(max_iter=3), r"For 'max_iter', did you mean 'max_iters'"),
])
def test_pipeline_arguments_are_checked_with_hints(call, match):
    pipe = tiny_unet_pipeline("ddpm", diffusers.DDPMScheduler())
    with pytest.raises(InvalidOptionError, match=match):
        sample(pipe, **call)
