"""The conformance checks, as plain functions: each raises :class:`ConformanceError` on failure.

The test-class mixins of :mod:`fpsolve.testing.conformance` and the ``fpsolve_conformance``
pytest fixture call these; they also work outside pytest (``check_solver(MySolver())`` in a
notebook). Every check builds its own small problems (:mod:`fpsolve.testing.problems`), so a
component is judged on one-step, stochastic and multistep samplers without any set-up.

What "conforms" means, per kind:

* every component: the interface (base class, ``name``), deterministic results, any batch
  shape and sample shape, float32 and float64, any device (the result stays on the system's);
* solvers: the ``step`` contract (a proposal of the window's shape, dtype and device), parity
  with the sequential sample at a tight tolerance, and at most T iterations when claimed;
* samplers: a valid affine form and noise schedule, every built-in parallel solver reproducing
  its sequential run within T iterations, and agreement with the author's own loop if given;
* stopping rules: a ``[W]`` bool verdict on the view's device (or ``None``), and safe use with
  every built-in solver (and parity, given a tight configuration);
* initializers: a guess of the right shape, dtype and device that keeps ``x_T``, from which the
  solvers reach the sequential sample.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, cast

import attrs
import torch

from ..api import solve
from ..control import Controller, runs_sequentially
from ..errors import NotConvergedWarning
from ..initializers import FromTrajectory, InitialGuess, Initializer
from ..registry import preset_for, resolve
from ..samplers.base import MODEL_OUTPUTS, AffineForm, SequentialSampler
from ..solution import Solution, Status
from ..solvers.base import FixedPointSolver, WindowView
from ..stopping import RMS, StoppingRule, StoppingView
from ..system import TriangularSystem
from .problems import SAMPLER_KINDS, available_devices, make_system

__all__ = [
    "ConformanceError",
    "tight_stopping",
    "solver_controller",
    "assert_same_sample",
    "check_solver_interface",
    "check_solver_step_contract",
    "check_solver_parity",
    "check_solver_iteration_bound",
    "check_solver_determinism",
    "check_solver_shapes",
    "check_solver_dtype",
    "check_solver_device",
    "check_sampler_interface",
    "check_sampler_parity",
    "check_sampler_reference",
    "check_sampler_determinism",
    "check_sampler_dtype_device",
    "check_stopping_rule_contract",
    "check_stopping_rule_in_solves",
    "check_stopping_rule_parity",
    "check_initializer_contract",
    "check_initializer_parity",
    "check_initializer_determinism",
    "check_solver",
    "check_sampler",
    "check_stopping_rule",
    "check_initializer",
    "SHAPE_CASES",
]


class ConformanceError(AssertionError):
    """A component broke the fpsolve contract; the message says which part and how to fix it."""


def _fail(component: Any, message: str) -> ConformanceError:
    return ConformanceError(f"{_label(component)}: {message}")


def _label(component: Any) -> str:
    name = getattr(component, "name", "") or "(no name)"
    return f"{type(component).__name__} {name!r}"


SHAPE_CASES: tuple[tuple[int | None, tuple[int, ...], int], ...] = (
    (None, (4,), 8),
    (3, (2, 3), 8),
    (2, (3,), 1),
)
"""``(batch, shape, steps)`` cases of :func:`check_solver_shapes`: no batch axis, a batch of
matrix-shaped samples, and the one-step edge case."""


def tight_stopping(
    solver: FixedPointSolver | None = None, dtype: torch.dtype = torch.float64
) -> StoppingRule:
    """The rule a parity check uses: the rule of the solver's preset if it has one, else ``rms``
    at 1e-12 (float64) or 1e-5 (float32, where 1e-12 is below rounding)."""
    if solver is not None:
        preset = preset_for(type(solver))
        if preset is not None and preset.stopping is not None:
            return preset.stopping
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    return RMS(tol1=tol, tol2=tol)


def solver_controller(solver: FixedPointSolver, controller: Controller | None = None) -> Controller:
    """The controller the checks run ``solver`` under: ``controller`` when given, else the one
    ``fpsolve.solve(system, solver)`` uses (its preset's, :func:`fpsolve.registry.preset_for`,
    else the plain safeguarded one)."""
    if controller is not None:
        return controller
    preset = preset_for(type(solver))
    return preset.controller if preset is not None else Controller()


def _cap(solver: FixedPointSolver, unbounded: int, controller: Controller | None = None) -> int | None:
    """``None`` (the controller's cap) for a solver whose controller bounds the iterations by T,
    else ``unbounded``: an unsafeguarded solve may need more than T iterations."""
    return None if solver_controller(solver, controller).bounds_iterations() else unbounded


def _window(controller: Controller | None, window: int | None = None) -> Any:
    """``solve``'s ``window=``: the given controller with ``window`` applied, or just ``window``."""
    return window if controller is None else controller.override(window=window)


def assert_same_sample(component: Any, got: Solution, expected: Solution, atol: float, what: str) -> None:
    """``got`` reproduces ``expected`` (sample and trajectory) within ``atol`` relative to its scale."""
    if got.sample.shape != expected.sample.shape:
        raise _fail(
            component,
            f"{what}: sample shape {list(got.sample.shape)}, expected {list(expected.sample.shape)}.",
        )
    scale = 1.0 + float(expected.trajectory.abs().max())
    error = float((got.trajectory.to(expected.trajectory) - expected.trajectory).abs().max())
    if not error <= atol * scale:  # also catches NaN
        raise _fail(
            component,
            f"{what}: max abs error {error:.3e} to the sequential trajectory exceeds "
            f"{atol:.1e} x {scale:.3g} (status {got.status.name}, {got.iterations} iterations, "
            f"{got.message}).",
        )


# -- solvers ---------------------------------------------------------------------------------------


def check_solver_interface(solver: FixedPointSolver) -> None:
    """A :class:`~fpsolve.FixedPointSolver` instance with a ``name``, a frozen attrs config."""
    if not isinstance(solver, FixedPointSolver):
        raise ConformanceError(f"{solver!r} is not a fpsolve.FixedPointSolver instance.")
    if not isinstance(solver.name, str) or not solver.name:
        raise _fail(solver, "set the class attribute name (its registry name).")
    if runs_sequentially(solver):
        raise _fail(
            solver, "fpsolve.solvers.Sequential is reserved for the reference (it runs as the system's "
            "own loop); a parallel solver subclasses FixedPointSolver."
        )
    if not attrs.has(type(solver)):
        raise _fail(
            solver,
            "make it an attrs class (@attrs.define(frozen=True, kw_only=True)) so that "
            "fpsolve.solve(..., option=value) can validate and replace its options.",
        )
    fields = attrs.fields(cast(Any, type(solver)))
    if fields:
        try:
            setattr(solver, fields[0].name, getattr(solver, fields[0].name))
        except attrs.exceptions.FrozenInstanceError:
            pass
        else:
            raise _fail(
                solver,
                "its attrs class must be frozen (frozen=True): a solver is an immutable config; "
                "state between iterations lives in the value init() returns.",
            )
    for steps in (1, 5):
        order = solver.resolved_order(steps)
        if not (isinstance(order, int) and 1 <= order <= steps):
            raise _fail(solver, f"resolved_order({steps}) must be an int in 1..{steps}; got {order!r}.")


def _window_view(
    system: TriangularSystem,
    states: torch.Tensor,
    lo: int,
    hi: int,
    order: int,
    iteration: int,
    age: torch.Tensor,
) -> WindowView:
    steps = system.num_steps
    outputs = torch.zeros(
        steps, system.num_samples, system.state_size, dtype=system.dtype, device=system.device
    )
    positions = list(range(steps))
    outputs[:] = system.evaluate(states[:steps], positions)
    current = states[lo : hi + 1].clone()
    first_rhs = system.first_order_rhs(states, outputs, lo, hi)
    first_order = first_rhs - current
    residual = system.order_residual(first_order, lo, order)
    rhs = first_rhs if order == 1 else current + residual
    # newer drivers also show the whole iterate and the model outputs; pass them where the view has them
    extra = {
        name: value
        for name, value in (("trajectory", states), ("outputs", outputs))
        if name in attrs.fields_dict(WindowView)
    }
    return WindowView(iteration, lo, hi, current, rhs, residual, first_order, age, **extra)


def _check_tensor(solver: Any, value: Any, like: torch.Tensor, what: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise _fail(solver, f"{what} must be a torch.Tensor; got {type(value).__name__}.")
    if value.shape != like.shape:
        raise _fail(
            solver,
            f"{what} has shape {list(value.shape)}; expected {list(like.shape)} "
            "(window rows x samples x state size).",
        )
    if value.dtype != like.dtype:
        raise _fail(
            solver,
            f"{what} has dtype {value.dtype}; expected the state dtype {like.dtype} "
            "(compute in any precision, return the state's).",
        )
    if value.device != like.device:
        raise _fail(solver, f"{what} is on {value.device}; expected the state's device {like.device}.")
    if not torch.isfinite(value).all():
        raise _fail(solver, f"{what} has non-finite values on a well-conditioned problem.")


def check_solver_step_contract(solver: FixedPointSolver, system: TriangularSystem) -> None:
    """``init`` then two ``step`` calls on a sliding window: proposals ``[W, N, D]`` of the state's
    dtype and device, finite."""
    steps = system.num_steps
    order = solver.resolved_order(steps)
    states = system.flat_noise.clone()
    states[1:] = states[0]  # the noise-copy guess
    state = solver.init(system)
    width = max(1, min(steps, 4))
    for iteration, lo in enumerate((1, min(2, steps)), start=1):
        hi = min(lo + width - 1, steps)
        age = torch.full((hi - lo + 1,), iteration, dtype=torch.long, device=system.device)
        view = _window_view(system, states, lo, hi, order, iteration, age)
        result = solver.step(view, state)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise _fail(solver, "step(view, state) must return a pair (proposal, new_state).")
        proposal, state = result
        _check_tensor(solver, proposal, view.states, f"step() proposal (iteration {iteration})")
        states[lo : hi + 1] = proposal


def check_solver_parity(
    solver: FixedPointSolver,
    system: TriangularSystem,
    *,
    window: int | None = None,
    stopping: StoppingRule | None = None,
    atol: float = 1e-8,
    max_iters: int | None = None,
    controller: Controller | None = None,
) -> Solution:
    """At a tight tolerance the solve converges to the sequential trajectory (under
    ``controller``, default: the solver's preset's)."""
    reference = solve(system, "sequential")
    rule = stopping if stopping is not None else tight_stopping(solver, system.dtype)
    cap = max_iters if max_iters is not None else _cap(solver, 4 * system.num_steps, controller)
    solution = solve(system, solver, window=_window(controller, window), stopping=rule, max_iters=cap)
    if not solution.converged:
        raise _fail(
            solver,
            f"did not converge on {_describe(system)} with window={window} and {rule!r}: "
            f"{solution.status.name}, {solution.message}.",
        )
    assert_same_sample(solver, solution, reference, atol, f"{_describe(system)}, window={window}")
    return solution


def check_solver_iteration_bound(
    solver: FixedPointSolver, system: TriangularSystem, *, window: int | None = None, seed: int = 0,
    controller: Controller | None = None,
) -> None:
    """From a random guess and with no row ever accepted early, a solver that claims the bound
    finishes within T iterations, the anchor advancing every iteration, and stays exact."""
    steps = system.num_steps
    reference = solve(system, "sequential")
    guess = torch.randn(
        reference.trajectory.shape, dtype=system.dtype, generator=torch.Generator().manual_seed(seed)
    ).to(system.device)
    init = FromTrajectory(trajectory=guess)
    # A rule that judges no rows: only the finite-termination argument can finish the solve
    # (the cap T + 1 lets a solver that breaks the claim show it).
    with warnings.catch_warnings():  # a solver that breaks the claim hits the cap: reported below
        warnings.simplefilter("ignore", NotConvergedWarning)
        solution = solve(
            system, solver, window=_window(controller, window), initializer=init, stopping=StoppingRule(),
            max_iters=steps + 1
        )
    parallel = len(solution.residuals)
    if not solution.converged or parallel > steps:
        raise _fail(
            solver,
            f"claims at most T iterations but took {parallel} on {_describe(system)} "
            f"(window={window}, status {solution.status.name}); run it under a safeguarded "
            "controller (its preset's Controller(safeguard=True)) or drop the claim.",
        )
    anchors = (0,) + solution.residuals.anchors
    if any(b <= a for a, b in zip(anchors, anchors[1:], strict=False)):
        raise _fail(solver, f"the anchor did not advance every iteration: {anchors}.")
    assert_same_sample(solver, solution, reference, 1e-8, f"finite termination on {_describe(system)}")


def check_solver_determinism(
    solver: FixedPointSolver, system: TriangularSystem, *, stopping: StoppingRule | None = None,
    controller: Controller | None = None,
) -> None:
    """Two solves of the same problem give bit-identical trajectories and the same counts."""
    rule = stopping if stopping is not None else tight_stopping(solver, system.dtype)
    cap = _cap(solver, 4 * system.num_steps, controller)
    first = solve(system, solver, window=_window(controller), stopping=rule, max_iters=cap)
    second = solve(system, solver, window=_window(controller), stopping=rule, max_iters=cap)
    if (first.iterations, first.model_evals) != (second.iterations, second.model_evals):
        raise _fail(
            solver,
            f"is not deterministic: {first.iterations} then {second.iterations} iterations "
            f"on {_describe(system)} (no global random state: draw from the system's noise).",
        )
    # The residual trace records every iterate: equal samples can hide different paths to them.
    same_trace = torch.equal(
        first.residuals.first_order.nan_to_num(-1.0), second.residuals.first_order.nan_to_num(-1.0)
    )
    if not torch.equal(first.trajectory, second.trajectory) or not same_trace:
        raise _fail(
            solver,
            f"is not deterministic: two solves of {_describe(system)} gave different "
            "iterates (no global random state, no in-place changes to shared tensors).",
        )


def check_solver_shapes(
    solver: FixedPointSolver,
    *,
    stopping: StoppingRule | None = None,
    atol: float = 1e-8,
    cases: Sequence[tuple[int | None, tuple[int, ...], int]] = SHAPE_CASES,
    controller: Controller | None = None,
) -> None:
    """Any batch (``None`` or N), any sample shape, and T = 1 give the sequential shapes and sample."""
    for batch, shape, steps in cases:
        system = make_system("ddim", steps=steps, shape=shape, batch=batch)
        check_solver_parity(solver, system, stopping=stopping, atol=atol, controller=controller)


def check_solver_dtype(
    solver: FixedPointSolver,
    dtype: torch.dtype,
    *,
    stopping: StoppingRule | None = None,
    atol: float | None = None,
    controller: Controller | None = None,
) -> None:
    """A system in ``dtype`` gives a result in ``dtype``, close to that dtype's sequential sample."""
    system = make_system("ddim", dtype=dtype)
    reference = solve(system, "sequential")
    rule = stopping if stopping is not None else tight_stopping(solver, dtype)
    cap = _cap(solver, 4 * system.num_steps, controller)
    solution = solve(system, solver, window=_window(controller), stopping=rule, max_iters=cap)
    for name, value in (("sample", solution.sample), ("trajectory", solution.trajectory)):
        if value.dtype != dtype:
            raise _fail(solver, f"returned a {name} of dtype {value.dtype} for a {dtype} system.")
    tolerance = atol if atol is not None else (1e-8 if dtype == torch.float64 else 2e-4)
    assert_same_sample(solver, solution, reference, tolerance, f"a {dtype} system")


def check_solver_device(
    solver: FixedPointSolver,
    device: str | torch.device,
    *,
    stopping: StoppingRule | None = None,
    atol: float = 1e-6,
    controller: Controller | None = None,
) -> None:
    """A system on ``device`` gives a result on ``device`` that matches the CPU result."""
    cpu = check_solver_parity(solver, make_system("ddim"), stopping=stopping, controller=controller)
    system = make_system("ddim", device=device)
    rule = stopping if stopping is not None else tight_stopping(solver, system.dtype)
    solution = solve(system, solver, window=_window(controller), stopping=rule,
                     max_iters=_cap(solver, 40, controller))
    target = torch.device(device)
    for name, value in (("sample", solution.sample), ("trajectory", solution.trajectory)):
        if value.device.type != target.type:
            raise _fail(solver, f"returned a {name} on {value.device} for a system on {target}.")
    assert_same_sample(solver, solution, cpu, atol, f"a system on {target} (compared with the CPU)")


def _describe(system: TriangularSystem) -> str:
    batch = "no batch" if system.batch is None else f"batch {system.batch}"
    return (
        f"{type(system.sampler).__name__}-{system.num_steps} ({batch}, shape {list(system.shape)}, "
        f"{system.dtype}, {system.device})"
    )


# -- samplers --------------------------------------------------------------------------------------


def check_sampler_interface(sampler: SequentialSampler) -> None:
    """A :class:`~fpsolve.SequentialSampler` with a valid affine form and noise schedule."""
    if not isinstance(sampler, SequentialSampler):
        raise ConformanceError(f"{sampler!r} is not a fpsolve.SequentialSampler instance.")
    if not isinstance(sampler.name, str) or not sampler.name:
        raise _fail(sampler, "set the class attribute name (its registry name).")
    steps = sampler.num_steps
    if steps < 1 or len(sampler.timesteps) != steps:
        raise _fail(sampler, f"needs at least one timestep; num_steps is {steps}.")
    if sampler.prediction not in MODEL_OUTPUTS:
        raise _fail(sampler, f"prediction must be one of {MODEL_OUTPUTS} (what its model returns); "
                             f"got {sampler.prediction!r}.")
    if not isinstance(sampler.continuous_time, bool):
        raise _fail(sampler, f"continuous_time must be a bool; got {sampler.continuous_time!r}.")
    if not sampler.continuous_time and any(float(t) != int(t) for t in sampler.timesteps):
        raise _fail(sampler, "has fractional timesteps but continuous_time is False (the model would be "
                             "called with them rounded to integers); set continuous_time = True.")
    form = sampler.affine_form()
    if not isinstance(form, AffineForm):
        raise _fail(
            sampler, f"affine_form() must return a fpsolve.samplers.AffineForm; got {type(form).__name__}."
        )
    if form.num_steps != steps:
        raise _fail(sampler, f"affine_form() has {form.num_steps} steps; the sampler has {steps} timesteps.")
    for method in ("state_sigmas", "step_variances"):
        values = getattr(sampler, method)()
        if not isinstance(values, torch.Tensor) or tuple(values.shape) != (steps + 1,):
            got = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise _fail(
                sampler, f"{method}() must return a tensor [T+1] = [{steps + 1}] (x_T first); got {got}."
            )
        if not torch.isfinite(values).all() or (values < 0).any():
            raise _fail(sampler, f"{method}() must be finite and >= 0.")


def check_sampler_parity(sampler: SequentialSampler, *, batch: int | None = 2, atol: float = 1e-8) -> None:
    """Every built-in parallel solver, with and without a window, reproduces the sequential run
    within T iterations (the system is triangular, so the bound always holds)."""
    system = make_system(sampler, batch=batch)
    steps = system.num_steps
    for name, options in (("fp", {"order": 1}), ("fp", {}), ("taa", {}), ("taa", {"history": 3})):
        for window in (None, max(1, steps // 3)):
            solution = check_solver_parity(solve_solver(name, options), system, window=window, atol=atol)
            if len(solution.residuals) > steps:
                raise _fail(
                    sampler, f"{name} {options} took {len(solution.residuals)} > T = {steps} iterations."
                )


def solve_solver(name: str, options: dict[str, Any]) -> FixedPointSolver:
    """A built-in solver instance by name (a helper for the checks)."""
    return resolve("solver", name, options)


def check_sampler_reference(
    sampler: SequentialSampler, reference: Callable[[TriangularSystem], torch.Tensor], *, atol: float = 1e-10
) -> None:
    """fpsolve's sequential run of the affine form equals the author's own sampling loop.

    ``reference(system)`` returns the trajectory ``[T+1, *batch, *shape]`` of the author's loop,
    run with ``system.denoiser`` from ``system.flat_noise`` (``[0]`` is x_T, ``[i]`` the noise of step i).
    """
    system = make_system(sampler)
    expected = torch.as_tensor(reference(system))
    got = solve(system, "sequential").trajectory
    if tuple(expected.shape) != tuple(got.shape):
        raise _fail(
            sampler, f"the reference loop returned shape {list(expected.shape)}; expected {list(got.shape)}."
        )
    error = float((got - expected.to(got)).abs().max())
    if not error <= atol * (1 + float(expected.abs().max())):
        raise _fail(
            sampler, f"its affine form disagrees with its own sampling loop: max abs error {error:.3e}."
        )


def check_sampler_determinism(sampler: SequentialSampler) -> None:
    """The affine form and schedules are the same on every call."""
    first, second = sampler.affine_form(), sampler.affine_form()
    for name in ("state", "output", "noise"):
        if not torch.equal(getattr(first, name), getattr(second, name)):
            raise _fail(sampler, f"affine_form().{name} differs between two calls.")
    for method in ("state_sigmas", "step_variances"):
        if not torch.equal(getattr(sampler, method)(), getattr(sampler, method)()):
            raise _fail(sampler, f"{method}() differs between two calls.")


def check_sampler_dtype_device(
    sampler: SequentialSampler, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> None:
    """A system in ``dtype`` on ``device`` solves to the float64 CPU sequential sample."""
    expected = solve(make_system(sampler), "sequential")
    system = make_system(sampler, dtype=dtype, device=device)
    for name in ("sequential", "taa"):
        options: dict[str, Any] = ({} if name == "sequential"  # takes no rule
                                   else {"stopping": tight_stopping(None, dtype)})
        solution = solve(system, name, **options)
        if solution.sample.dtype != dtype or solution.sample.device.type != torch.device(device).type:
            raise _fail(
                sampler,
                f"{name} returned {solution.sample.dtype} on {solution.sample.device} for a "
                f"{dtype} system on {device}.",
            )
        assert_same_sample(
            sampler,
            solution,
            expected,
            1e-8 if dtype == torch.float64 else 2e-4,
            f"{name} in {dtype} on {device}",
        )


# -- stopping rules --------------------------------------------------------------------------------


def _stopping_views(system: TriangularSystem) -> list[StoppingView]:
    """Views of a noise-copy guess and of the exact trajectory, whole window and a slid one."""
    steps = system.num_steps
    exact = solve(system, "sequential").trajectory.reshape(system.flat_noise.shape).to(system.device)
    guess = system.flat_noise.clone()
    guess[1:] = guess[0]
    views = []
    for states in (guess, exact):
        for lo, hi in ((1, steps), (min(2, steps), min(steps, 4))):
            view = _window_view(
                system,
                states,
                lo,
                hi,
                steps,
                1,
                torch.ones(hi - lo + 1, dtype=torch.long, device=system.device),
            )
            views.append(
                StoppingView(
                    1,
                    lo,
                    hi,
                    view.states,
                    view.first_order,
                    view.residual,
                    system.sigmas[lo : hi + 1],
                    system.step_variances[lo : hi + 1],
                    system,
                )
            )
    return views


def check_stopping_rule_contract(rule: StoppingRule, system: TriangularSystem) -> None:
    """``converged`` returns ``None`` or a ``[W]`` bool tensor on the view's device, the same
    for the same view; ``stop`` returns ``None`` or a message."""
    if not isinstance(rule, StoppingRule):
        raise ConformanceError(f"{rule!r} is not a fpsolve.StoppingRule instance.")
    for view in _stopping_views(system):
        verdict = rule.converged(view)
        if verdict is None:
            continue
        width = view.hi - view.lo + 1
        if (
            not isinstance(verdict, torch.Tensor)
            or verdict.dtype != torch.bool
            or tuple(verdict.shape) != (width,)
        ):
            got = (
                f"{verdict.dtype} {list(verdict.shape)}"
                if isinstance(verdict, torch.Tensor)
                else type(verdict).__name__
            )
            raise _fail(
                rule,
                f"converged() must return None or a bool tensor [W] = [{width}] (one verdict per "
                f"window row, all samples together); got {got}.",
            )
        if verdict.device != view.states.device:
            raise _fail(
                rule,
                f"converged() returned a verdict on {verdict.device}; the view is on {view.states.device}.",
            )
        again = rule.converged(view)
        if again is None or not torch.equal(verdict, again):
            raise _fail(rule, "converged() is not deterministic: two calls on the same view disagree.")
    for iteration in (1, 2, 1000):
        message = rule.stop(iteration)
        if message is not None and not (isinstance(message, str) and message):
            raise _fail(rule, f"stop({iteration}) must return None or a non-empty message; got {message!r}.")


def check_stopping_rule_in_solves(rule: StoppingRule, system: TriangularSystem) -> None:
    """Every built-in parallel solver runs with the rule (alone and combined with ``rms``): a
    finite result, and at most T iterations for the safeguarded ones."""
    steps = system.num_steps
    for rules in (rule, rule & RMS(), rule | RMS()):
        for name in ("fp", "jacobi", "taa"):
            solution = solve(system, name, stopping=rules, window=max(1, steps // 2))
            if solution.status is Status.NONFINITE or not torch.isfinite(solution.trajectory).all():
                raise _fail(rule, f"solver {name} produced non-finite values with it: {solution.message}.")
            if len(solution.residuals) > steps:
                raise _fail(rule, f"solver {name} took {len(solution.residuals)} > T iterations with it.")


def check_stopping_rule_parity(rule: StoppingRule, system: TriangularSystem, atol: float = 1e-6) -> None:
    """With the rule in a tight configuration, fp and taa reproduce the sequential sample."""
    for name in ("fp", "taa"):
        check_solver_parity(solve_solver(name, {}), system, stopping=rule, atol=atol)


# -- initializers ----------------------------------------------------------------------------------


def check_initializer_contract(initializer: Initializer, system: TriangularSystem) -> InitialGuess:
    """``initialize`` returns an :class:`~fpsolve.initializers.InitialGuess` ``[T+1, N, D]`` in the
    system's dtype and device, with ``0 <= anchor <= valid_upto <= T``, finite guessed rows, and
    ``x_T`` kept when nothing is frozen."""
    if not isinstance(initializer, Initializer):
        raise ConformanceError(f"{initializer!r} is not a fpsolve.Initializer instance.")
    if not isinstance(initializer.name, str) or not initializer.name:
        raise _fail(initializer, "set the class attribute name (its registry name).")
    guess = initializer.initialize(system)
    if not isinstance(guess, InitialGuess):
        raise _fail(
            initializer,
            f"initialize() must return a fpsolve.initializers.InitialGuess; got {type(guess).__name__}.",
        )
    trajectory, steps = guess.trajectory, system.num_steps
    if not 0 <= guess.anchor <= guess.valid_upto <= steps:
        raise _fail(
            initializer,
            f"needs 0 <= anchor <= valid_upto <= T = {steps}; got anchor {guess.anchor}, "
            f"valid_upto {guess.valid_upto}.",
        )
    if isinstance(trajectory, torch.Tensor) and trajectory.shape == system.flat_noise.shape:
        # rows after valid_upto are filled by the driver, so only the guessed rows must be finite
        _check_tensor(
            initializer,
            trajectory[: guess.valid_upto + 1],
            system.flat_noise[: guess.valid_upto + 1],
            "InitialGuess.trajectory (rows 0..valid_upto)",
        )
    else:
        _check_tensor(initializer, trajectory, system.flat_noise, "InitialGuess.trajectory")
    if guess.iterations < 0 or guess.model_evals < 0:
        raise _fail(initializer, "iterations and model_evals must be >= 0.")
    if guess.anchor == 0 and not torch.equal(trajectory[0], system.flat_noise[0]):
        raise _fail(initializer, "changed x_T (trajectory[0]); it must be the system's first noise draw.")
    return guess


def check_initializer_parity(initializer: Initializer, system: TriangularSystem, atol: float = 1e-8) -> None:
    """From the guess, fp and taa reach the sequential sample within T parallel iterations."""
    steps = system.num_steps
    reference = solve(system, "sequential")
    for name in ("fp", "taa"):
        solution = solve(system, name, initializer=initializer, stopping=tight_stopping(None, system.dtype))
        if len(solution.residuals) > steps:
            raise _fail(
                initializer, f"{name} took {len(solution.residuals)} > T = {steps} parallel iterations."
            )
        if not solution.converged:
            raise _fail(initializer, f"{name} did not converge from the guess: {solution.message}.")
        tolerance = atol if system.dtype == torch.float64 else 2e-4
        assert_same_sample(
            initializer, solution, reference, tolerance, f"{name} from the guess, {_describe(system)}"
        )


def check_initializer_determinism(initializer: Initializer, system: TriangularSystem) -> None:
    """Two calls give the same guess."""
    first, second = initializer.initialize(system), initializer.initialize(system)
    rows = slice(0, first.valid_upto + 1)
    same = (first.valid_upto, first.anchor) == (second.valid_upto, second.anchor)
    if not same or not torch.equal(first.trajectory[rows], second.trajectory[rows]):
        raise _fail(initializer, "initialize() is not deterministic: two calls gave different guesses.")


# -- everything at once ----------------------------------------------------------------------------


def _run_all(component: Any, checks: Sequence[tuple[str, Callable[[], Any]]]) -> None:
    failures = []
    for label, check in checks:
        try:
            check()
        except ConformanceError as error:
            failures.append(f"- {label}: {error}")
        except Exception as error:  # the component raised: that is a failure of this check too
            failures.append(f"- {label}: raised {type(error).__name__}: {error}")
    if failures:
        raise ConformanceError(
            f"{_label(component)} failed {len(failures)} of {len(checks)} conformance "
            "checks:\n" + "\n".join(failures)
        )


def check_solver(
    solver: FixedPointSolver,
    *,
    stopping: StoppingRule | None = None,
    claims_at_most_steps: bool | None = None,
    samplers: Sequence[str] = SAMPLER_KINDS,
    windows: Sequence[int | None] = (None, 3),
    devices: Sequence[str] | None = None,
    atol: float = 1e-8,
    controller: Controller | None = None,
) -> None:
    """Run every solver check; one :class:`ConformanceError` lists all failures.

    Args:
        solver: the solver instance to judge.
        stopping: the tight rule for parity (default: :func:`tight_stopping`).
        claims_at_most_steps: whether to hold the solver to T iterations (default: whether its
            controller (:func:`solver_controller`) is safeguarded).
        samplers: problem samplers (:data:`~fpsolve.testing.problems.SAMPLER_KINDS`).
        windows: windows for the parity and bound checks (``None``: the solver's default).
        devices: devices to check (default: the CPU and every visible GPU).
        atol: parity tolerance in float64, relative to the trajectory's scale.
        controller: the loop policy to check the solver under (default: its preset's).
    """
    checks: list[tuple[str, Callable[[], Any]]] = [("interface", partial(check_solver_interface, solver))]
    policy = solver_controller(solver, controller)
    bound = policy.bounds_iterations() if claims_at_most_steps is None else claims_at_most_steps
    for kind in samplers:
        system = make_system(kind)
        checks.append((f"step contract [{kind}]", partial(check_solver_step_contract, solver, system)))
        checks.append(
            (f"determinism [{kind}]", partial(check_solver_determinism, solver, system, stopping=stopping,
                                              controller=controller))
        )
        for window in windows:
            checks.append(
                (
                    f"parity [{kind}, window={window}]",
                    partial(check_solver_parity, solver, system, window=window, stopping=stopping, atol=atol,
                            controller=controller),
                )
            )
            if bound:
                checks.append(
                    (
                        f"at most T iterations [{kind}, window={window}]",
                        partial(check_solver_iteration_bound, solver, system, window=window,
                                controller=controller),
                    )
                )
    checks.append(("shapes", partial(check_solver_shapes, solver, atol=atol, stopping=stopping,
                                     controller=controller)))
    for dtype in (torch.float32, torch.float64):
        checks.append((f"dtype {dtype}", partial(check_solver_dtype, solver, dtype, stopping=stopping,
                                                 controller=controller)))
    for device in _devices(devices):
        checks.append((f"device {device}", partial(check_solver_device, solver, device, stopping=stopping,
                                                   controller=controller)))
    _run_all(solver, checks)


def check_sampler(
    sampler: SequentialSampler,
    *,
    reference: Callable[[TriangularSystem], torch.Tensor] | None = None,
    devices: Sequence[str] | None = None,
) -> None:
    """Run every sampler check (``reference``: the author's own loop, see :func:`check_sampler_reference`)."""
    checks: list[tuple[str, Callable[[], Any]]] = [
        ("interface", partial(check_sampler_interface, sampler)),
        ("determinism", partial(check_sampler_determinism, sampler)),
        ("parity of the parallel solvers", partial(check_sampler_parity, sampler)),
        ("no batch axis", partial(check_sampler_parity, sampler, batch=None)),
    ]
    if reference is not None:
        checks.append(("own sampling loop", partial(check_sampler_reference, sampler, reference)))
    for dtype in (torch.float32, torch.float64):
        for device in _devices(devices):
            checks.append(
                (f"{dtype} on {device}", partial(check_sampler_dtype_device, sampler, dtype, device))
            )
    _run_all(sampler, checks)


def check_stopping_rule(
    rule: StoppingRule,
    *,
    tight: StoppingRule | None = None,
    samplers: Sequence[str] = SAMPLER_KINDS,
    devices: Sequence[str] | None = None,
) -> None:
    """Run every stopping-rule check (``tight``: the rule in a configuration that must be exact)."""
    checks: list[tuple[str, Callable[[], Any]]] = []
    for kind in samplers:
        system = make_system(kind)
        checks.append((f"verdict contract [{kind}]", partial(check_stopping_rule_contract, rule, system)))
        checks.append((f"with every solver [{kind}]", partial(check_stopping_rule_in_solves, rule, system)))
        if tight is not None:
            checks.append((f"parity [{kind}]", partial(check_stopping_rule_parity, tight, system)))
    for dtype in (torch.float32, torch.float64):
        for device in _devices(devices):
            system = make_system("ddim", dtype=dtype, device=device)
            checks.append((f"{dtype} on {device}", partial(check_stopping_rule_contract, rule, system)))
    _run_all(rule, checks)


def check_initializer(
    initializer: Initializer | Callable[[TriangularSystem], Initializer],
    *,
    samplers: Sequence[str] = SAMPLER_KINDS,
    devices: Sequence[str] | None = None,
) -> None:
    """Run every initializer check. Pass a callable ``system -> Initializer`` for initializers that
    need the system to be built (e.g. one that takes an earlier trajectory)."""

    def built(check: Callable[[Initializer, TriangularSystem], Any], system: TriangularSystem) -> None:
        check(initializer if isinstance(initializer, Initializer) else initializer(system), system)

    systems = [make_system(kind) for kind in samplers]
    systems += [make_system("ddim", batch=None, shape=(2, 3)), make_system("ddim", steps=1)]
    systems += [
        make_system("ddim", dtype=dtype, device=device)
        for dtype in (torch.float32, torch.float64)
        for device in _devices(devices)
    ]
    checks: list[tuple[str, Callable[[], Any]]] = []
    for system in systems:
        for label, check in (
            ("contract", check_initializer_contract),
            ("parity", check_initializer_parity),
            ("determinism", check_initializer_determinism),
        ):
            checks.append((f"{label} [{_describe(system)}]", partial(built, check, system)))
    _run_all(initializer, checks)


def _devices(devices: Sequence[str] | None) -> Sequence[str]:
    return devices if devices is not None else available_devices()
