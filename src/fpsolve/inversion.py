"""``fpsolve.invert``: recover the noise ``x_T`` of a given ``x_0``, in parallel.

A deterministic one-step sampler steps ``s_i = A_i s_{i-1} + B_i eps(s_{i-1}, t_{i-1})`` from
``s_0 = x_T`` to ``s_T = x_0``. Inversion runs this recurrence backwards, from ``x_0`` to
``x_T``; its unknowns ``u_p = s_{T-p}`` (``u_0 = x_0``) form a triangular system again:

* ``exact=False`` (DDIM inversion, as diffusers' ``DDIMInverseScheduler`` and the usual
  editing pipelines do it): the model is evaluated at the LESS noisy state,

      u_p = u_{p-1} / A_i - (B_i / A_i) eps(u_{p-1}, t_{i-1}),       i = T - p + 1,

  an explicit one-step sampler over the reversed timesteps (:class:`InverseSampler`), solved
  by :func:`fpsolve.solve` with every solver, window and stopping rule, and equal to the
  sequential inverse loop at ``tol -> 0``. It is approximate: the forward sampler started from
  the result does not return exactly to ``x_0``.
* ``exact=True``: every forward step read as an implicit equation in the unknown noisier state,

      u_p = u_{p-1} / A_i - (B_i / A_i) eps(u_p, t_{i-1}),

  so that the forward step from ``u_p`` gives ``u_{p-1}`` exactly; the forward sampler started
  from the result reproduces ``x_0`` to the tolerance. The model now reads the row's own
  state, so the system is block triangular with a nonlinear diagonal: it is solved by the same
  solvers, windows and stopping rules (:class:`ImplicitInverseSystem` evaluates the model one
  position ahead), with the anchor moving only over rows whose implicit equation holds to the
  tolerance (no finite-termination guarantee: the count of iterations is a measured number).
  ``solver="sequential"`` is the per-step fixed-point loop of the literature (ReNoise, AIDI
  without acceleration): each step iterated until its residual meets the tolerance.

Extension point: a sampler class may define ``inverse_sampler(output_to_eps=None)`` returning
its own backward sampler (position ``p`` holding ``s_{T-p}``, the model called at position
``p - 1`` with the key of the noisier state, one lag, no noise); :func:`inverse_system` uses it
instead of :class:`InverseSampler` for both modes. A flow sampler needs none while its affine
form is the one-step Euler step; one whose keys or levels differ overrides this.

Samplers that cannot be inverted are refused with the reason: those that inject noise (DDIM
with ``eta > 0``, DDPM: ``x_T`` is not a function of ``x_0``) and multistep samplers (each step
reads several noisier states, so stepping back from ``x_0`` is not a recurrence). A flow
sampler whose affine form is one-step (Euler on a velocity model: ``A = 1``, ``B = dsigma``)
inverts with this same code: ``exact=False`` is Euler run backwards.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from .api import make_system, resolve_method, solve
from .control import Controller, runs_sequentially
from .errors import InvalidOptionError, ShapeError, UnsupportedError
from .initializers import InitialGuess, Initializer
from .registry import resolve
from .samplers.base import AffineForm, SequentialSampler
from .solution import ResidualTrace, Solution, Status
from .solvers.base import FixedPointSolver
from .stopping import RMS
from .system import TriangularSystem
from .validators import as_flag

__all__ = ["invert", "InverseSampler", "ImplicitInverseSystem", "inverse_system", "solve_inverse",
           "check_invertible", "reconstruction_error"]


#: Default cap of an exact inversion, in parallel iterations per step: without the triangular
#: safeguard the count is not bounded by T (coarse steps contract slowly: on a sharp Gaussian
#: mixture, DDIM-10 needed 16 iterations per step at tol 1e-8, DDIM-50 under one).
_EXACT_ITERS_PER_STEP = 5


def check_invertible(sampler: SequentialSampler, argument: str = "system") -> AffineForm:
    """The sampler's affine form, after checking that its recurrence can be run backwards.

    Raises:
        UnsupportedError: the sampler injects noise, is multistep, or has a step that forgets
            its input (``A_i = 0``); the message names ``argument`` and the reason.
    """
    form = sampler.affine_form()
    label = getattr(sampler, "scheduler_name", None) or type(sampler).__name__
    noisy = (form.noise[1:] != 0).nonzero().flatten()
    if noisy.numel():
        steps = ", ".join(str(int(i) + 1) for i in noisy[:5])
        raise UnsupportedError(
            f"invert({argument}=...): the sampler {label} injects fresh noise at step(s) {steps} "
            "(DDIM with eta > 0, DDPM, SDE solvers): there x_T is not a function of x_0, so there is "
            "nothing to invert. Use a deterministic sampler, e.g. fpsolve.samplers.DDIM(..., eta=0.0) "
            "(or DDIMScheduler with eta=0 for diffusers)."
        )
    if form.lags > 1 and bool((form.state[:, 1:] != 0).any() or (form.output[:, 1:] != 0).any()):
        raise UnsupportedError(
            f"invert({argument}=...): the sampler {label} is multistep (a step reads {form.lags} earlier "
            "states), so stepping back from x_0 needs states that are not known yet: it has no inverse "
            "recurrence. Invert with a one-step sampler on the same timesteps "
            + ("(FlowEuler on the same sigmas" if type(sampler).prediction == "velocity"
               else "(DDIM with eta=0, or DPMSolver(order=1)")
            + ") and sample back with it."
        )
    forgets = (form.state[1:, 0] == 0).nonzero().flatten()
    if forgets.numel():
        raise UnsupportedError(
            f"invert({argument}=...): step {int(forgets[0]) + 1} of {label} does not depend on its input "
            "state (A = 0, e.g. a step to sigma = 0 in data prediction), so it cannot be run backwards."
        )
    return form


def _as_conversion(value: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    if value is None:
        return None
    r, u = (torch.as_tensor(v, dtype=torch.float64).flatten() for v in value)
    return r, u


@attrs.define(frozen=True, eq=False)
class InverseSampler(SequentialSampler):
    """A one-step deterministic sampler run backwards, from ``x_0`` to ``x_T`` (DDIM inversion).

    Position ``p`` holds ``s_{T-p}``; the model is called at position ``p - 1`` with the key of
    the noisier state ``t_{T-p}`` (so the keys are the forward timesteps reversed). Sigmas and
    step variances are the forward sampler's, reversed.

    The inverted step keeps eps frozen. When the model predicts something else (``v``, ``x0``),
    ``output_to_eps = (r, u)`` (``[T+1]`` each) says how eps follows from the output ``m`` at
    state ``j``, ``eps = r_j s_j + u_j m``: the step is then written in eps, and eps is read at
    the less noisy state with that state's level, as diffusers' ``DDIMInverseScheduler`` does.
    ``None`` means the output is eps (fpsolve's samplers).

    Args:
        forward: the forward sampler (checked by :func:`check_invertible`).
        output_to_eps: ``(r, u)`` or ``None``.
    """

    name = "inverse"

    forward: SequentialSampler
    output_to_eps: tuple[torch.Tensor, torch.Tensor] | None = attrs.field(
        default=None, converter=_as_conversion, repr=False)
    timesteps: tuple[int, ...] = attrs.field(init=False)
    form: AffineForm = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        forward_form = check_invertible(self.forward)
        steps = forward_form.num_steps
        object.__setattr__(self, "timesteps", tuple(reversed(tuple(self.forward.timesteps))))
        big_a, big_b = forward_form.state[1:, 0], forward_form.output[1:, 0]  # step i = 1..T
        if self.output_to_eps is None:
            state, output = 1 / big_a, -big_b / big_a
        else:
            r, u = self.output_to_eps
            if r.numel() != steps + 1 or u.numel() != steps + 1:
                raise InvalidOptionError(f"output_to_eps needs two tensors of T+1 = {steps + 1} values; "
                                         f"got {r.numel()} and {u.numel()}.")
            a = big_a - big_b * r[:-1] / u[:-1]  # the forward step in eps: s_i = a s_{i-1} + b eps
            b = big_b / u[:-1]
            state, output = (1 - b * r[1:]) / a, -b * u[1:] / a  # eps read at s_i, level i
        if not (torch.isfinite(state).all() and torch.isfinite(output).all()):
            raise UnsupportedError("invert(system=...): the inverse steps have non-finite coefficients "
                                   "(an output that cannot be converted to eps at some state, e.g. x0 "
                                   "prediction at sigma = 0).")
        zero = torch.zeros(1, dtype=torch.float64)
        form = AffineForm(state=torch.cat([zero, state.flip(0)]).unsqueeze(1),
                          output=torch.cat([zero, output.flip(0)]).unsqueeze(1),
                          noise=torch.zeros(steps + 1, dtype=torch.float64))
        object.__setattr__(self, "form", form)

    # The model convention is the forward sampler's: the same model is called, at the same keys.
    # (A flow sampler's keys are float model times: read as integers they would be truncated,
    # e.g. 549.99... -> 549, and the inverse would call the model at the wrong time.)
    @property  # type: ignore[misc]
    def continuous_time(self) -> bool:  # type: ignore[override]
        """Whether model times are floats: the forward sampler's convention."""
        return bool(type(self.forward).continuous_time)

    @property  # type: ignore[misc]
    def prediction(self) -> str:  # type: ignore[override]
        """What the model returns: the forward sampler's convention (the output read at the less
        noisy state; for a flow sampler the velocity, so ``exact=False`` is Euler run backwards)."""
        return str(type(self.forward).prediction)

    def affine_form(self) -> AffineForm:
        """``u_p = u_{p-1} / A_i - (B_i / A_i) e_{p-1}``, ``i = T - p + 1``."""
        return self.form

    def state_sigmas(self) -> torch.Tensor:
        """The forward sigmas, ``x_0`` first."""
        return self.forward.state_sigmas().flip(0)

    def step_variances(self) -> torch.Tensor:
        """Entry ``p`` is the forward variance of step ``T - p + 1`` (the step being inverted)."""
        forward = self.forward.step_variances()
        result = torch.zeros_like(forward)
        result[1:] = forward[1:].flip(0)
        return result


@attrs.define(frozen=True, eq=False, kw_only=True)
class ImplicitInverseSystem(TriangularSystem):
    """The exact inverse: the model at position ``q`` is evaluated at state ``q + 1``.

    With :class:`InverseSampler`'s coefficients this makes row ``p`` read
    ``eps(u_p, t_{T-p})``, the implicit equation of the forward step. The states are read from
    the trajectory the driver iterates (shared through :class:`_SharedInitializer`), which the
    system checks on every call.
    """

    def model_inputs(self, states: torch.Tensor,
                     positions: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model batch for ``positions``, taken one position ahead in the shared trajectory."""
        trajectory = self._cache.get("trajectory")
        index = torch.as_tensor(list(positions) if not isinstance(positions, torch.Tensor) else positions,
                                dtype=torch.long, device=self.device)
        if trajectory is None or not torch.equal(trajectory[index], states):
            raise RuntimeError(
                "ImplicitInverseSystem: the states to evaluate are not those of the shared trajectory; "
                "it must be solved through fpsolve.invert(..., exact=True) (the driver's states are "
                "shared with the system through the initializer)."
            )
        return super().model_inputs(trajectory[index + 1], positions)


@attrs.define(frozen=True, eq=False)
class _SharedInitializer(Initializer):
    """Runs ``inner`` and lets the implicit system read the trajectory the driver iterates."""

    inner: Initializer
    name = "shared"

    def initialize(self, system: TriangularSystem) -> InitialGuess:
        guess = self.inner.initialize(system)
        system._cache["trajectory"] = guess.trajectory
        return guess


def _batched(x0: torch.Tensor, system: TriangularSystem) -> tuple[torch.Tensor, int | None]:
    """``x0`` as ``[N, D]`` and the batch (``None`` for one unbatched sample)."""
    if not isinstance(x0, torch.Tensor):
        raise ShapeError(f"x0 must be a tensor of shape [*shape] = {list(system.shape)} or [N, *shape]; "
                         f"got {type(x0).__name__}.")
    shape = tuple(system.shape)
    if tuple(x0.shape) == shape:
        return x0.reshape(1, -1), None
    if x0.dim() == len(shape) + 1 and tuple(x0.shape[1:]) == shape and x0.shape[0] >= 1:
        return x0.reshape(x0.shape[0], -1), int(x0.shape[0])
    raise ShapeError(f"x0 must have shape [*shape] = {list(shape)} or [N, *shape]; got {list(x0.shape)}.")


def inverse_system(system: TriangularSystem, x0: torch.Tensor, exact: bool = False,
                   output_to_eps: tuple[torch.Tensor, torch.Tensor] | None = None) -> TriangularSystem:
    """The triangular system whose solution runs ``system``'s sampler backwards from ``x0``.

    Args:
        system: the forward system (its sampler, denoiser, dtypes and device are used).
        x0: ``[*shape]`` or ``[N, *shape]``.
        exact: ``False`` for DDIM inversion, ``True`` for the implicit (exact) inverse.
        output_to_eps: see :class:`InverseSampler` (only for ``exact=False``: the exact inverse
            solves the forward step as it is, in any parameterisation).
    """
    flat, batch = _batched(x0, system)
    if not torch.isfinite(flat).all():
        raise ShapeError("x0 must be finite.")
    conversion = None if exact else output_to_eps
    custom = getattr(system.sampler, "inverse_sampler", None)  # the extension point (flow samplers)
    if callable(custom):
        sampler = custom(output_to_eps=conversion)
    else:
        sampler = InverseSampler(system.sampler, conversion)
    if not isinstance(sampler, SequentialSampler) or sampler.num_steps != system.num_steps:
        raise InvalidOptionError(f"{type(system.sampler).__name__}.inverse_sampler() must return a "
                                 f"SequentialSampler with {system.num_steps} steps; got {sampler!r}.")
    steps = sampler.num_steps
    noise = torch.zeros(steps + 1, flat.shape[0], flat.shape[1], dtype=system.dtype, device=system.device)
    noise[0] = flat.detach().to(system.device, system.dtype)
    lead = (steps + 1,) if batch is None else (steps + 1, batch)
    kind = ImplicitInverseSystem if exact else TriangularSystem
    return kind(sampler=sampler, denoiser=system.denoiser, shape=system.shape, batch=batch,
                noise=noise.reshape(*lead, *system.shape), dtype=system.dtype, device=system.device,
                model_dtype=system.model_dtype)


def _sequential_exact(system: TriangularSystem, stopping: RMS, max_inner: int) -> Solution:
    """Per-step fixed-point iteration of the implicit equations (the sequential reference)."""
    started = time.perf_counter()
    steps, samples = system.num_steps, system.num_samples
    state_coef, output_coef, _ = system.coefficients()
    states = system.flat_noise.clone()
    evals = 0
    rows = []
    status, message = Status.CONVERGED, "every step's implicit equation met the tolerance"
    sigmas = system.sigmas
    for p in range(1, steps + 1):
        a, b = state_coef[p, 0], output_coef[p, 0]
        current = states[p - 1].clone()  # first guess: the less noisy state
        base = a * states[p - 1]
        for _ in range(max_inner):
            # the model at the step's own (noisier) state, with the key of position p-1: t_{T-p}
            x, t = TriangularSystem.model_inputs(system, current[None], [p - 1])
            e = system.denoise(x, t).reshape(samples, -1).to(system.dtype)
            evals += samples
            residual = base + b * e - current
            rms = residual.pow(2).mean(-1).sqrt().amax()
            tol = max(stopping.tol1, stopping.tol2 * float(sigmas[p]))
            current = current + residual
            if float(rms) <= tol:
                break
        else:
            status = Status.MAX_ITERS
            message = f"step {p} did not meet the tolerance in {max_inner} iterations"
        states[p] = current
        rows.append(float(rms))
    trajectory = system.unflatten(states)
    first_order = torch.full((1, steps + 1), float("nan"), dtype=torch.float64)
    first_order[0, 1:] = torch.tensor(rows, dtype=torch.float64)
    trace = ResidualTrace(first_order, (steps,), ((1, steps),), (evals,))
    return Solution(sample=trajectory[-1], trajectory=trajectory, iterations=evals // samples,
                    model_evals=evals, status=status, message=message, residuals=trace,
                    wall_time=time.perf_counter() - started, solver=None, order=1)


def invert(system: TriangularSystem | Any, x0: torch.Tensor,
           solver: str | type[FixedPointSolver] | FixedPointSolver = "taa", exact: bool = False,
           **solve_options: Any) -> Solution:
    """Recover the noise ``x_T`` from which ``system``'s deterministic sampler produces ``x0``.

    Args:
        system: a :class:`~fpsolve.TriangularSystem` (or an object an adapter turns into one) with
            a deterministic one-step sampler (e.g. DDIM with ``eta=0``); its noise is not used.
        x0: ``[*shape]`` or ``[N, *shape]``: the sample(s) to invert.
        solver: as for :func:`fpsolve.solve` (``"sequential"``: the sequential inverse loop).
        exact: ``False``: DDIM inversion (the model at the less noisy state, as diffusers'
            ``DDIMInverseScheduler``); ``True``: each step's implicit equation solved, so that the
            sampler started from the result reproduces ``x0`` to the tolerance.
        **solve_options: options of :func:`fpsolve.solve` (``tol``, ``window``, ``order``,
            ``history``, ``stopping``, ``max_iters``, ``initializer``, ...). With ``exact=True``
            the stopping rule must be ``rms`` (given by ``tol`` or ``stopping``); ``window="auto"``,
            ``distributed`` and ``differentiable`` are refused; ``max_iters`` defaults to 5 T
            parallel iterations (the safeguard that bounds a triangular solve by T does not hold
            for implicit equations) or, for ``solver="sequential"``, 50 per step. A solve that
            stops short says so in its ``status``.

    Returns:
        A :class:`~fpsolve.Solution` whose ``sample`` is ``x_T`` in ``x0``'s layout and whose
        ``trajectory`` runs from ``x0`` (first) to ``x_T`` (last).

    Raises:
        UnsupportedError: the sampler cannot be inverted (noise injection, multistep); see
            :func:`check_invertible`.
        ShapeError: ``x0`` does not have the system's sample shape.
    """
    system = make_system(system)
    exact = as_flag("exact", exact)
    if solve_options.get("differentiable"):
        raise InvalidOptionError("invert(..., differentiable=True) is not supported; differentiate a "
                                 "forward solve with fpsolve.solve(..., differentiable=True) instead.")
    return solve_inverse(inverse_system(system, x0, exact=exact), solver, exact, **solve_options)


def solve_inverse(inverse: TriangularSystem, solver: Any = "taa", exact: bool = False,
                  **solve_options: Any) -> Solution:
    """Solve a system built by :func:`inverse_system` (what :func:`invert` does after building it).

    ``exact`` must match the one the system was built with; options as for :func:`invert`.
    """
    if exact != isinstance(inverse, ImplicitInverseSystem):
        raise InvalidOptionError(f"solve_inverse(exact={exact}) got a system built with exact={not exact}; "
                                 "build it with inverse_system(..., exact=...) to match.")
    if not exact:
        return solve(inverse, solver, **solve_options)
    return _solve_exact(inverse, solver, dict(solve_options))


def _solve_exact(inverse: TriangularSystem, solver: Any, options: dict[str, Any]) -> Solution:
    for refused in ("distributed", "progress_bar"):
        if options.get(refused) not in (None, False):
            raise InvalidOptionError(f"invert(..., exact=True) does not take {refused}=; leave it unset.")
    if options.get("window") == "auto":
        raise InvalidOptionError("invert(..., exact=True) needs an explicit window (an int or None), "
                                 "not 'auto': the latency model assumes a triangular solve.")
    tol, stopping = options.pop("tol", None), options.pop("stopping", None)
    if tol is not None and stopping is not None:
        raise InvalidOptionError("give tol= (a shortcut for the rms rule) or stopping=, not both.")
    stopping_obj = RMS(tol1=float(tol), tol2=float(tol)) if tol is not None else resolve(
        "stopping rule", stopping if stopping is not None else "rms")
    if not isinstance(stopping_obj, RMS):
        raise InvalidOptionError(
            f"invert(..., exact=True) needs the rms stopping rule (tol= or stopping='rms'); got "
            f"{type(stopping_obj).__name__}: the rule must judge each implicit equation's own residual.")
    solver_options = {k: options.pop(k) for k in ("order", "history", "ridge") if options.get(k) is not None}
    for key in ("order", "history", "ridge"):
        options.pop(key, None)
    passthrough = {"window", "initializer", "max_iters", "observers", "progress"}
    solver_options.update({k: options.pop(k) for k in list(options) if k not in passthrough})
    solver_obj, preset = resolve_method(solver, solver_options)
    if runs_sequentially(solver_obj):
        max_inner = options.get("max_iters") or 50
        return _sequential_exact(inverse, stopping_obj, max_inner)
    initializer = resolve("initializer", options.pop("initializer", None) or "noise_copy")
    max_iters = options.pop("max_iters", None)
    # Unsafeguarded: row U of an implicit system has no exact step, so the anchor may only move
    # over rows whose equation the stopping rule accepted. The rest of the preset's policy (the
    # boundary value of x_0, accepted rows) stays; its window does not (None: all T).
    controller = attrs.evolve(
        preset.controller if preset is not None else Controller(), safeguard=False,
        window=options.pop("window", None),
        max_iters=max_iters if max_iters is not None else _EXACT_ITERS_PER_STEP * inverse.num_steps)
    return solve(inverse, solver_obj, window=controller, stopping=stopping_obj,
                 initializer=_SharedInitializer(initializer), **options)


def reconstruction_error(system: TriangularSystem, x_T: torch.Tensor, x0: torch.Tensor) -> float:
    """RMS distance between ``x0`` and the sequential sampler started from ``x_T`` (a check)."""
    steps = system.num_steps
    flat, batch = _batched(x_T, system)
    noise = torch.zeros(steps + 1, flat.shape[0], flat.shape[1], dtype=system.dtype, device=system.device)
    noise[0] = flat.to(system.device, system.dtype)
    lead = (steps + 1,) if batch is None else (steps + 1, batch)
    forward = TriangularSystem(sampler=system.sampler, denoiser=system.denoiser, shape=system.shape,
                               batch=batch, noise=noise.reshape(*lead, *system.shape), dtype=system.dtype,
                               device=system.device, model_dtype=system.model_dtype)
    sample = solve(forward, "sequential").sample
    difference = sample.reshape(-1, flat.shape[1]) - x0.reshape(-1, flat.shape[1]).to(sample)
    return float(difference.pow(2).mean(-1).sqrt().max())
