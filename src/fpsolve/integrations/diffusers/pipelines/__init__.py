"""Pipeline adapters: a diffusers pipeline call as a triangular system plus its own output.

Each adapter reproduces one pipeline class's ``__call__`` around the denoising loop: the same
setup and random draws before it, the same model call (guidance included) inside the system's
denoiser, and the same decode and post-processing after it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ....errors import UnsupportedError
from .base import PreparedPipeline, state_dtype
from .dit import prepare_dit
from .flux import prepare_flux
from .pixart import prepare_pixart_sigma
from .stable_diffusion import prepare_stable_diffusion
from .stable_diffusion_3 import prepare_stable_diffusion_3
from .stable_diffusion_xl import prepare_stable_diffusion_xl
from .unet2d import prepare_ddim, prepare_ddpm
from .wan import prepare_wan

__all__ = ["ADAPTERS", "PreparedPipeline", "prepare_pipeline", "is_pipeline"]

#: Supported pipeline classes by name, with their adapters.
ADAPTERS: dict[str, Callable[[Any, Mapping[str, Any], torch.dtype], PreparedPipeline]] = {
    "DDPMPipeline": prepare_ddpm,
    "DDIMPipeline": prepare_ddim,
    "DiTPipeline": prepare_dit,
    "FluxPipeline": prepare_flux,
    "PixArtSigmaPipeline": prepare_pixart_sigma,
    "StableDiffusionPipeline": prepare_stable_diffusion,
    "StableDiffusionXLPipeline": prepare_stable_diffusion_xl,
    "StableDiffusion3Pipeline": prepare_stable_diffusion_3,
    "WanPipeline": prepare_wan,
}


def is_pipeline(obj: Any) -> bool:
    """True for an instance of a diffusers ``DiffusionPipeline`` (checked without importing diffusers)."""
    return any(cls.__name__ == "DiffusionPipeline" and cls.__module__.startswith("diffusers")
               for cls in type(obj).__mro__)


def prepare_pipeline(pipe: Any, call: Mapping[str, Any],
                     dtype: torch.dtype | None = None) -> PreparedPipeline:
    """Prepare ``pipe(**call)`` for a parallel solve; ``dtype`` is the solver state's (default float32).

    Raises:
        UnsupportedError: the pipeline class (naming the supported ones), its scheduler, or an
            argument cannot be reproduced exactly.
    """
    for cls in type(pipe).__mro__:
        if cls.__module__.startswith("diffusers") and cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__](pipe, call, state_dtype(dtype))
    raise UnsupportedError(
        f"pipeline {type(pipe).__name__} is not supported by fpsolve's diffusers integration; supported "
        f"pipelines: {', '.join(sorted(ADAPTERS))}. For another pipeline, build the system from its "
        "scheduler and model with fpsolve.integrations.diffusers.scheduler_system(...)."
    )
