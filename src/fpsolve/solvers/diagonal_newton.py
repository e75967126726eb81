"""Quasi-DEER: Newton's method with a diagonal secant estimate of the model's Jacobian.

Like :mod:`fpsolve.solvers.newton`, a correction ``delta`` of the window solves the linearised
sampler, row by row (``J_j`` the Jacobian of eps at state ``j``),

    delta_i = sum_l (A[i, l] + B[i, l] J_{i-l}) delta_{i-l} + r1_i,

but ``J_j ~ diag(g_j)`` with one secant per *element* (Gonzalez et al., "Towards scalable and
stable parallelization of nonlinear RNNs", NeurIPS 2024, use the diagonal of the true Jacobian;
here it comes from the last two model evaluations, so each iteration still makes ONE batched
model call and no JVP). Per element, the secant ``de_e / dx_e`` is shrunk towards the state's
scalar secant ``gamma`` (the ``newton`` solver's), which keeps elements that barely moved from
taking a wild slope:

    g_e = (de_e dx_e + shrink m gamma) / (dx_e^2 + shrink m),     m = mean_e dx_e^2,

then clamped to ``[-clamp, clamp]``. ``shrink -> inf`` is the scalar ``newton``; ``damping``
(ELK-style) scales the Jacobian term, ``J -> (1 - damping) J``. With a diagonal Jacobian the
triangular solve is an elementwise scan over the window rows.
"""

from __future__ import annotations

import attrs
import torch

from ..errors import InvalidOptionError
from ..validators import check_real, order_option, prior_option, real, ridge_option
from .base import FixedPointSolver, WindowView
from .newton import NewtonState, prior_slopes, secant_pairs

__all__ = ["DiagonalNewton"]


@attrs.define(frozen=True, eq=False, kw_only=True)
class DiagonalNewton(FixedPointSolver):
    """Quasi-Newton with a per-element secant Jacobian (see the module docstring).

    Args:
        order: must be T (``None``, the default): the correction runs the whole window.
        shrink: weight of the state's scalar secant in each element's estimate (default 1).
        clamp: bound on each ``|g_e|`` (default 50).
        damping: ELK-style damping of the Jacobian term, in [0, 1) (default 0: none).
        prior: ``g`` of a state without a secant yet: ``"zero"`` (Picard) or ``"x0"`` (default;
            ``1 / sigma_j``, see :func:`~fpsolve.solvers.newton.prior_slopes`).
    """

    name = "newton_diag"
    aliases = {"quasi_deer": {}}

    order: int | None = attrs.field(default=None, validator=order_option)
    shrink: float = attrs.field(default=1.0, validator=ridge_option)
    clamp: float = attrs.field(default=50.0, validator=ridge_option)
    damping: float = attrs.field(
        default=0.0, converter=real, validator=check_real(minimum=0.0, maximum=1.0, strict_maximum=True))
    prior: str = attrs.field(default="x0", validator=prior_option)

    def init(self, system: object) -> NewtonState:
        """No secants yet: ``g`` is the prior everywhere."""
        steps = system.num_steps  # type: ignore[attr-defined]
        if self.resolved_order(steps) != steps:
            raise InvalidOptionError(
                f"solver 'newton_diag' solves the whole window (order = T = {steps}); got order="
                f"{self.order}. Use solver='newton' for a banded correction."
            )
        gamma = torch.zeros(steps + 1, system.num_samples, system.state_size,  # type: ignore[attr-defined]
                            dtype=system.dtype, device=system.device)  # type: ignore[attr-defined]
        if self.prior == "x0":
            gamma += prior_slopes(system, self.clamp)[:, None, None]
        state_coef, output_coef, _ = system.coefficients()  # type: ignore[attr-defined]
        return NewtonState(0, None, None, gamma, state_coef, output_coef)

    def step(self, view: WindowView, state: NewtonState) -> tuple[torch.Tensor, NewtonState]:
        """Update the secants at the evaluated states, then scan the window for the correction."""
        first, states, outputs, pairs = secant_pairs(view, state)
        gamma = state.gamma.clone()
        if pairs is not None:
            start, stop, dx, de = pairs
            tiny = torch.finfo(dx.dtype).tiny
            mean = dx.pow(2).mean(-1, keepdim=True)
            scalar = (de * dx).sum(-1, keepdim=True) / dx.pow(2).sum(-1, keepdim=True).clamp_min(tiny)
            prior = self.shrink * mean
            secant = (de * dx + prior * scalar) / (dx.pow(2) + prior).clamp_min(tiny)
            moved = mean > 0
            slope = secant.clamp(-self.clamp, self.clamp)
            gamma[start:stop] = torch.where(moved, slope, gamma[start:stop])
        correction = self._scan(view, gamma * (1 - self.damping), state.state_coef, state.output_coef)
        return view.states + correction, attrs.evolve(state, first=first, states=states, outputs=outputs,
                                                      gamma=gamma)

    @staticmethod
    def _scan(view: WindowView, gamma: torch.Tensor, state_coef: torch.Tensor,
              output_coef: torch.Tensor) -> torch.Tensor:
        lo = view.lo
        delta = torch.empty_like(view.first_order)
        for row in range(view.width):
            value = view.first_order[row].clone()
            for lag in range(1, min(state_coef.shape[1], row) + 1):
                i = lo + row  # the state of this row; it reads state i - lag
                coefficient = state_coef[i, lag - 1] + output_coef[i, lag - 1] * gamma[i - lag]
                value += coefficient * delta[row - lag]
            delta[row] = value
        return delta
