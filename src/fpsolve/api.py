"""``fpsolve.solve``: resolve names through the registry, then run the driver."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs

from .driver import DriverConfig, Evaluator, Observer, run
from .errors import InvalidOptionError
from .initializers import Initializer
from .registry import get_plugin_manager, resolve
from .solution import Solution
from .solvers.base import FixedPointSolver
from .stopping import RMS, StoppingRule
from .system import TriangularSystem

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

    Returns:
        The :class:`Solution`.
    """
    system = make_system(system)
    options = {k: v for k, v in dict(order=order, history=history, ridge=ridge).items() if v is not None}
    options.update(solver_options)
    solver_obj = resolve("solver", solver, options)
    if tol is not None and stopping is not None:
        raise InvalidOptionError("give tol= (a shortcut for the rms rule) or stopping=, not both.")
    if tol is not None:
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
            raise InvalidOptionError(f"tol must be a finite number > 0 (default 2e-4); got {tol!r}.")
        stopping_obj: StoppingRule = RMS(tol1=float(tol), tol2=float(tol))
    elif stopping is not None:
        stopping_obj = resolve("stopping rule", stopping)
    else:
        # A solver that reproduces a published method whole brings its own rule and window.
        default = solver_obj.default_stopping()
        stopping_obj = default if default is not None else resolve("stopping rule", "rms")
    if window is None:
        window = solver_obj.default_window()
    initializer_obj = resolve("initializer", initializer if initializer is not None else "noise_copy")
    observers = list(observers)
    auto = None
    if isinstance(window, str):
        if window != "auto":
            raise InvalidOptionError(f"window must be an int >= 1, None or 'auto'; got {window!r}.")
        from .gpu.auto import resolve_auto_window

        auto = resolve_auto_window(system, solver_obj, stopping_obj, distributed=distributed)
        window, solver_obj = auto.window, auto.solver
        observers.append(auto.observer)  # what the solve took teaches the next plan
    bar = None
    if progress:
        from .progress import ProgressBar

        bar = ProgressBar(f"fpsolve {solver_obj.name}")
        observers.append(bar)
    evaluate: Evaluator | None = None
    if distributed is not None and distributed is not False:
        from .distributed import sharded_evaluator

        evaluate = sharded_evaluator(system, distributed)
    elif system.device.type == "cuda":  # a model call that does not fit is split, not fatal
        from .gpu.chunking import ChunkedEvaluator

        evaluate = ChunkedEvaluator(system)
    try:
        solution = run(system, solver_obj, stopping_obj, initializer_obj,
                       DriverConfig(window=window, max_iters=max_iters), observers, evaluate=evaluate)
    finally:
        if bar is not None:
            bar.close()
    steps = system.num_steps
    return attrs.evolve(solution, window=None if solver_obj.sequential else min(window or steps, steps),
                        plan=None if auto is None else auto.plan)
