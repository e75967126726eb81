"""Multi-secant quasi-Newton: Anderson mixing of ``newton``'s proposals (issue 14, round 3).

``newton`` (:mod:`fpsolve.solvers.newton`) uses ONE secant per state: a scalar slope through the
last two model evaluations, blended with the prior ``1 / sigma``. Its correction ``c(x)`` (the
triangular solve of the linearised sampler with that slope) is a preconditioned residual: zero
exactly at the sequential trajectory. This solver keeps the last ``m`` iterates ``X`` and
corrections ``C`` of the window, forms the ``q = m - 1`` newest difference columns ``dX``,
``dC``, and mixes them as TAA does with the order-k residual (type-II Anderson on the map
``x -> x + c(x)``):

* ``mode="triangular"`` (default; ParaTAA's structure): row ``s`` fits its own coefficients on
  the rows ``u <= s`` of the window,

      B_s = sum_{u <= s} dC_u^T dC_u + ridge I,   d_s = sum_{u <= s} dC_u^T C_u,
      x_s <- x_s + C_s - (dX_s + dC_s) B_s^{-1} d_s;

* ``mode="stacked"``: one fit per sample over the whole window (AA).

So the m - 1 extra secant pairs of every state are folded in by least squares; with ``m = 1``
it is exactly ``newton``. The safeguard of the mixing itself: a sample whose mixed step is longer
than ``max_ratio`` times newton's own step (RMS over its window) takes newton's proposal; the
driver's safeguard (exact step at the first unconverged row) applies as for every solver.
"""

from __future__ import annotations

import attrs
import torch

from ..validators import check_choice, check_real, history_option, integer, real, ridge_option
from .anderson import masked_coefficients, triangular_normal_equations
from .base import WindowView
from .history import History, Snapshot, differences
from .newton import NewtonState, QuasiNewton

__all__ = ["AndersonNewton", "AndersonNewtonState"]

mode_option = check_choice({"triangular": "one fit per row on the rows above it, as TAA",
                            "stacked": "one fit per sample over the window, as AA"})
fit_option = check_choice({"correction": "newton's corrections", "residual": "the first-order residuals"})


@attrs.define(frozen=True, eq=False)
class AndersonNewtonState:
    """newton's secant memory and the history of iterates and newton corrections."""

    newton: NewtonState
    history: History
    residuals: History | None = None


@attrs.define(frozen=True, eq=False, kw_only=True)
class AndersonNewton(QuasiNewton):
    """``newton`` with its proposals Anderson-mixed over ``history`` iterates (module docstring).

    Args:
        order, clamp, prior, prior_weight: as :class:`~fpsolve.solvers.QuasiNewton`.
        history: m, iterates kept (default 3: two secant pairs; 1 is exactly ``newton``).
        ridge: lambda added to every Gram matrix, relative to the mean diagonal of that Gram
            matrix (default 1e-3), so it does not depend on the scale of the corrections.
        mode: ``"triangular"`` (default) or ``"stacked"``.
        fit: what the least squares minimises: ``"correction"`` (default; newton's corrections
            ``C``, Anderson on ``x -> x + c(x)``) or ``"residual"`` (the sampler's first-order
            residuals ``R``: ``Gamma = argmin ||R - dR Gamma||``, the step still
            ``C - (dX + dC) Gamma``).
        max_ratio: a sample whose mixed step is longer than this times newton's step takes
            newton's step (default 2; > 0).

    Without ``stopping=`` / ``tol=`` it stops like ``newton`` (its preset's ``x0_forecast``).
    """

    name = "newton_aa"
    aliases = {"anderson_newton": {}}

    history: int = attrs.field(default=3, converter=integer, validator=history_option)
    ridge: float = attrs.field(default=1e-3, converter=real, validator=ridge_option)
    mode: str = attrs.field(default="triangular", validator=mode_option)
    max_ratio: float = attrs.field(default=2.0, converter=real,
                                   validator=check_real(minimum=0.0, strict=True))
    fit: str = attrs.field(default="correction", validator=fit_option)

    def init(self, system: object) -> AndersonNewtonState:  # type: ignore[override]
        """newton's initial state and an empty history of capacity ``history``."""
        residuals = History(self.history) if self.fit == "residual" else None
        return AndersonNewtonState(super().init(system), History(self.history), residuals)

    def step(self, view: WindowView,  # type: ignore[override]
             state: AndersonNewtonState) -> tuple[torch.Tensor, AndersonNewtonState]:
        """newton's proposal, then the least-squares mixing of its corrections."""
        proposal, newton = super().step(view, state.newton)
        correction = proposal - view.states
        history = state.history.push(Snapshot(view.lo, view.states, correction))
        residuals = None if state.residuals is None else state.residuals.push(
            Snapshot(view.lo, view.states, view.first_order))
        new_state = AndersonNewtonState(newton, history, residuals)
        if self.history == 1 or len(history.snapshots) < 2:
            return proposal, new_state
        d_states, d_corrections, valid = differences(history, view.lo, view.hi)
        fitted, target = d_corrections, correction
        if residuals is not None:
            fitted, target = differences(residuals, view.lo, view.hi)[1], view.first_order
        if self.mode == "triangular":
            gram, rhs = triangular_normal_equations(fitted, target)
            mask = valid.to(gram.dtype)[:, None, :]  # [W, 1, q]: row s uses column j only if it has it
        else:
            gram = torch.einsum("wndi,wndj->nij", fitted, fitted)
            rhs = torch.einsum("wndi,wnd->ni", fitted, target)
            mask = torch.ones_like(rhs)
        # the ridge is relative to the Gram matrix's scale (its mean diagonal)
        coefficients = masked_coefficients(gram, rhs, mask, self.ridge, proposal.dtype, relative=True)
        if self.mode == "triangular":
            mixing = torch.einsum("wndi,wni->wnd", d_states + d_corrections, coefficients)
        else:
            mixing = torch.einsum("wndi,ni->wnd", d_states + d_corrections, coefficients)
        mixed = proposal - mixing
        newton_step = correction.pow(2).sum((0, 2))
        mixed_step = (mixed - view.states).pow(2).sum((0, 2))
        too_long = (mixed_step > self.max_ratio ** 2 * newton_step) | ~torch.isfinite(mixed_step)
        return torch.where(too_long[None, :, None], proposal, mixed), new_state
