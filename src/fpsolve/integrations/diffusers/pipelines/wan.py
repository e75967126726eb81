"""``WanPipeline``: text-to-video with a flow transformer (Wan 2.1, and Wan 2.2's two experts).

What the pipeline does, and fpsolve reproduces by calling the pipeline's own helpers:

* ``check_inputs``; ``num_frames`` rounded to ``4 k + 1`` and the size to the patch grid (with
  the pipeline's warnings); ``encode_prompt`` (T5, negatives under CFG) cast to the
  transformer's dtype; ``scheduler.set_timesteps(T)``; ``prepare_latents`` in float32
  (``[N, C, 1 + (F - 1) / 4, H / 8, W / 8]``);
* per step: the expert for the step (``transformer`` while ``t >= boundary_ratio * 1000``, else
  ``transformer_2`` with ``guidance_scale_2``), called on the latents in its dtype with ``t`` (per
  token under ``expand_timesteps``), a second call on the negative embeddings under CFG and
  ``uncond + g (cond - uncond)``; ``scheduler.step`` without generator;
* decode: ``latents / (1 / latents_std) + latents_mean`` in the VAE's dtype, ``vae.decode``,
  ``video_processor.postprocess_video``; the output is ``WanPipelineOutput(frames=...)``.

Refused by name: per-step callbacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..sampler import compile_scheduler
from ..system import loop_system
from .base import PreparedPipeline, bind_call, sample_index
from .guidance import guide
from .inputs import prompt_batch_size
from .output import Decode, finisher
from .refusals import CALLBACK_WHY, Refusals, refuse_all

__all__ = ["prepare_wan", "REFUSED"]

#: Call options refused by name.
REFUSED: Refusals = ((("callback_on_step_end",), CALLBACK_WHY),)


def _wan_model(pipe: Any, embeds: torch.Tensor, negative: torch.Tensor | None, batch: int,
               scales: tuple[float, float], boundary: float | None, token_grid: torch.Tensor | None,
               attention_kwargs: dict[str, Any] | None):
    """The pipeline's expert choice, transformer calls and guidance, row by row of the batch."""
    def expert_output(expert: Any, scale: float, x: torch.Tensor, t: torch.Tensor,
                      sample: torch.Tensor) -> torch.Tensor:
        model_input = x.to(expert.dtype)
        timestep = t if token_grid is None else t.reshape(-1, 1) * token_grid.reshape(1, -1)
        noise_pred = expert(hidden_states=model_input, timestep=timestep,
                            encoder_hidden_states=embeds[sample],
                            attention_kwargs=attention_kwargs, return_dict=False)[0]
        if negative is not None:
            noise_uncond = expert(hidden_states=model_input, timestep=timestep,
                                  encoder_hidden_states=negative[sample], attention_kwargs=attention_kwargs,
                                  return_dict=False)[0]
            noise_pred = guide(noise_uncond, noise_pred, scale)
        return noise_pred

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sample = sample_index(x, batch)
        if boundary is None:
            return expert_output(pipe.transformer, scales[0], x, t, sample)
        first = t >= boundary
        outputs = []
        for rows, expert, scale in ((first, pipe.transformer, scales[0]), (~first, pipe.transformer_2,
                                                                           scales[1])):
            where = rows.nonzero().flatten()
            if where.numel():
                outputs.append((where, expert_output(expert, scale, x[where], t[where], sample[where])))
        result = torch.empty((x.shape[0],) + outputs[0][1].shape[1:], dtype=outputs[0][1].dtype,
                             device=x.device)
        for where, output in outputs:
            result[where] = output.to(result.dtype)
        return result
    return model


def _decode_video(pipe: Any) -> Decode:
    """The pipeline's decode: ``latents / (1 / latents_std) + latents_mean`` in the VAE's dtype,
    ``vae.decode``, ``video_processor.postprocess_video``."""
    def decode(latents: torch.Tensor, output_type: str) -> Any:
        from diffusers.utils.torch_utils import get_module_execution_device

        config = pipe.vae.config
        latents = latents.to(get_module_execution_device(pipe.vae), dtype=pipe.vae.dtype)
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents.device,
                                                                                   latents.dtype)
        std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents.device,
                                                                                       latents.dtype)
        video = pipe.vae.decode(latents / std + mean, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type=output_type)
    return decode


def _frames_and_size(pipe: Any, args: Mapping[str, Any]) -> tuple[int, int, int]:
    """``num_frames``, ``height``, ``width`` adjusted as the pipeline adjusts them (it warns; so do we)."""
    from diffusers.pipelines.wan.pipeline_wan import logger

    num_frames, height, width = args["num_frames"], args["height"], args["width"]
    temporal = pipe.vae_scale_factor_temporal
    if num_frames % temporal != 1:
        logger.warning(f"`num_frames - 1` has to be divisible by {temporal}. Rounding to the nearest number.")
        num_frames = num_frames // temporal * temporal + 1
    num_frames = max(num_frames, 1)
    transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    patch = transformer.config.patch_size
    spatial = pipe.vae_scale_factor_spatial
    h_multiple, w_multiple = spatial * patch[1], spatial * patch[2]
    calc_height, calc_width = height // h_multiple * h_multiple, width // w_multiple * w_multiple
    if (height, width) != (calc_height, calc_width):
        logger.warning(f"`height` and `width` must be multiples of ({h_multiple}, {w_multiple}) for proper "
                       f"patchification. Adjusting ({height}, {width}) -> ({calc_height}, {calc_width}).")
    return num_frames, calc_height, calc_width


def prepare_wan(pipe: Any, call: Mapping[str, Any], dtype: torch.dtype) -> PreparedPipeline:
    """Prepare ``WanPipeline.__call__(**call)``; ``dtype`` is the solver state's."""
    from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

    args = bind_call(pipe, call)
    refuse_all(pipe, args, REFUSED)
    pipe.check_inputs(args["prompt"], args["negative_prompt"], args["height"], args["width"],
                      args["prompt_embeds"],
                      args["negative_prompt_embeds"], args["callback_on_step_end_tensor_inputs"],
                      args["guidance_scale_2"])
    num_frames, height, width = _frames_and_size(pipe, args)
    guidance_scale, guidance_scale_2 = args["guidance_scale"], args["guidance_scale_2"]
    if pipe.config.boundary_ratio is not None and guidance_scale_2 is None:
        guidance_scale_2 = guidance_scale
    pipe._guidance_scale = guidance_scale  # do_classifier_free_guidance reads it, as in the pipeline
    guided = guidance_scale > 1.0
    device = pipe._execution_device
    embeds, negative = pipe.encode_prompt(
        prompt=args["prompt"], negative_prompt=args["negative_prompt"], do_classifier_free_guidance=guided,
        num_videos_per_prompt=args["num_videos_per_prompt"], prompt_embeds=args["prompt_embeds"],
        negative_prompt_embeds=args["negative_prompt_embeds"],
        max_sequence_length=args["max_sequence_length"], device=device)
    transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    embeds = embeds.to(transformer.dtype)
    negative = negative.to(transformer.dtype) if negative is not None and guided else None
    pipe.scheduler.set_timesteps(args["num_inference_steps"], device=device)
    samples = prompt_batch_size(args["prompt"], args["prompt_embeds"]) * args["num_videos_per_prompt"]
    latents = pipe.prepare_latents(samples, transformer.config.in_channels, height, width, num_frames,
                                   torch.float32, device, args["generator"], args["latents"])
    pipe.scheduler.set_begin_index(0)
    program = compile_scheduler(pipe.scheduler, {}, input_scaling="none")
    boundary = None
    if pipe.config.boundary_ratio is not None:
        boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    token_grid = None
    if pipe.config.expand_timesteps:  # Wan 2.2 TI2V: one timestep per latent token
        token_grid = torch.ones(latents.shape[2:], dtype=torch.float32, device=device)[:, ::2, ::2].flatten()
    scales = (guidance_scale, guidance_scale if guidance_scale_2 is None else guidance_scale_2)
    model = _wan_model(pipe, embeds, negative, samples, scales, boundary, token_grid,
                       args["attention_kwargs"])
    system = loop_system(program, model, latents, generator=None, step_batch=samples,
                         model_dtype=torch.float32, device=device, dtype=dtype)
    # Wan keeps its latents in float32 (and casts them to the VAE's dtype to decode)
    finish = finisher(pipe, args, dtype=torch.float32, decode=_decode_video(pipe),
                      output_class=WanPipelineOutput, field="frames")
    return PreparedPipeline(system, program, finish)
