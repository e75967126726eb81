"""A configured diffusers scheduler as an fpsolve sampler.

:func:`compile_scheduler` checks the scheduler against the support table, probes its loop (with
clipping switched off), and returns a :class:`SchedulerProgram`: the
:class:`SchedulerSampler` (the affine form fpsolve solves), the fold that puts clipping back
into the model output, the noise each step draws and the model-input scaling of the loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from ...errors import UnsupportedError
from ...samplers.base import AffineForm, SequentialSampler
from .folding import OutputFold, make_fold, unfolded_copy
from .probe import ProbedSchedule, probe_schedule
from .schedulers import check_options, check_step_kwargs, noise_levels, spec_for, step_variances

__all__ = ["SchedulerSampler", "SchedulerProgram", "compile_scheduler", "scheduler_sampler"]


@attrs.define(frozen=True, eq=False, kw_only=True)
class SchedulerSampler(SequentialSampler):
    """The loop of a diffusers scheduler, as measured by probing (see :mod:`.probe`).

    Args:
        scheduler_name: the diffusers class name (for messages).
        timesteps: keys of the steps for the system's denoiser: the scheduler's timesteps when they
            are distinct whole numbers, else the step indices ``T-1, ..., 0`` (Euler's fractional
            timesteps, Heun's repeated ones); :class:`SchedulerProgram` maps them back.
        form: the affine form of the loop.
        sigmas: ``[T+1]`` noise std of each state (stopping rules).
        variances: ``[T+1]`` DDPM posterior variance of the step into each state.
    """

    name = "diffusers"

    scheduler_name: str
    timesteps: tuple[int, ...]
    form: AffineForm = attrs.field(repr=False)
    sigmas: torch.Tensor = attrs.field(repr=False)
    variances: torch.Tensor = attrs.field(repr=False)

    def affine_form(self) -> AffineForm:
        """The measured coefficients."""
        return self.form

    def state_sigmas(self) -> torch.Tensor:
        """``[T+1]`` noise std of each state, in the states' units."""
        return self.sigmas

    def step_variances(self) -> torch.Tensor:
        """``[T+1]`` DDPM posterior variance of the step into each state."""
        return self.variances


@attrs.define(frozen=True, eq=False)
class SchedulerProgram:
    """Everything needed to replay a scheduler's loop as a triangular system.

    Attributes:
        sampler: the affine part, for :class:`~fpsolve.TriangularSystem`.
        probed: the probe's findings (noise draws, input scales, the scheduler's timesteps).
        fold: clipping/thresholding folded into the model output, or ``None``.
        init_noise_sigma: the factor a pipeline multiplies its initial noise with.
        lookup: ``lookup[key]`` is the step index of a sampler timestep key.
    """

    sampler: SchedulerSampler
    probed: ProbedSchedule = attrs.field(repr=False)
    fold: OutputFold | None = attrs.field(repr=False)
    init_noise_sigma: float
    lookup: torch.Tensor = attrs.field(repr=False)


def _timestep_keys(timesteps: torch.Tensor) -> tuple[int, ...]:
    """The scheduler's timesteps when they are distinct whole numbers, else ``T-1, ..., 0``."""
    values = timesteps.detach().to("cpu", torch.float64)
    whole = bool((values == values.round()).all()) and bool((values >= 0).all())
    if whole and values.unique().numel() == values.numel():
        return tuple(int(v) for v in values.tolist())
    return tuple(range(values.numel() - 1, -1, -1))


def compile_scheduler(scheduler: Any, step_kwargs: Mapping[str, Any] | None = None,
                      input_scaling: str = "model") -> SchedulerProgram:
    """Check, probe and fold a configured scheduler (after ``scheduler.set_timesteps(...)``).

    Args:
        scheduler: a diffusers scheduler instance; it is not modified (deep copies are stepped).
        step_kwargs: the keyword arguments the loop passes to ``step`` besides the generator
            (``eta``, ``use_clipped_model_output``, ``s_churn``, ...).
        input_scaling: ``"none"`` (the loop never calls ``scale_model_input``), ``"model"`` (it
            scales the model input, as Stable Diffusion does) or ``"model_and_step"`` (DiT also
            steps the scaled sample).

    Raises:
        UnsupportedError: the scheduler, an option value or its step cannot be reproduced exactly.
    """
    spec = spec_for(scheduler)
    check_options(scheduler, spec)
    check_step_kwargs(spec, step_kwargs)
    kwargs = dict(step_kwargs or {})
    probed = probe_schedule(unfolded_copy(scheduler), kwargs, input_scaling)
    alpha, sigma = noise_levels(scheduler, spec, probed.num_steps)
    fold = make_fold(scheduler, spec, probed, alpha, sigma, kwargs)  # in the scheduler's own view
    if probed.input_scaling == "model_and_step":  # a state is the sample before the step scales it
        scales = torch.cat([probed.input_scales, torch.ones(1, dtype=torch.float64)])
        alpha, sigma = alpha / scales, sigma / scales
    keys = _timestep_keys(probed.timesteps)
    lookup = torch.full((max(keys) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(keys)] = torch.arange(len(keys))
    sampler = SchedulerSampler(scheduler_name=spec.name, timesteps=keys, form=probed.form, sigmas=sigma,
                               variances=step_variances(alpha, sigma))
    init_noise_sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
    return SchedulerProgram(sampler=sampler, probed=probed, fold=fold, init_noise_sigma=init_noise_sigma,
                            lookup=lookup)


def scheduler_sampler(scheduler: Any, step_kwargs: Mapping[str, Any] | None = None) -> SchedulerSampler:
    """The fpsolve sampler of a configured scheduler whose steps need no fold.

    A scheduler that clips or thresholds x0 is exact only together with the fold inside the
    denoiser; use :func:`fpsolve.integrations.diffusers.scheduler_system` for it.
    """
    program = compile_scheduler(scheduler, step_kwargs)
    if program.fold is not None:
        option = "thresholding" if scheduler.config.get("thresholding") else "clip_sample"
        raise UnsupportedError(
            f"{program.sampler.scheduler_name} with {option}=True is exact only with its clipping "
            "folded into the denoiser; use fpsolve.integrations.diffusers.scheduler_system(scheduler, "
            f"model, shape=...) or set {option}=False."
        )
    return program.sampler
