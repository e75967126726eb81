"""Pipeline adapters: a diffusers pipeline call as a triangular system plus its own output.

Each adapter reproduces one pipeline class's ``__call__`` around the denoising loop: the same
setup and random draws before it, the same model call (guidance included) inside the system's
denoiser, and the same decode and post-processing after it. The registry of adapters, and
the docs table made from it, is :mod:`.support`.

What the adapters share is written once, each pipeline's differences passed as parameters:
:mod:`.base` (the prepared call, argument binding, the batch layout), :mod:`.refusals` (refused
options), :mod:`.inputs` (the set-up before the loop), :mod:`.guidance` (the guided model call)
and :mod:`.output` (the decode and the output object).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ....errors import UnsupportedError
from .base import PreparedPipeline, state_dtype
from .support import SUPPORT, PipelineSupport, schedulers_for, support_markdown, support_rows

__all__ = ["ADAPTERS", "SUPPORT", "PipelineSupport", "PreparedPipeline", "prepare_pipeline", "is_pipeline",
           "support_rows", "support_markdown", "schedulers_for"]

#: Supported pipeline classes by name, with their adapters (from the registry, :data:`SUPPORT`).
ADAPTERS: dict[str, Callable[[Any, Mapping[str, Any], torch.dtype], PreparedPipeline]] = {
    name: row.prepare for name, row in SUPPORT.items()}


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
