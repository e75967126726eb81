"""Quasi-Newton iteration: Newton's method with a secant estimate of the model's Jacobian.

Linearising the sampler's step around the current iterate, a correction ``delta`` of the states
satisfies, row by row (``J_j`` the Jacobian of eps at state ``j``),

    delta_i = sum_l (A[i, l] + B[i, l] J_{i-l}) delta_{i-l} + r1_i.

Fixed-point iteration on the order-T equations (Picard) is this with ``J = 0``: it freezes the
model outputs. Here ``J_j ~ gamma_j I``, one scalar per state and sample, from the secant
between the last two model evaluations at that state,

    gamma_j = <e_j - e'_j, x_j - x'_j> / ||x_j - x'_j||^2      (clamped to [-clamp, clamp]),

so each iteration still makes ONE batched model call, and the correction is one batched
triangular solve over the window. States without a secant yet use ``gamma = 0`` (Picard).
Measured on the shipped digits model (DDIM-100, tol 2e-4, two seeds): 12-13 iterations
against 16-17 for ``taa`` (m = 2), both within 1/255 of the sequential image.

A state's slope is blended with a prior, ``1 / sigma_j`` by default: the slope of eps when the
predicted ``x_0`` is held fixed (``eps = (x - alpha_j x0) / sigma_j``). The secant through two
far-apart early iterates is a poor estimate, and before a state has one, ``gamma = 0`` is
Picard's step; the prior makes the early iterations the frozen-x0 extrapolation instead. With
the ``x0`` stopping rule this took the digits UNet from 10 to 7 rounds at DDIM-100 (issue 14).
"""

from __future__ import annotations

import attrs
import torch

from ..validators import integer, order_option, prior_option, real, ridge_option, unit_interval_option
from .base import FixedPointSolver, WindowView

__all__ = ["QuasiNewton", "NewtonState", "prior_slopes", "secant_pairs"]


def prior_slopes(system: object, clamp: float) -> torch.Tensor:
    """``[T+1]``: ``1 / sigma_j`` clamped to ``clamp``, the slope of eps at state ``j`` when the
    predicted ``x_0`` is held fixed (``eps = (x - alpha_j x0) / sigma_j``)."""
    sigmas = system.sigmas  # type: ignore[attr-defined]
    return (1 / sigmas.clamp_min(1 / clamp)).clamp(max=clamp)


@attrs.define(frozen=True, eq=False)
class NewtonState:
    """Secant memory: the previous evaluations ``(x, e)`` at states ``first..``, ``gamma [T+1, N]``,
    and the sampler's lag coefficients ``A``, ``B`` ``[T+1, K]`` on the device."""

    first: int
    states: torch.Tensor | None = attrs.field(repr=False)
    outputs: torch.Tensor | None = attrs.field(repr=False)
    gamma: torch.Tensor = attrs.field(repr=False)
    state_coef: torch.Tensor = attrs.field(repr=False)
    output_coef: torch.Tensor = attrs.field(repr=False)
    prior: torch.Tensor | None = attrs.field(default=None, repr=False)


@attrs.define(frozen=True, eq=False, kw_only=True)
class QuasiNewton(FixedPointSolver):
    """Quasi-Newton with a per-state scalar secant Jacobian (see the module docstring).

    Args:
        order: k; the correction reaches at most k rows down (``None`` = T, default).
        clamp: bound on ``|gamma|`` (guards against a secant through nearly equal states).
        prior: the slope of a state without a secant yet, and the one secants are blended with:
            ``"x0"`` (default; ``1 / sigma_j``, the Jacobian of an eps- or velocity-predicting
            model when its predicted ``x_0`` is held fixed, as in ParaSolver's extrapolation) or
            ``"zero"`` (Picard's frozen outputs).
        prior_weight: ``w`` in [0, 1]; a state's slope is ``(1 - w) secant + w prior`` (default
            0.5; 0: the secant alone, the solver before issue 14 with ``prior="zero"``; 1: the
            prior alone, no secants).

    Its preset (``solve(system, "newton")``, or a ``QuasiNewton`` instance) stops with
    :class:`~fpsolve.stopping.X0Forecast` unless ``stopping=`` / ``tol=`` is given: stop once the
    output ``x_0`` moved by at most 1.5e-2, or once its contraction forecasts a remaining error of
    at most 1.2e-2, rows judged at RMS 5e-6 (issue 14: one round fewer than the ``x0`` rule on
    about a quarter of the benchmark cells, every one still <= 1 px;
    docs/benchmarks/iterations.md; the preset is in :mod:`fpsolve.control`).
    """

    name = "newton"
    aliases = {"quasi_newton": {}}

    order: int | None = attrs.field(default=None, converter=integer, validator=order_option)
    clamp: float = attrs.field(default=50.0, converter=real, validator=ridge_option)
    # Defaults measured on the digits UNet (issue 14, docs/benchmarks): the prior 1/sigma with
    # weight 0.5 took DDIM-100 from 10 to 7 rounds to the first <= 1 px iterate; the secant
    # alone (weight 0) 10, the prior alone (weight 1) 8; on DDPM-100 17 against 19 and 21.
    prior: str = attrs.field(default="x0", validator=prior_option)
    prior_weight: float = attrs.field(default=0.5, converter=real, validator=unit_interval_option)

    def init(self, system: object) -> NewtonState:
        """No secants yet: ``gamma`` is the prior everywhere (``zero``: the first step is Picard's)."""
        steps, samples = system.num_steps, system.num_samples  # type: ignore[attr-defined]
        gamma = torch.zeros(steps + 1, samples, dtype=system.dtype, device=system.device)  # type: ignore[attr-defined]
        if self.prior == "x0":
            gamma += prior_slopes(system, self.clamp)[:, None]
        state_coef, output_coef, _ = system.coefficients()  # type: ignore[attr-defined]
        return NewtonState(0, None, None, gamma, state_coef, output_coef, gamma[:, :1].clone())

    def step(self, view: WindowView, state: NewtonState) -> tuple[torch.Tensor, NewtonState]:
        """Update the secants at the evaluated states, then solve for the Newton correction."""
        first, states, outputs, pairs = secant_pairs(view, state)
        gamma = state.gamma.clone()
        if pairs is not None:
            start, stop, d_states, d_outputs = pairs
            prior = None if state.prior is None else state.prior[start:stop]
            slope, moved = self.secant_slopes(d_states, d_outputs, prior)
            gamma[start:stop] = torch.where(moved, slope, gamma[start:stop])
        correction = self._correction(view, gamma, state.state_coef, state.output_coef)
        return view.states + correction, attrs.evolve(state, first=first, states=states, outputs=outputs,
                                                      gamma=gamma)

    def secant_slopes(self, d_states: torch.Tensor, d_outputs: torch.Tensor,
                      prior: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each state's slope from its secant pair ``[..., D]``: ``<de, dx> / |dx|^2`` clamped to
        ``[-clamp, clamp]``, blended with ``prior`` (``[...]``, or ``None``: no blend) by
        ``prior_weight``. Returns ``(slope, moved)``, ``moved`` where ``dx`` is non-zero (elsewhere
        the slope is meaningless and the caller keeps the old one)."""
        squared = d_states.pow(2).sum(-1)
        secant = (d_outputs * d_states).sum(-1) / squared.clamp_min(torch.finfo(squared.dtype).tiny)
        slope = secant.clamp(-self.clamp, self.clamp)
        if self.prior_weight and prior is not None:
            slope = (1 - self.prior_weight) * slope + self.prior_weight * prior
        return slope, squared > 0

    def _correction(self, view: WindowView, gamma: torch.Tensor, state_coef: torch.Tensor,
                    output_coef: torch.Tensor) -> torch.Tensor:
        lo, hi, width = view.lo, view.hi, view.width
        samples = view.first_order.shape[1]
        lower = view.first_order.new_zeros(samples, width, width)
        for lag in range(1, state_coef.shape[1] + 1):
            if lag >= width:
                break
            rows = torch.arange(lag, width, device=lower.device)
            coefficient = (state_coef[lo + lag:hi + 1, lag - 1, None]
                           + output_coef[lo + lag:hi + 1, lag - 1, None] * gamma[lo:hi + 1 - lag])  # [W-l, N]
            lower[:, rows, rows - lag] = coefficient.transpose(0, 1)
        eye = torch.eye(width, dtype=lower.dtype, device=lower.device)
        residual = view.first_order.transpose(0, 1)  # [N, W, D]
        order = self.resolved_order(view.trajectory.shape[0] - 1)
        if order >= width:
            solved = torch.linalg.solve_triangular(eye - lower, residual, upper=False, unitriangular=True)
        else:  # the correction of row i reaches back at most k - 1 rows, like the order-k equations
            propagator = torch.linalg.solve_triangular(eye - lower, eye.expand_as(lower), upper=False,
                                                       unitriangular=True)
            offsets = torch.arange(width, device=lower.device)
            propagator = propagator * ((offsets[:, None] - offsets[None, :]) < order)
            solved = propagator @ residual
        return solved.transpose(0, 1)


def secant_pairs(
    view: WindowView, state: NewtonState
) -> tuple[int, torch.Tensor, torch.Tensor, tuple[int, int, torch.Tensor, torch.Tensor] | None]:
    """The states and model outputs this iteration evaluated (``lo-1 .. hi-1``), and their
    differences to the previous iteration's at the states both evaluated.

    Returns ``(first, states, outputs, pairs)``: ``first = lo - 1``, copies of the evaluated
    states and outputs (kept for the next iteration), and ``pairs = (start, stop, d_states,
    d_outputs)`` over trajectory positions ``start .. stop-1``, or ``None`` when nothing overlaps.
    The secant solvers (``newton``, ``newton_diag``) fit their slopes to these pairs.
    """
    first, hi = view.lo - 1, view.hi
    states = view.trajectory[first:hi].clone()
    outputs = view.outputs[first:hi].clone()
    if state.states is None:
        return first, states, outputs, None
    start = max(first, state.first)
    stop = min(hi, state.first + state.states.shape[0])
    if start >= stop:
        return first, states, outputs, None
    new = slice(start - first, stop - first)
    old = slice(start - state.first, stop - state.first)
    d_states = states[new] - state.states[old]
    d_outputs = outputs[new] - state.outputs[old]  # type: ignore[index]
    return first, states, outputs, (start, stop, d_states, d_outputs)
