"""``fpsolve.solve``: resolve names through the registry, then run the driver.

The loop policy is resolved in one place, :func:`resolve_method` + :func:`resolve_controller`:
a solver name or object finds its preset (:class:`fpsolve.control.Preset`), whose controller
and stopping rule apply unless the caller gives ``window=`` / ``max_iters=`` / ``tol=`` /
``stopping=``. ``window`` may be an int (the window of the preset's controller), a registered
controller name (``"auto"``, which :mod:`fpsolve.gpu` registers) or a
:class:`~fpsolve.control.Controller`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from .adjoint import differentiable_solution
from .control import Controller, Preset, runs_sequentially
from .driver import Observer, run
from .errors import InvalidOptionError, NotConvergedWarning
from .evaluators import choose as choose_evaluator
from .initializers import Initializer
from .progress import ProgressBar
from .registry import get_plugin_manager, get_registry, iteration_hook, lookup_preset, preset_for, resolve
from .solution import Solution, Status
from .solvers.base import FixedPointSolver
from .stopping import MAX_ITERS_MOVED, RMS, StoppingRule
from .system import TriangularSystem
from .validators import as_flag, as_real, did_you_mean, is_integer

#: solve()'s own keyword arguments, for did-you-mean hints on a misspelt solver option.
_SOLVE_ARGUMENTS = {name: "an argument of solve()" for name in (
    "order", "history", "ridge", "window", "tol", "stopping", "initializer", "max_iters", "observers",
    "progress", "distributed", "differentiable", "params", "adjoint_tol", "vjp_chunk")}

__all__ = ["solve", "make_system", "resolve_method", "resolve_controller", "resolve_stopping"]


def make_system(obj: Any, **options: Any) -> TriangularSystem:
    """Turn ``obj`` into a :class:`TriangularSystem` through the ``fpsolve_make_system`` adapters."""
    if isinstance(obj, TriangularSystem):
        if options:
            raise InvalidOptionError("options are only for adapters; this is already a TriangularSystem.")
        return obj
    system = get_plugin_manager().hook.fpsolve_make_system(obj=obj, options=dict(options))
    if system is None:
        raise InvalidOptionError(
            f"no fpsolve adapter turns a {type(obj).__module__}.{type(obj).__qualname__} into a "
            "TriangularSystem; build one with fpsolve.TriangularSystem(sampler=..., denoiser=..., shape=...) "
            "or install a plugin that implements fpsolve_make_system for it."
        )
    return system


def solve(
    system: TriangularSystem | Any,
    solver: str | type[FixedPointSolver] | FixedPointSolver = "newton",
    *,
    order: int | None = None,
    history: int | None = None,
    ridge: float | None = None,
    window: int | str | Controller | None = None,
    tol: float | None = None,
    stopping: str | type[StoppingRule] | StoppingRule | None = None,
    initializer: str | type[Initializer] | Initializer | None = None,
    max_iters: int | None = None,
    observers: Sequence[Observer] = (),
    progress: bool = False,
    distributed: Any = None,
    differentiable: bool = False,
    params: Sequence[torch.Tensor] | None = None,
    adjoint_tol: float | None = None,
    vjp_chunk: int | None = None,
    **solver_options: Any,
) -> Solution:
    """Solve a sampler's trajectory in parallel (or sequentially, with ``solver="sequential"``).

    Args:
        system: a :class:`TriangularSystem` (or an object an adapter plugin turns into one).
        solver: a registered name (``"newton"``, the default: the fewest rounds measured on the
            benchmark at equal error; ``"taa"`` (ParaTAA), ``"fp"``, ``"jacobi"``, ``"picard"``,
            ``"aa"``, ``"sequential"``, ...), a solver class, or an instance.
        order, history, ridge, **solver_options: options of the solver (e.g. ``order`` = k of the
            equations, ``history`` = m); an option the solver does not take is an error.
        window: positions solved per iteration (``None``: the preset's window, which is all T
            for the built-ins; more than T means T). ``"auto"``: measure the model's latency on
            its device once and take the window with the smallest predicted wall time, or the
            sequential loop (with a warning) when no window is predicted to beat it; see
            :mod:`fpsolve.gpu` and :attr:`Solution.plan`. A :class:`~fpsolve.control.Controller`
            replaces the preset's whole loop policy (e.g. ``Controller(safeguard=True)`` for a
            safeguarded ``aa``).
        tol: shortcut for the ``rms`` rule with ``tol1 = tol2 = tol``.
        stopping: a stopping rule (name, class or instance). Default: the preset's (``newton``:
            the ``x0_forecast`` rule; the ``paradigms`` plugin: its own), else ``rms`` with tol 2e-4.
        initializer: first guess (name, class or instance); default ``noise_copy``.
        max_iters: THE cap on parallel iterations (``None``: the preset's, else T); reaching
            it ends the solve with status ``MAX_ITERS``.
        observers: callables receiving an :class:`~fpsolve.driver.IterationInfo` per iteration.
        progress: show a progress bar.
        distributed: ``True`` to shard each iteration's model call over the ranks of the default
            ``torch.distributed`` process group (every rank calls ``solve`` with the same
            arguments and gets the same solution), or a ``ProcessGroup`` to use that group.
        differentiable: make ``sample`` and ``trajectory`` carry gradients to the system's noise
            (when it requires grad), to the denoiser's parameters and to tensors it closes over,
            by the implicit function theorem: ``backward`` solves the adjoint triangular system
            with the same solver, window and cap, in parallel (see :mod:`fpsolve.adjoint`).
        params: with ``differentiable``: the tensors to differentiate besides the noise (default:
            found in the denoiser by :func:`fpsolve.adjoint.denoiser_parameters`).
        adjoint_tol: with ``differentiable``: the adjoint solve's tolerance, relative to the
            size of its right-hand side (default: ``tol``, else 2e-4).
        vjp_chunk: with ``differentiable``: states per vector-Jacobian product in the final
            pass of the backward (default: the window).

    Returns:
        The :class:`Solution`.
    """
    system = make_system(system)
    differentiable = as_flag("differentiable", differentiable)
    if not differentiable and (params is not None or adjoint_tol is not None or vjp_chunk is not None):
        raise InvalidOptionError("params=, adjoint_tol= and vjp_chunk= are options of differentiable=True; "
                                 "pass differentiable=True or leave them unset.")
    options = {k: v for k, v in dict(order=order, history=history, ridge=ridge).items() if v is not None}
    options.update(solver_options)
    solver_obj, preset = resolve_method(solver, options)
    if runs_sequentially(solver_obj):
        # The sequential loop takes no window, cap, rule or first guess: refuse rather than ignore.
        # window="auto" may choose the sequential loop itself, so it is no contradiction here.
        given = [name for name, value in (("window", None if window == "auto" else window),
                                          ("max_iters", max_iters), ("tol", tol), ("stopping", stopping),
                                          ("initializer", initializer))
                 if value is not None]
        if given:
            raise InvalidOptionError(
                f"solver {solver_obj.name!r} runs the sampler step by step (T model calls) and uses no "
                f"{' or '.join(given)}; drop {'it' if len(given) == 1 else 'them'}, or choose a parallel "
                "solver such as 'taa'."
            )
    stopping_obj = resolve_stopping(tol, stopping, preset)
    if tol is not None:
        tol = float(tol)
    if isinstance(observers, (str, bytes)) or not isinstance(observers, Sequence):
        raise InvalidOptionError(
            f"observers must be a list of callables observer(info); got {observers!r}.")
    for index, observer in enumerate(observers):
        if not callable(observer):
            raise InvalidOptionError(
                f"observers[{index}] is {observer!r}, not a callable; every observer is called as "
                "observer(info) with an fpsolve.IterationInfo after each iteration."
            )
    progress = as_flag("progress", progress)
    controller = resolve_controller(window, max_iters, preset)
    initializer_obj = resolve("initializer", initializer if initializer is not None else "noise_copy")
    observers = [iteration_hook(), *observers]  # plugins' fpsolve_iteration_end hooks first
    # A planning controller (window="auto") measures the model here and may choose the
    # sequential solver; its observers learn from the solve for the next plan.
    prepared = controller.prepare(system, solver_obj, stopping_obj, distributed=distributed)
    solver_obj, controller = prepared.solver, prepared.controller
    observers.extend(prepared.observers)
    bar = None
    if progress:
        bar = ProgressBar(f"fpsolve {solver_obj.name}")
        observers.append(bar)
    evaluate = choose_evaluator(system, distributed=distributed)
    # A differentiable solve runs without autograd; its backward is the adjoint solve.
    grad_mode = torch.no_grad() if differentiable else contextlib.nullcontext()
    try:
        with grad_mode:
            solution = run(system, solver_obj, stopping_obj, initializer_obj, controller, observers,
                           evaluate=evaluate)
    finally:
        if bar is not None:
            bar.close()
    if solution.status in (Status.MAX_ITERS, Status.NONFINITE):
        warnings.warn(NotConvergedWarning(
            f"fpsolve.solve with solver {solver_obj.name!r} returns an unconverged result: "
            f"{solution.message} "
            "(status " + solution.status.name + "). Check solution.status, or call "
            "solution.raise_for_status() to make this an error."), stacklevel=2)
    if differentiable:
        solution = differentiable_solution(
            system, solution, solver_obj, controller=controller, params=params,
            adjoint_tol=adjoint_tol if adjoint_tol is not None else (tol if tol is not None else 2e-4),
            vjp_chunk=vjp_chunk)
    return solution


def resolve_method(spec: str | type[FixedPointSolver] | FixedPointSolver,
                   options: dict[str, Any] | None = None) -> tuple[FixedPointSolver, Preset | None]:
    """The solver a ``solve(system, spec, **options)`` runs and the preset whose policy it gets.

    A name is looked up among the presets first (a preset fixes its solver class and options),
    then among the solvers; a solver class or instance, and a solver name without a preset of its
    own, gets the preset registered for its class (:func:`fpsolve.registry.preset_for`: ``newton``
    and its alias ``quasi_newton`` get the ``x0_forecast`` rule, ``QuasiNewton(clamp=20)`` too), or none.
    """
    options = dict(options or {})
    preset = lookup_preset(spec) if isinstance(spec, str) else None
    if preset is None:
        solver_obj = resolve("solver", spec, options, also=_SOLVE_ARGUMENTS)
        return solver_obj, preset_for(type(solver_obj))
    for key, value in preset.options.items():
        if key in options and options[key] != value:
            raise InvalidOptionError(
                f"preset {preset.name!r} fixes the solver option {key}={value!r}; "
                f"got {key}={options[key]!r}. "
                f"Use the solver {preset.solver.name!r} to choose {key} freely."
            )
    # By name when the preset is named after a registered solver: its messages and aliases stay.
    solver_names = {name.casefold() for name in get_registry().names("solver")}
    named = isinstance(spec, str) and spec.casefold() in solver_names
    solver_obj = resolve("solver", spec if named else preset.solver, {**preset.options, **options},
                         also=_SOLVE_ARGUMENTS)
    return solver_obj, preset


def resolve_stopping(tol: Any, stopping: Any, preset: Preset | None) -> StoppingRule:
    """The stopping rule of a solve: ``tol=`` (the ``rms`` rule), ``stopping=``, the preset's
    rule (rules keep no state: what the ``x0`` rules remember is the solve's
    :attr:`~fpsolve.stopping.StoppingView.memory`), or ``rms``."""
    if tol is not None and stopping is not None:
        raise InvalidOptionError("give tol= (a shortcut for the rms rule) or stopping=, not both.")
    if tol is not None:
        tol = as_real("tol", tol, minimum=0.0, strict=True, hint=" (default 2e-4)")
        return RMS(tol1=tol, tol2=tol)
    if isinstance(stopping, str) and stopping.casefold() == "max_iters":
        raise InvalidOptionError(MAX_ITERS_MOVED)
    if stopping is not None:
        return resolve("stopping rule", stopping)
    if preset is not None and preset.stopping is not None:
        return preset.stopping  # rules keep no state: StoppingView.memory is the solve's
    return resolve("stopping rule", "rms")


def resolve_controller(window: Any, max_iters: Any, preset: Preset | None) -> Controller:
    """The controller of a solve: the preset's (or the plain one), with the caller's ``window``
    (an int: the window; a registered controller name such as ``"auto"``: that controller with
    the preset's policy; a :class:`~fpsolve.control.Controller`: it replaces the preset's) and
    ``max_iters`` (the one cap) applied. Validation is the controller's own."""
    base = preset.controller if preset is not None else Controller()
    if window is None:
        return base.override(max_iters=max_iters)
    if isinstance(window, Controller):
        return window.override(max_iters=max_iters)
    if isinstance(window, str):
        if window.casefold() not in {name.casefold() for name in get_registry().names("controller")}:
            raise _bad_window(window)
        # Every policy field of the preset's controller carries over; the named one plans the window.
        policy = {field.name: getattr(base, field.name) for field in attrs.fields(Controller)
                  if field.name not in ("window", "plan")}
        if max_iters is not None:
            policy["max_iters"] = max_iters
        return resolve("controller", window, policy)
    if is_integer(window):
        return base.override(window=int(window), max_iters=max_iters)  # numpy integers are integers
    raise _bad_window(window)


def _bad_window(window: Any) -> InvalidOptionError:
    names = get_registry().names("controller")
    hint = did_you_mean(window, names) if isinstance(window, str) else ""
    return InvalidOptionError(
        f"window must be an int >= 1 (positions solved per iteration), None (all T), a controller name "
        f"({', '.join(repr(n) for n in names)}) or an fpsolve.Controller; got {window!r}.{hint}"
    )
