"""The result of a solve: complete, frozen data; no dicts, no sentinel values."""

from __future__ import annotations

import enum
from typing import Any

import attrs
import torch

from .errors import NotConvergedError

__all__ = ["Status", "ResidualTrace", "Solution"]


class Status(enum.Enum):
    """How a solve ended; each value is a human-readable message."""

    CONVERGED = "converged: every state met the stopping rule or was computed exactly"
    MAX_ITERS = "stopped at the iteration limit before every state converged"
    STOPPED = "stopped by the stopping rule before every state converged"
    NONFINITE = "stopped: a non-finite value appeared; the last finite iterate is returned"


@attrs.define(frozen=True, eq=False)
class ResidualTrace:
    """Per-iteration, per-position record of a solve.

    Attributes:
        first_order: ``[iterations, T+1]`` RMS of the first-order residual of each state (worst
            sample), NaN where the state was not in the window.
        anchors: the anchor after each iteration (states ``0..anchor`` final).
        windows: ``(lo, hi)`` rows of each iteration's window.
        evaluations: denoiser evaluations of each iteration (positions x samples).
    """

    first_order: torch.Tensor = attrs.field(repr=False)
    anchors: tuple[int, ...]
    windows: tuple[tuple[int, int], ...]
    evaluations: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.anchors)


@attrs.define(frozen=True, eq=False)
class Solution:
    """The outcome of :func:`fpsolve.solve`.

    Attributes:
        sample: ``x_0``, ``[*shape]`` (or ``[N, *shape]`` for a batch of N samples).
        trajectory: every state, ``x_T`` first: ``[T+1, *shape]`` (or ``[T+1, N, *shape]``).
        iterations: rounds of model calls (parallel iterations, plus any sequential warm-up calls
            of the initializer).
        model_evals: denoiser evaluations, counted per sample and position.
        status: how the solve ended (:class:`Status`); ``message`` gives details.
        residuals: the :class:`ResidualTrace`.
        wall_time: seconds spent in the solve.
        solver: the solver instance used; ``order``: the order k of its equations.
        window: positions per parallel iteration (set by :func:`fpsolve.solve`; ``None`` for the
            sequential loop).
        plan: the :class:`fpsolve.gpu.Plan` of a ``window="auto"`` solve (why this window, or why
            sequential), else ``None``.
        converged_samples: ``[N]`` bool (CPU; ``[1]`` without a batch axis): which samples
            converged. A sample whose model outputs or solver updates became non-finite is
            frozen at its last finite iterate and marked False while the others go on (status
            ``NONFINITE``; ``message`` names each failed sample). All False after ``MAX_ITERS``
            or ``STOPPED``, all True when ``converged``. ``None`` only for a Solution built by
            hand without it.
    """

    sample: torch.Tensor = attrs.field(repr=False)
    trajectory: torch.Tensor = attrs.field(repr=False)
    iterations: int
    model_evals: int
    status: Status
    message: str
    residuals: ResidualTrace
    wall_time: float
    solver: Any = attrs.field(repr=False, default=None)
    order: int = 1
    window: int | None = None
    plan: Any = attrs.field(repr=False, default=None)
    converged_samples: torch.Tensor | None = attrs.field(repr=False, default=None)

    @property
    def converged(self) -> bool:
        """True when every state met the stopping rule or was computed exactly."""
        return self.status is Status.CONVERGED

    def raise_for_status(self) -> Solution:
        """Return this solution if it converged, else raise :class:`~fpsolve.errors.NotConvergedError`.

        For code that must not use an unfinished result by accident::

            x0 = fpsolve.solve(system, "taa").raise_for_status().sample
        """
        if not self.converged:
            raise NotConvergedError(
                f"the solve did not converge (status {self.status.name}: {self.message}); pass a larger "
                "max_iters or a looser tolerance, or read solution.sample knowing it is unfinished.",
                self,
            )
        return self
