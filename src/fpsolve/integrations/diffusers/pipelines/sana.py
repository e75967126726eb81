"""``SanaPipeline``: a linear-attention flow transformer conditioned on Gemma, with CFG.

What the pipeline does, and fpsolve reproduces by calling the pipeline's own helpers:

* with ``use_resolution_binning`` the size snaps to the transformer's aspect-ratio bins and the
  decoded image is resized and cropped back; ``check_inputs``; ``encode_prompt`` (the Gemma
  embeddings of the prompt behind ``complex_human_instruction``, attention masks, negatives under
  CFG); ``retrieve_timesteps`` (custom ``timesteps`` / ``sigmas``); ``prepare_latents`` in
  float32; ``prepare_extra_step_kwargs`` (``eta``, the generator);
* per step: one transformer call on ``[x, x]`` in its dtype with ``[negative, positive]``
  embeddings and masks and ``t * timestep_scale``, the output in float32,
  ``uncond + g (text - uncond)``, learned-sigma channels dropped; ``scheduler.step`` with the
  generator;
* decode: ``vae.decode(latents / scaling_factor)`` in the VAE's dtype, ``image_processor``.

Refused by name: per-step callbacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..sampler import compile_scheduler
from ..system import loop_system
from .base import PreparedPipeline, bind_call
from .guidance import doubled_batch_model
from .inputs import binned_size, loop_inputs, lora_scale, masked_prompt_embeds
from .output import finisher, image_decoder
from .refusals import CALLBACK_WHY, Refusals, refuse_all

__all__ = ["prepare_sana", "REFUSED"]

#: Call options refused by name.
REFUSED: Refusals = ((("callback_on_step_end",), CALLBACK_WHY),)

#: The transformer's sample size -> the pipeline's aspect-ratio table (``use_resolution_binning``).
BINS = {128: "ASPECT_RATIO_4096_BIN", 64: "ASPECT_RATIO_2048_BIN", 32: "ASPECT_RATIO_1024_BIN",
        16: "ASPECT_RATIO_512_BIN"}


def _sana_model(pipe: Any, embeds: torch.Tensor, mask: torch.Tensor, batch: int, guided: bool,
                guidance_scale: float, latent_channels: int, attention_kwargs: dict[str, Any] | None):
    transformer = pipe.transformer
    embeds = embeds.to(dtype=transformer.dtype)

    def call(model_input: torch.Tensor, timestep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # the transformer runs in its dtype; the guidance mix and the step in float32
        return transformer(model_input.to(dtype=transformer.dtype), encoder_hidden_states=embeds[rows],
                           encoder_attention_mask=mask[rows],
                           timestep=timestep * transformer.config.timestep_scale, return_dict=False,
                           attention_kwargs=attention_kwargs)[0].float()
    return doubled_batch_model(call, batch=batch, guided=guided, guidance_scale=guidance_scale,
                               learned_sigma=transformer.config.out_channels // 2 == latent_channels)


def prepare_sana(pipe: Any, call: Mapping[str, Any], dtype: torch.dtype) -> PreparedPipeline:
    """Prepare ``SanaPipeline.__call__(**call)``; ``dtype`` is the solver state's."""
    from diffusers.pipelines.sana import pipeline_sana as module
    from diffusers.pipelines.sana.pipeline_output import SanaPipelineOutput

    args = bind_call(pipe, call)
    refuse_all(pipe, args, REFUSED)
    height, width = args["height"], args["width"]
    original_size = None
    if args["use_resolution_binning"]:
        original_size = (height, width)
        height, width = binned_size(pipe, height, width, module, BINS)
    pipe.check_inputs(args["prompt"], height, width, args["callback_on_step_end_tensor_inputs"],
                      args["negative_prompt"], args["prompt_embeds"], args["negative_prompt_embeds"],
                      args["prompt_attention_mask"], args["negative_prompt_attention_mask"])
    guidance_scale = args["guidance_scale"]
    guided = guidance_scale > 1.0
    device = pipe._execution_device
    attention_kwargs = args["attention_kwargs"]
    embeds, mask = masked_prompt_embeds(pipe, args, guided, device,
                                        complex_human_instruction=args["complex_human_instruction"],
                                        lora_scale=lora_scale(attention_kwargs))
    module.retrieve_timesteps(pipe.scheduler, args["num_inference_steps"], device, args["timesteps"],
                              args["sigmas"])
    latent_channels = pipe.transformer.config.in_channels
    # Sana keeps its latents in float32 whatever the transformer's dtype (and decodes from float32)
    loop = loop_inputs(pipe, args, latent_channels, height, width, torch.float32, device)
    program = compile_scheduler(pipe.scheduler, loop.step_kwargs, input_scaling="none")
    model = _sana_model(pipe, embeds, mask, loop.samples, guided, guidance_scale, latent_channels,
                        attention_kwargs)
    system = loop_system(program, model, loop.latents, generator=loop.generator, step_batch=loop.samples,
                         model_dtype=torch.float32, device=device, dtype=dtype)
    finish = finisher(pipe, args, dtype=torch.float32, output_class=SanaPipelineOutput,
                      decode=image_decoder(pipe, cast=True, original_size=original_size))
    return PreparedPipeline(system, program, finish)
