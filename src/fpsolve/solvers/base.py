"""The fixed-point solver interface: an immutable config with ``init`` and ``step``.

The driver owns the loop and the stopping decision, the controller (:mod:`fpsolve.control`) the
loop policy; a solver sees one window at a time through a :class:`WindowView` and proposes new
values for every row of it. By default the driver then applies the safeguard uniformly: rows
that passed the stopping rule keep their values, the first row that failed takes the exact
step, and only the rows below it take the solver's proposal (see :mod:`fpsolve.driver`). A
solver that is published with another policy (a window, a rule, no safeguard) registers a
:class:`fpsolve.control.Preset` for it instead of carrying it as members.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch

from ..errors import InvalidOptionError

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

    That is all a solver is: ``init``, ``step`` and its options. The window, the safeguard, the
    value of the row made final, whether accepted rows move, and the iteration cap are the
    controller's (:class:`fpsolve.control.Controller`); a method published with its own policy
    registers a :class:`fpsolve.control.Preset` (solver + controller + stopping rule).
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[dict[str, dict[str, Any]]] = {}

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
