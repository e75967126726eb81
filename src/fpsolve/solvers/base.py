"""The fixed-point solver interface: an immutable config with ``init`` and ``step``.

The driver owns the loop, the window and the stopping decision; a solver sees one window at a
time through a :class:`WindowView` and proposes new values for every row of it. The driver then
applies the safeguard uniformly: rows that passed the stopping rule keep their values, the
first row that failed takes the sampler's exact step, and only the rows below it take the
solver's proposal (for solvers with ``safeguarded = True``; see :mod:`fpsolve.driver`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import torch

from ..errors import InvalidOptionError

if TYPE_CHECKING:
    from ..stopping import StoppingRule

__all__ = ["FixedPointSolver", "WindowView", "check_order"]


@attrs.define(frozen=True, eq=False)
class WindowView:
    """What a solver sees of one iteration (all tensors ``[W, N, D]`` unless noted).

    Attributes:
        iteration: 1-based index of the parallel iteration.
        lo, hi: the window's first and last unknown state index (inclusive); the anchor is ``lo-1``.
        states: the current iterate on the window.
        rhs: ``G^k``, the right-hand side of the order-k equations (``states + residual``).
        residual: the order-k residual ``R^k``.
        first_order: the first-order residual (the sampler's own equations).
        age: ``[W]`` long, how many iterations (this one included) each row has been in the window.
        trajectory: the whole current iterate ``[T+1, N, D]`` (read only).
        outputs: the model outputs ``[T, N, D]``; ``outputs[j]`` is eps at ``trajectory[j]`` for
            ``j`` in ``lo-1 .. hi-1`` (read only).
    """

    iteration: int
    lo: int
    hi: int
    states: torch.Tensor
    rhs: torch.Tensor
    residual: torch.Tensor
    first_order: torch.Tensor
    age: torch.Tensor
    trajectory: torch.Tensor = attrs.field(repr=False, default=None)
    outputs: torch.Tensor = attrs.field(repr=False, default=None)

    @property
    def width(self) -> int:
        """The number of rows in the window."""
        return self.hi - self.lo + 1


def check_order(order: int | None, num_steps: int, solver: str) -> int:
    """Resolve ``order`` (None means T) against the number of steps, with a clear error."""
    if order is None:
        return num_steps
    if not 1 <= order <= num_steps:
        raise InvalidOptionError(
            f"order for solver {solver!r} must lie in 1..T = 1..{num_steps} (1: the sampler's own "
            f"equations, T: every equation anchored at x_T); got {order}."
        )
    return order


class FixedPointSolver:
    """Base class of the parallel solvers.

    Subclasses are frozen attrs classes with an ``order`` field (``None`` = T) and implement
    :meth:`init` and :meth:`step`.

    Attributes:
        name: registry name (class attribute).
        aliases: other names mapped to option presets, e.g. ``{"jacobi": {"order": 1}}``.
        safeguarded: whether the driver forces the exact step at the first unconverged row, which
            makes the anchor advance every iteration (at most T iterations).
        sequential: ``True`` only for the sequential reference, which the driver runs as a loop.
        update_accepted: whether rows the stopping rule accepted take the solver's proposal too
            (ParaDiGMS does this); by default they keep the values the rule judged.

    A solver that reproduces a published method whole (window, stopping rule and all) may also
    override :meth:`default_window`, :meth:`default_stopping` (used by :func:`fpsolve.solve` when
    the caller gives no ``window`` / ``stopping`` / ``tol``) and :meth:`final_step`.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[dict[str, dict[str, Any]]] = {}
    safeguarded: ClassVar[bool] = True
    sequential: ClassVar[bool] = False
    update_accepted: ClassVar[bool] = False

    order: int | None

    def resolved_order(self, num_steps: int) -> int:
        """The order k of the equations this solver iterates, for a T-step system."""
        return check_order(getattr(self, "order", None), num_steps, self.name or type(self).__name__)

    def init(self, system: Any) -> Any:
        """The solver's state before the first iteration (``None`` for a memoryless solver)."""
        return None

    def step(self, view: WindowView, state: Any) -> tuple[torch.Tensor, Any]:
        """Propose new values ``[W, N, D]`` for the window rows; return them and the new state."""
        raise NotImplementedError

    def final_step(self, view: WindowView, proposal: torch.Tensor, row: int) -> torch.Tensor:
        """The value ``[N, D]`` that window row ``row`` takes when the driver makes it final.

        Called for the first row the stopping rule did not accept (safeguarded solvers only) and
        for the last state ``x_0`` once every row is accepted. The default is the plain
        fixed-point step on the order-k equations, ``view.rhs[row]``: exact, because every state
        it reads is final. A solver that reproduces a method which keeps its own proposal there
        (ParaDiGMS) returns ``proposal[row]``; the anchor still advances every iteration.
        """
        return view.rhs[row]

    def default_window(self) -> int | None:
        """The window :func:`fpsolve.solve` uses when the caller gives none (``None``: all T)."""
        return None

    def default_stopping(self) -> StoppingRule | None:
        """The stopping rule :func:`fpsolve.solve` uses when the caller gives neither ``stopping``
        nor ``tol`` (``None``: the ``rms`` rule with tol 2e-4)."""
        return None
