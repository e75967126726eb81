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
from .base import (
    CALLBACK_WHY,
    IP_ADAPTER_WHY,
    PreparedPipeline,
    Refusals,
    batch_rows,
    bind_call,
    refuse_all,
    sample_index,
)

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
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sample = sample_index(x, batch)
        rows = batch_rows(sample, batch, guided)
        if guided:
            x, t = torch.cat([x, x]), torch.cat([t, t])
        added_cond_kwargs = {"text_embeds": text_embeds[rows], "time_ids": time_ids[rows]}
        noise_pred = pipe.unet(x, t, encoder_hidden_states=embeds[rows],
                               timestep_cond=None if timestep_cond is None else timestep_cond[sample],
                               cross_attention_kwargs=cross_attention_kwargs,
                               added_cond_kwargs=added_cond_kwargs,
                               return_dict=False)[0]
        if guided:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            if guidance_rescale > 0.0:
                noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=guidance_rescale)
        return noise_pred
    return model


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


def _finisher(pipe: Any, args: Mapping[str, Any], dtype: torch.dtype):
    output_type = args["output_type"]

    def finish(latents: torch.Tensor) -> Any:
        from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

        latents = latents.to(dtype)
        if output_type == "latent":
            image = latents
        else:
            image = _decode(pipe, latents)
            if pipe.watermark is not None:
                image = pipe.watermark.apply_watermark(image)
            image = pipe.image_processor.postprocess(image, output_type=output_type)
        pipe.maybe_free_model_hooks()
        if not args["return_dict"]:
            return (image,)
        return StableDiffusionXLPipelineOutput(images=image)
    return finish


def _batch_size(args: Mapping[str, Any]) -> int:
    prompt = args["prompt"]
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    return args["prompt_embeds"].shape[0]


def _conditioning(pipe: Any, args: Mapping[str, Any], height: int, width: int, guided: bool,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(embeds, text_embeds, time_ids)`` with the rows of the pipeline's (doubled) UNet batch."""
    attention_kwargs = args["cross_attention_kwargs"]
    lora_scale = attention_kwargs.get("scale", None) if attention_kwargs is not None else None
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=args["prompt"], prompt_2=args["prompt_2"], device=device,
        num_images_per_prompt=args["num_images_per_prompt"], do_classifier_free_guidance=guided,
        negative_prompt=args["negative_prompt"], negative_prompt_2=args["negative_prompt_2"],
        prompt_embeds=args["prompt_embeds"], negative_prompt_embeds=args["negative_prompt_embeds"],
        pooled_prompt_embeds=args["pooled_prompt_embeds"],
        negative_pooled_prompt_embeds=args["negative_pooled_prompt_embeds"], lora_scale=lora_scale,
        clip_skip=args["clip_skip"])
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
    samples = _batch_size(args) * args["num_images_per_prompt"]
    # the pipeline's own layout: [neg, pos] repeated per sample (not aligned with the embeddings')
    time_ids = time_ids.to(device).repeat(samples, 1)
    return embeds.to(device), text_embeds.to(device), time_ids


def prepare_stable_diffusion_xl(pipe: Any, call: Mapping[str, Any], dtype: torch.dtype) -> PreparedPipeline:
    """Prepare ``StableDiffusionXLPipeline.__call__(**call)``; ``dtype`` is the solver state's."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps

    args = bind_call(pipe, call, extra=("callback", "callback_steps"))
    refuse_all(pipe, args, REFUSED)
    height = args["height"] or pipe.default_sample_size * pipe.vae_scale_factor
    width = args["width"] or pipe.default_sample_size * pipe.vae_scale_factor
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
    samples = _batch_size(args) * args["num_images_per_prompt"]
    latents = pipe.prepare_latents(samples, pipe.unet.config.in_channels, height, width, embeds.dtype, device,
                                   args["generator"], args["latents"])
    step_kwargs = pipe.prepare_extra_step_kwargs(args["generator"], args["eta"])
    generator = step_kwargs.pop("generator", None)
    timestep_cond = None
    if pipe.unet.config.time_cond_proj_dim is not None:
        scale = torch.tensor(guidance_scale - 1).repeat(samples)
        timestep_cond = pipe.get_guidance_scale_embedding(
            scale, embedding_dim=pipe.unet.config.time_cond_proj_dim).to(device=device, dtype=latents.dtype)
    if hasattr(pipe.scheduler, "set_begin_index"):
        pipe.scheduler.set_begin_index(0)
    program = compile_scheduler(pipe.scheduler, step_kwargs, input_scaling="model")
    model = _sdxl_model(pipe, embeds, text_embeds, time_ids, samples, guided, guidance_scale,
                        guidance_rescale, timestep_cond, args["cross_attention_kwargs"])
    system = loop_system(program, model, latents, generator=generator, step_batch=samples,
                         model_dtype=pipe.unet.dtype, device=device, dtype=dtype)
    return PreparedPipeline(system, program, _finisher(pipe, args, embeds.dtype))
