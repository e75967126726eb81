"""Solve diffusers schedulers and pipelines in parallel, identical to their own sequential output.

Quick start::

    from fpsolve.integrations.diffusers import sample
    out, solution = sample(pipe, solver="taa", generator=torch.Generator().manual_seed(0),
                           num_inference_steps=50, output_type="np")

``out`` is what ``pipe(generator=<same seed>, num_inference_steps=50, output_type="np")``
returns, up to the solver's tolerance. The pieces:

* :func:`sample`: a pipeline call solved in parallel (DDPM, DDIM, DiT, Stable Diffusion 1/2, SDXL,
  PixArt-Sigma, Sana, Flux, SD3, Wan: see docs/pipelines.md);
* :func:`invert`: the latents from which ``sample`` makes a given image (Stable Diffusion, SD3, Flux);
* :func:`scheduler_system`: a scheduler plus a model as a :class:`~fpsolve.TriangularSystem`
  (variance-preserving schedulers, and the flow-matching ones: ``FlowMatchEulerDiscreteScheduler``,
  ``FlowMatchHeunDiscreteScheduler``, UniPC / DPM-Solver / DEIS with ``use_flow_sigmas=True``);
* :func:`compile_scheduler` / :func:`scheduler_sampler`: a configured scheduler's loop as an
  fpsolve sampler, measured exactly by probing its ``step`` (see :mod:`.probe`).

Importing this package does not import diffusers; diffusers is imported when it is used.
"""

from __future__ import annotations

from .api import sample
from .inversion import encode_image, invert
from .pipelines import ADAPTERS, PreparedPipeline, prepare_pipeline
from .sampler import SchedulerProgram, SchedulerSampler, compile_scheduler, scheduler_sampler
from .schedulers import SPECS, supported_names
from .system import scheduler_system

__all__ = [
    "sample",
    "invert",
    "encode_image",
    "scheduler_system",
    "compile_scheduler",
    "scheduler_sampler",
    "SchedulerSampler",
    "SchedulerProgram",
    "prepare_pipeline",
    "PreparedPipeline",
    "supported_names",
    "supported_pipelines",
    "SPECS",
    "ADAPTERS",
]


def supported_pipelines() -> list[str]:
    """The class names of the supported pipelines, sorted."""
    return sorted(ADAPTERS)
