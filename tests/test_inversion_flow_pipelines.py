"""``invert(pipe, image)`` for the flow-matching pipelines: Flux and Stable Diffusion 3.

The forward loop of ``FlowMatchEulerDiscreteScheduler`` is Euler on the transformer's velocity,
``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, t_i)`` (with guidance inside ``v``). The tests
state:

* ``encode_image`` inverts the pipeline's decode step: Flux unpacks, unscales and unshifts its
  latents before ``vae.decode``, so the encoded latents do the reverse to the VAE's mode;
* ``exact=True``: the pipeline's own sequential loop, ``pipe(latents=inverted)``, lands on the
  encoded image's latents to the measured float32 floor (and ``sample(pipe, latents=...)`` does
  the same);
* ``exact=False`` is Euler run backwards, ``x_i = x_{i+1} - (sigma_{i+1} - sigma_i)
  v(x_{i+1}, t_i)`` (the velocity read at the less noisy latents with the noisier step's time),
  equal to that loop written out here with the pipeline's transformer;
* what cannot be inverted (stochastic sampling, multistep and multi-stage flow schedulers) is
  refused by name; guidance (SD3's CFG, Flux's embedded guidance and true CFG) inverts.

Noise floor (tiny random float32 transformers, 2-core x86_64 CPU, T = 8): the inverted latents,
replayed by ``pipe()``'s own float32 loop, meet the encoded latents to 5.1e-7 (Flux, tol 1e-7),
1.1e-6 (SD3 with CFG 5, tol 3e-7) and 9.5e-7 (Flux with true CFG 3, tol 1e-7), latents of max |x|
1.4; below tol ~ 1e-7 SD3's implicit equations stop converging (the float32 transformer's
rounding, amplified by CFG, is the floor). Euler run backwards differs from the loop written out
here by 1.2e-7 (Flux) and 7.6e-7 (SD3, CFG 5 amplifies the float32 transformer's batch
rounding). The bounds leave a factor 6 or more.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fpsolve.errors import InvalidOptionError, ShapeError, UnsupportedError  # noqa: E402
from fpsolve.integrations.diffusers import encode_image, invert, sample  # noqa: E402
from fpsolve.integrations.diffusers.testing import tiny_flux_pipeline, tiny_sd3_pipeline  # noqa: E402
from tests._diffusers_helpers import one_thread_per_module, pipeline_fixture  # noqa: E402

STEPS = 8
FLUX = dict(prompt=["a cat", "a red dog"], guidance_scale=3.5, height=8, width=8, num_inference_steps=STEPS,
            max_sequence_length=8)
SD3 = dict(prompt=["a cat", "a red dog"], negative_prompt=["blur", "dark"], guidance_scale=5.0, height=16,
           width=16, num_inference_steps=STEPS, max_sequence_length=8)
ROUND_TRIP = 1e-5  # max abs, latents of max |x| ~ 1.4 (measured 5.1e-7 Flux, 1.1e-6 SD3: see above)
BACKWARD_EULER = 5e-6  # max abs (measured 1.2e-7 Flux, 7.6e-7 SD3)


_one_thread = one_thread_per_module()


flux = pipeline_fixture(tiny_flux_pipeline, "flux")
sd3 = pipeline_fixture(tiny_sd3_pipeline, "sd3")


def generated_image(pipe, seed: int = 0, **call) -> torch.Tensor:
    """An image the pipeline makes: ``[N, 3, H, W]`` in ``[0, 1]``."""
    out, _ = sample(pipe, generator=torch.Generator().manual_seed(seed), output_type="pt", **call)
    return out.images


def replayed(pipe, latents: torch.Tensor, **call) -> torch.Tensor:
    """The pipeline's own sequential loop started from ``latents`` (its final latents)."""
    with torch.no_grad():
        return pipe(latents=latents, output_type="latent", **call).images


# -- encode_image ---------------------------------------------------------------------------------

def test_flux_encode_image_inverts_the_pipelines_decode_layout(flux):
    image = generated_image(flux, **FLUX)
    latents = encode_image(flux, image)
    assert latents.shape == (2, 16, 4)  # (8 / 2)^2 tokens of 2 x 2 x 1 channels
    # what Flux's decode does before vae.decode: unpack, unscale, unshift -> the VAE's mode
    config = flux.vae.config
    unpacked = flux._unpack_latents(latents, 8, 8, flux.vae_scale_factor)
    with torch.no_grad():
        mode = flux.vae.encode(flux.image_processor.preprocess(image)).latent_dist.mode()
    torch.testing.assert_close(unpacked / config.scaling_factor + config.shift_factor, mode, rtol=0,
                               atol=1e-6)


def test_sd3_encode_image_inverts_the_pipelines_decode_step(sd3):
    image = generated_image(sd3, **SD3)
    latents = encode_image(sd3, image)
    assert latents.shape == (2, 4, 8, 8)
    config = sd3.vae.config
    with torch.no_grad():
        mode = sd3.vae.encode(sd3.image_processor.preprocess(image)).latent_dist.mode()
    torch.testing.assert_close(latents / config.scaling_factor + config.shift_factor, mode, rtol=0, atol=1e-6)


# -- exact inversion: the pipeline's loop lands on the image's latents ---------------------------

@pytest.mark.parametrize("name, call, tol", [("flux", FLUX, 1e-7), ("sd3", SD3, 3e-7)])
def test_exact_inversion_round_trip(name, call, tol, request, record_property):
    pipe = request.getfixturevalue(name)
    image = generated_image(pipe, **call)
    encoded = encode_image(pipe, image)
    latents, solution = invert(pipe, image, exact=True, tol=tol, **call)
    assert solution.converged and latents.shape == encoded.shape and latents.dtype == encoded.dtype
    error = float((replayed(pipe, latents, **call) - encoded).abs().max())
    record_property("round_trip_max_abs", error)
    record_property("iterations", solution.iterations)
    assert error <= ROUND_TRIP, error
    # the parallel sampler from the same latents: the same landing point (and the decoded image)
    out, replay = sample(pipe, latents=latents, output_type="latent", tol=1e-9, **call)
    assert float((replay.sample.to(encoded.dtype) - encoded).abs().max()) <= ROUND_TRIP
    # a sampler started from the latents of Euler run backwards misses the image by far more
    approximate, _ = invert(pipe, image, exact=False, **call)
    assert float((replayed(pipe, approximate, **call) - encoded).abs().max()) > 100 * ROUND_TRIP


def test_flux_true_cfg_inverts(flux):
    # true CFG (neg + s (pos - neg)) keeps each step an explicit Euler step in x: still invertible
    call = dict(prompt="a cat", negative_prompt="blur", true_cfg_scale=3.0, num_images_per_prompt=2, height=8,
                width=8, num_inference_steps=STEPS, max_sequence_length=8)
    image = generated_image(flux, seed=3, **call)
    latents, solution = invert(flux, image, exact=True, tol=1e-7, **call)
    assert solution.converged
    error = float((replayed(flux, latents, **call) - encode_image(flux, image)).abs().max())
    assert error <= ROUND_TRIP, error


# -- exact=False: Euler run backwards ------------------------------------------------------------

def flow_scheduler(pipe, **set_timesteps):
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(device="cpu", **set_timesteps)
    return scheduler.timesteps, scheduler.sigmas.to(torch.float64)


def backward_euler(x0: torch.Tensor, timesteps, sigmas, velocity) -> torch.Tensor:
    """``x_i = x_{i+1} - (sigma_{i+1} - sigma_i) v(x_{i+1}, t_i)`` from ``x_T = x0`` down to ``x_0``."""
    x = x0.to(torch.float64)
    with torch.no_grad():
        for i in reversed(range(len(timesteps))):
            v = velocity(x.to(torch.float32), timesteps[i].expand(x.shape[0])).to(torch.float64)
            x = x - (sigmas[i + 1] - sigmas[i]) * v
    return x


def test_flux_euler_inversion_is_euler_run_backwards(flux):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    image = generated_image(flux, seed=1, **FLUX)
    got, solution = invert(flux, image, tol=1e-9, **FLUX)
    assert solution.converged and solution.iterations <= STEPS
    embeds, pooled, text_ids = flux.encode_prompt(prompt=FLUX["prompt"], prompt_2=None, device="cpu",
                                                  max_sequence_length=8)
    image_ids = flux._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)  # 8x8 latents -> 4x4 tokens
    config = flux.scheduler.config
    mu = calculate_shift(16, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)
    timesteps, sigmas = flow_scheduler(flux, sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    guidance = torch.full((2,), FLUX["guidance_scale"])

    def velocity(x, t):
        return flux.transformer(hidden_states=x, timestep=t / 1000, guidance=guidance,
                                pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                img_ids=image_ids).sample

    want = backward_euler(encode_image(flux, image), timesteps, sigmas, velocity)
    error = float((got.to(torch.float64) - want).abs().max())
    assert error <= BACKWARD_EULER, error


def test_sd3_euler_inversion_is_euler_run_backwards_with_cfg(sd3):
    image = generated_image(sd3, seed=1, **SD3)
    got, solution = invert(sd3, image, tol=1e-9, **SD3)
    assert solution.converged and solution.iterations <= STEPS
    embeds, negative, pooled, negative_pooled = sd3.encode_prompt(
        prompt=SD3["prompt"], prompt_2=None, prompt_3=None, negative_prompt=SD3["negative_prompt"],
        do_classifier_free_guidance=True, device="cpu", max_sequence_length=8)
    timesteps, sigmas = flow_scheduler(sd3, num_inference_steps=STEPS)

    def velocity(x, t):
        out = sd3.transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]),
                              encoder_hidden_states=torch.cat([negative, embeds]),
                              pooled_projections=torch.cat([negative_pooled, pooled])).sample
        uncond, text = out.chunk(2)
        return uncond + SD3["guidance_scale"] * (text - uncond)

    want = backward_euler(encode_image(sd3, image), timesteps, sigmas, velocity)
    error = float((got.to(torch.float64) - want).abs().max())
    assert error <= BACKWARD_EULER, error


# -- refusals ------------------------------------------------------------------------------------

def with_scheduler(pipe, scheduler, call, image):
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        invert(pipe, image, **call)
    finally:
        pipe.scheduler = original


def test_stochastic_sampling_is_refused_before_drawing_noise(flux):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(flux.scheduler.config,
                                                                      stochastic_sampling=True)
    state = torch.random.get_rng_state()
    with pytest.raises(UnsupportedError, match="stochastic_sampling=True"):
        with_scheduler(flux, scheduler, FLUX, torch.zeros(2, 3, 8, 8))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator was not touched


@pytest.mark.parametrize("name, size, call, scheduler", [
    ("flux", 8, FLUX, lambda: diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                                use_flow_sigmas=True, flow_shift=3.0)),
    ("sd3", 16, SD3, lambda: diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0)),
])
def test_multistep_and_multi_stage_flow_schedulers_are_refused(name, size, call, scheduler, request):
    pipe = request.getfixturevalue(name)
    reason = (rf"invert\(pipe=\.\.\.\): {type(scheduler()).__name__} is a multistep or multi-stage "
              ".*FlowMatchEuler")
    with pytest.raises(UnsupportedError, match=reason):
        with_scheduler(pipe, scheduler(), call, torch.zeros(2, 3, size, size))


def test_bad_calls_are_refused(flux, sd3):
    image = torch.zeros(2, 3, 8, 8)
    with pytest.raises(InvalidOptionError, match="latents"):
        invert(flux, image, latents=torch.zeros(2, 16, 4), **FLUX)
    with pytest.raises(InvalidOptionError, match="generator"):
        invert(flux, image, generator=torch.Generator(), **FLUX)
    with pytest.raises(InvalidOptionError, match="exact must be True or False"):
        invert(flux, image, exact="yes", **FLUX)
    with pytest.raises(ShapeError, match="image batch"):
        invert(flux, image[:1], **FLUX)
    with pytest.raises(ShapeError, match="height=16, width=16"):
        invert(sd3, torch.zeros(2, 3, 32, 32), **SD3)
    with pytest.raises(UnsupportedError, match="supports StableDiffusionPipeline, StableDiffusion3Pipeline"):
        encode_image(object(), image)

