"""Anderson acceleration: standard (one least-squares fit) and triangular (one per timestep).

Both keep the last ``m`` iterates ``X`` and order-k residuals ``R`` of the window and form the
``q = m - 1`` newest difference columns ``dX``, ``dR``. Inner products run over all elements of
a state, separately for every sample (samples are independent systems). The ridge is absolute.

* AA:  ``Gamma = argmin ||R - dR Gamma||^2 + ridge ||Gamma||^2`` over the whole stacked window;
  ``X+ = X + R - (dX + dR) Gamma``. Rows new to the window have zero difference entries.
* TAA: row ``s`` fits its own ``Gamma_s`` on rows ``u <= s`` of the window only (the same and
  noisier timesteps: the triangular dependency), using the difference columns valid for ``s``
  (the newest ones):

      B_s = sum_{u <= s} dR_u^T dR_u + ridge I,   d_s = sum_{u <= s} dR_u^T R_u,
      x_s <- x_s + R_s - (dX_s + dR_s) B_s^{-1} d_s,

  computed for all rows at once with a cumulative sum of per-row Gram blocks. A row in its first
  window iteration has no valid column and takes the plain FP step. With the driver's safeguard
  (exact step at the first unconverged row) the anchor advances every iteration.
"""

from __future__ import annotations

import attrs
import torch

from ..validators import history_option, integer, order_option, real, restart_option, ridge_option
from .base import FixedPointSolver, WindowView
from .history import History, Snapshot, differences

__all__ = ["AA", "TAA", "RestartingHistory"]


@attrs.define(frozen=True, eq=False)
class RestartingHistory:
    """TAA's state with restarts: the history and, per sample, how many of its snapshots (newest
    first) are usable (``[N]``; older ones predate that sample's last restart)."""

    history: History
    usable: torch.Tensor | None = attrs.field(default=None, repr=False)


def _solve_small(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve ``(gram + ridge I) gamma = rhs`` in float64 for a batch of small systems."""
    size = gram.shape[-1]
    eye = torch.eye(size, dtype=torch.float64, device=gram.device)
    system = gram.to(torch.float64) + ridge * eye
    rhs = rhs.to(torch.float64).unsqueeze(-1)
    if ridge > 0:
        # Positive definite (a Gram matrix plus ridge I), so never singular: skip the error check,
        # which synchronises with the host on CUDA. Same LU solve, same numbers.
        return torch.linalg.solve_ex(system, rhs, check_errors=False)[0].squeeze(-1)
    try:
        return torch.linalg.solve(system, rhs).squeeze(-1)
    except torch.linalg.LinAlgError:  # only reachable with ridge = 0: take the least-norm fit
        return (torch.linalg.pinv(system) @ rhs).squeeze(-1)


def triangular_normal_equations(fitted: torch.Tensor,
                                target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ParaTAA's per-row normal equations: row ``s`` of the window fits on the rows ``u <= s``.

    ``fitted`` ``[W, N, D, q]`` (difference columns) and ``target`` ``[W, N, D]`` give
    ``gram[s] = sum_{u <= s} fitted_u^T fitted_u`` ``[W, N, q, q]`` and
    ``rhs[s] = sum_{u <= s} fitted_u^T target_u`` ``[W, N, q]``."""
    gram = torch.einsum("wndi,wndj->wnij", fitted, fitted).cumsum(0)
    rhs = torch.einsum("wndi,wnd->wni", fitted, target).cumsum(0)
    return gram, rhs


def masked_coefficients(gram: torch.Tensor, rhs: torch.Tensor, mask: torch.Tensor, ridge: float,
                        dtype: torch.dtype, *, relative: bool = False) -> torch.Tensor:
    """The least-squares coefficients on the columns ``mask`` keeps (1) and 0 on the others.

    A dropped column's row and column of ``gram`` are zeroed and its diagonal set to 1, so the
    system stays regular. ``ridge`` is absolute, or with ``relative`` a fraction of the kept Gram
    matrix's mean diagonal (the fit then does not depend on the scale of the columns)."""
    gram = gram * mask.unsqueeze(-1) * mask.unsqueeze(-2)
    rhs = rhs * mask
    if relative:
        scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).clamp_min(torch.finfo(gram.dtype).tiny)
        gram = gram / scale[..., None]
        rhs = rhs / scale
    gram = gram + torch.diag_embed(1 - mask)
    return _solve_small(gram, rhs, ridge).to(dtype) * mask


@attrs.define(frozen=True, eq=False, kw_only=True)
class _AndersonBase(FixedPointSolver):
    order: int | None = attrs.field(default=None, converter=integer, validator=order_option)
    history: int = attrs.field(default=2, converter=integer, validator=history_option)
    ridge: float = attrs.field(default=1e-3, converter=real, validator=ridge_option)

    def init(self, system: object) -> History:
        """An empty history of capacity ``history``."""
        return History(self.history)

    def _record(self, view: WindowView, state: History) -> History:
        return state.push(Snapshot(view.lo, view.states, view.residual))


@attrs.define(frozen=True, eq=False, kw_only=True)
class TAA(_AndersonBase):
    """Triangular Anderson acceleration (ParaTAA).

    Args:
        order: k of the equations, 1..T, ``None`` = T (default).
        history: m, iterates kept (2 by default; 1 is exactly plain FP).
        ridge: lambda added to every Gram matrix (absolute, default 1e-3).
        restart: ``None`` (default, ParaTAA) or a factor ``>= 1``: when a sample's order-k residual
            norm over the window grows by more than this factor in one iteration, that sample's
            history is dropped (it takes the plain FP step and fits only newer columns), the
            classic Anderson restart. The driver's safeguard applies either way.
    """

    name = "taa"
    aliases = {"parataa": {}}

    restart: float | None = attrs.field(default=None, converter=real, validator=restart_option)

    def init(self, system: object) -> History | RestartingHistory:  # type: ignore[override]
        """An empty history of capacity ``history`` (with restarts: and no usable snapshot yet)."""
        history = History(self.history)
        return history if self.restart is None else RestartingHistory(history)

    def step(self, view: WindowView,
             state: History | RestartingHistory) -> tuple[torch.Tensor, History | RestartingHistory]:
        """Per-row least squares on the noisier rows of the window; see the module docstring."""
        if isinstance(state, RestartingHistory):
            return self._restarting_step(view, state)
        state = self._record(view, state)
        if self.history == 1 or len(state.snapshots) < 2:
            return view.rhs, state
        return self._update(view, state, None), state

    def _restarting_step(self, view: WindowView,
                         state: RestartingHistory) -> tuple[torch.Tensor, RestartingHistory]:
        history = self._record(view, state.history)
        samples = view.residual.shape[1]
        usable = (torch.ones(samples, dtype=torch.long, device=view.residual.device) if state.usable is None
                  else (state.usable + 1).clamp(max=self.history))
        if len(history.snapshots) >= 2:
            previous = history.snapshots[1]
            rows = slice(view.lo - previous.lo, view.hi - previous.lo + 1)  # the window only slides down
            now = view.residual.pow(2).sum((0, 2)).sqrt()
            before = previous.residual[rows].pow(2).sum((0, 2)).sqrt()
            grew = now > before * self.restart  # type: ignore[operator]
            usable = torch.where(grew, torch.ones_like(usable), usable)
        new_state = RestartingHistory(history, usable)
        if self.history == 1 or len(history.snapshots) < 2:
            return view.rhs, new_state
        return self._update(view, history, usable), new_state

    def _update(self, view: WindowView, state: History, usable: torch.Tensor | None) -> torch.Tensor:
        d_states, d_residuals, valid = differences(state, view.lo, view.hi)
        gram, rhs = triangular_normal_equations(d_residuals, view.residual)
        # Row s may use column j only if it has that history itself; rows above s always do.
        mask = valid.to(gram.dtype)[:, None, :]  # [W, 1, q]
        if usable is not None:  # column j differences snapshots j and j+1: both must postdate a restart
            columns = torch.arange(valid.shape[1], device=usable.device)
            mask = mask * (columns[None, :] + 1 < usable[:, None]).to(gram.dtype)[None]  # [W, N, q]
        gamma = masked_coefficients(gram, rhs, mask, self.ridge, view.rhs.dtype)
        correction = torch.einsum("wndi,wni->wnd", d_states + d_residuals, gamma)
        return view.rhs - correction


@attrs.define(frozen=True, eq=False, kw_only=True)
class AA(_AndersonBase):
    """Standard (type-II, undamped) Anderson acceleration over the stacked window.

    Run unsafeguarded by its preset (``solve(system, "aa")``, or an ``AA`` instance), as in the
    literature: the anchor then moves only over rows that passed the stopping rule, and nothing
    bounds the number of iterations by T. ``window=fpsolve.Controller(safeguard=True)`` applies
    the exact step at the first unconverged row like TAA.

    Args:
        order: k of the equations, 1..T, ``None`` = T (default).
        history: m, iterates kept (default 2).
        ridge: lambda added to the Gram matrix (absolute, default 1e-3).
    """

    name = "aa"
    aliases = {"anderson": {}}

    def step(self, view: WindowView, state: History) -> tuple[torch.Tensor, History]:
        """One least-squares fit per sample over every row and element of the window."""
        state = self._record(view, state)
        if self.history == 1 or len(state.snapshots) < 2:
            return view.rhs, state
        d_states, d_residuals, _ = differences(state, view.lo, view.hi)
        gram = torch.einsum("wndi,wndj->nij", d_residuals, d_residuals)
        rhs = torch.einsum("wndi,wnd->ni", d_residuals, view.residual)
        gamma = _solve_small(gram, rhs, self.ridge).to(view.rhs.dtype)
        correction = torch.einsum("wndi,ni->wnd", d_states + d_residuals, gamma)
        return view.rhs - correction, state
