"""``PixArtSigmaPipeline``: a T5-conditioned DiT with CFG, learned sigma and resolution binning.

What the pipeline does, and fpsolve reproduces by calling the pipeline's own helpers:

* with ``use_resolution_binning`` the size snaps to the transformer's aspect-ratio bins
  (``image_processor.classify_height_width_bin``) and the decoded image is resized and cropped
  back (``resize_and_crop_tensor``); ``check_inputs``; ``encode_prompt`` (T5 embeddings and
  attention masks, negatives under CFG); ``retrieve_timesteps`` (custom ``timesteps`` /
  ``sigmas``); ``prepare_latents``; ``prepare_extra_step_kwargs`` (``eta``, the generator);
* per step: ``scale_model_input``, one transformer call on ``[x, x]`` with ``[negative,
  positive]`` embeddings and masks, ``uncond + g (text - uncond)``, the learned-sigma channels
  dropped; ``scheduler.step`` with the generator;
* decode: ``vae.decode(latents / scaling_factor)``, ``image_processor.postprocess``.

Refused by name: the deprecated per-step ``callback``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..sampler import compile_scheduler
from ..system import loop_system
from .base import PreparedPipeline, bind_call
from .guidance import doubled_batch_model
from .inputs import binned_size, loop_inputs, masked_prompt_embeds
from .output import finisher, image_decoder
from .refusals import CALLBACK_WHY, Refusals, refuse_all

__all__ = ["prepare_pixart_sigma", "REFUSED"]

#: Call options refused by name.
REFUSED: Refusals = ((("callback",), CALLBACK_WHY),)

#: The transformer's sample size -> the pipeline's aspect-ratio table (``use_resolution_binning``).
BINS = {256: "ASPECT_RATIO_2048_BIN", 128: "ASPECT_RATIO_1024_BIN", 64: "ASPECT_RATIO_512_BIN",
        32: "ASPECT_RATIO_256_BIN"}


def _pixart_model(pipe: Any, embeds: torch.Tensor, mask: torch.Tensor, batch: int, guided: bool,
                  guidance_scale: float, latent_channels: int):
    transformer = pipe.transformer

    def call(model_input: torch.Tensor, timestep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return transformer(model_input, encoder_hidden_states=embeds[rows], encoder_attention_mask=mask[rows],
                           timestep=timestep, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                           return_dict=False)[0]
    return doubled_batch_model(call, batch=batch, guided=guided, guidance_scale=guidance_scale,
                               learned_sigma=transformer.config.out_channels // 2 == latent_channels)


def prepare_pixart_sigma(pipe: Any, call: Mapping[str, Any], dtype: torch.dtype) -> PreparedPipeline:
    """Prepare ``PixArtSigmaPipeline.__call__(**call)``; ``dtype`` is the solver state's."""
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as module

    args = bind_call(pipe, call)
    refuse_all(pipe, args, REFUSED)
    height = args["height"] or pipe.transformer.config.sample_size * pipe.vae_scale_factor
    width = args["width"] or pipe.transformer.config.sample_size * pipe.vae_scale_factor
    original_size = None
    if args["use_resolution_binning"]:
        original_size = (height, width)
        height, width = binned_size(pipe, height, width, module, BINS)
    pipe.check_inputs(args["prompt"], height, width, args["negative_prompt"], args["callback_steps"],
                      args["prompt_embeds"], args["negative_prompt_embeds"], args["prompt_attention_mask"],
                      args["negative_prompt_attention_mask"])
    guidance_scale = args["guidance_scale"]
    guided = guidance_scale > 1.0
    device = pipe._execution_device
    embeds, mask = masked_prompt_embeds(pipe, args, guided, device)
    module.retrieve_timesteps(pipe.scheduler, args["num_inference_steps"], device, args["timesteps"],
                              args["sigmas"])
    latent_channels = pipe.transformer.config.in_channels
    loop = loop_inputs(pipe, args, latent_channels, height, width, embeds.dtype, device)
    program = compile_scheduler(pipe.scheduler, loop.step_kwargs, input_scaling="model")
    model = _pixart_model(pipe, embeds, mask, loop.samples, guided, guidance_scale, latent_channels)
    system = loop_system(program, model, loop.latents, generator=loop.generator, step_batch=loop.samples,
                         model_dtype=pipe.transformer.dtype, device=device, dtype=dtype)
    finish = finisher(pipe, args, dtype=embeds.dtype, output_class=ImagePipelineOutput,
                      decode=image_decoder(pipe, cast=True, original_size=original_size))
    return PreparedPipeline(system, program, finish)
