"""``StableDiffusionXLPipeline``: two text encoders, pooled embeddings, micro-conditioning ids.

The setup runs the pipeline's own helpers in the pipeline's order (``check_inputs``,
``encode_prompt`` with both tokenizers and encoders, ``retrieve_timesteps``, ``prepare_latents``,
``prepare_extra_step_kwargs``, ``_get_add_time_ids``), so prompts and second prompts, negative
prompts, ``prompt_embeds`` / ``pooled_prompt_embeds``, ``num_images_per_prompt``, ``clip_skip``,
the size and crop conditioning (negative ones included), custom ``timesteps`` / ``sigmas``, user
``latents`` and ``eta`` behave exactly as in ``pipe(...)``.

Inside the system's denoiser the UNet call is the pipeline's: the conditioning tensors are built
as the pipeline builds its guidance-doubled batch (``[negative, positive]`` embeddings, pooled
``text_embeds`` and the ``time_ids`` repeated the pipeline's way), and each row of the system's
batch picks the rows of that batch its sample has in the pipeline; then
``uncond + g (text - uncond)`` and ``rescale_noise_cfg`` when ``guidance_rescale > 0``. The tail
(VAE upcast, ``latents_mean`` / ``latents_std``, decode, watermark, ``image_processor``,
``output_type``, ``return_dict``) is the pipeline's too.

Refused by name: per-step callbacks, IP-Adapter inputs (neither has a parallel counterpart) and
``denoising_end`` (the base half of an ensemble-of-experts run stops the scheduler mid-loop).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..sampler import compile_scheduler
from ..system import loop_system
from .base import PreparedPipeline, bind_call
from .guidance import doubled_batch_model, rescaled
from .inputs import (
    POOLED_EMBEDS,
    default_size,
    guidance_scale_embedding,
    loop_inputs,
    lora_scale,
    named,
    prompt_batch_size,
)
from .output import Decode, finisher
from .refusals import CALLBACK_WHY, IP_ADAPTER_WHY, Refusals, refuse_all

__all__ = ["prepare_stable_diffusion_xl", "REFUSED"]

#: Call options refused by name.
REFUSED: Refusals = (
    (("callback", "callback_on_step_end"), CALLBACK_WHY),
    (("ip_adapter_image", "ip_adapter_image_embeds"), IP_ADAPTER_WHY),
    (("denoising_end",), "stopping the scheduler part-way (ensemble of experts) is not reproduced"),
)


def _sdxl_model(pipe: Any, embeds: torch.Tensor, text_embeds: torch.Tensor, time_ids: torch.Tensor,
                batch: int, guided: bool, guidance_scale: float, guidance_rescale: float,
                timestep_cond: torch.Tensor | None, cross_attention_kwargs: dict[str, Any] | None):
    """The pipeline's UNet call and guidance; conditioning tensors hold the pipeline's batch rows."""
    def call(model_input: torch.Tensor, timestep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # a guidance-distilled UNet (timestep_cond) runs unguided: its rows are the samples
        added_cond_kwargs = {"text_embeds": text_embeds[rows], "time_ids": time_ids[rows]}
        return pipe.unet(model_input, timestep, encoder_hidden_states=embeds[rows],
                         timestep_cond=None if timestep_cond is None else timestep_cond[rows],
                         cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs,
                         return_dict=False)[0]
    return doubled_batch_model(call, batch=batch, guided=guided, guidance_scale=guidance_scale,
                               refine=rescaled(guidance_rescale))


def _decode(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """The pipeline's decode: fp16 VAE upcast, latent de-normalisation, ``vae.decode``."""
    from diffusers.utils.torch_utils import get_module_execution_device

    needs_upcasting = pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast
    if needs_upcasting:
        pipe.vae.to(dtype=torch.float32)  # what the pipeline's (deprecated) upcast_vae does
        latents = latents.to(next(iter(pipe.vae.post_quant_conv.parameters())).dtype)
    config = pipe.vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    image = pipe.vae.decode(latents.to(get_module_execution_device(pipe.vae)), return_dict=False)[0]
    if needs_upcasting:
        pipe.vae.to(dtype=torch.float16)
    return image


def _decoder(pipe: Any) -> Decode:
    """The pipeline's decode, watermark and ``image_processor.postprocess``."""
    def decode(latents: torch.Tensor, output_type: str) -> Any:
        image = _decode(pipe, latents)
        if pipe.watermark is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type=output_type)
    return decode


def _conditioning(pipe: Any, args: Mapping[str, Any], height: int, width: int, guided: bool,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(embeds, text_embeds, time_ids)`` with the rows of the pipeline's (doubled) UNet batch."""
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        device=device, do_classifier_free_guidance=guided,
        lora_scale=lora_scale(args["cross_attention_kwargs"]),
        **named(args, "prompt", "prompt_2", "negative_prompt", "negative_prompt_2", *POOLED_EMBEDS,
                "num_images_per_prompt", "clip_skip"))
    if pipe.text_encoder_2 is None:
        projection_dim = int(pooled.shape[-1])
    else:
        projection_dim = pipe.text_encoder_2.config.projection_dim
    original_size = args["original_size"] or (height, width)
    target_size = args["target_size"] or (height, width)
    time_ids = pipe._get_add_time_ids(original_size, args["crops_coords_top_left"], target_size,
                                      dtype=embeds.dtype, text_encoder_projection_dim=projection_dim)
    if args["negative_original_size"] is not None and args["negative_target_size"] is not None:
        negative_time_ids = pipe._get_add_time_ids(
            args["negative_original_size"], args["negative_crops_coords_top_left"],
            args["negative_target_size"],
            dtype=embeds.dtype, text_encoder_projection_dim=projection_dim)
    else:
        negative_time_ids = time_ids
    text_embeds = pooled
    if guided:
        embeds = torch.cat([negative, embeds], dim=0)
        text_embeds = torch.cat([negative_pooled, text_embeds], dim=0)
        time_ids = torch.cat([negative_time_ids, time_ids], dim=0)
    samples = prompt_batch_size(args["prompt"], args["prompt_embeds"]) * args["num_images_per_prompt"]
    # the pipeline's own layout: [neg, pos] repeated per sample (not aligned with the embeddings')
    time_ids = time_ids.to(device).repeat(samples, 1)
    return embeds.to(device), text_embeds.to(device), time_ids


def prepare_stable_diffusion_xl(pipe: Any, call: Mapping[str, Any], dtype: torch.dtype) -> PreparedPipeline:
    """Prepare ``StableDiffusionXLPipeline.__call__(**call)``; ``dtype`` is the solver state's."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps

    args = bind_call(pipe, call, extra=("callback", "callback_steps"))
    refuse_all(pipe, args, REFUSED)
    height, width = default_size(pipe, args)
    pipe.check_inputs(args["prompt"], args["prompt_2"], height, width, args.get("callback_steps"),
                      args["negative_prompt"], args["negative_prompt_2"], args["prompt_embeds"],
                      args["negative_prompt_embeds"], args["pooled_prompt_embeds"],
                      args["negative_pooled_prompt_embeds"], None, None,
                      args["callback_on_step_end_tensor_inputs"])
    guidance_scale, guidance_rescale = args["guidance_scale"], args["guidance_rescale"]
    guided = guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
    device = pipe._execution_device
    embeds, text_embeds, time_ids = _conditioning(pipe, args, height, width, guided, device)
    retrieve_timesteps(pipe.scheduler, args["num_inference_steps"], device, args["timesteps"], args["sigmas"])
    loop = loop_inputs(pipe, args, pipe.unet.config.in_channels, height, width, embeds.dtype, device)
    timestep_cond = guidance_scale_embedding(pipe, guidance_scale, loop.samples, device, loop.latents.dtype)
    if hasattr(pipe.scheduler, "set_begin_index"):
        pipe.scheduler.set_begin_index(0)
    program = compile_scheduler(pipe.scheduler, loop.step_kwargs, input_scaling="model")
    model = _sdxl_model(pipe, embeds, text_embeds, time_ids, loop.samples, guided, guidance_scale,
                        guidance_rescale, timestep_cond, args["cross_attention_kwargs"])
    system = loop_system(program, model, loop.latents, generator=loop.generator, step_batch=loop.samples,
                         model_dtype=pipe.unet.dtype, device=device, dtype=dtype)
    finish = finisher(pipe, args, dtype=embeds.dtype, output_class=StableDiffusionXLPipelineOutput,
                      decode=_decoder(pipe))
    return PreparedPipeline(system, program, finish)
