"""``fpsolve.solve``: resolve names through the registry, then run the driver."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from .adjoint import differentiable_solution
from .driver import DriverConfig, Observer, run
from .errors import InvalidOptionError, NotConvergedWarning
from .evaluators import choose as choose_evaluator
from .gpu.auto import resolve_auto_window
from .initializers import Initializer
from .progress import ProgressBar
from .registry import get_plugin_manager, iteration_hook, resolve
from .solution import Solution, Status
from .solvers.base import FixedPointSolver
from .stopping import RMS, StoppingRule
from .system import TriangularSystem
from .validators import as_flag, as_real, is_integer

#: solve()'s own keyword arguments, for did-you-mean hints on a misspelt solver option.
_SOLVE_ARGUMENTS = {name: "an argument of solve()" for name in (
    "order", "history", "ridge", "window", "tol", "stopping", "initializer", "max_iters", "observers",
    "progress", "distributed", "differentiable", "params", "adjoint_tol", "vjp_chunk")}

__all__ = ["solve", "make_system"]


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
    window: int | str | None = None,
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
        window: positions solved per iteration (``None``: the solver's
            :meth:`~fpsolve.FixedPointSolver.default_window`, which is all T for the built-ins).
            ``"auto"``: measure the model's latency on its device once and take the window with
            the smallest predicted wall time, or the sequential loop (with a warning) when no
            window is predicted to beat it; see :mod:`fpsolve.gpu` and :attr:`Solution.plan`.
        tol: shortcut for the ``rms`` rule with ``tol1 = tol2 = tol``.
        stopping: a stopping rule (name, class or instance). Default: the solver's
            :meth:`~fpsolve.FixedPointSolver.default_stopping` if it has one (``newton``: the
            ``x0`` rule; the ``paradigms`` plugin solver: its own), else ``rms`` with tol 2e-4.
        initializer: first guess (name, class or instance); default ``noise_copy``.
        max_iters: cap on parallel iterations (``None``: T).
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
    if not isinstance(differentiable, bool):
        raise InvalidOptionError(f"differentiable must be True or False; got {differentiable!r}.")
    if not differentiable and (params is not None or adjoint_tol is not None or vjp_chunk is not None):
        raise InvalidOptionError("params=, adjoint_tol= and vjp_chunk= are options of differentiable=True; "
                                 "pass differentiable=True or leave them unset.")
    options = {k: v for k, v in dict(order=order, history=history, ridge=ridge).items() if v is not None}
    options.update(solver_options)
    solver_obj = resolve("solver", solver, options, also=_SOLVE_ARGUMENTS)
    if solver_obj.sequential:
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
    if tol is not None and stopping is not None:
        raise InvalidOptionError("give tol= (a shortcut for the rms rule) or stopping=, not both.")
    if tol is not None:
        tol = as_real("tol", tol, minimum=0.0, strict=True, hint=" (default 2e-4)")
        stopping_obj: StoppingRule = RMS(tol1=tol, tol2=tol)
    elif stopping is not None:
        stopping_obj = resolve("stopping rule", stopping)
    else:
        # A solver that reproduces a published method whole brings its own rule and window.
        default = solver_obj.default_stopping()
        stopping_obj = default if default is not None else resolve("stopping rule", "rms")
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
    if window is None:
        window = solver_obj.default_window()
    if is_integer(window):
        window = int(window)  # numpy integers are integers
    initializer_obj = resolve("initializer", initializer if initializer is not None else "noise_copy")
    observers = [iteration_hook(), *observers]  # plugins' fpsolve_iteration_end hooks first
    auto = None
    if isinstance(window, str):
        if window != "auto":
            raise InvalidOptionError(f"window must be an int >= 1, None or 'auto'; got {window!r}.")

        auto = resolve_auto_window(system, solver_obj, stopping_obj, distributed=distributed)
        window, solver_obj = auto.window, auto.solver
        observers.append(auto.observer)  # what the solve took teaches the next plan
    bar = None
    if progress:
        bar = ProgressBar(f"fpsolve {solver_obj.name}")
        observers.append(bar)
    evaluate = choose_evaluator(system, distributed=distributed)
    # A differentiable solve runs without autograd; its backward is the adjoint solve.
    grad_mode = torch.no_grad() if differentiable else contextlib.nullcontext()
    try:
        with grad_mode:
            solution = run(system, solver_obj, stopping_obj, initializer_obj,
                           DriverConfig(window=window, max_iters=max_iters), observers, evaluate=evaluate)
    finally:
        if bar is not None:
            bar.close()
    steps = system.num_steps
    if solution.status in (Status.MAX_ITERS, Status.NONFINITE):
        warnings.warn(NotConvergedWarning(
            f"fpsolve.solve with solver {solver_obj.name!r} returns an unconverged result: "
            f"{solution.message} "
            "(status " + solution.status.name + "). Check solution.status, or call "
            "solution.raise_for_status() to make this an error."), stacklevel=2)
    solution = attrs.evolve(solution, window=None if solver_obj.sequential else min(window or steps, steps),
                            plan=None if auto is None else auto.plan)
    if differentiable:
        solution = differentiable_solution(
            system, solution, solver_obj, window=window, max_iters=max_iters, params=params,
            adjoint_tol=adjoint_tol if adjoint_tol is not None else (tol if tol is not None else 2e-4),
            vjp_chunk=vjp_chunk)
    return solution
