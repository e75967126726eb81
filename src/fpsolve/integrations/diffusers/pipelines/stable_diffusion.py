"""``StableDiffusionPipeline``: text-to-image with classifier-free guidance, then the VAE decode.

The setup runs the pipeline's own helpers in the pipeline's order (``check_inputs``,
``encode_prompt``, ``retrieve_timesteps``, ``prepare_latents``, ``prepare_extra_step_kwargs``),
so prompts, negative prompts, ``prompt_embeds``, ``num_images_per_prompt``, ``clip_skip``, LoRA
scale, custom ``timesteps``/``sigmas``, user ``latents`` and ``eta`` behave exactly as in
``pipe(...)``. Inside the system's denoiser the guidance is the pipeline's: one UNet call on
``[x, x]`` with ``[negative, positive]`` embeddings, ``uncond + g (text - uncond)``, then
``rescale_noise_cfg`` when ``guidance_rescale > 0``. The tail (decode, safety checker,
``image_processor.postprocess``, ``output_type``, ``return_dict``) is the pipeline's too.
Per-step callbacks and IP-Adapter inputs are refused: a parallel solve has no "after step i".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..sampler import compile_scheduler
from ..system import loop_system
from .base import PreparedPipeline, bind_call
from .guidance import doubled_batch_model, rescaled
from .inputs import guidance_scale_embedding, loop_inputs, lora_scale
from .refusals import CALLBACK_WHY, IP_ADAPTER_WHY, Refusals, refuse_all

__all__ = ["prepare_stable_diffusion", "REFUSED"]

#: Call options refused by name.
REFUSED: Refusals = (
    (("callback", "callback_on_step_end"), CALLBACK_WHY),
    (("ip_adapter_image", "ip_adapter_image_embeds"), IP_ADAPTER_WHY),
)


def _sd_model(pipe: Any, embeds: torch.Tensor, negative: torch.Tensor | None, guidance_scale: float,
              guidance_rescale: float, timestep_cond: torch.Tensor | None,
              cross_attention_kwargs: dict[str, Any] | None):
    guided = negative is not None
    condition = embeds if negative is None else torch.cat([negative, embeds])

    def call(model_input: torch.Tensor, timestep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # a guidance-distilled UNet (timestep_cond) runs unguided: its rows are the samples
        return pipe.unet(model_input, timestep, encoder_hidden_states=condition[rows],
                         timestep_cond=None if timestep_cond is None else timestep_cond[rows],
                         cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=None,
                         return_dict=False)[0]
    return doubled_batch_model(call, batch=embeds.shape[0], guided=guided, guidance_scale=guidance_scale,
                               refine=rescaled(guidance_rescale))


def _finisher(pipe: Any, args: Mapping[str, Any], device: torch.device, dtype: torch.dtype):
    output_type, generator = args["output_type"], args["generator"]

    def finish(latents: torch.Tensor) -> Any:
        from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput

        latents = latents.to(dtype)
        if not output_type == "latent":
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False,
                                    generator=generator)[0]
            image, has_nsfw_concept = pipe.run_safety_checker(image, device, dtype)
        else:
            image, has_nsfw_concept = latents, None
        if has_nsfw_concept is None:
            do_denormalize = [True] * image.shape[0]
        else:
            do_denormalize = [not has_nsfw for has_nsfw in has_nsfw_concept]
        image = pipe.image_processor.postprocess(image, output_type=output_type,
                                                 do_denormalize=do_denormalize)
        pipe.maybe_free_model_hooks()
        if not args["return_dict"]:
            return (image, has_nsfw_concept)
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)
    return finish


def _size(pipe: Any, height: int | None, width: int | None) -> tuple[int, int]:
    """The image size, defaulting to the UNet's sample size times the VAE factor (as the pipeline)."""
    if height and width:
        return height, width
    size = pipe.unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else (size[0], size[1])
    return height * pipe.vae_scale_factor, width * pipe.vae_scale_factor


def _encode(pipe: Any, args: Mapping[str, Any], do_cfg: bool, device: torch.device):
    """``(prompt_embeds, negative_prompt_embeds)`` from the pipeline's own ``encode_prompt``."""
    return pipe.encode_prompt(args["prompt"], device, args["num_images_per_prompt"], do_cfg,
                              args["negative_prompt"], prompt_embeds=args["prompt_embeds"],
                              negative_prompt_embeds=args["negative_prompt_embeds"],
                              lora_scale=lora_scale(args["cross_attention_kwargs"]),
                              clip_skip=args["clip_skip"])


def prepare_stable_diffusion(pipe: Any, call: Mapping[str, Any], dtype: torch.dtype) -> PreparedPipeline:
    """Prepare ``StableDiffusionPipeline.__call__(**call)``."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    args = bind_call(pipe, call, extra=("callback", "callback_steps"))
    refuse_all(pipe, args, REFUSED)
    height, width = _size(pipe, args["height"], args["width"])
    pipe.check_inputs(args["prompt"], height, width, args.get("callback_steps"), args["negative_prompt"],
                      args["prompt_embeds"], args["negative_prompt_embeds"], None, None,
                      args["callback_on_step_end_tensor_inputs"])
    guidance_scale, guidance_rescale = args["guidance_scale"], args["guidance_rescale"]
    do_cfg = guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
    device = pipe._execution_device
    embeds, negative = _encode(pipe, args, do_cfg, device)
    retrieve_timesteps(pipe.scheduler, args["num_inference_steps"], device, args["timesteps"], args["sigmas"])
    loop = loop_inputs(pipe, args, pipe.unet.config.in_channels, height, width, embeds.dtype, device)
    timestep_cond = guidance_scale_embedding(pipe, guidance_scale, loop.samples, device, loop.latents.dtype)
    program = compile_scheduler(pipe.scheduler, loop.step_kwargs, input_scaling="model")
    model = _sd_model(pipe, embeds, negative if do_cfg else None, guidance_scale, guidance_rescale,
                      timestep_cond, args["cross_attention_kwargs"])
    system = loop_system(program, model, loop.latents, generator=loop.generator, step_batch=loop.samples,
                         model_dtype=pipe.unet.dtype, device=device, dtype=dtype)
    return PreparedPipeline(system, program, _finisher(pipe, args, device, embeds.dtype))
