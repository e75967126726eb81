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

__all__ = ["prepare_pixart_sigma", "REFUSED"]

#: Call options refused by name.
REFUSED: Refusals = ((("callback",), CALLBACK_WHY),)


def _pixart_model(pipe: Any, embeds: torch.Tensor, mask: torch.Tensor, batch: int, guided: bool,
                  guidance_scale: float, latent_channels: int):
    transformer = pipe.transformer
    learned_sigma = transformer.config.out_channels // 2 == latent_channels

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows = batch_rows(sample_index(x, batch), batch, guided)
        model_input, timestep = (torch.cat([x, x]), torch.cat([t, t])) if guided else (x, t)
        noise_pred = transformer(model_input, encoder_hidden_states=embeds[rows],
                                 encoder_attention_mask=mask[rows],
                                 timestep=timestep,
                                 added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                 return_dict=False)[0]
        if guided:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        if learned_sigma:
            noise_pred = noise_pred.chunk(2, dim=1)[0]
        return noise_pred
    return model


def _finisher(pipe: Any, args: Mapping[str, Any], original_size: tuple[int, int] | None, dtype: torch.dtype):
    output_type = args["output_type"]

    def finish(latents: torch.Tensor) -> Any:
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

        latents = latents.to(dtype)
        if output_type == "latent":
            image = latents
        else:
            image = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor,
                                    return_dict=False)[0]
            if original_size is not None:
                image = pipe.image_processor.resize_and_crop_tensor(image, original_size[1], original_size[0])
            image = pipe.image_processor.postprocess(image, output_type=output_type)
        pipe.maybe_free_model_hooks()
        if not args["return_dict"]:
            return (image,)
        return ImagePipelineOutput(images=image)
    return finish


def _binned_size(pipe: Any, height: int, width: int) -> tuple[int, int]:
    """The pipeline's aspect-ratio bin for the transformer's sample size (its error otherwise)."""
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as module

    bins = {256: "ASPECT_RATIO_2048_BIN", 128: "ASPECT_RATIO_1024_BIN", 64: "ASPECT_RATIO_512_BIN",
            32: "ASPECT_RATIO_256_BIN"}
    name = bins.get(pipe.transformer.config.sample_size)
    if name is None:
        raise ValueError("Invalid sample size")
    return pipe.image_processor.classify_height_width_bin(height, width, ratios=getattr(module, name))


def prepare_pixart_sigma(pipe: Any, call: Mapping[str, Any], dtype: torch.dtype) -> PreparedPipeline:
    """Prepare ``PixArtSigmaPipeline.__call__(**call)``; ``dtype`` is the solver state's."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import retrieve_timesteps

    args = bind_call(pipe, call)
    refuse_all(pipe, args, REFUSED)
    height = args["height"] or pipe.transformer.config.sample_size * pipe.vae_scale_factor
    width = args["width"] or pipe.transformer.config.sample_size * pipe.vae_scale_factor
    original_size = None
    if args["use_resolution_binning"]:
        original_size = (height, width)
        height, width = _binned_size(pipe, height, width)
    pipe.check_inputs(args["prompt"], height, width, args["negative_prompt"], args["callback_steps"],
                      args["prompt_embeds"], args["negative_prompt_embeds"], args["prompt_attention_mask"],
                      args["negative_prompt_attention_mask"])
    guidance_scale = args["guidance_scale"]
    guided = guidance_scale > 1.0
    device = pipe._execution_device
    embeds, mask, negative, negative_mask = pipe.encode_prompt(
        args["prompt"], guided, negative_prompt=args["negative_prompt"],
        num_images_per_prompt=args["num_images_per_prompt"], device=device,
        prompt_embeds=args["prompt_embeds"], negative_prompt_embeds=args["negative_prompt_embeds"],
        prompt_attention_mask=args["prompt_attention_mask"],
        negative_prompt_attention_mask=args["negative_prompt_attention_mask"],
        clean_caption=args["clean_caption"], max_sequence_length=args["max_sequence_length"])
    if guided:
        embeds, mask = torch.cat([negative, embeds], dim=0), torch.cat([negative_mask, mask], dim=0)
    retrieve_timesteps(pipe.scheduler, args["num_inference_steps"], device, args["timesteps"], args["sigmas"])
    latent_channels = pipe.transformer.config.in_channels
    samples = prompt_batch_size(args["prompt"], args["prompt_embeds"]) * args["num_images_per_prompt"]
    latents = pipe.prepare_latents(samples, latent_channels, height, width, embeds.dtype, device,
                                   args["generator"],
                                   args["latents"])
    step_kwargs = pipe.prepare_extra_step_kwargs(args["generator"], args["eta"])
    generator = step_kwargs.pop("generator", None)
    program = compile_scheduler(pipe.scheduler, step_kwargs, input_scaling="model")
    model = _pixart_model(pipe, embeds, mask, samples, guided, guidance_scale, latent_channels)
    system = loop_system(program, model, latents, generator=generator, step_batch=samples,
                         model_dtype=pipe.transformer.dtype, device=device, dtype=dtype)
    return PreparedPipeline(system, program, _finisher(pipe, args, original_size, embeds.dtype))
