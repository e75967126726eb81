"""The controller: a parallel solve's loop policy in one frozen object.

A solver proposes new values for the window rows (``init`` + ``step``); everything about how the
loop uses those proposals is the controller's, as diffrax keeps step-size control out of its
solvers:

* ``window``: positions solved per iteration (``None``: all T; more than T is clipped to T here,
  in :meth:`Controller.window_for`, and nowhere else);
* ``max_iters``: THE iteration cap (``None``: T); reaching it ends the solve with
  :attr:`~fpsolve.Status.MAX_ITERS`;
* ``safeguard``: with it (the default), row ``U`` (the first row the stopping rule did not
  accept) is made final and the anchor moves to ``U``: at least one row per iteration, so at
  most T iterations. Without it row ``U`` takes the solver's proposal and the anchor moves only
  over accepted rows (standard Anderson acceleration, an implicit system without exact steps);
* ``boundary``: the value a row takes when the driver makes it final (row ``U`` with the
  safeguard, and ``x_0`` once every row is accepted): ``"exact"``, the plain fixed-point step on
  the solver's order-k equations (exact, since every state it reads is final), or
  ``"proposal"``, the solver's own proposal (ParaDiGMS keeps its Picard value there);
* ``update_accepted``: whether rows the stopping rule accepted take the solver's proposal too
  (ParaDiGMS does this); by default they keep the values the rule judged.

A published method, or a solver with defaults of its own, registers a :class:`Preset`: solver +
controller + stopping rule, through the ``fpsolve_register_presets`` hook. ``window="auto"``
names a controller that :mod:`fpsolve.gpu` registers through ``fpsolve_register_controllers``:
a controller may plan itself for a system in :meth:`Controller.prepare` (measure the model,
choose the window, or choose the sequential loop).

The sequential reference is a solver name (``"sequential"``) for
:meth:`fpsolve.TriangularSystem.sequential`; :func:`runs_sequentially` is the one place that
recognises it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from .errors import InvalidOptionError
from .plugin_marks import hookimpl
from .solvers import AA, QuasiNewton
from .solvers.base import FixedPointSolver
from .solvers.sequential import Sequential
from .stopping import StoppingRule, X0Forecast
from .validators import check_flag, check_int, integer

if TYPE_CHECKING:
    from .system import TriangularSystem

__all__ = ["BOUNDARY_VALUES", "Controller", "Prepared", "Preset", "runs_sequentially"]

#: The values of :attr:`Controller.boundary`, with what each means.
BOUNDARY_VALUES: Mapping[str, str] = {
    "exact": "the plain fixed-point step on the solver's order-k equations (exact: every state it reads "
             "is final)",
    "proposal": "the solver's own proposal (ParaDiGMS keeps its Picard value there)",
}


def runs_sequentially(solver: Any) -> bool:
    """Whether ``solver`` is the sequential reference, which runs as the system's own loop
    (:meth:`~fpsolve.TriangularSystem.sequential`) instead of the parallel driver."""
    return isinstance(solver, Sequential)


def _boundary_value(instance: Any, attribute: Any, value: Any) -> None:
    if not (isinstance(value, str) and value in BOUNDARY_VALUES):
        choices = "; ".join(f"{name!r}: {meaning}" for name, meaning in BOUNDARY_VALUES.items())
        raise InvalidOptionError(f"boundary must be one of {choices}; got {value!r}.")


@attrs.define(frozen=True, eq=False)
class Prepared:
    """A controller planned for one solve (what :meth:`Controller.prepare` returns).

    Attributes:
        controller: the concrete controller the driver runs (a plain :class:`Controller`).
        solver: the solver to run (a planning controller may choose the sequential one).
        observers: observers the controller needs on this solve (e.g. to learn from it).
    """

    controller: Controller
    solver: FixedPointSolver
    observers: tuple[Callable[[Any], Any], ...] = ()


@attrs.define(frozen=True)
class Controller:
    """The loop policy of a parallel solve (see the module docstring for each field).

    Args:
        window: positions solved per iteration (one batched model call over them); ``None``: all
            T. Larger than T is clipped to T.
        max_iters: the cap on parallel iterations; ``None``: T.
        safeguard: make the first unaccepted row final each iteration (default True).
        boundary: ``"exact"`` (default) or ``"proposal"``: the value of a row made final.
        update_accepted: accepted rows take the solver's proposal too (default False).
        plan: why this controller was chosen (the :class:`fpsolve.gpu.Plan` of
            ``window="auto"``), recorded on :attr:`fpsolve.Solution.plan`; not part of equality.
    """

    name: ClassVar[str] = "fixed"
    aliases: ClassVar[dict[str, dict[str, Any]]] = {}

    window: int | None = attrs.field(
        default=None, converter=integer,
        validator=check_int(minimum=1, optional=True, hint=" (positions solved per iteration) or None for T"))
    max_iters: int | None = attrs.field(
        default=None, converter=integer,
        validator=check_int(minimum=1, optional=True, hint=" (the cap on parallel iterations) or None for T"))
    safeguard: bool = attrs.field(
        default=True, validator=check_flag("safeguard"))
    boundary: str = attrs.field(default="exact", validator=_boundary_value)
    update_accepted: bool = attrs.field(
        default=False, validator=check_flag("update_accepted"))
    plan: Any = attrs.field(default=None, eq=False, repr=False)

    def window_for(self, num_steps: int) -> int:
        """The window of a T-step solve: ``window``, or T when it is ``None`` or larger than T.

        The one place a window is clipped."""
        return min(self.window or num_steps, num_steps)

    def cap_for(self, num_steps: int) -> int:
        """The iteration cap of a T-step solve: ``max_iters``, or T when it is ``None``."""
        return self.max_iters if self.max_iters is not None else num_steps

    def bounds_iterations(self) -> bool:
        """Whether the anchor advances every iteration, so a solve ends within T iterations."""
        return self.safeguard

    def override(self, *, window: int | None = None, max_iters: int | None = None) -> Controller:
        """This controller with the caller's ``window`` / ``max_iters`` where given (not ``None``)."""
        changes: dict[str, Any] = {key: value for key, value in (("window", window), ("max_iters", max_iters))
                                   if value is not None}
        return attrs.evolve(self, **changes) if changes else self

    def prepare(self, system: TriangularSystem, solver: FixedPointSolver, stopping: StoppingRule, *,
                distributed: Any = None) -> Prepared:
        """This controller planned for a solve of ``system`` (a fixed controller: itself, as is).

        A planning controller (``window="auto"``) overrides this: it may measure the model and
        return a concrete window, or the sequential solver, and observers that learn from the solve.
        """
        return Prepared(self, solver)


@attrs.define(frozen=True, eq=False, kw_only=True)
class Preset:
    """A named method: a solver with the controller and stopping rule it is published with.

    ``fpsolve.solve(system, name)`` with a preset's name runs ``solver`` (built with ``options``
    and the caller's solver options) under ``controller`` and ``stopping``; the caller's
    ``window=``, ``max_iters=``, ``tol=`` and ``stopping=`` override those parts. The preset named
    after a solver class (``name == solver.name``) is also what a solver class or instance of
    that class (or of a subclass that registers none) gets: ``solve(system, QuasiNewton(clamp=20))``
    keeps newton's stopping rule.

    Attributes:
        name: the preset's registry name.
        solver: the solver class.
        options: solver options the preset fixes (the caller may give the others).
        controller: the loop policy (default: the plain safeguarded controller).
        stopping: the stopping rule (``None``: ``rms`` with tol 2e-4, as for any solver).
        description: one line for listings and docs.
    """

    name: str = attrs.field()
    solver: type[FixedPointSolver] = attrs.field()
    options: Mapping[str, Any] = attrs.field(factory=dict)
    controller: Controller = attrs.field(factory=Controller)
    stopping: StoppingRule | None = attrs.field(default=None)
    description: str = ""

    @name.validator
    def _check_name(self, attribute: Any, value: Any) -> None:
        if not (isinstance(value, str) and value):
            raise InvalidOptionError(f"a preset's name must be a non-empty str; got {value!r}.")

    @solver.validator
    def _check_solver(self, attribute: Any, value: Any) -> None:
        if not (isinstance(value, type) and issubclass(value, FixedPointSolver)):
            raise InvalidOptionError(
                f"preset {self.name!r}: solver must be a FixedPointSolver subclass; got {value!r}.")

    @controller.validator
    def _check_controller(self, attribute: Any, value: Any) -> None:
        if not isinstance(value, Controller):
            raise InvalidOptionError(
                f"preset {self.name!r}: controller must be an fpsolve.control.Controller; got {value!r}.")

    @stopping.validator
    def _check_stopping(self, attribute: Any, value: Any) -> None:
        if value is not None and not isinstance(value, StoppingRule):
            raise InvalidOptionError(
                f"preset {self.name!r}: stopping must be a StoppingRule instance or None; got {value!r}.")


@hookimpl
def fpsolve_register_presets() -> Sequence[Preset]:
    """fpsolve's own presets: ``newton`` with the ``x0_forecast`` rule, ``aa`` unsafeguarded.

    (The policies the two solvers carried as members before issue 12; newton's rule is issue 14's
    ``x0_forecast``, which replaced the ``x0`` rule: docs/benchmarks/iterations.md.)"""
    return (
        Preset(name="newton", solver=QuasiNewton, stopping=X0Forecast(),
               description="quasi-Newton, stopped once the output x_0 has settled or its forecast "
                           "remaining error is small (the x0_forecast rule)"),
        Preset(name="aa", solver=AA, controller=Controller(safeguard=False),
               description="standard Anderson acceleration, unsafeguarded as in the literature"),
    )


@hookimpl
def fpsolve_register_controllers() -> list[type[Controller]]:
    """fpsolve's plain controller (``"fixed"``)."""
    return [Controller]
