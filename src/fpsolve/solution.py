"""The result of a solve: complete, frozen data; no dicts, no sentinel values."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
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

    @classmethod
    def merge(cls, traces: Sequence[ResidualTrace]) -> ResidualTrace:
        """One trace for a batch whose groups of samples were solved apart (``traces``, one per
        group, possibly of different lengths): per iteration, the worst entry over the groups
        still running (NaN where none had the state in its window), the least advanced anchor,
        the union of the windows and the evaluations summed."""
        if not traces:
            raise ValueError("ResidualTrace.merge needs at least one trace.")
        width = traces[0].first_order.shape[-1]
        rows, anchors, windows, evaluations = [], [], [], []
        for i in range(max(len(trace) for trace in traces)):
            running = [trace for trace in traces if i < len(trace)]
            stacked = torch.stack([trace.first_order[i] for trace in running])
            worst = torch.where(stacked.isnan(), -math.inf, stacked).max(0).values
            rows.append(torch.where(worst == -math.inf, math.nan, worst))
            anchors.append(min(trace.anchors[i] for trace in running))
            windows.append((min(t.windows[i][0] for t in running), max(t.windows[i][1] for t in running)))
            evaluations.append(sum(trace.evaluations[i] for trace in running))
        matrix = torch.stack(rows) if rows else torch.empty(0, width, dtype=torch.float64)
        return cls(matrix, tuple(anchors), tuple(windows), tuple(evaluations))


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

    @classmethod
    def concatenate(cls, parts: Sequence[Solution], *, wall_time: float,
                    labels: Sequence[str] | None = None) -> Solution:
        """One Solution for a batch whose consecutive groups of samples were solved apart.

        Args:
            parts: the groups' solutions in sample order, each with a batch axis (its trajectory
                ``[T+1, N_i, *shape]``); their samples are concatenated on that axis.
            wall_time: seconds the whole solve took (the groups may have run side by side).
            labels: one name per part for the message of a part that did not converge
                (default ``"part i"``).

        Returns:
            A Solution whose ``iterations`` is the most any part needed (the critical path when
            the parts run in parallel), ``model_evals`` the sum, ``status`` and ``message`` those
            of the first part that did not converge (its message prefixed with its label), else
            the first part's; ``residuals`` :meth:`ResidualTrace.merge` of the parts';
            ``converged_samples`` the parts' concatenated (a part without them counts all or
            nothing); ``solver`` and ``order`` the first part's that has a solver.
        """
        if not parts:
            raise ValueError("Solution.concatenate needs at least one part.")
        names = list(labels) if labels is not None else [f"part {i}" for i in range(len(parts))]
        if len(names) != len(parts):
            raise ValueError(f"Solution.concatenate got {len(names)} labels for {len(parts)} parts.")
        trajectory = torch.cat([part.trajectory for part in parts], dim=1)
        status, message = parts[0].status, parts[0].message
        for name, part in zip(names, parts, strict=True):
            if not part.converged:
                status, message = part.status, f"{name}: {part.message}"
                break
        verdicts = [part.converged_samples.cpu() if part.converged_samples is not None
                    else torch.full((part.trajectory.shape[1],), part.converged, dtype=torch.bool)
                    for part in parts]
        solved = next((part for part in parts if part.solver is not None), parts[0])
        return cls(sample=trajectory[-1], trajectory=trajectory,
                   iterations=max(part.iterations for part in parts),
                   model_evals=sum(part.model_evals for part in parts), status=status, message=message,
                   residuals=ResidualTrace.merge([part.residuals for part in parts]), wall_time=wall_time,
                   solver=solved.solver, order=solved.order, converged_samples=torch.cat(verdicts))

    def without_states(self) -> Solution:
        """This solution's statistics alone, to send to another process: ``sample`` and
        ``trajectory`` empty, no ``solver`` or ``plan`` (objects that may not pickle), the
        verdicts on the CPU. :meth:`with_trajectory` puts states back."""
        empty = torch.empty(0)
        verdicts = None if self.converged_samples is None else self.converged_samples.cpu()
        return attrs.evolve(self, sample=empty, trajectory=empty, solver=None, plan=None,
                            converged_samples=verdicts)

    def with_trajectory(self, trajectory: torch.Tensor) -> Solution:
        """This solution with ``trajectory`` as its states (and its last state as ``sample``)."""
        return attrs.evolve(self, sample=trajectory[-1], trajectory=trajectory)

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
