"""``DiTPipeline``: class-conditional DiT with classifier-free guidance.

What the pipeline does, and fpsolve reproduces:

* latents ``randn_tensor((N, C, S, S), generator, dtype=transformer.dtype)``; with guidance
  (``guidance_scale > 1``) the loop carries a doubled batch whose second half is reset to the
  first at every step, so only the first half matters;
* the transformer sees ``[x, x]`` with labels ``[class_labels, 1000 (null) ...]`` (conditional
  first); guidance mixes the first ``C`` channels (eps); a transformer with learned sigma
  (``out_channels == 2 C``) has its extra channels dropped before ``step``;
* ``scale_model_input`` is applied and the *scaled* latents are passed to ``step``;
* ``step`` gets no generator: a scheduler that draws noise draws it (for the doubled batch) from
  torch's global generator, and fpsolve draws it from there in the same order;
* the output decodes ``latents / vae.config.scaling_factor`` and post-processes like the pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..sampler import compile_scheduler
from ..system import loop_system
from .base import PreparedPipeline, bind_call, sample_index
from .guidance import guide

__all__ = ["prepare_dit"]


def _dit_model(pipe: Any, labels: torch.Tensor, guidance_scale: float):
    transformer = pipe.transformer
    channels = transformer.config.in_channels
    learned_sigma = transformer.config.out_channels // 2 == channels
    guided = guidance_scale > 1
    batch = labels.shape[0]

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sample = sample_index(x, batch)
        if guided:
            x, t = torch.cat([x, x]), torch.cat([t, t])
            class_input = torch.cat([labels[sample], torch.full_like(labels[sample], 1000)])
        else:
            class_input = labels[sample]
        noise_pred = transformer(x, timestep=t, class_labels=class_input).sample
        if guided:
            eps, rest = noise_pred[:, :channels], noise_pred[:, channels:]
            cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
            half_eps = guide(uncond_eps, cond_eps, guidance_scale)
            noise_pred = torch.cat([half_eps, rest[: len(rest) // 2]], dim=1)
        if learned_sigma:
            return torch.split(noise_pred, channels, dim=1)[0]
        return noise_pred
    return model


def _finisher(pipe: Any, output_type: str | None, return_dict: bool):
    def finish(latents: torch.Tensor) -> Any:
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

        latents = 1 / pipe.vae.config.scaling_factor * latents.to(pipe.transformer.dtype)
        samples = pipe.vae.decode(latents).sample
        samples = (samples / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            samples = samples.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                samples = pipe.numpy_to_pil(samples)
        pipe.maybe_free_model_hooks()
        if not return_dict:
            return (samples,)
        return ImagePipelineOutput(images=samples)
    return finish


def prepare_dit(pipe: Any, call: Mapping[str, Any], dtype: torch.dtype) -> PreparedPipeline:
    """Prepare ``DiTPipeline.__call__(**call)``; ``dtype`` is the solver state's."""
    from diffusers.utils.torch_utils import randn_tensor

    args = bind_call(pipe, call)
    transformer = pipe.transformer
    batch = len(args["class_labels"])
    size, channels = transformer.config.sample_size, transformer.config.in_channels
    device = pipe._execution_device
    latents = randn_tensor(shape=(batch, channels, size, size), generator=args["generator"], device=device,
                           dtype=transformer.dtype)
    labels = torch.tensor(args["class_labels"], device=device).reshape(-1)
    guidance_scale = args["guidance_scale"]
    pipe.scheduler.set_timesteps(args["num_inference_steps"])
    program = compile_scheduler(pipe.scheduler, {}, input_scaling="model_and_step")
    system = loop_system(program, _dit_model(pipe, labels, guidance_scale), latents, generator=None,
                         step_batch=2 * batch if guidance_scale > 1 else batch, model_dtype=transformer.dtype,
                         device=device, dtype=dtype)
    return PreparedPipeline(system, program, _finisher(pipe, args["output_type"], args["return_dict"]))
