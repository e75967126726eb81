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

from ..validators import history_option, integer, order_option, real, ridge_option
from .base import FixedPointSolver, WindowView
from .history import History, Snapshot, differences

__all__ = ["AA", "TAA"]


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
    """

    name = "taa"
    aliases = {"parataa": {}}

    def step(self, view: WindowView, state: History) -> tuple[torch.Tensor, History]:
        """Per-row least squares on the noisier rows of the window; see the module docstring."""
        state = self._record(view, state)
        if self.history == 1 or len(state.snapshots) < 2:
            return view.rhs, state
        d_states, d_residuals, valid = differences(state, view.lo, view.hi)
        gram = torch.einsum("wndi,wndj->wnij", d_residuals, d_residuals).cumsum(0)
        rhs = torch.einsum("wndi,wnd->wni", d_residuals, view.residual).cumsum(0)
        # Row s may use column j only if it has that history itself; rows above s always do.
        mask = valid.to(gram.dtype)[:, None, :]  # [W, 1, q]
        gram = gram * mask.unsqueeze(-1) * mask.unsqueeze(-2) + torch.diag_embed(1 - mask)
        rhs = rhs * mask
        gamma = _solve_small(gram, rhs, self.ridge).to(view.rhs.dtype) * mask
        correction = torch.einsum("wndi,wni->wnd", d_states + d_residuals, gamma)
        return view.rhs - correction, state


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
