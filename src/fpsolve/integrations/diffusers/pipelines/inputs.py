"""The pipelines' own set-up before their loop, step by step: sizes, prompt embeddings, latents.

Each adapter reproduces its pipeline's ``__call__`` up to the denoising loop by calling the
pipeline's helpers in the pipeline's order; what several pipelines do alike is written here once,
with each pipeline's choice (the latents' dtype, the latent channels, the aspect-ratio tables, the
arguments its helpers take) as a parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from ....errors import InvalidOptionError

__all__ = ["prompt_batch_size", "lora_scale", "step_options", "default_size", "binned_size",
           "guidance_scale_embedding", "masked_prompt_embeds", "LoopInputs", "loop_inputs", "named",
           "POOLED_EMBEDS"]


def prompt_batch_size(prompt: Any, prompt_embeds: torch.Tensor | None) -> int:
    """Prompts in a call, as pipelines count them: one string, a list, or ``prompt_embeds`` rows."""
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    if prompt_embeds is None:
        raise InvalidOptionError("give prompt= or prompt_embeds=.")
    return prompt_embeds.shape[0]


def lora_scale(attention_kwargs: Mapping[str, Any] | None) -> float | None:
    """The LoRA scale a pipeline reads from its attention kwargs (``"scale"``), ``None`` without them."""
    return attention_kwargs.get("scale", None) if attention_kwargs is not None else None


def step_options(pipe: Any, args: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """``(step kwargs, generator)``: the pipeline's ``prepare_extra_step_kwargs`` (``eta``, the
    generator), the generator taken out (the system draws the step noise from it)."""
    step_kwargs = pipe.prepare_extra_step_kwargs(args["generator"], args["eta"])
    return step_kwargs, step_kwargs.pop("generator", None)


def default_size(pipe: Any, args: Mapping[str, Any]) -> tuple[int, int]:
    """``(height, width)``: the call's, else ``default_sample_size * vae_scale_factor`` (as the pipeline)."""
    default = pipe.default_sample_size * pipe.vae_scale_factor
    return args["height"] or default, args["width"] or default


def binned_size(pipe: Any, height: int, width: int, module: Any, bins: Mapping[int, str]) -> tuple[int, int]:
    """The pipeline's aspect-ratio bin of ``(height, width)`` (``use_resolution_binning``).

    Args:
        module: the pipeline's module, which holds its ratio tables.
        bins: the transformer's sample size -> the name of the table in ``module``.

    Raises:
        ValueError: the pipeline's own error for a sample size without a table.
    """
    name = bins.get(pipe.transformer.config.sample_size)
    if name is None:
        raise ValueError("Invalid sample size")
    return pipe.image_processor.classify_height_width_bin(height, width, ratios=getattr(module, name))


def guidance_scale_embedding(pipe: Any, guidance_scale: float, samples: int, device: torch.device,
                             dtype: torch.dtype) -> torch.Tensor | None:
    """A guidance-distilled UNet's ``timestep_cond`` (``time_cond_proj_dim`` set), else ``None``."""
    if pipe.unet.config.time_cond_proj_dim is None:
        return None
    scale = torch.tensor(guidance_scale - 1).repeat(samples)
    return pipe.get_guidance_scale_embedding(
        scale, embedding_dim=pipe.unet.config.time_cond_proj_dim).to(device=device, dtype=dtype)


def masked_prompt_embeds(pipe: Any, args: Mapping[str, Any], guided: bool, device: torch.device,
                         **extra: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeds, mask)`` from ``encode_prompt`` of a pipeline with attention masks (PixArt, Sana).

    Under guidance both hold the pipeline's doubled batch, ``[negative, positive]``. ``extra``:
    further ``encode_prompt`` arguments of the pipeline (Sana's ``complex_human_instruction``).
    """
    embeds, mask, negative, negative_mask = pipe.encode_prompt(
        args["prompt"], guided, negative_prompt=args["negative_prompt"],
        num_images_per_prompt=args["num_images_per_prompt"], device=device,
        prompt_embeds=args["prompt_embeds"], negative_prompt_embeds=args["negative_prompt_embeds"],
        prompt_attention_mask=args["prompt_attention_mask"],
        negative_prompt_attention_mask=args["negative_prompt_attention_mask"],
        clean_caption=args["clean_caption"], max_sequence_length=args["max_sequence_length"], **extra)
    if guided:
        embeds, mask = torch.cat([negative, embeds], dim=0), torch.cat([negative_mask, mask], dim=0)
    return embeds, mask


@attrs.define(frozen=True, eq=False)
class LoopInputs:
    """What a text-to-image pipeline prepares for its loop once its timesteps are set.

    Attributes:
        samples: the images of the call (prompts times ``num_images_per_prompt``).
        latents: the initial latents, ``prepare_latents``' draw.
        step_kwargs: the scheduler's extra step arguments (``eta``), without the generator.
        generator: the generator the steps draw their noise from.
    """

    samples: int
    latents: torch.Tensor
    step_kwargs: dict[str, Any]
    generator: Any


def loop_inputs(pipe: Any, args: Mapping[str, Any], channels: int, height: int, width: int,
                dtype: torch.dtype, device: torch.device) -> LoopInputs:
    """The set-up after ``retrieve_timesteps`` that Stable Diffusion, SDXL, PixArt and Sana share,
    in their order: the sample count, ``prepare_latents`` (``channels``, in ``dtype``: each
    pipeline's own choice) and ``prepare_extra_step_kwargs``."""
    samples = prompt_batch_size(args["prompt"], args["prompt_embeds"]) * args["num_images_per_prompt"]
    latents = pipe.prepare_latents(samples, channels, height, width, dtype, device, args["generator"],
                                   args["latents"])
    step_kwargs, generator = step_options(pipe, args)
    return LoopInputs(samples, latents, step_kwargs, generator)


#: The embedding arguments of the pipelines with pooled text embeddings (SDXL, SD3, Flux).
POOLED_EMBEDS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                 "negative_pooled_prompt_embeds")


def named(args: Mapping[str, Any], *names: str) -> dict[str, Any]:
    """``{name: args[name]}`` for ``names``: call arguments passed on by keyword under their own names."""
    return {name: args[name] for name in names}
