"""``sample(pipe, ...)``: a diffusers pipeline call, solved in parallel.

Returns exactly what ``pipe(generator=g, **pipe_kwargs)`` returns (same type, fields and
post-processing) together with the fpsolve :class:`~fpsolve.Solution` of the denoising loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...api import solve
from ...solution import Solution
from .pipelines import prepare_pipeline

__all__ = ["sample"]


def sample(pipe: Any, solver: Any = "newton", *, generator: Any = None, dtype: torch.dtype | None = None,
           tol: float | None = None, order: int | None = None, history: int | None = None,
           ridge: float | None = None, window: int | str | None = None, stopping: Any = None,
           initializer: Any = None, max_iters: int | None = None, observers: Sequence[Any] = (),
           progress: bool = False, distributed: Any = None,
           solver_options: Mapping[str, Any] | None = None, **pipe_kwargs: Any) -> tuple[Any, Solution]:
    """Run ``pipe(generator=generator, **pipe_kwargs)`` with its denoising loop solved in parallel.

    Args:
        pipe: a supported pipeline (``DDPMPipeline``, ``DDIMPipeline``, ``DiTPipeline``,
            ``StableDiffusionPipeline``) with a supported scheduler.
        solver: fpsolve solver (name, class or instance): ``"newton"`` (default), ``"taa"``, ``"fp"``,
            ``"sequential"``, ...
        generator: the pipeline's generator (or list of generators): initial latents and every
            step's noise are drawn from it in the pipeline's order.
        dtype: dtype of the solver state (default float64; the model keeps its own dtype).
        tol: the ``rms`` rule's tolerance (see :func:`fpsolve.solve`, like the options below).
        order: the order k of the solver's equations.
        history: the solver's history m.
        ridge: the solver's ridge regularisation.
        window: positions solved per iteration (``None``: the solver's default, ``"auto"``).
        stopping: a stopping rule instead of ``tol``.
        initializer: the first guess of the trajectory.
        max_iters: cap on parallel iterations.
        observers: callables receiving each iteration's summary.
        progress: show a progress bar.
        distributed: shard each iteration's model call over a process group.
        solver_options: any other option of the solver.
        **pipe_kwargs: the pipeline call's arguments (``num_inference_steps``, ``prompt``,
            ``guidance_scale``, ``output_type``, ...).

    Returns:
        ``(out, solution)``: ``out`` as ``pipe(...)`` returns it, ``solution`` the solve's result
        (its ``sample`` holds the final latents).

    Raises:
        UnsupportedError: a pipeline, scheduler or option fpsolve cannot reproduce exactly.
        InvalidOptionError: an argument neither the pipeline nor the solver takes.
    """
    prepared = prepare_pipeline(pipe, dict(pipe_kwargs, generator=generator), dtype)
    solution = solve(prepared.system, solver, order=order, history=history, ridge=ridge, window=window,
                     tol=tol, stopping=stopping, initializer=initializer, max_iters=max_iters,
                     observers=observers, progress=progress, distributed=distributed,
                     **dict(solver_options or {}))
    with torch.no_grad():
        out = prepared.finish(solution.sample)
    return out, solution
