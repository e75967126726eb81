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

from typing import Any

import diffusers
import numpy as np
import pytest
import torch

from fpsolve.errors import UnsupportedError
from fpsolve.integrations.diffusers import sample
from fpsolve.integrations.diffusers.testing import tiny_clip_tokenizer, tiny_vae
from tests.test_diffusers_pipelines import assert_same_output, images_of, run_both

EXACT = dict(tol=1e-9)  # tolerance -> 0: every state is solved to the float64 floor
LATENT_PARITY = 1e-5  # relative, see the noise floor above
PIXEL = 1 / 255


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_sdxl_pipeline(directory, seed: int = 0, output_scale: float = 0.2) -> Any:
    """An SDXL pipeline from tiny random components: 8x8 latents, 16x16 images, no watermark."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer(directory / "one")
    tokenizer_2 = tiny_clip_tokenizer(directory / "two")

    def clip_config(**extra):
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=2,
                              max_position_embeddings=tokenizer.model_max_length,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, hidden_act="gelu", **extra)

    torch.manual_seed(seed)
    # cross attention sees both encoders' hidden states side by side (16 + 16); the added
    # embedding takes 6 time ids x 4 plus the pooled projection (8)
    unet: Any = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=32,
        transformer_layers_per_block=(1, 1),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    unet.eval()
    with torch.no_grad():  # a small output layer keeps the random UNet's loop tame (as a trained one)
        unet.conv_out.weight.mul_(output_scale)
        unet.conv_out.bias.mul_(output_scale)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(clip_config()).eval()
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(projection_dim=8)).eval()
    pipe: Any = diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(seed + 3), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(prediction_type="v_prediction"),
        add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl-tokenizers"))


def latent_relative_error(reference, out) -> float:
    """Max abs difference of the latents over their max abs value."""
    a, b = (torch.as_tensor(images_of(o)) for o in (out, reference))
    assert a.shape == b.shape
    return float((a - b).abs().max() / b.abs().max())


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
