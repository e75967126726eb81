"""``FluxPipeline``: a flow-matching transformer on packed latents, guidance embedding, true CFG.

What the pipeline does, and fpsolve reproduces by calling the pipeline's own helpers:

* ``check_inputs``, then ``encode_prompt`` (CLIP pooled projections + T5 sequence, ``text_ids``)
  for the prompt and, with true CFG (``true_cfg_scale > 1`` and a negative prompt or negative
  embeddings), again for the negative prompt;
* ``prepare_latents``: ``randn_tensor`` on ``[N, C, 2h, 2w]`` packed by ``_pack_latents`` into
  ``[N, h w, 4 C]`` tokens, and the ``latent_image_ids``;
* the scheduler's sigmas ``linspace(1, 1/T, T)`` (or the call's ``sigmas``) with the ``mu`` of
  dynamic shifting computed from the token count by ``calculate_shift`` and passed to
  ``retrieve_timesteps`` (the scheduler's flow adapter reproduces the shifted schedule);
* per step: ``transformer(latents, timestep=t / 1000, guidance, pooled, T5 embeddings, ids)``
  (``guidance`` only for guidance-distilled transformers), with true CFG a second call on the
  negative conditioning and ``neg + s (pos - neg)``; ``scheduler.step`` without generator;
* decode: ``_unpack_latents``, ``latents / scaling_factor + shift_factor``, ``vae.decode``,
  ``image_processor.postprocess``.

Refused by name: per-step callbacks and IP-Adapter inputs (positive or negative).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..sampler import compile_scheduler
from ..system import loop_system
from .base import PreparedPipeline, bind_call, sample_index
from .guidance import guide
from .inputs import POOLED_EMBEDS, default_size, lora_scale, named, prompt_batch_size
from .output import finisher, image_decoder
from .refusals import CALLBACK_WHY, IP_ADAPTER_WHY, Refusals, refuse_all

__all__ = ["prepare_flux", "REFUSED"]

#: Call options refused by name.
REFUSED: Refusals = (
    (("callback_on_step_end",), CALLBACK_WHY),
    (("ip_adapter_image", "ip_adapter_image_embeds", "negative_ip_adapter_image",
      "negative_ip_adapter_image_embeds"), IP_ADAPTER_WHY),
)


def _flux_model(pipe: Any, batch: int, positive: tuple[torch.Tensor, ...],
                negative: tuple[torch.Tensor, ...] | None,
                image_ids: torch.Tensor, guidance: torch.Tensor | None, true_cfg_scale: float,
                attention_kwargs: dict[str, Any]):
    """The pipeline's transformer call(s); ``positive`` / ``negative`` are (embeds, pooled, text ids)."""
    transformer = pipe.transformer

    def call(x: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor,
             condition: tuple[torch.Tensor, ...]) -> torch.Tensor:
        embeds, pooled, text_ids = condition
        return transformer(hidden_states=x, timestep=timestep / 1000,
                           guidance=None if guidance is None else guidance[sample],
                           pooled_projections=pooled[sample], encoder_hidden_states=embeds[sample],
                           txt_ids=text_ids, img_ids=image_ids, joint_attention_kwargs=attention_kwargs,
                           return_dict=False)[0]

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sample = sample_index(x, batch)
        timestep = t.to(x.dtype)
        noise_pred = call(x, timestep, sample, positive)
        if negative is not None:
            neg_noise_pred = call(x, timestep, sample, negative)
            noise_pred = guide(neg_noise_pred, noise_pred, true_cfg_scale)
        return noise_pred
    return model


def _encode(pipe: Any, args: Mapping[str, Any], negative: bool, device: torch.device,
            scale: float | None) -> tuple[torch.Tensor, ...]:
    """``(embeds, pooled, text_ids)`` of the prompt (or, ``negative``, of the negative prompt)."""
    prefix = "negative_" if negative else ""
    return tuple(pipe.encode_prompt(
        prompt=args[prefix + "prompt"], prompt_2=args[prefix + "prompt_2"],
        prompt_embeds=args[prefix + "prompt_embeds"],
        pooled_prompt_embeds=args[prefix + "pooled_prompt_embeds"],
        device=device, num_images_per_prompt=args["num_images_per_prompt"],
        max_sequence_length=args["max_sequence_length"], lora_scale=scale))


def prepare_flux(pipe: Any, call: Mapping[str, Any], dtype: torch.dtype) -> PreparedPipeline:
    """Prepare ``FluxPipeline.__call__(**call)``; ``dtype`` is the solver state's."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
    from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

    args = bind_call(pipe, call)
    refuse_all(pipe, args, REFUSED)
    height, width = default_size(pipe, args)
    pipe.check_inputs(args["prompt"], args["prompt_2"], height, width,
                      **named(args, "negative_prompt", "negative_prompt_2", *POOLED_EMBEDS,
                              "callback_on_step_end_tensor_inputs", "max_sequence_length"))
    batch = prompt_batch_size(args["prompt"], args["prompt_embeds"])
    device = pipe._execution_device
    attention_kwargs = args["joint_attention_kwargs"]
    has_negative = args["negative_prompt"] is not None or (
        args["negative_prompt_embeds"] is not None and args["negative_pooled_prompt_embeds"] is not None)
    true_cfg = args["true_cfg_scale"] > 1 and has_negative
    if true_cfg and args["prompt_embeds"] is not None and args["negative_prompt_embeds"] is not None:
        if args["prompt_embeds"].shape != args["negative_prompt_embeds"].shape:
            raise ValueError(
                "`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly,"
                " but"
                f" got: `prompt_embeds` {args['prompt_embeds'].shape} != `negative_prompt_embeds`"
                f" {args['negative_prompt_embeds'].shape}."
            )
    positive = _encode(pipe, args, False, device, lora_scale(attention_kwargs))
    negative = _encode(pipe, args, True, device, lora_scale(attention_kwargs)) if true_cfg else None
    samples = batch * args["num_images_per_prompt"]
    latents, image_ids = pipe.prepare_latents(samples, pipe.transformer.config.in_channels // 4, height,
                                              width, positive[0].dtype, device, args["generator"],
                                              args["latents"])
    steps = args["num_inference_steps"]
    sigmas = np.linspace(1.0, 1 / steps, steps) if args["sigmas"] is None else args["sigmas"]
    config = pipe.scheduler.config
    if getattr(config, "use_flow_sigmas", False):
        sigmas = None
    mu = calculate_shift(latents.shape[1], config.get("base_image_seq_len", 256),
                         config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                         config.get("max_shift", 1.15))
    retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)
    guidance = None
    if pipe.transformer.config.guidance_embeds:
        guidance = torch.full([1], args["guidance_scale"], device=device, dtype=torch.float32).expand(samples)
    pipe.scheduler.set_begin_index(0)
    program = compile_scheduler(pipe.scheduler, {}, input_scaling="none")
    model = _flux_model(pipe, samples, positive, negative, image_ids, guidance, args["true_cfg_scale"],
                        dict(attention_kwargs or {}))
    system = loop_system(program, model, latents, generator=None, step_batch=samples,
                         model_dtype=latents.dtype, device=device, dtype=dtype)
    # the decode unpacks the tokens to [N, C, H, W] and unscales, unshifts and moves them to the VAE
    decode = image_decoder(pipe, shift=True, to_vae_device=True,
                           unpack=lambda x: pipe._unpack_latents(x, height, width, pipe.vae_scale_factor))
    finish = finisher(pipe, args, dtype=latents.dtype, output_class=FluxPipelineOutput, decode=decode)
    return PreparedPipeline(system, program, finish)
