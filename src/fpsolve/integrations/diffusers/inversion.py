"""``invert(pipe, image, ...)``: the latents from which ``sample(pipe, latents=...)`` makes ``image``.

The image is encoded by the pipeline's VAE (the mode of its latent distribution, as diffusers'
image-to-image pipelines do with ``sample_mode="argmax"``) into the latents the pipeline
decodes, exactly inverting its decode step:

* Stable Diffusion: ``latents = z * scaling_factor`` (it decodes ``latents / scaling_factor``);
* Stable Diffusion 3: ``latents = (z - shift_factor) * scaling_factor`` (it decodes
  ``latents / scaling_factor + shift_factor``);
* Flux: the same, then packed by the pipeline's ``_pack_latents`` into ``[N, h w / 4, 4 C]``
  tokens (it unpacks before decoding).

The denoising loop of the SAME call (prompt, guidance, steps, shift, ...) is built by the
pipeline's adapter and run backwards by :func:`fpsolve.invert`. With ``exact=True`` the returned
latents make the loop land on the encoded latents to the tolerance, so the decoded image is the
VAE's own reconstruction of ``image``. With ``exact=False`` it is the usual approximation: for
Stable Diffusion DDIM inversion (``DDIMInverseScheduler``'s arithmetic: eps read at the less
noisy latents), for the flow pipelines Euler run backwards (the velocity read at the less noisy
latents with the noisier step's time).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...errors import InvalidOptionError, ShapeError, UnsupportedError
from ...inversion import check_invertible, inverse_system, solve_inverse
from ...solution import Solution
from ...system import TriangularSystem
from ...validators import as_flag
from .folding import _conversion
from .pipelines import prepare_pipeline
from .schedulers import noise_levels, spec_for

__all__ = ["invert", "encode_image", "INVERTIBLE_PIPELINES"]

#: Pipelines whose call ``invert`` reproduces backwards (class names).
INVERTIBLE_PIPELINES = ("StableDiffusionPipeline", "StableDiffusion3Pipeline", "FluxPipeline")

#: The flow-matching ones: their VAE latents are shifted, their schedulers step a velocity.
_FLOW_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")


def _pipeline_name(pipe: Any) -> str | None:
    for cls in type(pipe).__mro__:
        if cls.__module__.startswith("diffusers") and cls.__name__ in INVERTIBLE_PIPELINES:
            return cls.__name__
    return None


def _require_invertible(pipe: Any) -> str:
    name = _pipeline_name(pipe)
    if name is None:
        raise UnsupportedError(
            f"invert(pipe=...) supports {', '.join(INVERTIBLE_PIPELINES)}; got {type(pipe).__name__}. "
            "For another pipeline build its system with scheduler_system(...) and call fpsolve.invert."
        )
    return name


def _preprocess(pipe: Any, image: Any) -> torch.Tensor:
    """The image as the VAE's input ``[N, 3, H, W]`` in ``[-1, 1]`` (the pipeline's image processor)."""
    return pipe.image_processor.preprocess(image).to(device=pipe._execution_device, dtype=pipe.vae.dtype)


def _encode_pixels(pipe: Any, name: str, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latents (mode) mapped to the pipeline's latents: the inverse of its decode step."""
    config = pipe.vae.config
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mode()
    if name not in _FLOW_PIPELINES:  # Stable Diffusion decodes latents / scaling_factor
        return latents * config.scaling_factor
    latents = (latents - (config.shift_factor or 0.0)) * config.scaling_factor
    if name == "FluxPipeline":
        batch, channels, height, width = latents.shape
        if height % 2 or width % 2:
            raise ShapeError(f"FluxPipeline packs 2x2 latent patches; the image encodes to {height}x{width} "
                             "latents. Give an image whose sides are multiples of "
                             f"{2 * pipe.vae_scale_factor} pixels.")
        latents = pipe._pack_latents(latents, batch, channels, height, width)
    return latents


def encode_image(pipe: Any, image: Any) -> torch.Tensor:
    """``image`` as the pipeline's latents, the layout ``pipe(latents=...)`` takes.

    Preprocessed by the pipeline's image processor (PIL, numpy or a tensor in ``[0, 1]``),
    encoded by its VAE (mode), then mapped as the pipeline's decode step expects: ``[N, C, h, w]``
    for Stable Diffusion (scaled) and Stable Diffusion 3 (shifted and scaled), packed
    ``[N, h w / 4, 4 C]`` for Flux (shifted, scaled, packed by ``_pack_latents``).

    Raises:
        UnsupportedError: a pipeline other than :data:`INVERTIBLE_PIPELINES`.
    """
    name = _require_invertible(pipe)
    return _encode_pixels(pipe, name, _preprocess(pipe, image))


def _refuse_stochastic(pipe: Any) -> None:
    """Refuse a scheduler configured to add noise, before anything draws from a generator
    (Flux and SD3 pass none to ``step``: their noise would come from torch's global one)."""
    if pipe.scheduler.config.get("stochastic_sampling"):
        raise UnsupportedError(
            f"invert(pipe=...): {type(pipe.scheduler).__name__} with stochastic_sampling=True adds fresh "
            "noise at every step, so the latents are not a function of the image: there is nothing to "
            "invert. Set pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, "
            "stochastic_sampling=False)."
        )


def _refuse_multistep(pipe: Any, system: TriangularSystem) -> None:
    """Refuse a flow scheduler whose step reads more than the state before it (multistep
    UniPC / DPM-Solver / DEIS, Heun's two stages), naming the one-step schedulers to use.
    (Checked here rather than by ``check_invertible``, whose hint names fpsolve's samplers.)"""
    form = system.sampler.affine_form()
    used = ((form.state != 0) | (form.output != 0)).any(dim=0).nonzero().flatten()
    lags = int(used.max()) + 1 if used.numel() else 1
    if lags > 1:
        raise UnsupportedError(
            f"invert(pipe=...): {type(pipe.scheduler).__name__} is a multistep or multi-stage scheduler "
            f"(a step reads up to {lags} earlier latents), so stepping back from the image needs latents "
            "that are not known yet: the loop has no inverse recurrence. Invert and sample back with a "
            "one-step scheduler, e.g. pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=...) "
            "with the pipeline's shift (or DPMSolverMultistepScheduler with solver_order=1)."
        )


def invert(pipe: Any, image: Any, solver: Any = "taa", *, exact: bool = False,
           dtype: torch.dtype | None = None,
           tol: float | None = None, order: int | None = None, history: int | None = None,
           window: int | None = None, stopping: Any = None, max_iters: int | None = None,
           observers: Sequence[Any] = (), solver_options: Mapping[str, Any] | None = None,
           **pipe_kwargs: Any) -> tuple[torch.Tensor, Solution]:
    """Invert ``image`` through ``pipe``'s denoising loop, solved in parallel.

    Args:
        pipe: a ``StableDiffusionPipeline`` with a deterministic one-step scheduler
            (``DDIMScheduler`` with ``eta=0``), or a ``StableDiffusion3Pipeline`` / ``FluxPipeline``
            with a deterministic one-step flow scheduler (``FlowMatchEulerDiscreteScheduler`` with
            ``stochastic_sampling=False``; shifts, dynamic shifting and custom ``sigmas`` are
            inverted as the call sets them). Guidance (SD3's CFG, Flux's guidance embedding and
            true CFG) is part of the loop and inverted with it.
        image: what ``pipe.image_processor.preprocess`` takes: PIL images, numpy arrays or a
            tensor ``[N, 3, H, W]`` in ``[0, 1]``; ``N`` must equal the call's number of images.
        solver, tol, order, history, window, stopping, max_iters, observers, solver_options: as
            for :func:`fpsolve.invert` / :func:`fpsolve.solve`.
        exact: ``False``: DDIM inversion (Stable Diffusion) or Euler run backwards (Flux, SD3);
            ``True``: the exact inverse of the loop (each step's implicit equation solved).
        dtype: the solver state's dtype (default float64).
        **pipe_kwargs: the arguments of the ``sample(pipe, ...)`` call that should reproduce the
            image (``prompt``, ``num_inference_steps``, ``guidance_scale``, Flux's
            ``true_cfg_scale`` with ``negative_prompt``, ...). ``height`` and ``width`` default
            to the image's.

    Returns:
        ``(latents, solution)``: pass ``latents=latents`` (with the same ``pipe_kwargs``) to
        :func:`~fpsolve.integrations.diffusers.sample` or to ``pipe(...)``; they are in the
        pipeline's own layout (Flux: packed ``[N, h w / 4, 4 C]``). ``solution`` is the
        inversion's (its trajectory runs from the encoded image to the latents, in state units).

    Raises:
        UnsupportedError: another pipeline, or a scheduler that cannot be inverted (noise
            injection: ``eta > 0``, ``stochastic_sampling=True``, DDPM; multistep or
            multi-stage schedulers).
        InvalidOptionError: ``latents`` or ``generator`` given (``invert`` computes the latents).
        ShapeError: the image batch or size does not match the call's.
    """
    name = _require_invertible(pipe)
    exact = as_flag("exact", exact)
    for refused in ("latents", "generator"):
        if pipe_kwargs.get(refused) is not None:
            raise InvalidOptionError(f"invert(pipe, image, ...) computes the latents itself; do not pass "
                                     f"{refused}=.")
    flow = name in _FLOW_PIPELINES
    if flow:
        _refuse_stochastic(pipe)
    pixels = _preprocess(pipe, image)
    x0 = _encode_pixels(pipe, name, pixels)
    pipe_kwargs.setdefault("height", pixels.shape[-2])
    pipe_kwargs.setdefault("width", pixels.shape[-1])
    # the generator only draws the latents the inversion replaces (and no step noise: refused)
    prepared = prepare_pipeline(pipe, dict(pipe_kwargs, generator=torch.Generator().manual_seed(0)), dtype)
    system = prepared.system
    if flow:
        _refuse_multistep(pipe, system)
    check_invertible(system.sampler, argument="pipe")  # names the pipeline's scheduler in the reason
    if x0.shape[0] != system.num_samples:
        raise ShapeError(f"invert(pipe, image, ...): the image batch has {x0.shape[0]} image(s) but the call "
                         f"makes {system.num_samples} (prompts x num_images_per_prompt); make them equal.")
    if tuple(x0.shape[1:]) != tuple(system.shape):
        raise ShapeError(f"invert(pipe, image, ...): the {pixels.shape[-2]}x{pixels.shape[-1]} image encodes "
                         f"to latents {list(x0.shape[1:])}, but the call (height={pipe_kwargs['height']}, "
                         f"width={pipe_kwargs['width']}) makes {list(system.shape)}; leave height and width "
                         "unset or resize the image to them.")
    conversion = None  # flow: the velocity is frozen, so exact=False is Euler run backwards
    if not flow:  # eps read at the less noisy latents, for every prediction type (DDIMInverseScheduler)
        scheduler = pipe.scheduler
        alpha, sigma = noise_levels(scheduler, spec_for(scheduler), system.num_steps)
        _, _, r, u = _conversion(scheduler.config.prediction_type, alpha, sigma)  # eps = r s + u m
        conversion = (r, u)
    inverse = inverse_system(system, x0.to(system.dtype), exact=exact, output_to_eps=conversion)
    options = {k: v for k, v in dict(tol=tol, order=order, history=history, window=window, stopping=stopping,
                                     max_iters=max_iters).items() if v is not None}
    options.update(dict(solver_options or {}))
    solution = solve_inverse(inverse, solver, exact, observers=observers, **options)
    # Stable Diffusion multiplies given latents by init_noise_sigma; Flux and SD3 take them as they are
    latents = solution.sample if flow else solution.sample / prepared.program.init_noise_sigma
    return latents.to(x0.dtype), solution
