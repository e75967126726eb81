"""Flow-matching diffusers pipelines through ``sample(pipe, ...)`` against ``pipe(...)``.

Flux, Stable Diffusion 3, Wan (text-to-video), Sana and PixArt-Sigma, each from tiny random
components built here (CLIP / T5 text encoders over vocabularies written into a temporary
directory, transformers with one or two layers of width 16, 8x8 latents, 2-4 steps). At a
vanishing tolerance the latents (``output_type="latent"``) must equal the pipeline's to ``1e-5``
relative and the decoded output to ``1/255``; at the default tolerance the decoded output is
within ``1/255``.

Noise floor (measured on these configurations, 2-core x86_64, float32 models): ``pipe()``'s own
latents move when the same sample is generated alone or inside a batch of four (float32
reductions round differently with the batch size), by 8.6e-8 relative (Flux), 4.4e-7 (SD3),
2.4e-7 (Wan), 2.4e-7 (Sana), 4.4e-7 (PixArt-Sigma with DPM-Solver) and 1.6e-6 (PixArt-Sigma
with v-prediction DDPM). fpsolve evaluates many positions in one batch, so its error rests on that
floor; the ``1e-5`` bound leaves a factor 6 or more.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

from fpsolve.errors import UnsupportedError
from fpsolve.integrations.diffusers import sample
from fpsolve.integrations.diffusers.pipelines import ADAPTERS, SUPPORT, support_markdown, support_rows
from fpsolve.integrations.diffusers.testing import (
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sana_pipeline,
    tiny_sd3_pipeline,
    tiny_wan_pipeline,
    wan_unipc,
)
from tests._diffusers_helpers import (
    EXACT,
    PIXEL,
    assert_same_output,
    images_of,
    latent_relative_error,
    one_thread_per_module,
    pipeline_fixture,
    run_both,
    scheduler_swapped,
)

LATENT_PARITY = 1e-5  # relative, see the noise floor above

_one_thread = one_thread_per_module()

# -- tiny components (built by fpsolve.integrations.diffusers.testing) ---------------------------

flux = pipeline_fixture(tiny_flux_pipeline, "flux")
sd3 = pipeline_fixture(tiny_sd3_pipeline, "sd3")
wan = pipeline_fixture(lambda directory: tiny_wan_pipeline(directory, wan_unipc()), "wan")
pixart = pipeline_fixture(tiny_pixart_pipeline, "pixart")
sana = pipeline_fixture(tiny_sana_pipeline, "sana")


def check_latents_and_images(pipe, record_property=None, **case):
    """tol -> 0: latents within 1e-5 relative and decoded images within 1/255 of ``pipe()``'s."""
    reference, out, solution = run_both(pipe, output_type="latent", **case, **EXACT)
    error = latent_relative_error(reference, out)
    assert error <= LATENT_PARITY, error
    reference, out, _ = run_both(pipe, output_type="np", **case, **EXACT)
    pixels = assert_same_output(reference, out, limit=PIXEL)
    if record_property is not None:
        record_property("latent_relative_error", error)
        record_property("max_abs_error_255", pixels * 255)
    return solution


# -- Flux ----------------------------------------------------------------------------------------

FLUX = dict(height=8, width=8, num_inference_steps=4, max_sequence_length=8)


def test_flux_guidance_embedding_batch(flux, record_property):
    solution = check_latents_and_images(flux, record_property, prompt=["a cat", "a red dog"],
                                        guidance_scale=3.5,
                                        **FLUX)
    assert solution.sample.shape == (2, 16, 4)  # packed: (8 / 2)^2 tokens of 4 x 1 channels


def test_flux_true_cfg_with_images_per_prompt_and_generators(flux):
    check_latents_and_images(flux, prompt="a cat", negative_prompt="blur", true_cfg_scale=3.0,
                             num_images_per_prompt=2, generator_list=[4, 2], **FLUX)


def test_flux_stochastic_sampling_draws_from_the_global_generator(flux):
    # Flux passes no generator to step: stochastic_sampling draws each step's noise from torch's
    # global generator, after the latents; fpsolve pre-draws it from there in the same order
    with scheduler_swapped(flux, diffusers.FlowMatchEulerDiscreteScheduler.from_config(flux.scheduler.config,
                                                                                      stochastic_sampling=True)):
        check_latents_and_images(flux, prompt=["a cat", "a dog"], global_seed=11, **FLUX)


def test_flux_multistep_flow_scheduler(flux):
    # UniPC with flow sigmas: Flux then leaves the sigmas to the scheduler and passes only mu
    with scheduler_swapped(flux, diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                                   use_flow_sigmas=True, flow_shift=3.0)):
        check_latents_and_images(flux, prompt=["a cat", "a dog"], **FLUX)


def test_flux_without_guidance_embedding(tmp_path):
    # a FLUX.1-schnell-like transformer: no guidance embedding, guidance_scale is unused
    pipe = tiny_flux_pipeline(tmp_path, guidance_embeds=False)
    check_latents_and_images(pipe, prompt="a cat", **FLUX)


def test_flux_user_latents(flux):
    # packed latents [N, (H/2)(W/2), 4C] given by the caller are used as they are
    latents = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(8))
    check_latents_and_images(flux, prompt="a cat", num_images_per_prompt=2, latents=latents, **FLUX)


def test_flux_prompt_embeds_path(flux):
    generator = torch.Generator().manual_seed(5)
    embeds = {name: torch.randn(*shape, generator=generator) for name, shape in (
        ("prompt_embeds", (2, 8, 16)), ("pooled_prompt_embeds", (2, 16)),
        ("negative_prompt_embeds", (2, 8, 16)), ("negative_pooled_prompt_embeds", (2, 16)))}
    check_latents_and_images(flux, true_cfg_scale=2.0, **embeds, **FLUX)


@pytest.mark.parametrize("output_type", ["pt", "pil"])
def test_flux_output_types(flux, output_type):
    reference, out, _ = run_both(flux, prompt="a cat", output_type=output_type,
                                 return_dict=output_type == "pt",
                                 **FLUX, **EXACT)
    assert_same_output(reference, out, limit=PIXEL)


# -- Stable Diffusion 3 --------------------------------------------------------------------------

SD3 = dict(height=16, width=16, num_inference_steps=4, max_sequence_length=8)


def test_sd3_guided_batch(sd3, record_property):
    solution = check_latents_and_images(sd3, record_property, prompt=["a cat", "a red dog"],
                                        negative_prompt=["blur", "dark"], guidance_scale=5.0, **SD3)
    assert solution.sample.shape == (2, 4, 8, 8)


def test_sd3_skip_layer_guidance(sd3):
    # steps 1 and 2 of 5 lie inside the (0.1, 0.6) window: two of the five rows get the extra call
    check_latents_and_images(sd3, prompt="a cat", guidance_scale=4.0, skip_guidance_layers=[1],
                             skip_layer_guidance_start=0.1, skip_layer_guidance_stop=0.6,
                             **dict(SD3, num_inference_steps=5))


def test_sd3_unguided_images_per_prompt_generators_and_dynamic_shift(sd3):
    with scheduler_swapped(sd3, diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)):
        check_latents_and_images(sd3, prompt=["a", "b"], guidance_scale=1.0, num_images_per_prompt=2,
                                 generator_list=[1, 2, 3, 4], **SD3)


def test_sd3_flow_heun(sd3):
    # Heun repeats each timestep (two model calls per step): keys are step indices, not timesteps
    with scheduler_swapped(sd3, diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0)):
        check_latents_and_images(sd3, prompt="a cat", guidance_scale=4.0, **SD3)


def test_sd3_prompt_embeds_path_and_output_types(sd3):
    generator = torch.Generator().manual_seed(5)
    embeds = {name: torch.randn(*shape, generator=generator) for name, shape in (
        ("prompt_embeds", (1, 24, 32)), ("pooled_prompt_embeds", (1, 32)),
        ("negative_prompt_embeds", (1, 24, 32)), ("negative_pooled_prompt_embeds", (1, 32)))}
    check_latents_and_images(sd3, **embeds, **SD3)
    for output_type in ("pt", "pil"):
        reference, out, _ = run_both(sd3, prompt="a cat", output_type=output_type, return_dict=False, **SD3,
                                     **EXACT)
        assert_same_output(reference, out, limit=PIXEL)


# -- Wan (text-to-video) -------------------------------------------------------------------------

WAN = dict(height=32, width=32, num_frames=5, num_inference_steps=4, max_sequence_length=8)


def test_wan_guided_video_batch(wan, record_property):
    solution = check_latents_and_images(wan, record_property, prompt=["a cat", "a red dog"],
                                        negative_prompt=["blur", "dark"], guidance_scale=5.0, **WAN)
    assert solution.sample.shape == (2, 4, 2, 4, 4)  # 5 frames -> 2 latent frames, 32 px -> 4


def test_wan_flow_euler_videos_per_prompt_generators_and_output_types(wan):
    with scheduler_swapped(wan, diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0)):
        check_latents_and_images(wan, prompt="a cat", num_videos_per_prompt=2, generator_list=[7, 8], **WAN)
        for output_type in ("pt", "pil"):
            reference, out, _ = run_both(wan, prompt="a cat", output_type=output_type, return_dict=False,
                                         **WAN,
                                         **EXACT)
            assert_same_output(reference, out, limit=PIXEL)


def test_wan_two_experts_and_prompt_embeds(tmp_path):
    pipe = tiny_wan_pipeline(tmp_path, wan_unipc(), two_experts=True)
    generator = torch.Generator().manual_seed(5)
    embeds = dict(prompt_embeds=torch.randn(1, 8, 16, generator=generator),
                  negative_prompt_embeds=torch.randn(1, 8, 16, generator=generator))
    # boundary 600: the first steps go to the first expert, the rest to the second (guidance 2.0)
    check_latents_and_images(pipe, guidance_scale=4.0, guidance_scale_2=2.0, **embeds, **WAN)


def test_wan_expand_timesteps(tmp_path):
    # Wan 2.2 TI2V: the transformer gets one timestep per latent token ([N, 2 x 2 x 2] here); all
    # tokens share the step's t, so this checks the per-token call (a wrong token count fails in
    # the transformer) and its parity, not a different output
    pipe = tiny_wan_pipeline(tmp_path, wan_unipc(), expand_timesteps=True)
    check_latents_and_images(pipe, prompt=["a cat", "a dog"], guidance_scale=3.0, **WAN)


# -- PixArt-Sigma --------------------------------------------------------------------------------

PIXART = dict(height=16, width=16, num_inference_steps=4, max_sequence_length=8, use_resolution_binning=False)


def test_pixart_sigma_guided_batch_learned_sigma(pixart, record_property):
    solution = check_latents_and_images(pixart, record_property, prompt=["a cat", "a red dog"],
                                        negative_prompt="blur", guidance_scale=4.5, **PIXART)
    assert solution.sample.shape == (2, 4, 8, 8)


def test_pixart_sigma_ddpm_generators_images_per_prompt_and_embeds(pixart):
    # DDPM draws step noise from the generators; v-prediction: with eps-prediction the random
    # transformer's x0 is clipped at every step and pipe()'s own float32 floor rises to 4.5e-6
    # (1.6e-6 with v-prediction, 4e-7 with DPM-Solver)
    with scheduler_swapped(pixart, diffusers.DDPMScheduler(prediction_type="v_prediction")):
        check_latents_and_images(pixart, prompt="a cat", num_images_per_prompt=2, generator_list=[3, 9],
                                 **PIXART)
        generator = torch.Generator().manual_seed(5)
        embeds = dict(prompt_embeds=torch.randn(1, 8, 16, generator=generator),
                      prompt_attention_mask=torch.ones(1, 8, dtype=torch.long),
                      negative_prompt_embeds=torch.randn(1, 8, 16, generator=generator),
                      negative_prompt_attention_mask=torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]]))
        check_latents_and_images(pixart, negative_prompt=None, **embeds, **PIXART)
        reference, out, _ = run_both(pixart, prompt="a cat", output_type="pt", return_dict=False, **PIXART,
                                     **EXACT)
        assert_same_output(reference, out, limit=PIXEL)


def test_pixart_sigma_resolution_binning(tmp_path):
    # sample size 32 bins to the 256-pixel ratios: 48x32 is generated at a binned size and
    # resized and cropped back (an 8x VAE keeps the binned latents at 32x32-ish)
    pipe = tiny_pixart_pipeline(tmp_path, sample_size=32, vae_blocks=4)
    for output_type in ("np", "pil"):
        reference, out, _ = run_both(pipe, prompt="a cat", height=48, width=32, num_inference_steps=2,
                                     max_sequence_length=8, output_type=output_type, **EXACT)
        assert_same_output(reference, out, limit=PIXEL)
    assert images_of(out).shape == (1, 48, 32, 3)


# -- Sana ----------------------------------------------------------------------------------------

SANA = dict(height=32, width=32, num_inference_steps=4, max_sequence_length=8, use_resolution_binning=False)


def test_sana_guided_batch_behind_the_complex_instruction(sana, record_property):
    solution = check_latents_and_images(sana, record_property, prompt=["a cat", "a red dog"],
                                        negative_prompt="blur", guidance_scale=4.5, **SANA)
    assert solution.sample.shape == (2, 4, 16, 16)


def test_sana_flow_dpm_solver_images_per_prompt_generators_and_outputs(sana):
    with scheduler_swapped(sana, diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction",
                                                                       use_flow_sigmas=True,
                                                                       flow_shift=3.0)):
        check_latents_and_images(sana, prompt="a cat", num_images_per_prompt=2, generator_list=[3, 9],
                                 complex_human_instruction=None, **SANA)
        for output_type in ("pt", "pil"):
            reference, out, _ = run_both(sana, prompt="a cat", output_type=output_type, return_dict=False,
                                         **SANA, **EXACT)
            assert_same_output(reference, out, limit=PIXEL)


# -- default tolerance: the decoded output within one level --------------------------------------

DEFAULT_CASES = {
    "flux": (FLUX, dict(prompt=["a cat", "a dog"], guidance_scale=3.5)),
    "sd3": (SD3, dict(prompt=["a cat", "a dog"], guidance_scale=5.0)),
    "wan": (WAN, dict(prompt=["a cat", "a dog"], guidance_scale=5.0)),
    "pixart": (PIXART, dict(prompt=["a cat", "a dog"], guidance_scale=4.5)),
    "sana": (SANA, dict(prompt=["a cat", "a dog"], guidance_scale=4.5)),
}


@pytest.mark.parametrize("name", list(DEFAULT_CASES))
def test_default_tolerance_within_one_level(name, request, record_property):
    pipe = request.getfixturevalue(name)
    options, case = DEFAULT_CASES[name]
    options = dict(options, num_inference_steps=12)
    reference, out, solution = run_both(pipe, output_type="np", **case, **options)
    error = float(np.abs(images_of(out) - images_of(reference)).max())
    record_property("max_abs_error_255", error * 255)
    record_property("iterations", solution.iterations)
    assert solution.converged and solution.iterations < 12
    assert error <= PIXEL


# -- the support table in the docs ---------------------------------------------------------------

def test_docs_table_is_the_registry():
    page = (Path(__file__).resolve().parents[1] / "docs" / "pipelines.md").read_text()
    start, end = "<!-- pipeline-support:start -->\n", "<!-- pipeline-support:end -->"
    shown = page[page.index(start) + len(start):page.index(end)]
    assert shown == support_markdown(), "regenerate the table: print(support_markdown())"
    assert [row["pipeline"] for row in support_rows()] == sorted(
        SUPPORT, key=lambda name: (SUPPORT[name].family != "noise", name))
    assert set(ADAPTERS) == set(SUPPORT)


@pytest.mark.parametrize("name", ["flux", "sd3", "wan", "pixart", "sana"])
def test_every_refused_option_in_the_table_is_refused_by_name(name, request):
    pipe = request.getfixturevalue(name)
    options = dict(DEFAULT_CASES[name][0], prompt="a", num_inference_steps=2)
    for names, _ in SUPPORT[type(pipe).__name__].refused:
        for option in names:
            with pytest.raises(UnsupportedError, match=option):
                sample(pipe, **options, **{option: object()})


def test_chunked_model_batches_must_hold_whole_positions(flux):
    # A row's prompt is read from its place in the position-major batch: chunks of whole positions
    # (multiples of N rows) give the unchunked result, other chunks are refused, never misread.
    from fpsolve.gpu import ChunkedEvaluator
    from fpsolve.integrations.diffusers import prepare_pipeline

    call = dict(prompt=["a cat", "a red dog"], generator=torch.Generator().manual_seed(0),
                output_type="latent", **FLUX)
    system = prepare_pipeline(flux, call).system
    states, positions = system.flat_noise[:1].expand(4, -1, -1).clone(), torch.arange(4)
    with torch.no_grad():
        whole = ChunkedEvaluator(system, remember=False)(states, positions)
        in_pairs = ChunkedEvaluator(system, max_batch=4, remember=False)(states, positions)
        assert torch.allclose(in_pairs, whole, rtol=0, atol=1e-6 * float(whole.abs().max()))
        # The chunked evaluator rounds a chunk down to whole positions (3 rows -> 2 = one position):
        # the same result, never a shifted prompt.
        odd = ChunkedEvaluator(system, max_batch=3, remember=False)(states, positions)
        assert torch.allclose(odd, whole, rtol=0, atol=1e-6 * float(whole.abs().max()))
        # A model batch that is not whole positions, handed to the denoiser directly, is refused.
        x, t = system.model_inputs(states, positions)
        with pytest.raises(UnsupportedError, match="whole positions"):
            system.denoise(x[:3], t[:3])
