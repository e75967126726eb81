"""Iterate/residual history for the Anderson-type solvers, stored per window snapshot.

A snapshot holds one iteration's window rows ``lo..hi``, its iterate and its order-k residual.
The window only slides towards the clean end, so a row present in an older snapshot is present
in every newer one; differences between consecutive snapshots are taken row by row, and a row
that entered the window recently simply has fewer valid difference columns.
"""

from __future__ import annotations

import attrs
import torch

__all__ = ["Snapshot", "History", "differences"]


@attrs.define(frozen=True, eq=False)
class Snapshot:
    """One iteration's window: rows ``lo..lo+W-1``, iterate ``states`` and ``residual`` ``[W, N, D]``."""

    lo: int
    states: torch.Tensor
    residual: torch.Tensor

    @property
    def hi(self) -> int:
        """The last row of the snapshot."""
        return self.lo + self.states.shape[0] - 1

    def rows(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(states, residual, present)`` on rows ``lo..hi``: zeros and False where absent."""
        width = hi - lo + 1
        states = self.states.new_zeros((width,) + self.states.shape[1:])
        residual = torch.zeros_like(states)
        present = torch.zeros(width, dtype=torch.bool, device=states.device)
        first, last = max(lo, self.lo), min(hi, self.hi)
        if first <= last:
            target = slice(first - lo, last - lo + 1)
            source = slice(first - self.lo, last - self.lo + 1)
            states[target] = self.states[source]
            residual[target] = self.residual[source]
            present[target] = True
        return states, residual, present


@attrs.define(frozen=True, eq=False)
class History:
    """The newest ``capacity`` snapshots, newest first (an explicit, immutable solver state)."""

    capacity: int
    snapshots: tuple[Snapshot, ...] = ()

    def push(self, snapshot: Snapshot) -> History:
        """A new history with ``snapshot`` as the newest entry."""
        return History(self.capacity, ((snapshot,) + self.snapshots)[: self.capacity])


def differences(history: History, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Difference columns on rows ``lo..hi``, newest first.

    Returns ``dX``, ``dR`` of shape ``[W, N, D, q]`` (``q = len(history) - 1``; column ``j`` is
    snapshot ``j`` minus snapshot ``j+1``, zero where a row is absent from either) and ``valid``
    ``[W, q]`` bool.
    """
    rows = [snapshot.rows(lo, hi) for snapshot in history.snapshots]
    d_states, d_residuals, valid = [], [], []
    for (x_new, r_new, p_new), (x_old, r_old, p_old) in zip(rows, rows[1:], strict=False):
        present = p_new & p_old
        mask = present.view(-1, *([1] * (x_new.dim() - 1))).to(x_new.dtype)
        d_states.append((x_new - x_old) * mask)
        d_residuals.append((r_new - r_old) * mask)
        valid.append(present)
    if not d_states:
        width = hi - lo + 1
        empty_shape = (width,) + history.snapshots[0].states.shape[1:] + (0,)
        like = history.snapshots[0].states
        empty = like.new_zeros(empty_shape)
        return empty, empty.clone(), torch.zeros(width, 0, dtype=torch.bool, device=like.device)
    return torch.stack(d_states, -1), torch.stack(d_residuals, -1), torch.stack(valid, -1)
