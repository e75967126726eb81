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
from .base import (
    CALLBACK_WHY,
    PreparedPipeline,
    Refusals,
    batch_rows,
    bind_call,
    prompt_batch_size,
    refuse_all,
    sample_index,
)

__all__ = ["prepare_sana", "REFUSED"]

#: Call options refused by name.
REFUSED: Refusals = ((("callback_on_step_end",), CALLBACK_WHY),)


def _sana_model(pipe: Any, embeds: torch.Tensor, mask: torch.Tensor, batch: int, guided: bool,
                guidance_scale: float, latent_channels: int, attention_kwargs: dict[str, Any] | None):
    transformer = pipe.transformer
    learned_sigma = transformer.config.out_channels // 2 == latent_channels
    embeds = embeds.to(dtype=transformer.dtype)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows = batch_rows(sample_index(x, batch), batch, guided)
        model_input, timestep = (torch.cat([x, x]), torch.cat([t, t])) if guided else (x, t)
        noise_pred = transformer(model_input.to(dtype=transformer.dtype), encoder_hidden_states=embeds[rows],
                                 encoder_attention_mask=mask[rows],
                                 timestep=timestep * transformer.config.timestep_scale, return_dict=False,
                                 attention_kwargs=attention_kwargs)[0].float()
        if guided:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        if learned_sigma:
            noise_pred = noise_pred.chunk(2, dim=1)[0]
        return noise_pred
    return model


def _finisher(pipe: Any, args: Mapping[str, Any], original_size: tuple[int, int] | None):
    output_type = args["output_type"]

    def finish(latents: torch.Tensor) -> Any:
        from diffusers.pipelines.sana.pipeline_output import SanaPipelineOutput

        latents = latents.to(torch.float32)
        if output_type == "latent":
            image = latents
        else:
            latents = latents.to(pipe.vae.dtype)
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
            if original_size is not None:
                image = pipe.image_processor.resize_and_crop_tensor(image, original_size[1], original_size[0])
            image = pipe.image_processor.postprocess(image, output_type=output_type)
        pipe.maybe_free_model_hooks()
        if not args["return_dict"]:
            return (image,)
        return SanaPipelineOutput(images=image)
    return finish


def _binned_size(pipe: Any, height: int, width: int) -> tuple[int, int]:
    """The pipeline's aspect-ratio bin for the transformer's sample size (its error otherwise)."""
    from diffusers.pipelines.sana import pipeline_sana as module

    bins = {128: "ASPECT_RATIO_4096_BIN", 64: "ASPECT_RATIO_2048_BIN", 32: "ASPECT_RATIO_1024_BIN",
            16: "ASPECT_RATIO_512_BIN"}
    name = bins.get(pipe.transformer.config.sample_size)
    if name is None:
        raise ValueError("Invalid sample size")
    return pipe.image_processor.classify_height_width_bin(height, width, ratios=getattr(module, name))


def prepare_sana(pipe: Any, call: Mapping[str, Any], dtype: torch.dtype) -> PreparedPipeline:
    """Prepare ``SanaPipeline.__call__(**call)``; ``dtype`` is the solver state's."""
    from diffusers.pipelines.sana.pipeline_sana import retrieve_timesteps

    args = bind_call(pipe, call)
    refuse_all(pipe, args, REFUSED)
    height, width = args["height"], args["width"]
    original_size = None
    if args["use_resolution_binning"]:
        original_size = (height, width)
        height, width = _binned_size(pipe, height, width)
    pipe.check_inputs(args["prompt"], height, width, args["callback_on_step_end_tensor_inputs"],
                      args["negative_prompt"], args["prompt_embeds"], args["negative_prompt_embeds"],
                      args["prompt_attention_mask"], args["negative_prompt_attention_mask"])
    guidance_scale = args["guidance_scale"]
    guided = guidance_scale > 1.0
    device = pipe._execution_device
    attention_kwargs = args["attention_kwargs"]
    lora_scale = attention_kwargs.get("scale", None) if attention_kwargs is not None else None
    embeds, mask, negative, negative_mask = pipe.encode_prompt(
        args["prompt"], guided, negative_prompt=args["negative_prompt"],
        num_images_per_prompt=args["num_images_per_prompt"], device=device,
        prompt_embeds=args["prompt_embeds"], negative_prompt_embeds=args["negative_prompt_embeds"],
        prompt_attention_mask=args["prompt_attention_mask"],
        negative_prompt_attention_mask=args["negative_prompt_attention_mask"],
        clean_caption=args["clean_caption"], max_sequence_length=args["max_sequence_length"],
        complex_human_instruction=args["complex_human_instruction"], lora_scale=lora_scale)
    if guided:
        embeds, mask = torch.cat([negative, embeds], dim=0), torch.cat([negative_mask, mask], dim=0)
    retrieve_timesteps(pipe.scheduler, args["num_inference_steps"], device, args["timesteps"], args["sigmas"])
    latent_channels = pipe.transformer.config.in_channels
    samples = prompt_batch_size(args["prompt"], args["prompt_embeds"]) * args["num_images_per_prompt"]
    latents = pipe.prepare_latents(samples, latent_channels, height, width, torch.float32, device,
                                   args["generator"], args["latents"])
    step_kwargs = pipe.prepare_extra_step_kwargs(args["generator"], args["eta"])
    generator = step_kwargs.pop("generator", None)
    program = compile_scheduler(pipe.scheduler, step_kwargs, input_scaling="none")
    model = _sana_model(pipe, embeds, mask, samples, guided, guidance_scale, latent_channels,
                        attention_kwargs)
    system = loop_system(program, model, latents, generator=generator, step_batch=samples,
                         model_dtype=torch.float32, device=device, dtype=dtype)
    return PreparedPipeline(system, program, _finisher(pipe, args, original_size))
