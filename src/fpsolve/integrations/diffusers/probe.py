"""Probing a configured diffusers scheduler: its whole loop as one exact affine map.

For every step index the scheduler's ``step`` is affine in the samples it was given, the model
outputs it was given (its history included) and the noise it draws. Instead of re-deriving each
scheduler's formulas, fpsolve measures them: it runs the scheduler's own loop, on deep copies,
over a batch of *probe columns*. Schedulers act elementwise, so every element of the probe tensor
is an independent run of the whole loop:

* basis columns: column ``j`` feeds 1 as the sample of step ``j`` (``2T`` columns cover every
  sample and model output), so each step's output in that column is one coefficient;
* a zero column: its output must be zero (an affine step with no constant term);
* random columns: their outputs must equal what the coefficients predict, which tells affine
  steps from non-affine ones (clipping left on, a variance learned by the model, ...).

The samples fed to step ``j+1`` are free variables rather than the output of step ``j``: in the
real loop they are the states ``s_j`` of fpsolve's system, so the coefficients are exactly the
rows of its :class:`~fpsolve.samplers.base.AffineForm`. Noise is isolated by running the loop
twice with differently seeded generators; each draw is replayed to check that it is one tensor of
the model output's shape (the layout that :mod:`.noise` pre-draws).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any

import attrs
import torch

from ...errors import UnsupportedError
from ...samplers.base import AffineForm

__all__ = ["INPUT_SCALING", "ProbedSchedule", "probe_schedule"]

#: How the loop scales the model input: not at all (DDPM/DDIM pipelines), for the model only
#: (Stable Diffusion), or for the model and the step (DiT passes the scaled latents to ``step``).
INPUT_SCALING = ("none", "model", "model_and_step")

_RANDOM_COLUMNS = 4
_MIN_COLUMNS = 16
# Several schedulers compute in float32 internally (Euler, DPM-Solver upcast/downcast the
# sample), so the float64 random columns are reproduced to float32 precision only.
_LINEARITY_TOL = 1e-5
# Coefficients below this fraction of their row's largest one are rounding dust, not lags.
_DUST = 1e-13
#: dtypes a step may draw its noise in besides the model output's (DPM-Solver SDE uses float32).
_NOISE_DTYPES = ("float32", "float16", "bfloat16")


@attrs.define(frozen=True, eq=False)
class ProbedSchedule:
    """The measured loop of a scheduler.

    Attributes:
        form: the affine form; row ``i`` is scheduler step ``i-1`` (states ``s_0 = x_T`` ...).
        draws: per step, ``None`` if it draws no noise, else the dtype of the one standard normal
            tensor of the model output's shape it draws from the generator: ``"model"`` (the model
            output's dtype) or a dtype name such as ``"float32"``. A draw may have a zero
            coefficient and still consume random numbers.
        input_scales: ``[T]`` float64, the factor ``scale_model_input`` applies at each step
            (1 where the loop does not call it).
        timesteps: the scheduler's timesteps, as the loop passes them to the model.
        input_scaling: one of :data:`INPUT_SCALING`.
    """

    form: AffineForm = attrs.field(repr=False)
    draws: tuple[str | None, ...]
    input_scales: torch.Tensor = attrs.field(repr=False)
    timesteps: torch.Tensor = attrs.field(repr=False)
    input_scaling: str = "none"

    @property
    def num_steps(self) -> int:
        """T, the number of calls of ``step`` (and of the model) in the loop."""
        return len(self.draws)


@attrs.define(frozen=True, eq=False)
class _Run:
    """Outputs of one probe run: ``outputs``/``noise`` ``[T, P]``, draws and input scales."""

    outputs: torch.Tensor
    noise: torch.Tensor
    draws: tuple[str | None, ...]
    scales: torch.Tensor


def _columns(steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probe samples and model outputs, ``[T, P]`` each: basis, zero, then random columns.

    There are at least ``_MIN_COLUMNS`` columns: torch's CPU ``randn`` draws tensors of fewer
    than 16 elements in float32 and float64 from the same random numbers, so on a smaller probe a
    float32 draw (a step that upcasts the sample first) could not be told from a draw in the
    model's dtype, while the loop's real tensors are drawn differently in the two.
    """
    random = max(_RANDOM_COLUMNS, _MIN_COLUMNS - (2 * steps + 1))
    size = 2 * steps + 1 + random
    samples = torch.zeros(steps, size, dtype=torch.float64)
    outputs = torch.zeros(steps, size, dtype=torch.float64)
    index = torch.arange(steps)
    samples[index, index] = 1.0
    outputs[index, steps + index] = 1.0
    generator = torch.Generator().manual_seed(seed)
    samples[:, -random:] = 2.0 * torch.randn(steps, random, generator=generator, dtype=torch.float64)
    outputs[:, -random:] = torch.randn(steps, random, generator=generator, dtype=torch.float64)
    return samples, outputs


def _as_probe(row: torch.Tensor) -> torch.Tensor:
    # Image-like [1, 1, 1, P]: schedulers index channels (dim 1) and the batch (dim 0).
    return row.reshape(1, 1, 1, -1).clone()


def _accepts(method: Any, name: str) -> bool:
    return name in inspect.signature(method).parameters


def _scale_factor(scheduler: Any, sample: torch.Tensor, timestep: Any,
                  index: int) -> tuple[torch.Tensor, float]:
    """``scale_model_input`` of this step and its factor (checked to be one scalar).

    Schedulers without the method (the flow-matching ones) leave the model input as it is, as
    their pipelines do.
    """
    if not hasattr(scheduler, "scale_model_input"):
        return sample, 1.0
    scaled = scheduler.scale_model_input(sample, timestep)
    flat_in, flat_out = sample.flatten(), scaled.flatten().to(torch.float64)
    factor = float(flat_out[index])  # the basis column of this step's sample holds 1
    if not torch.allclose(flat_out, factor * flat_in, rtol=_LINEARITY_TOL, atol=_LINEARITY_TOL):
        raise UnsupportedError(
            f"{type(scheduler).__name__}.scale_model_input is not a scalar factor at step {index}; "
            "fpsolve can only reproduce loops whose model-input scaling is a per-step factor."
        )
    return scaled, factor


def _replay(name: str, index: int, before: torch.Tensor, after: torch.Tensor,
            shape: torch.Size) -> tuple[str, torch.Tensor]:
    """Which draw consumed the generator from ``before`` to ``after``; returns (dtype label, noise)."""
    for label in ("model",) + _NOISE_DTYPES:
        dtype = torch.float64 if label == "model" else getattr(torch, label)
        replay = torch.Generator().set_state(before)
        noise = torch.randn(shape, generator=replay, dtype=dtype)
        if torch.equal(replay.get_state(), after):
            return label, noise.to(torch.float64).flatten()
    raise UnsupportedError(
        f"{name}.step draws noise at step {index} in a way fpsolve cannot replay (not one standard "
        "normal tensor of the model output's shape)."
    )


def _run_loop(scheduler: Any, samples: torch.Tensor, outputs: torch.Tensor, step_kwargs: Mapping[str, Any],
              input_scaling: str, seed: int) -> _Run:
    name = type(scheduler).__name__
    # The probe runs on the CPU whatever device the pipeline set the timesteps on; schedulers keep
    # their coefficient arrays on the CPU, and this copy is never stepped on the model's device.
    scheduler.timesteps = scheduler.timesteps.cpu()
    generator = torch.Generator().manual_seed(seed)
    takes_generator = _accepts(scheduler.step, "generator")
    results, noises, draws, scales = [], [], [], []
    for index, timestep in enumerate(scheduler.timesteps):
        sample = _as_probe(samples[index])
        step_sample, factor = sample, 1.0
        if input_scaling != "none":
            scaled, factor = _scale_factor(scheduler, sample.clone(), timestep, index)
            if input_scaling == "model_and_step":
                step_sample = scaled
        extra = dict(step_kwargs)
        if takes_generator:
            extra["generator"] = generator
        before, global_before = generator.get_state(), torch.get_rng_state()
        result = scheduler.step(_as_probe(outputs[index]), timestep, step_sample, return_dict=False,
                                **extra)[0]
        if not torch.equal(torch.get_rng_state(), global_before):
            raise UnsupportedError(
                f"{name}.step draws noise from torch's global random generator at step {index}; fpsolve "
                "replays only noise drawn from the generator passed to step."
            )
        drew, noise = None, torch.zeros(samples.shape[1], dtype=torch.float64)
        if not torch.equal(generator.get_state(), before):
            drew, noise = _replay(name, index, before, generator.get_state(), sample.shape)
        results.append(result.detach().to(torch.float64).flatten())
        noises.append(noise)
        draws.append(drew)
        scales.append(factor)
    return _Run(torch.stack(results), torch.stack(noises), tuple(draws),
                torch.tensor(scales, dtype=torch.float64))


def _noise_coefficients(first: _Run, second: _Run) -> torch.Tensor:
    """Per-step noise coefficient from two runs that differ only in their noise."""
    change = first.noise - second.noise
    energy = change.pow(2).sum(1)
    coefficients = (first.outputs - second.outputs).mul(change).sum(1) / energy.clamp_min(1e-300)
    return torch.where(energy > 0, coefficients, torch.zeros_like(coefficients))


def _clear_dust(linear: torch.Tensor, noise_part: torch.Tensor, steps: int) -> torch.Tensor:
    """Zero the rounding dust that removing the noise leaves on coefficients that are zero.

    A step that computes in float32 rounds ``coef + c * noise`` to float32, so subtracting the
    replayed noise leaves dust of relative size ~1e-7 of ``c * noise``, which would otherwise read
    as spurious lags. Columns a step never saw (later steps' inputs, the zero column) are pure
    dust: they give its relative size, and anything within 4x of it is cleared.
    """
    linear = linear.clone()
    rows = torch.arange(steps)[:, None]
    cols = torch.arange(steps)[None, :]
    future = torch.cat([cols > rows, cols > rows, torch.ones(steps, 1, dtype=torch.bool)], dim=1)
    scale = noise_part[:, :2 * steps + 1].abs()
    relative = (linear[:, :2 * steps + 1].abs() / scale.clamp_min(1e-300))[future & (scale > 0)]
    level = float(relative.max()) if relative.numel() else 0.0
    basis = linear[:, :2 * steps]
    row_size = basis.abs().amax(1, keepdim=True)
    dust = (basis.abs() <= 4 * level * noise_part[:, :2 * steps].abs()) | (basis.abs() <= _DUST * row_size)
    basis[dust] = 0.0
    return linear


def _affine_form(linear: torch.Tensor, noise: torch.Tensor, steps: int) -> AffineForm:
    """Rows of the affine form from the noise-free outputs of the basis columns."""
    state_coef = linear[:, :steps]  # [i, j]: sample of step j -> output of step i
    output_coef = linear[:, steps:2 * steps]
    rows = torch.arange(steps)[:, None]
    cols = torch.arange(steps)[None, :]
    used = ((state_coef != 0) | (output_coef != 0)) & (cols <= rows)
    lags = int((rows + 1 - cols)[used].max()) if used.any() else 1
    state = torch.zeros(steps + 1, lags, dtype=torch.float64)
    output = torch.zeros(steps + 1, lags, dtype=torch.float64)
    for lag in range(1, lags + 1):
        index = torch.arange(lag - 1, steps)  # step i reads the sample of step i + 1 - lag
        state[index + 1, lag - 1] = state_coef[index, index + 1 - lag]
        output[index + 1, lag - 1] = output_coef[index, index + 1 - lag]
    row0 = torch.zeros(1, dtype=torch.float64)  # s_0 = x_T is not the result of a step
    return AffineForm(state=state, output=output, noise=torch.cat([row0, noise]))


def _check_affine(name: str, run: _Run, linear: torch.Tensor, noise: torch.Tensor, samples: torch.Tensor,
                  outputs: torch.Tensor, steps: int, checked: slice) -> None:
    """The ``checked`` columns of ``run`` must follow the measured coefficients and noise."""
    state_coef = torch.tril(linear[:, :steps])
    output_coef = torch.tril(linear[:, steps:2 * steps])
    predicted = (state_coef @ samples[:, checked] + output_coef @ outputs[:, checked]
                 + noise[:, None] * run.noise[:, checked])
    scale = (state_coef.abs() @ samples[:, checked].abs() + output_coef.abs() @ outputs[:, checked].abs()
             + noise.abs()[:, None] * run.noise[:, checked].abs())
    error = (run.outputs[:, checked] - predicted).abs() - _LINEARITY_TOL * (1 + scale)
    if not torch.isfinite(run.outputs).all():
        step = int((~torch.isfinite(run.outputs)).any(1).nonzero()[0])
        raise UnsupportedError(
            f"{name}.step returns non-finite values at step {step} for finite inputs: this configuration "
            "fails in diffusers' own loop too (e.g. rescale_betas_zero_snr=True with "
            "prediction_type='epsilon', noise prediction with a final sigma of 0, or "
            "variance_type='fixed_large_log'). Use a configuration diffusers can sample with."
        )
    if (error > 0).any():
        step = int((error > 0).any(1).nonzero()[0])
        raise UnsupportedError(
            f"{name}.step is not affine in (sample, model outputs, noise) at step {step}; fpsolve reproduces "
            "only affine steps exactly and refuses to approximate this one."
        )


def probe_schedule(scheduler: Any, step_kwargs: Mapping[str, Any] | None = None,
                   input_scaling: str = "none", seed: int = 0) -> ProbedSchedule:
    """Measure the affine form of ``scheduler``'s loop (after ``set_timesteps``).

    Args:
        scheduler: a configured diffusers scheduler; only deep copies of it are stepped. Clipping
            and thresholding must already be switched off in it (they are folded into the model
            output, see :mod:`.folding`).
        step_kwargs: extra keyword arguments the loop passes to ``step`` (e.g. ``eta``); not the
            generator, which probing supplies.
        input_scaling: one of :data:`INPUT_SCALING`.
        seed: seed of the probe columns and probe generators.

    Raises:
        UnsupportedError: the loop is not affine, draws noise fpsolve cannot replay, or is not finite.
    """
    if input_scaling not in INPUT_SCALING:
        raise ValueError(f"input_scaling must be one of {INPUT_SCALING}; got {input_scaling!r}.")
    name = type(scheduler).__name__
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or len(timesteps) == 0:
        raise UnsupportedError(
            f"{name} has no timesteps; call scheduler.set_timesteps(...) before probing it."
        )
    kwargs = {k: v for k, v in (step_kwargs or {}).items() if k not in ("generator", "variance_noise")}
    steps = len(timesteps)
    samples, outputs = _columns(steps, seed)
    with torch.no_grad():
        first = _run_loop(copy.deepcopy(scheduler), samples, outputs, kwargs, input_scaling, seed + 1)
        noise = torch.zeros(steps, dtype=torch.float64)
        second = None
        if any(first.draws):
            second = _run_loop(copy.deepcopy(scheduler), samples, outputs, kwargs, input_scaling, seed + 2)
            noise = _noise_coefficients(first, second)
        linear = first.outputs - noise[:, None] * first.noise
        # the zero column and the random ones test linearity; a second run, with other noise,
        # must match in every column (the noise enters as one coefficient per step)
        _check_affine(name, first, linear, noise, samples, outputs, steps, slice(2 * steps, None))
        if second is not None:
            _check_affine(name, second, linear, noise, samples, outputs, steps, slice(None))
    form = _affine_form(_clear_dust(linear, noise[:, None] * first.noise, steps), noise, steps)
    return ProbedSchedule(form=form, draws=first.draws, input_scales=first.scales,
                          timesteps=timesteps.detach().cpu().clone(), input_scaling=input_scaling)
