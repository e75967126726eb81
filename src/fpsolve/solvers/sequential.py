"""The sequential reference: the sampler run step by step, one model call per step."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from .base import FixedPointSolver, WindowView

__all__ = ["Sequential"]


@attrs.define(frozen=True, eq=False)
class Sequential(FixedPointSolver):
    """T model calls (each over the N samples), each followed by the sampler's step.

    The driver runs it as :meth:`fpsolve.TriangularSystem.sequential` (recognised by
    :func:`fpsolve.control.runs_sequentially`, the one place that does); it is the reference
    every parallel solver must reproduce, and the honest baseline for wall time.
    """

    name = "sequential"

    @property
    def order(self) -> int:  # type: ignore[override]
        """The sequential loop uses the sampler's own (first-order) equations."""
        return 1

    def step(self, view: WindowView, state: Any) -> tuple[torch.Tensor, Any]:
        """A window of one row, solved exactly."""
        return view.rhs, state
