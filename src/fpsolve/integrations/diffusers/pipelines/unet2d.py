"""``DDPMPipeline`` and ``DDIMPipeline``: unconditional UNet2DModel pipelines.

Both draw the initial image with ``randn_tensor(shape, generator, dtype=unet.dtype)``, call
``scheduler.set_timesteps(num_inference_steps)``, then per step ``unet(image, t)`` and
``scheduler.step(..., generator=generator)`` (DDIM adds ``eta`` and
``use_clipped_model_output``); neither scales the model input. The output is
``(image / 2 + 0.5).clamp(0, 1)`` in ``output_type`` ``"pt"``, ``"np"`` or ``"pil"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..sampler import compile_scheduler
from ..system import loop_system
from .base import PreparedPipeline, bind_call

__all__ = ["prepare_ddpm", "prepare_ddim"]


def _image_shape(pipe: Any, batch_size: int) -> tuple[int, ...]:
    size = pipe.unet.config.sample_size
    spatial = (size, size) if isinstance(size, int) else tuple(size)
    return (batch_size, pipe.unet.config.in_channels, *spatial)


def _unet_model(pipe: Any):
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return pipe.unet(x, t).sample
    return model


def _finisher(pipe: Any, output_type: str | None, return_dict: bool):
    def finish(latents: torch.Tensor) -> Any:
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

        image: Any = (latents.to(pipe.unet.dtype) / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = pipe.numpy_to_pil(image)
        pipe.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
    return finish


def _prepare(pipe: Any, args: Mapping[str, Any], dtype: torch.dtype, image: torch.Tensor,
             device: torch.device, step_kwargs: Mapping[str, Any]) -> PreparedPipeline:
    """The part both pipelines share once the initial image is drawn (neither scales inputs)."""
    pipe.scheduler.set_timesteps(args["num_inference_steps"])
    program = compile_scheduler(pipe.scheduler, step_kwargs, input_scaling="none")
    system = loop_system(program, _unet_model(pipe), image, generator=args["generator"],
                         step_batch=image.shape[0], model_dtype=pipe.unet.dtype, device=device, dtype=dtype)
    return PreparedPipeline(system, program, _finisher(pipe, args["output_type"], args["return_dict"]))


def prepare_ddpm(pipe: Any, call: Mapping[str, Any], dtype: torch.dtype) -> PreparedPipeline:
    """Prepare ``DDPMPipeline.__call__(**call)`` (any supported scheduler swapped in)."""
    from diffusers.utils.torch_utils import randn_tensor

    args = bind_call(pipe, call)
    shape = _image_shape(pipe, args["batch_size"])
    device = pipe.device
    if device.type == "mps":  # as the pipeline: randn is not reproducible on mps
        image = randn_tensor(shape, generator=args["generator"], dtype=pipe.unet.dtype).to(device)
    else:
        image = randn_tensor(shape, generator=args["generator"], device=device, dtype=pipe.unet.dtype)
    return _prepare(pipe, args, dtype, image, device, {})


def prepare_ddim(pipe: Any, call: Mapping[str, Any], dtype: torch.dtype) -> PreparedPipeline:
    """Prepare ``DDIMPipeline.__call__(**call)`` (any supported scheduler swapped in)."""
    from diffusers.utils.torch_utils import randn_tensor

    args = bind_call(pipe, call)
    shape = _image_shape(pipe, args["batch_size"])
    generator = args["generator"]
    if isinstance(generator, list) and len(generator) != args["batch_size"]:
        raise ValueError(
            f"You have passed a list of generators of length {len(generator)}, but requested an effective "
            f"batch size of {args['batch_size']}. Make sure the batch size matches the length of the "
            "generators."
        )
    device = pipe._execution_device
    image = randn_tensor(shape, generator=generator, device=device, dtype=pipe.unet.dtype)
    step_kwargs = {"eta": args["eta"], "use_clipped_model_output": args["use_clipped_model_output"]}
    return _prepare(pipe, args, dtype, image, device, step_kwargs)
