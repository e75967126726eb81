"""Plain fixed-point iteration on the order-k equations (Jacobi for k = 1, Picard for k = T)."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from ..validators import integer, order_option
from .base import FixedPointSolver, WindowView

__all__ = ["FP"]


@attrs.define(frozen=True, eq=False, kw_only=True)
class FP(FixedPointSolver):
    """Fixed-point iteration ``X <- G^k(X)`` on the order-k equations.

    Args:
        order: k, 1..T; ``None`` (default) means T, the Picard form (every equation
            anchored at x_T). The alias
            ``jacobi`` fixes k = 1 (the sampler's own equations), ``picard`` fixes k = T.
    """

    name = "fp"
    aliases = {"jacobi": {"order": 1}, "picard": {"order": None}}

    order: int | None = attrs.field(default=None, converter=integer, validator=order_option)

    def step(self, view: WindowView, state: Any) -> tuple[torch.Tensor, Any]:
        """Every row takes its right-hand side."""
        return view.rhs, state
