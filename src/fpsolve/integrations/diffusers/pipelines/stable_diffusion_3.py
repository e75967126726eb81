"""``StableDiffusion3Pipeline``: the MMDiT flow transformer with CFG and skip-layer guidance.

What the pipeline does, and fpsolve reproduces by calling the pipeline's own helpers:

* ``check_inputs``; ``encode_prompt`` with the two CLIP encoders and T5 (or its zeros when
  ``text_encoder_3`` is absent), negatives included; ``prepare_latents`` (``[N, C, h, w]``);
* ``retrieve_timesteps`` with the call's ``sigmas`` and ``mu`` (computed by ``calculate_shift``
  from the patch count when the scheduler uses dynamic shifting and the call gives none);
* per step: one transformer call on ``[x, x]`` with ``[negative, positive]`` embeddings and
  pooled projections, ``uncond + g (text - uncond)``; with ``skip_guidance_layers`` (SD 3.5
  skip-layer guidance), at the steps ``i`` with ``T start < i < T stop`` another call on the
  positive conditioning with ``skip_layers``, adding ``(text - skipped) * skip_layer_guidance_scale``
  (the denoiser reads each row's step ``i`` from its timestep); ``scheduler.step`` without
  generator;
* decode: ``latents / scaling_factor + shift_factor``, ``vae.decode``, ``image_processor``.

Refused by name: per-step callbacks and IP-Adapter inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..sampler import compile_scheduler
from ..system import loop_system
from .base import PreparedPipeline, bind_call, step_indexer
from .guidance import Refine, doubled_batch_model
from .inputs import POOLED_EMBEDS, default_size, lora_scale, named, prompt_batch_size
from .output import finisher, image_decoder
from .refusals import CALLBACK_WHY, IP_ADAPTER_WHY, Refusals, refuse_all

__all__ = ["prepare_stable_diffusion_3", "REFUSED"]

#: Call options refused by name.
REFUSED: Refusals = (
    (("callback_on_step_end",), CALLBACK_WHY),
    (("ip_adapter_image", "ip_adapter_image_embeds"), IP_ADAPTER_WHY),
)

NEGATIVE_PROMPTS = ("negative_prompt", "negative_prompt_2", "negative_prompt_3")


def _skip_layer_guidance(transformer: Any, embeds: torch.Tensor, pooled: torch.Tensor, batch: int,
                         skip: Mapping[str, Any], attention_kwargs: dict[str, Any] | None, step_of) -> Refine:
    """SD 3.5's skip-layer guidance after the mix, on the rows whose step lies in its window.

    ``skip``: ``layers``, ``scale``, ``start``, ``stop``, ``steps``.
    """
    def refine(noise_pred: torch.Tensor, noise_pred_text: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
               sample: torch.Tensor) -> torch.Tensor:
        step = step_of(t)
        active = (step > skip["steps"] * skip["start"]) & (step < skip["steps"] * skip["stop"])
        if not bool(active.any()):
            return noise_pred
        where = active.nonzero().flatten()
        positive = sample[where] + batch  # the positive half of the pipeline's batch
        skipped = transformer(hidden_states=x[where], timestep=t[where],
                              encoder_hidden_states=embeds[positive], pooled_projections=pooled[positive],
                              joint_attention_kwargs=attention_kwargs, return_dict=False,
                              skip_layers=skip["layers"])[0]
        noise_pred = noise_pred.clone()
        noise_pred[where] = noise_pred[where] + (noise_pred_text[where] - skipped) * skip["scale"]
        return noise_pred
    return refine


def _sd3_model(pipe: Any, embeds: torch.Tensor, pooled: torch.Tensor, batch: int, guided: bool,
               guidance_scale: float, skip: Mapping[str, Any] | None, attention_kwargs: dict[str, Any] | None,
               step_of):
    """The pipeline's transformer call and guidance; ``embeds`` / ``pooled`` hold its batch rows."""
    transformer = pipe.transformer

    def call(model_input: torch.Tensor, timestep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return transformer(hidden_states=model_input, timestep=timestep, encoder_hidden_states=embeds[rows],
                           pooled_projections=pooled[rows], joint_attention_kwargs=attention_kwargs,
                           return_dict=False)[0]
    refine = None
    if skip is not None:
        refine = _skip_layer_guidance(transformer, embeds, pooled, batch, skip, attention_kwargs, step_of)
    return doubled_batch_model(call, batch=batch, guided=guided, guidance_scale=guidance_scale, refine=refine)


def _scheduler_kwargs(pipe: Any, latents: torch.Tensor, mu: float | None) -> dict[str, Any]:
    """``{"mu": ...}`` as the pipeline passes it to ``retrieve_timesteps`` (or nothing)."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    config = pipe.scheduler.config
    if config.get("use_dynamic_shifting", None) and mu is None:
        _, _, height, width = latents.shape
        patch = pipe.transformer.config.patch_size
        mu = calculate_shift((height // patch) * (width // patch), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.16))
    return {} if mu is None else {"mu": mu}


def prepare_stable_diffusion_3(pipe: Any, call: Mapping[str, Any], dtype: torch.dtype) -> PreparedPipeline:
    """Prepare ``StableDiffusion3Pipeline.__call__(**call)``; ``dtype`` is the solver state's."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

    args = bind_call(pipe, call)
    refuse_all(pipe, args, REFUSED)
    height, width = default_size(pipe, args)
    pipe.check_inputs(args["prompt"], args["prompt_2"], args["prompt_3"], height, width,
                      **named(args, *NEGATIVE_PROMPTS, *POOLED_EMBEDS, "callback_on_step_end_tensor_inputs",
                              "max_sequence_length"))
    guidance_scale = args["guidance_scale"]
    guided = guidance_scale > 1
    pipe._clip_skip = args["clip_skip"]  # what the pipeline sets before encoding
    device = pipe._execution_device
    attention_kwargs = args["joint_attention_kwargs"]
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        do_classifier_free_guidance=guided, device=device, lora_scale=lora_scale(attention_kwargs),
        **named(args, "prompt", "prompt_2", "prompt_3", *NEGATIVE_PROMPTS, *POOLED_EMBEDS, "clip_skip",
                "num_images_per_prompt", "max_sequence_length"))
    if guided:
        embeds = torch.cat([negative, embeds], dim=0)
        pooled = torch.cat([negative_pooled, pooled], dim=0)
    samples = prompt_batch_size(args["prompt"], args["prompt_embeds"]) * args["num_images_per_prompt"]
    latents = pipe.prepare_latents(samples, pipe.transformer.config.in_channels, height, width, embeds.dtype,
                                   device, args["generator"], args["latents"])
    _, steps = retrieve_timesteps(pipe.scheduler, args["num_inference_steps"], device, sigmas=args["sigmas"],
                                  **_scheduler_kwargs(pipe, latents, args["mu"]))
    program = compile_scheduler(pipe.scheduler, {}, input_scaling="none")
    skip = None
    if guided and args["skip_guidance_layers"] is not None:
        skip = dict(layers=args["skip_guidance_layers"], scale=args["skip_layer_guidance_scale"],
                    start=args["skip_layer_guidance_start"], stop=args["skip_layer_guidance_stop"],
                    steps=steps)
    step_of = step_indexer(program.probed.timesteps) if skip is not None else None
    model = _sd3_model(pipe, embeds, pooled, samples, guided, guidance_scale, skip, attention_kwargs, step_of)
    system = loop_system(program, model, latents, generator=None, step_batch=samples,
                         model_dtype=latents.dtype, device=device, dtype=dtype)
    finish = finisher(pipe, args, dtype=latents.dtype, output_class=StableDiffusion3PipelineOutput,
                      decode=image_decoder(pipe, shift=True))
    return PreparedPipeline(system, program, finish)
