"""Initializers: the first guess of the trajectory.

* ``noise_copy`` (ParaTAA's reference): rows start as a copy of the lowest state already
  initialised when they enter the window (at first, ``x_T``).
* ``trajectory``: start from a given trajectory (an earlier solve with the same noise, e.g. a
  neighbouring prompt), optionally freezing its noisier part and solving only the last steps.
* ``coarse``: a cheap sequential solve on a subset of the timesteps, interpolated onto the fine
  grid; its model calls are counted as iterations.
* ``extrapolate`` (ParaSolver's start): ``steps`` exact sequential steps, then every later row
  from the sampler run with the latest predicted ``x_0`` held fixed (no model calls); with
  ``steps=0`` and ``x0=`` a data mean (e.g. the mean of earlier samples of the same model), the
  warm start that issue 14's round 7 measured.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch

from .errors import InvalidOptionError, ShapeError
from .plugin_marks import hookimpl
from .samplers import FlowSampler
from .system import TriangularSystem
from .validators import check_int, integer

__all__ = ["InitialGuess", "Initializer", "NoiseCopy", "FromTrajectory", "Coarse", "Extrapolate"]


@attrs.define(frozen=True, eq=False)
class InitialGuess:
    """An initializer's result.

    Attributes:
        trajectory: ``[T+1, N, D]`` first guess; ``trajectory[0]`` is ``x_T``.
        valid_upto: rows ``0..valid_upto`` hold guesses; later rows are filled, as they enter the
            window, with a copy of the lowest guessed row.
        anchor: rows ``0..anchor`` are final (not solved again).
        iterations: rounds of model calls the initializer spent (added to the solution's count).
        model_evals: denoiser evaluations the initializer spent.
    """

    trajectory: torch.Tensor = attrs.field(repr=False)
    valid_upto: int
    anchor: int = 0
    iterations: int = 0
    model_evals: int = 0


class Initializer:
    """Base class of initializers (frozen attrs subclasses set ``name``)."""

    name: ClassVar[str] = ""
    aliases: ClassVar[dict[str, dict[str, Any]]] = {}

    def initialize(self, system: TriangularSystem) -> InitialGuess:
        """The first guess for ``system``."""
        raise NotImplementedError


def _empty_trajectory(system: TriangularSystem) -> torch.Tensor:
    noise = system.flat_noise
    trajectory = torch.empty_like(noise)
    trajectory[0] = noise[0]
    return trajectory


@attrs.define(frozen=True, eq=False)
class NoiseCopy(Initializer):
    """Every row starts as a copy of the lowest initialised state when it enters the window."""

    name = "noise_copy"

    def initialize(self, system: TriangularSystem) -> InitialGuess:
        """Only ``x_T`` is known; the driver fills rows lazily."""
        return InitialGuess(_empty_trajectory(system), valid_upto=0)


@attrs.define(frozen=True, eq=False, kw_only=True)
class FromTrajectory(Initializer):
    """Start from a given trajectory.

    Args:
        trajectory: a :class:`~fpsolve.Solution` or a tensor ``[T+1, *shape]`` /
            ``[T+1, N, *shape]`` (x_T first), computed with the same noise for the frozen part.
        solve_last: if given, only the last ``solve_last`` steps are solved; the noisier states
            are taken as final (ParaTAA's example: T = 50, solve_last = 30).
    """

    name = "trajectory"
    aliases = {"from_trajectory": {}}

    trajectory: Any = attrs.field(default=None, repr=False)
    solve_last: int | None = attrs.field(default=None, converter=integer,
                                         validator=check_int("solve_last", optional=True,
                                                             hint=" in 1..T, or None"))

    def initialize(self, system: TriangularSystem) -> InitialGuess:
        """The given trajectory; ``x_T`` replaced by the system's own unless part is frozen."""
        if self.trajectory is None:
            raise InvalidOptionError(
                "the 'trajectory' initializer needs trajectory=<Solution or tensor [T+1, *shape]>."
            )
        given = getattr(self.trajectory, "trajectory", self.trajectory)
        if not isinstance(given, torch.Tensor):
            raise ShapeError(
                "the 'trajectory' initializer needs a Solution or a tensor [T+1, *shape] / [T+1, N, *shape]; "
                f"got {type(given).__name__}."
            )
        steps, samples, size = system.num_steps, system.num_samples, system.state_size
        if given.shape[0] != steps + 1 or given.numel() != (steps + 1) * samples * size:
            raise ShapeError(
                f"trajectory must have T+1 = {steps + 1} states of {samples} x {list(system.shape)} "
                f"elements; got shape {list(given.shape)}."
            )
        trajectory = given.reshape(steps + 1, samples, size)
        trajectory = trajectory.to(device=system.device, dtype=system.dtype).clone()
        anchor = 0
        if self.solve_last is not None:
            if not 1 <= self.solve_last <= steps:
                raise InvalidOptionError(f"solve_last must lie in 1..T = 1..{steps}; got {self.solve_last}.")
            anchor = steps - self.solve_last
        if anchor == 0:
            trajectory[0] = system.flat_noise[0]
        return InitialGuess(trajectory, valid_upto=steps, anchor=anchor)


@attrs.define(frozen=True, eq=False, kw_only=True)
class Coarse(Initializer):
    """A sequential solve with ``steps`` of the timesteps (the sampler's ``coarsened``), its
    states interpolated linearly in the noise level onto the fine grid.

    Args:
        steps: coarse steps; ``None`` means ``max(2, T // 5)`` (at most T).
    """

    name = "coarse"

    steps: int | None = attrs.field(default=None, converter=integer,
                                    validator=check_int("coarse steps", optional=True,
                                                        hint=" in 1..T (coarse sequential steps), or None"))

    def initialize(self, system: TriangularSystem) -> InitialGuess:
        """Run the coarse sampler from the same ``x_T`` and interpolate."""
        fine_steps = system.num_steps
        steps = self.steps if self.steps is not None else min(fine_steps, max(2, fine_steps // 5))
        if not 1 <= steps <= fine_steps:
            raise InvalidOptionError(f"coarse steps must lie in 1..T = 1..{fine_steps}; got {steps}.")
        coarse_sampler = system.sampler.coarsened(steps)
        noise = torch.zeros((coarse_sampler.num_steps + 1,) + tuple(system.flat_noise.shape[1:]),
                            dtype=system.dtype, device=system.device)
        noise[0] = system.flat_noise[0]
        # Same sample shape and batch as the fine system: denoisers may insist on their shape.
        coarse_system = TriangularSystem(
            sampler=coarse_sampler, denoiser=system.denoiser, shape=system.shape,
            batch=system.num_samples, noise=noise.reshape(noise.shape[0], system.num_samples, *system.shape),
            dtype=system.dtype, device=system.device, model_dtype=system.model_dtype,
        )
        coarse = coarse_system.sequential()  # the system's own sequential loop
        coarse_states = coarse.states.reshape(coarse_sampler.num_steps + 1, system.num_samples, -1)
        fine_sigma = system.sampler.state_sigmas().tolist()
        coarse_sigma = coarse_sampler.state_sigmas().tolist()
        trajectory = _empty_trajectory(system)
        for row, sigma in enumerate(fine_sigma):
            trajectory[row] = _interpolate(coarse_states, coarse_sigma, sigma)
        trajectory[0] = system.flat_noise[0]
        return InitialGuess(trajectory, valid_upto=fine_steps, iterations=coarse.calls,
                            model_evals=coarse.calls * system.num_samples)


def _interpolate(states: torch.Tensor, sigmas: list[float], sigma: float) -> torch.Tensor:
    """Linear interpolation in the noise level between the two coarse states around ``sigma``."""
    if sigma >= sigmas[0]:
        return states[0]
    for k in range(len(sigmas) - 1):
        high, low = sigmas[k], sigmas[k + 1]
        if low <= sigma <= high:
            weight = 0.0 if high == low else (high - sigma) / (high - low)
            return (1 - weight) * states[k] + weight * states[k + 1]
    return states[-1]


def _state_scales(system: TriangularSystem) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(alpha, sigma, c)``: the states' signal and noise scales ``[T+1]`` (``s = alpha x0 +
    sigma eps``) and the model output of a denoiser that predicts ``x0`` at ``s``,
    ``(s - alpha x0) / sigma - c x0``: ``c = 0`` for eps-predicting variance-preserving samplers
    (``state_alphas_cumprod``), ``c = 1`` for flow matching's velocity ``eps - x0`` (``alpha = 1 -
    sigma``). ``None`` for any other sampler, whose outputs need not be either."""
    sampler = system.sampler
    prediction = type(sampler).prediction
    schedule = getattr(sampler, "state_alphas_cumprod", None)
    if schedule is not None and prediction == "epsilon":
        abar = schedule().to(system.device, system.dtype)
        return abar.sqrt(), (1 - abar).clamp_min(0).sqrt(), 0.0
    if isinstance(sampler, FlowSampler) and prediction == "velocity":
        sigmas = sampler.state_sigmas().to(system.device, system.dtype)
        return 1 - sigmas, sigmas, 1.0
    return None


def _frozen_x0_rows(system: TriangularSystem, trajectory: torch.Tensor, outputs: torch.Tensor,
                   first: int, x0: torch.Tensor) -> bool:
    """Fill rows ``first + 1 .. T`` of ``trajectory`` by running the sampler with ``x_0`` held fixed.

    The model output at each extrapolated state ``s_j`` is replaced by what a denoiser predicting
    ``x0`` there would return (see ``_state_scales``: the eps ``(s_j - alpha_j x0) / sigma_j``, or
    the velocity ``(s_j - x0) / sigma_j``); ``outputs[j]`` for ``j < first`` must hold the true
    model outputs (a multistep sampler reads a few of them). For DDIM and flow Euler this is the
    straight line to ``x0``. No model calls. Returns False, leaving the rows untouched, for
    samplers whose outputs are neither eps on a variance-preserving schedule nor a flow velocity.
    """
    scales = _state_scales(system)
    if scales is None:
        return False
    alphas, sigmas, velocity = scales
    outputs = outputs.clone()
    for row in range(first, system.num_steps):
        if sigmas[row] > 0:  # states with sigma 0 (the final one) are never read by a step
            outputs[row] = (trajectory[row] - alphas[row] * x0) / sigmas[row] - velocity * x0
        trajectory[row + 1] = system.first_order_rhs(trajectory, outputs, row + 1, row + 1)[0]
    return True


def _held_x0(system: TriangularSystem, x0: Any) -> torch.Tensor:
    """``x0=`` of :class:`Extrapolate` as ``[N, D]``: one state for every sample, or one per sample."""
    samples, size = system.num_samples, system.state_size
    if not isinstance(x0, torch.Tensor):
        raise ShapeError(
            f"extrapolate's x0 must be a tensor of the sample's shape {list(system.shape)} (one x_0 for "
            f"every sample, e.g. earlier_solution.sample.mean(dim=0)) or of {samples} x {list(system.shape)} "
            f"elements; got {type(x0).__name__}."
        )
    if x0.numel() not in (size, samples * size):
        raise ShapeError(
            f"extrapolate's x0 must have the sample's {size} elements (shape {list(system.shape)}) or "
            f"{samples} x {size} (one per sample); got shape {list(x0.shape)}."
        )
    held = x0.detach().to(device=system.device, dtype=system.dtype).reshape(-1, size)
    if not torch.isfinite(held).all():
        raise InvalidOptionError("extrapolate's x0 must be finite; it has NaN or infinite entries.")
    return held.expand(samples, size).clone()


@attrs.define(frozen=True, eq=False, kw_only=True)
class Extrapolate(Initializer):
    """ParaSolver's initialisation: ``steps`` exact sequential steps from ``x_T`` (counted as
    iterations), then the rest of the trajectory extrapolated with the latest predicted ``x_0``
    held fixed (see ``_frozen_x0_rows``). ``steps = 0`` makes no model call and extrapolates
    towards ``x0`` (default 0, the data mean of a model whose data are centred).

    With ``steps=0, x0=`` the data mean (e.g. the mean of earlier samples of the same model),
    this is a warm start from neighbouring samples. On the digits, held-out and flow UNets the
    default ``newton`` needed 24 rounds fewer over 48 benchmark cells (397 against 421; ``x0 =
    0``: 5 fewer), though two of ten batches lost 3. The default stopping rule was tuned on the
    noise-copy start, and after this start it stopped at 2 px on one cell
    (docs/benchmarks/iterations.md, round 7), so check the error or pass a tighter rule.

    Samplers whose outputs are neither eps on a variance-preserving schedule nor a flow-matching
    velocity fall back to the lazy noise copy after the exact steps (an initial guess only
    changes the rounds, never the solution).

    Args:
        steps: exact sequential steps before extrapolating (default 1: one model call at ``x_T``).
        x0: with ``steps=0``, the x_0 held fixed: ``None`` (zeros), or a tensor of the sample's
            shape (for every sample) or ``[N, *shape]`` (one per sample).
    """

    name = "extrapolate"
    aliases = {"parasolver": {}}

    steps: int = attrs.field(default=1, converter=integer,
                             validator=check_int("extrapolate steps", minimum=0,
                                                 hint=" (exact sequential steps before extrapolating)"))
    x0: Any = attrs.field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.x0 is not None and self.steps != 0:
            raise InvalidOptionError(
                f"extrapolate's x0 is the x_0 held fixed without exact steps; with steps={self.steps} the "
                "model's own prediction after those steps is held. Pass steps=0 with x0=, or drop x0."
            )

    def initialize(self, system: TriangularSystem) -> InitialGuess:
        """Exact steps, then the frozen-x0 extrapolation of every later row."""
        steps = min(self.steps, system.num_steps)
        trajectory = _empty_trajectory(system)
        outputs = torch.zeros(system.num_steps, system.num_samples, system.state_size,
                              dtype=system.dtype, device=system.device)
        x0 = torch.zeros_like(trajectory[0]) if self.x0 is None else _held_x0(system, self.x0)
        for row in range(steps):
            outputs[row] = system.evaluate(trajectory[row:row + 1], [row])[0]
            trajectory[row + 1] = system.first_order_rhs(trajectory, outputs, row + 1, row + 1)[0]
        scales = _state_scales(system)
        if steps and scales is not None:  # the model's prediction at the last exact state
            alphas, sigmas, velocity = scales
            row = steps - 1
            # eps: x0 = (s - sigma e) / alpha; velocity v = eps - x0: x0 = s - sigma v
            x0 = (trajectory[row] - sigmas[row] * outputs[row]) / (alphas[row] + velocity * sigmas[row])
        if steps == system.num_steps:
            return InitialGuess(trajectory, valid_upto=steps, anchor=steps, iterations=steps,
                                model_evals=steps * system.num_samples)
        filled = _frozen_x0_rows(system, trajectory, outputs, steps, x0)
        return InitialGuess(trajectory, valid_upto=system.num_steps if filled else steps, anchor=steps,
                            iterations=steps, model_evals=steps * system.num_samples)


@hookimpl
def fpsolve_register_initializers() -> list[type[Initializer]]:
    """fpsolve's own initializers."""
    return [NoiseCopy, FromTrajectory, Coarse, Extrapolate]
