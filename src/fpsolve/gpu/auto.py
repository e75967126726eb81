"""``fpsolve.solve(..., window="auto")``: measure, predict, plan, and learn from the solve.

1. The denoiser's latency ``t(B)`` is measured on the system's device at ``B = N * w`` for
   ``w = 1, 2, 4, ..., T`` (once per process for a denoiser and input signature; see
   :func:`~fpsolve.gpu.latency.latency_table`).
2. Iterations come from the prior of :mod:`fpsolve.gpu.iterations`, or from earlier solves of
   the same problem (denoiser, T, N, solver settings, stopping rule, sampler noise) in this
   process: an observer records each solve's iterations and its time per iteration outside the
   model call.
3. :func:`~fpsolve.gpu.planner.plan_window` picks the window; if no window is predicted to beat
   sequential sampling, the solve runs the sequential loop and an :class:`AutoWindowWarning`
   says so (the :class:`~fpsolve.gpu.Plan` is on :attr:`fpsolve.Solution.plan`).

The samples are always solved together here (``batch_split = 1``): splitting them is a choice
for callers who run the groups themselves (``plan_window(..., splits=...)``).

``window="auto"`` names :class:`AutoWindow`, a controller this module registers through the
``fpsolve_register_controllers`` hook (it is one of the registry's built-in plugin modules, loaded
by name): the api resolves the string through the registry and never imports this package. Its
:meth:`AutoWindow.prepare` runs the steps above and returns the plain controller with the planned
window (and the plan, which the driver records on :attr:`fpsolve.Solution.plan`).
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from .._identity import PerDenoiser
from ..control import Controller, Prepared, runs_sequentially
from ..errors import InvalidOptionError
from ..evaluators import kind_for, known_max_batch
from ..plugin_marks import hookimpl
from ..solvers.base import FixedPointSolver
from ..solvers.sequential import Sequential
from ..stopping import StoppingRule
from ..system import TriangularSystem
from .iterations import IterationModel
from .latency import LatencyTable, latency_table
from .planner import Plan, latency_curve, plan_window

__all__ = ["AutoWindowWarning", "AutoChoice", "AutoWindow", "resolve_auto_window", "forget_observations"]

_OBSERVED = PerDenoiser()


class AutoWindowWarning(UserWarning):
    """``window="auto"`` predicted that no window beats the sequential loop and ran it instead."""


@attrs.define(frozen=True, eq=False)
class AutoChoice:
    """What ``window="auto"`` resolved to.

    Attributes:
        window: the window to run (``None`` when the solve runs sequentially).
        solver: the solver to run (the sequential one when the plan says so).
        plan: the :class:`~fpsolve.gpu.Plan`.
        observer: records the solve's iterations and overhead for the next plan (add it to the
            solve's observers).
        latency: the latency table the plan used.
    """

    window: int | None
    solver: FixedPointSolver
    plan: Plan
    observer: Callable[[Any], None]
    latency: LatencyTable


def forget_observations() -> None:
    """Forget every recorded solve (the next plans use the prior again)."""
    _OBSERVED.clear()


def _is_stochastic(system: TriangularSystem) -> bool:
    return bool((system.affine_form.noise != 0).any())


def _problem_key(system: TriangularSystem, solver: FixedPointSolver, stopping: Any,
                 controller: Controller | None) -> tuple[Any, ...]:
    # Everything that changes the iteration count, except the window (the model's variable).
    controller = controller if controller is not None else Controller()
    policy = (controller.safeguard, controller.boundary, controller.update_accepted)
    return (
        system.num_steps,
        system.num_samples,
        repr(solver),
        repr(stopping),
        policy,
        _is_stochastic(system),
        type(system.sampler).__qualname__,
    )


@attrs.define(eq=False)
class _Record:
    """Observations of one problem: (window, iterations) pairs and per-call overheads."""

    iterations: list[tuple[int, int]] = attrs.field(factory=list)
    iteration_overheads: list[float] = attrs.field(factory=list)
    step_overheads: list[float] = attrs.field(factory=list)


class _Observer:
    """Times each iteration (observers run once per iteration, after its host decision) and, when
    the solve finishes, records its iterations and the median time outside the model call."""

    def __init__(self, record: _Record, window: int | None, curve: Callable[[int], float]):
        self.record, self.window, self.curve = record, window, curve
        self.last: float | None = None
        self.overheads: list[float] = []

    def __call__(self, info: Any) -> None:
        now = time.perf_counter()
        if self.last is not None:  # the first iteration also holds set-up and warm-up
            self.overheads.append(max(0.0, now - self.last - self.curve(info.evaluations)))
        self.last = now
        if info.anchor < info.num_steps:
            return
        overhead = statistics.median(self.overheads) if self.overheads else None
        if self.window is None:
            if overhead is not None:
                self.record.step_overheads.append(overhead)
        else:
            self.record.iterations.append((self.window, info.iteration))
            if overhead is not None:
                self.record.iteration_overheads.append(overhead)


def _latency_windows(num_steps: int) -> list[int]:
    windows, w = {1, num_steps}, 2
    while w < num_steps:
        windows.add(w)
        w *= 2
    return sorted(windows)


def resolve_auto_window(
    system: TriangularSystem,
    solver: FixedPointSolver,
    stopping: Any = None,
    *,
    distributed: Any = None,
    cache_path: str | Path | None = None,
    controller: Controller | None = None,
) -> AutoChoice:
    """Plan the window of a solve of ``system`` with ``solver`` (see the module docstring).

    ``controller``: the loop policy the solve runs under (its safeguard, boundary and accepted
    rows change the iteration count, so solves under different policies are learnt apart).

    Raises:
        InvalidOptionError: together with ``distributed=`` (the plan is for one device).
    """
    if kind_for(system.device, distributed) == "sharded":  # the evaluators' one reading of distributed=
        raise InvalidOptionError("window='auto' plans for one device; give an int window with distributed=.")
    steps, samples = system.num_steps, system.num_samples
    table = latency_table(
        system.denoiser,
        shape=system.shape,
        dtype=system.input_dtype,
        device=system.device,
        batches=[samples * w for w in _latency_windows(steps)],
        timesteps=system.sampler.timesteps,
        cache_path=cache_path,
    )
    curve = latency_curve(table)
    key = _problem_key(system, solver, stopping, controller)
    record = _OBSERVED.slot(system.denoiser).setdefault(key, _Record())
    if record.iterations:
        model = IterationModel.observed(steps, record.iterations)
    else:
        model = IterationModel.prior(
            steps, solver=solver.name, order=getattr(solver, "order", None), stochastic=_is_stochastic(system)
        )
    limits = [v for v in (table.max_batch, known_max_batch(system)) if v is not None]
    plan = plan_window(
        curve,
        steps,
        samples,
        model,
        splits=(1,),
        max_batch=min(limits) if limits else None,
        iteration_overhead=statistics.median(record.iteration_overheads or [0.0]),
        step_overhead=statistics.median(record.step_overheads or [0.0]),
    )
    if runs_sequentially(solver):
        return AutoChoice(None, solver, plan, _Observer(record, None, curve), table)
    if plan.use_sequential:
        warnings.warn(
            f"window='auto': {plan.reason}; running the sequential loop.", AutoWindowWarning, stacklevel=4
        )
        return AutoChoice(None, Sequential(), plan, _Observer(record, None, curve), table)
    return AutoChoice(plan.window, solver, plan, _Observer(record, plan.window, curve), table)


@attrs.define(frozen=True, kw_only=True)
class AutoWindow(Controller):
    """``window="auto"``: measure the model on its device and plan the window (module docstring).

    The policy fields (``max_iters``, ``safeguard``, ``boundary``, ``update_accepted``) are kept
    on the planned controller; ``window`` is what the plan chooses (a given one is ignored).

    Args:
        cache_path: a JSON file that keeps measured latencies between processes (default: none).
    """

    name = "auto"

    cache_path: str | Path | None = attrs.field(default=None, eq=False)

    def prepare(self, system: TriangularSystem, solver: FixedPointSolver, stopping: StoppingRule, *,
                distributed: Any = None) -> Prepared:
        """Plan the window (or choose the sequential loop) for this solve; raises
        :class:`~fpsolve.errors.InvalidOptionError` together with ``distributed=``."""
        choice = resolve_auto_window(system, solver, stopping, distributed=distributed,
                                     cache_path=self.cache_path, controller=self)
        planned = Controller(window=choice.window, max_iters=self.max_iters, safeguard=self.safeguard,
                             boundary=self.boundary, update_accepted=self.update_accepted, plan=choice.plan)
        return Prepared(planned, choice.solver, (choice.observer,))


@hookimpl
def fpsolve_register_controllers() -> list[type[Controller]]:
    """The ``"auto"`` controller."""
    return [AutoWindow]
