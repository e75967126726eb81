"""The sliding-window driver: the only code that knows about windows and anchors.

One iteration, with anchor ``a`` (states ``0..a`` final) and window rows ``lo = a+1 .. hi``:

1. rows entering the window for the first time are filled with a copy of the lowest state
   already initialised (ParaTAA's rule; other initializers fill every row up front);
2. ONE batched denoiser call evaluates ``eps`` at states ``a .. hi-1`` (and, only right after an
   initializer froze a prefix, the few earlier states a multistep sampler reads);
3. the first-order residuals ``r1`` and the solver's order-k residuals come from the system;
4. the stopping rule marks accepted rows; ``U`` is the first row it does not accept;
5. the solver proposes new values for the window; the safeguard then keeps accepted rows
   (``< U``) as they are, gives row ``U`` the plain fixed-point step on the solver's order-k
   equations (exact, since every state it reads is accepted; a solver may override this value
   with :meth:`~fpsolve.FixedPointSolver.final_step`), and takes the solver's proposal
   only below ``U``. The anchor moves to ``U``: at least one row per iteration, so at most T
   iterations. (Solvers with ``safeguarded = False`` give row ``U`` their own proposal and the
   anchor moves only over accepted rows.) When every row is accepted, the anchor moves to
   ``hi``; the final state ``x_0``, whose value no model call reads, takes the same plain step.

Why the order-k step at ``U`` rather than the sampler's one-step update: accepted rows satisfy
their equations only to the tolerance, and their small defects add up along the trajectory
(amplified by ``1/sqrt(abar)`` from the noisy end). The order-k right-hand side at ``U`` is the
frozen-output run from the anchor, which removes the first-order effect of every accepted
defect in the window: on a DDIM-100 test problem at tol 1e-10 the error to the sequential
sample drops from 2e-8 to 2e-10.

Accepted rows keep exactly the values the stopping rule judged, so every stored model output
above the anchor belongs to its final state. Non-finite model outputs or solver proposals stop
the solve with :attr:`~fpsolve.Status.NONFINITE`, keeping the last finite iterate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from .errors import InvalidOptionError
from .initializers import Initializer
from .solution import ResidualTrace, Solution, Status
from .solvers.base import FixedPointSolver, WindowView
from .stopping import StoppingRule, StoppingView, rms_per_row
from .system import TriangularSystem

__all__ = ["DriverConfig", "IterationInfo", "Evaluator", "run", "run_sequential"]

Observer = Callable[["IterationInfo"], Any]
#: ``evaluate(states [P, N, D], positions) -> outputs [P, N, D]``: ONE batched denoiser call.
#: The default is :meth:`TriangularSystem.evaluate`; the distributed driver shards it.
Evaluator = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


def _window_option(instance: Any, attribute: Any, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidOptionError(
            f"window must be an int >= 1 (positions solved per iteration) or None for T; got {value!r}."
        )


def _max_iters_option(instance: Any, attribute: Any, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidOptionError(f"max_iters must be an int >= 1 or None; got {value!r}.")


@attrs.define(frozen=True)
class DriverConfig:
    """Settings of the driver loop.

    Args:
        window: positions solved per iteration (one batched model call over them); ``None``
            means T (the whole trajectory). Larger than T is clipped to T.
        max_iters: cap on parallel iterations; ``None`` means T.
    """

    window: int | None = attrs.field(default=None, validator=_window_option)
    max_iters: int | None = attrs.field(default=None, validator=_max_iters_option)


@attrs.define(frozen=True, eq=False)
class IterationInfo:
    """Read-only summary of one iteration, given to observers.

    Attributes:
        iteration: 1-based index; lo, hi: the window rows; anchor: the anchor after the update.
        num_steps: T; evaluations: this iteration's denoiser evaluations; model_evals: so far.
        residual_rms: ``[W]`` first-order residual RMS of the window rows (worst sample).
        converged: ``[W]`` rows the stopping rule accepted.
    """

    iteration: int
    lo: int
    hi: int
    anchor: int
    num_steps: int
    evaluations: int
    model_evals: int
    residual_rms: torch.Tensor = attrs.field(repr=False)
    converged: torch.Tensor = attrs.field(repr=False)


def _notify(observers: Sequence[Observer], info: IterationInfo) -> None:
    from .registry import get_plugin_manager

    get_plugin_manager().hook.fpsolve_iteration_end(info=info)
    for observer in observers:
        observer(info)


def _first_nonfinite(values: torch.Tensor, positions: Sequence[int]) -> tuple[int, int]:
    bad = (~torch.isfinite(values)).flatten(2).any(-1).nonzero()[0].tolist()
    return positions[bad[0]], bad[1]


def _rows(positions: list[int]) -> slice | list[int]:
    """``positions`` as a slice when consecutive (the usual case): indexing a CUDA tensor with a
    list first copies the index to the device, a blocking copy that synchronises with the host."""
    first = positions[0]
    if positions == list(range(first, first + len(positions))):
        return slice(first, first + len(positions))
    return positions


def _decision(verdict: torch.Tensor, finite: torch.Tensor) -> tuple[int, bool]:
    """The iteration's one device-to-host read: the first row the rule did not accept (``W`` if
    none) and whether the model outputs were finite."""
    failing = (~verdict).to(torch.int32)
    first = torch.where(failing.any(), failing.argmax(), failing.numel())
    index, ok = torch.stack([first, finite.to(first.dtype)]).tolist()
    return int(index), bool(ok)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Recorder:
    """Collects the residual trace."""

    def __init__(self, num_steps: int):
        self.rows: list[tuple[int, int, torch.Tensor]] = []
        self.anchors: list[int] = []
        self.windows: list[tuple[int, int]] = []
        self.evaluations: list[int] = []
        self.num_steps = num_steps

    def add(self, lo: int, hi: int, rms: torch.Tensor, anchor: int, evaluations: int) -> None:
        # Kept on the device until trace(): a copy to the host here would synchronise every iteration.
        self.rows.append((lo, hi, rms.detach()))
        self.anchors.append(anchor)
        self.windows.append((lo, hi))
        self.evaluations.append(evaluations)

    def trace(self) -> ResidualTrace:
        rows = []
        for lo, hi, rms in self.rows:
            row = torch.full((self.num_steps + 1,), float("nan"), dtype=torch.float64)
            row[lo:hi + 1] = rms.to("cpu", torch.float64)
            rows.append(row)
        matrix = torch.stack(rows) if rows else torch.empty(0, self.num_steps + 1, dtype=torch.float64)
        return ResidualTrace(matrix, tuple(self.anchors), tuple(self.windows), tuple(self.evaluations))


_DEFAULT_CONFIG = DriverConfig()  # frozen, so one shared default is safe


def run(system: TriangularSystem, solver: FixedPointSolver, stopping: StoppingRule,
        initializer: Initializer, config: DriverConfig = _DEFAULT_CONFIG,
        observers: Sequence[Observer] = (), evaluate: Evaluator | None = None) -> Solution:
    """Solve ``system`` with a parallel solver; see the module docstring for one iteration."""
    if solver.sequential:
        return run_sequential(system, observers, solver=solver, evaluate=evaluate)
    evaluate = evaluate or system.evaluate
    started = time.perf_counter()
    steps, samples = system.num_steps, system.num_samples
    order = solver.resolved_order(steps)
    window = min(config.window or steps, steps)
    max_iters = config.max_iters or steps
    lags = system.affine_form.lags
    guess = initializer.initialize(system)
    states = guess.trajectory
    if tuple(states.shape) != tuple(system.flat_noise.shape):
        raise InvalidOptionError(
            f"initializer {type(initializer).__name__} returned a trajectory of shape {list(states.shape)}; "
            f"expected {list(system.flat_noise.shape)}."
        )
    valid_upto, anchor = guess.valid_upto, guess.anchor
    outputs = torch.zeros(steps, samples, system.state_size, dtype=system.dtype, device=system.device)
    fresh = [False] * (steps + 1)  # outputs[j] was evaluated at the current states[j]
    age = torch.zeros(steps + 1, dtype=torch.long, device=system.device)
    solver_state = solver.init(system)
    recorder = _Recorder(steps)
    iterations, model_evals, parallel = guess.iterations, guess.model_evals, 0
    status, message = Status.CONVERGED, Status.CONVERGED.value

    while anchor < steps:
        if parallel >= max_iters:
            status = Status.MAX_ITERS
            message = f"reached max_iters={max_iters} with anchor {anchor} of {steps}"
            break
        lo, hi = anchor + 1, min(anchor + window, steps)
        if valid_upto < hi:
            states[valid_upto + 1:hi + 1] = states[valid_upto]
            for j in range(valid_upto + 1, hi + 1):
                fresh[j] = False
            valid_upto = hi
        positions = [j for j in range(max(0, lo - lags), anchor) if not fresh[j]] + list(range(anchor, hi))
        rows = _rows(positions)
        evaluated = evaluate(states[rows].clone() if isinstance(rows, slice) else states[rows], positions)
        parallel += 1
        iterations += 1
        model_evals += len(positions) * samples
        finite = torch.isfinite(evaluated).all()  # read together with the decision: one host sync
        outputs[rows] = evaluated
        for j in positions:
            fresh[j] = True
        age[lo:hi + 1] += 1

        current = states[lo:hi + 1].clone()  # solvers may keep it in their history
        first_rhs = system.first_order_rhs(states, outputs, lo, hi)
        first_order = first_rhs - current
        residual = system.order_residual(first_order, lo, order)
        rhs = first_rhs if order == 1 else current + residual
        verdict = stopping.converged(StoppingView(
            parallel, lo, hi, current, first_order, residual,
            system.sigmas[lo:hi + 1], system.step_variances[lo:hi + 1], system))
        if verdict is None:
            verdict = torch.zeros(hi - lo + 1, dtype=torch.bool, device=system.device)
        view = WindowView(parallel, lo, hi, current, rhs, residual, first_order, age[lo:hi + 1],
                          states, outputs)
        proposal, solver_state = solver.step(view, solver_state)
        # The single host sync of the decision, once all of the iteration's device work is queued.
        first_failing, outputs_finite = _decision(verdict, finite)
        if not outputs_finite:
            position, sample = _first_nonfinite(evaluated, positions)
            status = Status.NONFINITE
            message = (f"the denoiser returned non-finite values at iteration {parallel}, "
                       f"position {position} "
                       f"(timestep {system.sampler.timesteps[position]}), sample {sample}; "
                       "the last finite iterate is returned")
            break
        boundary = None if first_failing == hi - lo + 1 else first_failing
        updated = current.clone()
        accepted = hi - lo + 1 if boundary is None else boundary
        if solver.update_accepted and accepted:
            updated[:accepted] = proposal[:accepted]
        if boundary is None:
            new_anchor, first_changed = hi, hi - lo + 1
            if hi == steps:
                updated[-1] = solver.final_step(view, proposal, hi - lo)
                first_changed = hi - lo
        else:
            updated[boundary + 1:] = proposal[boundary + 1:]
            if solver.safeguarded:
                updated[boundary] = solver.final_step(view, proposal, boundary)
                new_anchor = lo + boundary
            else:
                updated[boundary] = proposal[boundary]
                new_anchor = lo + boundary - 1
            first_changed = boundary
        if not torch.isfinite(updated).all():
            position, sample = _first_nonfinite(updated, list(range(lo, hi + 1)))
            status = Status.NONFINITE
            message = (f"solver {solver.name!r} produced non-finite values at iteration {parallel}, "
                       f"position {position}, sample {sample}; the last finite iterate is returned")
            break
        states[lo:hi + 1] = updated
        if solver.update_accepted:
            first_changed = 0
        for j in range(lo + first_changed, hi + 1):
            fresh[j] = False
        anchor = new_anchor
        rms = rms_per_row(first_order)
        recorder.add(lo, hi, rms, anchor, len(positions) * samples)
        _notify(observers, IterationInfo(parallel, lo, hi, anchor, steps, len(positions) * samples,
                                         model_evals, rms, verdict))
        reason = stopping.stop(parallel)
        if reason and anchor < steps:
            status, message = Status.STOPPED, f"stopping rule: {reason} (anchor {anchor} of {steps})"
            break

    if valid_upto < steps:  # rows never reached by the window keep the lowest guess
        states[valid_upto + 1:] = states[valid_upto]
    _synchronize(system.device)
    trajectory = system.unflatten(states)
    return Solution(sample=trajectory[-1], trajectory=trajectory, iterations=iterations,
                    model_evals=model_evals, status=status, message=message, residuals=recorder.trace(),
                    wall_time=time.perf_counter() - started, solver=solver, order=order)


def run_sequential(system: TriangularSystem, observers: Sequence[Observer] = (),
                   solver: FixedPointSolver | None = None, evaluate: Evaluator | None = None) -> Solution:
    """The reference: T model calls, each over the N samples, each followed by one exact step."""
    evaluate = evaluate or system.evaluate
    started = time.perf_counter()
    steps, samples = system.num_steps, system.num_samples
    states = torch.empty_like(system.flat_noise)
    states[0] = system.flat_noise[0]
    outputs = torch.zeros(steps, samples, system.state_size, dtype=system.dtype, device=system.device)
    recorder = _Recorder(steps)
    status, message = Status.CONVERGED, "sequential sampling completed"
    calls = 0
    for row in range(1, steps + 1):
        evaluated = evaluate(states[row - 1:row], [row - 1])
        calls = row
        if not torch.isfinite(evaluated).all():
            status = Status.NONFINITE
            message = (f"the denoiser returned non-finite values at step {row}, position {row - 1} "
                       f"(timestep {system.sampler.timesteps[row - 1]}); states from {row} on are copies")
            states[row:] = states[row - 1]
            break
        outputs[row - 1] = evaluated[0]
        states[row] = system.first_order_rhs(states, outputs, row, row)[0]
        zero = torch.zeros(1, dtype=torch.float64)
        recorder.add(row, row, zero, row, samples)
        _notify(observers, IterationInfo(row, row, row, row, steps, samples, row * samples, zero,
                                         torch.ones(1, dtype=torch.bool)))
    _synchronize(system.device)
    trajectory = system.unflatten(states)
    return Solution(sample=trajectory[-1], trajectory=trajectory, iterations=calls,
                    model_evals=calls * samples, status=status, message=message, residuals=recorder.trace(),
                    wall_time=time.perf_counter() - started, solver=solver, order=1)
