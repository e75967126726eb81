"""The ParaDiGMS solver: Picard iteration in a sliding window (Shih et al., NeurIPS 2023).

One ParaDiGMS iteration, as the paper's code and diffusers' ``StableDiffusionParadigmsPipeline``
run it, in fpsolve's terms (anchor ``a = lo - 1``, window rows ``lo..hi``, ``hi - a = parallel``):

1. one batched model call at states ``a .. hi-1``;
2. every row takes the Picard update ``x_r <- x_a + sum_{j <= r} (step(x_{j-1}) - x_{j-1})``
   (a cumulative sum of first-order residuals, see :func:`~fpsolve_paradigms.stopping.picard_update`),
   accepted rows included;
3. the rows are judged by :class:`~fpsolve_paradigms.ParadigmsOriginal`; the window slides by
   ``1 + `` the index of the first unaccepted row, which keeps its Picard value, so the anchor
   advances every iteration;
4. rows entering the window start as a copy of the last row of the previous window (fpsolve's
   ``noise_copy`` initializer and driver do exactly this).

The solver is step 2 only. Steps 1, 3 and 4 are loop policy, which the ``paradigms`` preset
(:data:`~fpsolve_paradigms.plugin.PARADIGMS`) gives the driver: ``Controller(window=10,
boundary="proposal", update_accepted=True)`` and ``ParadigmsOriginal(tol=0.1)``.

The iteration count is the number of model calls, as ParaDiGMS' loop counts them.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from fpsolve import FixedPointSolver
from fpsolve.solvers import WindowView

from .stopping import picard_update

__all__ = ["Paradigms"]


@attrs.define(frozen=True, eq=False, kw_only=True)
class Paradigms(FixedPointSolver):
    """ParaDiGMS' Picard update of every window row (see the module docstring).

    ``fpsolve.solve(system, "paradigms")`` (or with a ``Paradigms()`` instance) runs it under the
    ``paradigms`` preset: window 10, the ``paradigms_original`` rule at tol 0.1, the Picard value
    kept at the row where the window stops sliding, accepted rows updated too. ``window=`` and
    ``stopping=`` override those parts (``tol=`` always means fpsolve's ``rms`` rule); the
    pipeline's ``parallel`` is ``window=`` and its ``tolerance`` is
    ``stopping=ParadigmsOriginal(tol=...)``.
    """

    name = "paradigms"

    @property
    def order(self) -> int:  # type: ignore[override]
        """1: the Picard update is built from first-order residuals, so the driver need not unroll."""
        return 1

    def step(self, view: WindowView, state: Any) -> tuple[torch.Tensor, Any]:
        """Every row takes its Picard update from the anchor."""
        return view.states + picard_update(view.first_order), state
