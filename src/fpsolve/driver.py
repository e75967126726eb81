"""The sliding-window driver: the only code that knows about windows and anchors.

One iteration, with anchor ``a`` (states ``0..a`` final) and window rows ``lo = a+1 .. hi``:

1. rows entering the window for the first time are filled with a copy of the lowest state
   already initialised (ParaTAA's rule; other initializers fill every row up front);
2. ONE batched denoiser call evaluates ``eps`` at states ``a .. hi-1`` (and, only right after an
   initializer froze a prefix, the few earlier states a multistep sampler reads);
3. the first-order residuals ``r1`` and the solver's order-k residuals come from the system;
4. the stopping rule marks accepted rows; ``U`` is the first row it does not accept;
5. the solver proposes new values for the window; the controller (:class:`fpsolve.control.Controller`)
   decides what the rows take. With its safeguard (the default) accepted rows (``< U``) keep
   their values, row ``U`` is made final with the plain fixed-point step on the solver's order-k
   equations (exact, since every state it reads is accepted; ``boundary="proposal"`` gives it
   the solver's proposal instead, as ParaDiGMS does), and only the rows below ``U`` take the
   solver's proposal. The anchor moves to ``U``: at least one row per iteration, so at most T
   iterations. (Without the safeguard row ``U`` takes the proposal and the anchor moves only
   over accepted rows; with ``update_accepted`` accepted rows take the proposal too.) When every
   row is accepted, the anchor moves to ``hi``; the final state ``x_0``, whose value no model
   call reads, is made final the same way as row ``U``.

The window (clipped to T), the iteration cap and these rules are the controller's; the solver
only proposes, and the driver reads the policy from the controller alone.

Why the order-k step at ``U`` rather than the sampler's one-step update: accepted rows satisfy
their equations only to the tolerance, and their small defects add up along the trajectory
(amplified by ``1/sqrt(abar)`` from the noisy end). The order-k right-hand side at ``U`` is the
frozen-output run from the anchor, which removes the first-order effect of every accepted
defect in the window: on a DDIM-100 test problem at tol 1e-10 the error to the sequential
sample drops from 2e-8 to 2e-10.

Accepted rows keep exactly the values the stopping rule judged, so every stored model output
above the anchor belongs to its final state.

Failure is per sample: samples are independent systems, so a sample whose model outputs or
solver proposal become non-finite is frozen at its last finite iterate (its residuals count as
zero from then on, so it never holds the anchor back) while the others finish; the iteration
is recomputed without it, at no extra model call. The solution then has status
:attr:`~fpsolve.Status.NONFINITE`, a message naming each failed sample, and
``converged_samples`` marking them. Only when every sample has failed does the solve stop early.

Plugin outputs are checked where they enter the loop: an initializer's first guess (shape and
finiteness), a stopping rule's verdict (a bool tensor ``[W]``), a solver's proposal
(``[W, N, D]`` in the state dtype); anything else raises :class:`~fpsolve.errors.PluginOutputError`
naming the plugin.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from .control import Controller, runs_sequentially
from .errors import InvalidOptionError, PluginOutputError
from .initializers import Initializer
from .plugin_marks import plugin_of_class
from .solution import ResidualTrace, Solution, Status
from .solvers.base import FixedPointSolver, WindowView
from .stopping import StoppingRule, StoppingView, rms_per_row
from .system import Evaluator, TriangularSystem
from .validators import is_integer

__all__ = ["DriverConfig", "IterationInfo", "Evaluator", "run", "run_sequential"]

Observer = Callable[["IterationInfo"], Any]


#: The driver's settings before issue 12: the same class as :class:`fpsolve.control.Controller`
#: (``DriverConfig(window=8, max_iters=20)`` still reads as it did).
DriverConfig = Controller


@attrs.define(frozen=True, eq=False)
class IterationInfo:
    """Read-only summary of one iteration, given to observers.

    Attributes:
        iteration: 1-based index; lo, hi: the window rows; anchor: the anchor after the update.
        num_steps: T; evaluations: this iteration's denoiser evaluations; model_evals: so far.
        residual_rms: ``[W]`` first-order residual RMS of the window rows (worst sample).
        converged: ``[W]`` rows the stopping rule accepted.
        states: the whole iterate after this iteration's update, ``[T+1, N, D]`` (``x_T``
            first), as a COPY made when an observer reads it (so an observer can neither change
            the solve by writing to it nor see later iterations in it); ``None`` from the
            sequential loop, which reports rows only. Read it during the call: a copy costs one
            trajectory's memory.
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
    _trajectory: torch.Tensor | None = attrs.field(default=None, repr=False, alias="trajectory")

    @property
    def states(self) -> torch.Tensor | None:
        """A copy of the iterate after this iteration, ``[T+1, N, D]`` (see the class docstring)."""
        return None if self._trajectory is None else self._trajectory.detach().clone()


def _notify(observers: Sequence[Observer], info: IterationInfo) -> None:
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


_DEFAULT_CONTROLLER = Controller()  # frozen, so one shared default is safe


def plugin_label(component: Any) -> str:
    """``'name' (module.Class, from plugin 'x')`` for error messages about a plugin's output."""
    cls = type(component)
    label = f"{getattr(component, 'name', '') or cls.__name__!r} ({cls.__module__}.{cls.__qualname__}"
    plugin = plugin_of_class(cls)  # recorded by the registry when it built its table
    return label + (f", registered by plugin {plugin!r})" if plugin else ")")


def _check_initial_guess(initializer: Initializer, guess: Any, system: TriangularSystem) -> None:
    expected = tuple(system.flat_noise.shape)
    states = getattr(guess, "trajectory", None)
    if not isinstance(states, torch.Tensor) or tuple(states.shape) != expected:
        got = list(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
        raise PluginOutputError(
            f"initializer {plugin_label(initializer)} returned a trajectory of shape {got}; "
            f"expected {list(expected)} ([T+1, N, D], x_T first)."
        )
    steps = system.num_steps
    valid_upto, anchor = guess.valid_upto, guess.anchor
    if not (is_integer(valid_upto) and is_integer(anchor) and 0 <= anchor <= valid_upto <= steps):
        raise PluginOutputError(
            f"initializer {plugin_label(initializer)} returned valid_upto={valid_upto!r} and "
            f"anchor={anchor!r}; "
            f"expected ints with 0 <= anchor <= valid_upto <= T = {steps}."
        )
    known = states[:valid_upto + 1]
    finite = torch.isfinite(known)
    if not bool(finite.all()):
        position, sample = (~finite).flatten(2).any(-1).nonzero()[0].tolist()
        raise InvalidOptionError(
            f"the initial trajectory from initializer {plugin_label(initializer)} is not finite: state "
            f"{position}, sample {sample} holds NaN or inf (before any model call). Give a finite first "
            "guess (e.g. the trajectory of a solve that converged)."
        )


def _check_verdict(stopping: StoppingRule, verdict: Any, width: int, device: torch.device) -> torch.Tensor:
    if verdict is None:
        return torch.zeros(width, dtype=torch.bool, device=device)
    if (not isinstance(verdict, torch.Tensor) or verdict.dtype != torch.bool
            or tuple(verdict.shape) != (width,)):
        got = (f"a {verdict.dtype} tensor of shape {list(verdict.shape)}" if isinstance(verdict, torch.Tensor)
               else f"a {type(verdict).__name__}")
        raise PluginOutputError(
            f"stopping rule {plugin_label(stopping)} returned {got} from converged(); it must return a "
            f"torch.bool tensor of shape [W] = [{width}] (one verdict per window row, True = accepted) "
            "or None."
        )
    return verdict if verdict.device == device else verdict.to(device)


def _check_proposal(solver: FixedPointSolver, proposal: Any, like: torch.Tensor, what: str) -> torch.Tensor:
    if (not isinstance(proposal, torch.Tensor) or tuple(proposal.shape) != tuple(like.shape)
            or proposal.dtype != like.dtype):
        got = (f"a {proposal.dtype} tensor of shape {list(proposal.shape)}"
               if isinstance(proposal, torch.Tensor) else f"a {type(proposal).__name__}")
        raise PluginOutputError(
            f"solver {plugin_label(solver)} returned {got} from {what}; expected a {like.dtype} tensor of "
            f"shape {list(like.shape)} "
            f"({'one row per window row, [W, N, D]' if like.dim() == 3 else 'one state, [N, D]'})."
        )
    return proposal


def _first_bad_positions(values: torch.Tensor, positions: Sequence[int]) -> dict[int, int]:
    """``{sample: first position}`` of every sample with a non-finite entry in ``values`` ``[P, N, D]``."""
    bad = (~torch.isfinite(values)).any(-1)  # [P, N]
    first: dict[int, int] = {}
    for row, sample in bad.nonzero().tolist():
        first.setdefault(sample, positions[row])
    return first


def _bad_samples(values: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: samples with a non-finite entry in ``values`` ``[P, N, D]``."""
    return (~torch.isfinite(values)).any(-1).any(0)


def _failure_summary(failures: dict[int, str], samples: int) -> str:
    listed = "; ".join(f"sample {index}: {why}" for index, why in sorted(failures.items()))
    return (f"{len(failures)} of {samples} samples became non-finite and were frozen at their last finite "
            f"iterate ({listed})")


def _denoiser_failure(system: TriangularSystem, iteration: int, position: int) -> str:
    return (f"the denoiser returned non-finite values at iteration {iteration}, position {position} "
            f"(timestep {system.sampler.timesteps[position]})")


def _solver_failure(solver: FixedPointSolver, iteration: int, position: int) -> str:
    return f"solver {solver.name!r} produced non-finite values at iteration {iteration}, position {position}"


def _record_failures(values: torch.Tensor, positions: Sequence[int], failures: dict[int, str],
                     samples: int, describe: Callable[[int], str]) -> tuple[torch.Tensor, str | None]:
    """Record in ``failures`` every sample with a non-finite entry in ``values`` ``[P, N, D]``
    (``describe(position)`` says why, at its first bad position).

    Returns the ``[N]`` mask of those samples and, when no sample is left to solve, the message
    the solve ends with (else ``None``). Samples already frozen hold finite values, so every
    sample found here is a new failure."""
    _, sample = _first_nonfinite(values, positions)
    for index, at in _first_bad_positions(values, positions).items():
        failures.setdefault(index, describe(at))
    bad = _bad_samples(values)
    if len(failures) < samples:
        return bad, None
    if samples == 1:
        return bad, f"{failures[sample]}, sample {sample}; the last finite iterate is returned"
    return bad, _failure_summary(failures, samples) + "; no sample is left to solve"


def run(system: TriangularSystem, solver: FixedPointSolver, stopping: StoppingRule,
        initializer: Initializer, controller: Controller = _DEFAULT_CONTROLLER,
        observers: Sequence[Observer] = (), evaluate: Evaluator | None = None) -> Solution:
    """Solve ``system`` with a parallel solver under ``controller``'s loop policy; see the module
    docstring for one iteration. The sequential reference solver runs the system's own loop."""
    if not isinstance(controller, Controller):
        raise InvalidOptionError(
            f"controller must be an fpsolve.control.Controller (e.g. Controller(window=8)); "
            f"got {controller!r}.")
    if runs_sequentially(solver):
        return run_sequential(system, observers, solver=solver, evaluate=evaluate, plan=controller.plan)
    evaluate = evaluate or system.evaluate
    started = time.perf_counter()
    steps, samples = system.num_steps, system.num_samples
    order = solver.resolved_order(steps)
    window = controller.window_for(steps)
    max_iters = controller.cap_for(steps)
    safeguard, update_accepted = controller.safeguard, controller.update_accepted
    exact_boundary = controller.boundary == "exact"
    lags = system.affine_form.lags
    guess = initializer.initialize(system)
    _check_initial_guess(initializer, guess, system)
    states = guess.trajectory
    valid_upto, anchor = int(guess.valid_upto), int(guess.anchor)
    outputs = torch.zeros(steps, samples, system.state_size, dtype=system.dtype, device=system.device)
    fresh = [False] * (steps + 1)  # outputs[j] was evaluated at the current states[j]
    age = torch.zeros(steps + 1, dtype=torch.long, device=system.device)
    solver_state = solver.init(system)
    rule_memory: dict[Any, Any] = {}  # the stopping rules' record of this solve (StoppingView.memory)
    recorder = _Recorder(steps)
    iterations, model_evals, parallel = guess.iterations, guess.model_evals, 0
    status, message = Status.CONVERGED, Status.CONVERGED.value
    failures: dict[int, str] = {}  # failed sample -> why (host side, filled only on the rare bad path)
    failed = torch.zeros(samples, dtype=torch.bool, device=system.device)
    failed_rows = failed[None, :, None]

    def iterate(lo: int, hi: int, state: Any) -> tuple[Any, ...]:
        """Everything of one iteration after the model call; no host sync. Failed samples count
        as converged with zero residuals and keep their values."""
        current = states[lo:hi + 1].clone()  # solvers may keep it in their history
        first_rhs = system.first_order_rhs(states, outputs, lo, hi)
        first_order = first_rhs - current
        if failures:
            first_order = first_order.masked_fill(failed_rows, 0.0)
            first_rhs = torch.where(failed_rows, current, first_rhs)
        residual = system.order_residual(first_order, lo, order)
        rhs = first_rhs if order == 1 else current + residual
        verdict = _check_verdict(stopping, stopping.converged(StoppingView(
            parallel, lo, hi, current, first_order, residual,
            system.sigmas[lo:hi + 1], system.step_variances[lo:hi + 1], system, rule_memory)),
            hi - lo + 1, system.device)
        view = WindowView(parallel, lo, hi, current, rhs, residual, first_order, age[lo:hi + 1],
                          states, outputs)
        proposal, new_state = solver.step(view, state)
        proposal = _check_proposal(solver, proposal, current, "step()")
        if failures:
            proposal = torch.where(failed_rows, current, proposal)
        return current, first_order, verdict, view, proposal, new_state

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
        # A copy: the denoiser may write into its input, and the trajectory must not change.
        evaluated = evaluate(states[rows].clone() if isinstance(rows, slice) else states[rows], positions)
        parallel += 1
        iterations += 1
        model_evals += len(positions) * samples
        if failures:  # a frozen sample's outputs are not used; keep them from poisoning the sums
            evaluated = evaluated.masked_fill(failed_rows, 0.0)
        finite = torch.isfinite(evaluated).all()  # read together with the decision: one host sync
        outputs[rows] = evaluated
        for j in positions:
            fresh[j] = True
        age[lo:hi + 1] += 1

        previous_state = solver_state
        current, first_order, verdict, view, proposal, solver_state = iterate(lo, hi, previous_state)
        # The single host sync of the decision, once all of the iteration's device work is queued.
        first_failing, outputs_finite = _decision(verdict, finite)
        if not outputs_finite:
            bad, final = _record_failures(
                evaluated, positions, failures, samples,
                functools.partial(_denoiser_failure, system, parallel))
            if final is not None:
                status, message = Status.NONFINITE, final
                break
            failed |= bad
            evaluated = evaluated.masked_fill(failed_rows, 0.0)
            outputs[rows] = evaluated
            current, first_order, verdict, view, proposal, solver_state = iterate(lo, hi, previous_state)
            first_failing, _ = _decision(verdict, torch.ones((), dtype=torch.bool, device=system.device))
        boundary = None if first_failing == hi - lo + 1 else first_failing
        updated = current.clone()
        accepted = hi - lo + 1 if boundary is None else boundary
        if update_accepted and accepted:
            updated[:accepted] = proposal[:accepted]
        if boundary is None:
            new_anchor, first_changed = hi, hi - lo + 1
            if hi == steps:  # x_0 is made final like row U
                updated[-1] = view.rhs[hi - lo] if exact_boundary else proposal[hi - lo]
                first_changed = hi - lo
        else:
            updated[boundary + 1:] = proposal[boundary + 1:]
            if safeguard:
                updated[boundary] = view.rhs[boundary] if exact_boundary else proposal[boundary]
                new_anchor = lo + boundary
            else:
                updated[boundary] = proposal[boundary]
                new_anchor = lo + boundary - 1
            first_changed = boundary
        if failures:
            updated = torch.where(failed_rows, current, updated)
        if not torch.isfinite(updated).all():
            bad, final = _record_failures(
                updated, list(range(lo, hi + 1)), failures, samples,
                functools.partial(_solver_failure, solver, parallel))
            if final is not None:
                status, message = Status.NONFINITE, final
                break
            failed |= bad
            updated = torch.where(failed_rows, current, updated)
        states[lo:hi + 1] = updated
        if update_accepted:
            first_changed = 0
        for j in range(lo + first_changed, hi + 1):
            fresh[j] = False
        anchor = new_anchor
        rms = rms_per_row(first_order)
        recorder.add(lo, hi, rms, anchor, len(positions) * samples)
        _notify(observers, IterationInfo(parallel, lo, hi, anchor, steps, len(positions) * samples,
                                         model_evals, rms, verdict, trajectory=states))
        reason = stopping.stop(parallel)
        if reason and anchor < steps:
            status, message = Status.STOPPED, f"stopping rule: {reason} (anchor {anchor} of {steps})"
            break

    if valid_upto < steps:  # rows never reached by the window keep the lowest guess
        states[valid_upto + 1:] = states[valid_upto]
    if failures and status is Status.CONVERGED:
        status = Status.NONFINITE
        message = _failure_summary(failures, samples) + "; the other samples converged"
    elif failures and status is not Status.NONFINITE:
        message = f"{message}; {_failure_summary(failures, samples)}"
    _synchronize(system.device)
    trajectory = system.unflatten(states)
    return Solution(sample=trajectory[-1], trajectory=trajectory, iterations=iterations,
                    model_evals=model_evals, status=status, message=message, residuals=recorder.trace(),
                    wall_time=time.perf_counter() - started, solver=solver, order=order, window=window,
                    plan=controller.plan, converged_samples=_converged_samples(status, failures, samples))


def _converged_samples(status: Status, failures: dict[int, str], samples: int) -> torch.Tensor:
    """``[N]`` bool on the CPU: True for samples that converged (see :class:`~fpsolve.Solution`)."""
    done = status is Status.CONVERGED or (status is Status.NONFINITE and len(failures) < samples)
    result = torch.full((samples,), done, dtype=torch.bool)
    for index in failures:
        result[index] = False
    return result


def run_sequential(system: TriangularSystem, observers: Sequence[Observer] = (),
                   solver: FixedPointSolver | None = None, evaluate: Evaluator | None = None,
                   plan: Any = None) -> Solution:
    """The reference: T model calls, each over the N samples, each followed by one exact step.

    ``plan`` is recorded on the solution (a ``window="auto"`` plan that chose this loop).

    A sample whose model output turns non-finite keeps its last finite state from then on (the
    others go on); the solve stops early only when every sample has failed.
    """
    started = time.perf_counter()
    steps, samples = system.num_steps, system.num_samples
    recorder = _Recorder(steps)
    zero = torch.zeros(1, dtype=torch.float64)

    def report(row: int) -> None:
        recorder.add(row, row, zero, row, samples)
        _notify(observers, IterationInfo(row, row, row, row, steps, samples, row * samples, zero,
                                         torch.ones(1, dtype=torch.bool)))

    result = system.sequential(evaluate, on_step=report)
    states, calls, failures = result.states, result.calls, result.failures
    status, message = Status.CONVERGED, "sequential sampling completed"
    if result.stopped_at is not None:
        where = failures[min(failures)] if samples == 1 else None
        status = Status.NONFINITE
        copies = f"; states from {result.stopped_at} on are copies"
        message = (where if where is not None else _failure_summary(failures, samples)) + copies
    elif failures:
        status = Status.NONFINITE
        message = _failure_summary(failures, samples) + "; the other samples completed"
    _synchronize(system.device)
    trajectory = system.unflatten(states)
    return Solution(sample=trajectory[-1], trajectory=trajectory, iterations=calls,
                    model_evals=calls * samples, status=status, message=message, residuals=recorder.trace(),
                    wall_time=time.perf_counter() - started, solver=solver, order=1, window=None,
                    plan=plan, converged_samples=_converged_samples(status, failures, samples))
