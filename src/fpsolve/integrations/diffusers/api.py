"""``sample(pipe, ...)``: a diffusers pipeline call, solved in parallel.

Returns exactly what ``pipe(generator=g, **pipe_kwargs)`` returns (same type, fields and
post-processing) together with the fpsolve :class:`~fpsolve.Solution` of the denoising loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...api import solve
from ...errors import NotConvergedError
from ...solution import Solution
from ...validators import as_flag
from .pipelines import prepare_pipeline

__all__ = ["sample"]


def sample(pipe: Any, solver: Any = "newton", *, generator: Any = None, dtype: torch.dtype | None = None,
           tol: float | None = None, order: int | None = None, history: int | None = None,
           ridge: float | None = None, window: int | str | None = None, stopping: Any = None,
           initializer: Any = None, max_iters: int | None = None, observers: Sequence[Any] = (),
           progress: bool = False, distributed: Any = None,
           solver_options: Mapping[str, Any] | None = None, allow_unconverged: bool = False,
           **pipe_kwargs: Any) -> tuple[Any, Solution]:
    """Run ``pipe(generator=generator, **pipe_kwargs)`` with its denoising loop solved in parallel.

    Args:
        pipe: a supported pipeline (``DDPMPipeline``, ``DDIMPipeline``, ``DiTPipeline``,
            ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``PixArtSigmaPipeline``,
            ``SanaPipeline``, ``FluxPipeline``, ``StableDiffusion3Pipeline``, ``WanPipeline``: see
            :func:`supported_pipelines` and the docs' pipeline table) with a supported scheduler.
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
        allow_unconverged: return the output of a solve that did not converge (status
            ``MAX_ITERS``, ``STOPPED`` or ``NONFINITE``) instead of raising; by default an
            unfinished result is never passed off as the pipeline's output.
        **pipe_kwargs: the pipeline call's arguments (``num_inference_steps``, ``prompt``,
            ``guidance_scale``, ``output_type``, ...).

    Returns:
        ``(out, solution)``: ``out`` as ``pipe(...)`` returns it, ``solution`` the solve's result
        (its ``sample`` holds the final latents).

    Raises:
        UnsupportedError: a pipeline, scheduler or option fpsolve cannot reproduce exactly.
        InvalidOptionError: an argument neither the pipeline nor the solver takes.
        NotConvergedError: the solve did not converge (unless ``allow_unconverged=True``); the
            error carries ``.solution`` and the decoded ``.output``.
    """
    allow_unconverged = as_flag("allow_unconverged", allow_unconverged)
    prepared = prepare_pipeline(pipe, dict(pipe_kwargs, generator=generator), dtype)
    solution = solve(prepared.system, solver, order=order, history=history, ridge=ridge, window=window,
                     tol=tol, stopping=stopping, initializer=initializer, max_iters=max_iters,
                     observers=observers, progress=progress, distributed=distributed,
                     **dict(solver_options or {}))
    with torch.no_grad():
        out = prepared.finish(solution.sample)
    if not solution.converged and not allow_unconverged:
        raise NotConvergedError(
            f"sample({type(pipe).__name__}): the parallel solve did not converge "
            f"(status {solution.status.name}: {solution.message}), so its output is not the pipeline's. "
            "Raise max_iters or loosen tol, or pass allow_unconverged=True to take the partial result; "
            "this error carries it as .output (and the Solution as .solution).",
            solution, out,
        )
    return out, solution
