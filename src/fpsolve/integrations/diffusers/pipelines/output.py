"""The pipelines' tail after the denoising loop: the VAE decode and the output object.

Every latent pipeline ends its ``__call__`` the same way: cast the final latents (each pipeline
to its own dtype), return them as they are for ``output_type="latent"`` or else decode and
post-process them, free the model hooks, and return a tuple or the pipeline's output class.
:func:`finisher` is that tail once; what differs (the dtype, the decode, the output class and
its field) is a parameter. :func:`vae_decode` is the decode most pipelines share, with their
differences (the cast to the VAE's dtype, Flux's and SD3's shift factor, the move to the VAE's
device) as flags; pipelines with their own decode (SDXL's upcast and latent statistics, Wan's
video) pass a function of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["Decode", "finisher", "vae_decode", "image_decoder"]

#: ``decode(latents, output_type) -> images``: the pipeline's decode and post-processing.
Decode = Callable[[torch.Tensor, str], Any]


def finisher(pipe: Any, args: Mapping[str, Any], *, dtype: torch.dtype, decode: Decode,
             output_class: Callable[..., Any], field: str = "images") -> Callable[[torch.Tensor], Any]:
    """``finish(latents)``: what the pipeline returns for its final latents.

    Args:
        pipe: the pipeline (its model hooks are freed as the pipeline frees them).
        args: the bound call (``output_type``, ``return_dict``).
        dtype: the dtype the pipeline's latents have after its loop.
        decode: the decode and post-processing, for any ``output_type`` but ``"latent"``.
        output_class: the pipeline's output class, built as ``output_class(**{field: images})``.
    """
    output_type, return_dict = args["output_type"], args["return_dict"]

    def finish(latents: torch.Tensor) -> Any:
        latents = latents.to(dtype)
        images = latents if output_type == "latent" else decode(latents, output_type)
        pipe.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return output_class(**{field: images})
    return finish


def vae_decode(pipe: Any, latents: torch.Tensor, *, cast: bool = False, shift: bool = False,
               to_vae_device: bool = False) -> torch.Tensor:
    """``vae.decode(latents / scaling_factor [+ shift_factor])``, as the pipeline writes it.

    Args:
        cast: cast the latents to the VAE's dtype first (PixArt, Sana).
        shift: add the VAE's ``shift_factor`` after unscaling (Flux, Stable Diffusion 3).
        to_vae_device: move the latents to the VAE's execution device before decoding (Flux).
    """
    vae = pipe.vae
    if cast:
        latents = latents.to(vae.dtype)
    latents = latents / vae.config.scaling_factor
    if shift:
        latents = latents + vae.config.shift_factor
    if to_vae_device:
        from diffusers.utils.torch_utils import get_module_execution_device

        latents = latents.to(get_module_execution_device(vae))
    return vae.decode(latents, return_dict=False)[0]


def image_decoder(pipe: Any, *, cast: bool = False, shift: bool = False, to_vae_device: bool = False,
                  unpack: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  original_size: tuple[int, int] | None = None) -> Decode:
    """The :data:`Decode` of an image pipeline: :func:`vae_decode`, then ``image_processor.postprocess``.

    Args:
        cast, shift, to_vae_device: as in :func:`vae_decode`.
        unpack: turns the loop's latents into the VAE's layout first (Flux's packed tokens).
        original_size: ``(height, width)`` to resize and crop the decoded image back to, after
            resolution binning (PixArt, Sana); ``None`` without binning.
    """
    def decode(latents: torch.Tensor, output_type: str) -> Any:
        if unpack is not None:
            latents = unpack(latents)
        image = vae_decode(pipe, latents, cast=cast, shift=shift, to_vae_device=to_vae_device)
        if original_size is not None:
            image = pipe.image_processor.resize_and_crop_tensor(image, original_size[1], original_size[0])
        return pipe.image_processor.postprocess(image, output_type=output_type)
    return decode
