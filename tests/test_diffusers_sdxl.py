"""``StableDiffusionXLPipeline`` through ``sample(pipe, ...)`` against ``pipe(...)``.

Tiny random components (two CLIP text encoders, the second with a projection for the pooled
embedding, a UNet with ``text_time`` added conditioning, a 2-block VAE) stand in for trained
ones. At a vanishing tolerance the latents must equal the pipeline's to ``1e-5`` relative and
the decoded images to ``1/255``; at the default tolerance the images are within ``1/255``.

Noise floor (measured on this configuration, 2-core x86_64, float32 model): ``pipe()``'s own
latents change by up to 7.6e-7 relative when the same sample is generated alone or inside a batch
of four (the UNet's float32 reductions round differently with the batch size); fpsolve's batches
stack many positions, and its measured error is 3e-7 to 9e-7. The 1e-5 bound leaves a factor 10.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from fpsolve.errors import UnsupportedError
from fpsolve.integrations.diffusers import sample
from fpsolve.integrations.diffusers.testing import tiny_sdxl_pipeline
from tests._diffusers_helpers import (
    EXACT,
    PIXEL,
    assert_same_output,
    images_of,
    latent_relative_error,
    one_thread_per_module,
    pipeline_fixture,
    run_both,
)

LATENT_PARITY = 1e-5  # relative, see the noise floor above


_one_thread = one_thread_per_module()
sdxl = pipeline_fixture(tiny_sdxl_pipeline, "sdxl-tokenizers")


SCHEDULERS = {
    "euler": lambda config: diffusers.EulerDiscreteScheduler.from_config(config),
    "ddim": lambda config: diffusers.DDIMScheduler.from_config(config),
    "dpm": lambda config: diffusers.DPMSolverMultistepScheduler.from_config(config),
    "euler-ancestral": lambda config: diffusers.EulerAncestralDiscreteScheduler.from_config(config),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_guided_batch_latents_and_images(sdxl, name, record_property):
    sdxl.scheduler = SCHEDULERS[name](sdxl.scheduler.config)
    case = dict(prompt=["a cat", "a red dog"], negative_prompt=["blur", "dark"], guidance_scale=5.0,
                num_inference_steps=4)
    reference, out, solution = run_both(sdxl, output_type="latent", **case, **EXACT)
    error = latent_relative_error(reference, out)
    record_property("latent_relative_error", error)
    assert error <= LATENT_PARITY
    assert solution.sample.shape == (2, 4, 8, 8)
    reference, out, _ = run_both(sdxl, output_type="np", **case, **EXACT)
    record_property("max_abs_error", assert_same_output(reference, out, limit=PIXEL))


@pytest.mark.parametrize("case", [
    dict(prompt="a cat", num_images_per_prompt=2, guidance_rescale=0.7, output_type="pt"),
    dict(prompt=["a cat"], prompt_2=["a dog"], guidance_scale=1.0, output_type="np"),  # no guidance
    dict(prompt="a cat", original_size=(32, 32), crops_coords_top_left=(4, 0), negative_original_size=(8, 8),
         negative_target_size=(16, 8), output_type="latent", return_dict=False),
    dict(prompt="a cat", height=8, width=16, output_type="pil"),
], ids=["images-per-prompt-rescale", "unguided-prompt-2", "micro-conditioning", "size-pil"])
def test_call_options(sdxl, case):
    sdxl.scheduler = diffusers.EulerDiscreteScheduler.from_config(sdxl.scheduler.config)
    reference, out, _ = run_both(sdxl, num_inference_steps=4, **case, **EXACT)
    if case["output_type"] == "latent":
        assert type(out) is type(reference) and len(out) == len(reference)
        assert latent_relative_error(reference, out) <= LATENT_PARITY
    else:
        assert_same_output(reference, out, limit=PIXEL)


def test_list_of_generators_with_images_per_prompt_and_eta(sdxl):
    sdxl.scheduler = diffusers.DDIMScheduler.from_config(sdxl.scheduler.config)
    reference, out, _ = run_both(sdxl, generator_list=[3, 1, 4, 1], prompt=["a", "b"],
                                 num_images_per_prompt=2, eta=1.0, num_inference_steps=4,
                                 output_type="latent", **EXACT)
    assert latent_relative_error(reference, out) <= LATENT_PARITY


def test_prompt_embeds_path(sdxl):
    sdxl.scheduler = diffusers.EulerDiscreteScheduler.from_config(sdxl.scheduler.config)
    generator = torch.Generator().manual_seed(3)
    embeds = torch.randn(2, 16, 32, generator=generator)
    negative = torch.randn(2, 16, 32, generator=generator)
    pooled, negative_pooled = torch.randn(2, 8, generator=generator), torch.randn(2, 8, generator=generator)
    case = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled, num_inference_steps=4)
    reference, out, _ = run_both(sdxl, output_type="latent", **case, **EXACT)
    assert latent_relative_error(reference, out) <= LATENT_PARITY
    reference, out, _ = run_both(sdxl, output_type="np", **case, **EXACT)
    assert_same_output(reference, out, limit=PIXEL)


def test_default_tolerance_within_one_level(sdxl, record_property):
    sdxl.scheduler = diffusers.EulerDiscreteScheduler.from_config(sdxl.scheduler.config)
    reference, out, solution = run_both(sdxl, prompt=["a cat", "a dog"], num_inference_steps=12,
                                        output_type="np")
    error = float(np.abs(images_of(out) - images_of(reference)).max())
    record_property("max_abs_error_255", error * 255)
    record_property("iterations", solution.iterations)
    assert solution.converged and solution.iterations < 12
    assert error <= PIXEL


def test_refusals_name_the_option(sdxl):
    for option in (dict(denoising_end=0.8), dict(callback_on_step_end=lambda *a: {}),
                   dict(ip_adapter_image_embeds=[torch.zeros(1, 1, 4)])):
        with pytest.raises(UnsupportedError, match=next(iter(option))):
            sample(sdxl, prompt="a", num_inference_steps=2, **option)
