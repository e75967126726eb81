"""``invert(pipe, image, ...)``: the latents from which ``sample(pipe, latents=...)`` makes ``image``.

The image is encoded by the pipeline's VAE (the mode of its latent distribution, times the
scaling factor, as diffusers' image-to-image pipelines do with ``sample_mode="argmax"``), and
the denoising loop of the SAME call (prompt, guidance, steps, ...) is run backwards by
:func:`fpsolve.invert`. With ``exact=True`` the returned latents make the loop land on the
encoded latents to the tolerance, so the decoded image is the VAE's own reconstruction of
``image``; with ``exact=False`` (DDIM inversion, ``DDIMInverseScheduler``'s arithmetic: eps
read at the less noisy latents) it is the usual approximation.

Flux and SD3 (flow-matching Euler) are not adapted yet; a flow adapter whose sampler has a
one-step affine form inverts through the same path once it exists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...errors import InvalidOptionError, ShapeError, UnsupportedError
from ...inversion import check_invertible, inverse_system, solve_inverse
from ...solution import Solution
from .folding import _conversion
from .pipelines import prepare_pipeline
from .schedulers import noise_levels, spec_for

__all__ = ["invert", "encode_image"]

#: Pipelines whose call ``invert`` reproduces backwards (class names).
INVERTIBLE_PIPELINES = ("StableDiffusionPipeline",)


def encode_image(pipe: Any, image: Any) -> torch.Tensor:
    """``image`` as the pipeline's latents ``[N, C, h, w]``: preprocessed by the pipeline's image
    processor (PIL, numpy or a tensor in ``[0, 1]``), encoded by its VAE (mode), scaled."""
    device = pipe._execution_device
    pixels = pipe.image_processor.preprocess(image).to(device=device, dtype=pipe.vae.dtype)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mode()
    return latents * pipe.vae.config.scaling_factor


def _pipeline_name(pipe: Any) -> str | None:
    for cls in type(pipe).__mro__:
        if cls.__module__.startswith("diffusers") and cls.__name__ in INVERTIBLE_PIPELINES:
            return cls.__name__
    return None


def invert(pipe: Any, image: Any, solver: Any = "taa", *, exact: bool = False,
           dtype: torch.dtype | None = None,
           tol: float | None = None, order: int | None = None, history: int | None = None,
           window: int | None = None, stopping: Any = None, max_iters: int | None = None,
           observers: Sequence[Any] = (), solver_options: Mapping[str, Any] | None = None,
           **pipe_kwargs: Any) -> tuple[torch.Tensor, Solution]:
    """Invert ``image`` through ``pipe``'s denoising loop, solved in parallel.

    Args:
        pipe: a ``StableDiffusionPipeline`` with a deterministic one-step scheduler
            (``DDIMScheduler``; ``eta`` must be 0).
        image: what ``pipe.image_processor.preprocess`` takes: PIL images, numpy arrays or a
            tensor ``[N, 3, H, W]`` in ``[0, 1]``; ``N`` must equal the call's number of images.
        solver, tol, order, history, window, stopping, max_iters, observers, solver_options: as
            for :func:`fpsolve.invert` / :func:`fpsolve.solve`.
        exact: ``False``: DDIM inversion; ``True``: the exact inverse of the loop.
        dtype: the solver state's dtype (default float64).
        **pipe_kwargs: the arguments of the ``sample(pipe, ...)`` call that should reproduce the
            image (``prompt``, ``num_inference_steps``, ``guidance_scale``, ...). ``height`` and
            ``width`` default to the image's.

    Returns:
        ``(latents, solution)``: pass ``latents=latents`` (with the same ``pipe_kwargs``) to
        :func:`~fpsolve.integrations.diffusers.sample` or to ``pipe(...)``; ``solution`` is the
        inversion's (its trajectory runs from the encoded image to the latents, in state units).

    Raises:
        UnsupportedError: another pipeline, or a scheduler that cannot be inverted.
        ShapeError: the image batch does not match the call's number of images.
    """
    if _pipeline_name(pipe) is None:
        raise UnsupportedError(
            f"invert(pipe=...) supports {', '.join(INVERTIBLE_PIPELINES)}; got {type(pipe).__name__}. "
            "For another pipeline build its system with scheduler_system(...) and call fpsolve.invert."
        )
    for refused in ("latents", "generator"):
        if pipe_kwargs.get(refused) is not None:
            raise InvalidOptionError(f"invert(pipe, image, ...) computes the latents itself; do not pass "
                                     f"{refused}=.")
    x0 = encode_image(pipe, image)
    scale = pipe.vae_scale_factor
    pipe_kwargs.setdefault("height", x0.shape[-2] * scale)
    pipe_kwargs.setdefault("width", x0.shape[-1] * scale)
    prepared = prepare_pipeline(pipe, dict(pipe_kwargs, generator=torch.Generator().manual_seed(0)), dtype)
    system = prepared.system
    check_invertible(system.sampler, argument="pipe")  # names the pipeline's scheduler in the reason
    if x0.shape[0] != system.num_samples:
        raise ShapeError(f"invert(pipe, image, ...): the image batch has {x0.shape[0]} image(s) but the call "
                         f"makes {system.num_samples} (prompts x num_images_per_prompt); make them equal.")
    scheduler = pipe.scheduler
    alpha, sigma = noise_levels(scheduler, spec_for(scheduler), system.num_steps)
    _, _, r, u = _conversion(scheduler.config.prediction_type, alpha, sigma)  # eps = r s + u m
    conversion = (r, u)
    inverse = inverse_system(system, x0.to(system.dtype), exact=exact, output_to_eps=conversion)
    options = {k: v for k, v in dict(tol=tol, order=order, history=history, window=window, stopping=stopping,
                                     max_iters=max_iters).items() if v is not None}
    options.update(dict(solver_options or {}))
    solution = solve_inverse(inverse, solver, exact, observers=observers, **options)
    latents = solution.sample / prepared.program.init_noise_sigma
    return latents.to(x0.dtype), solution
