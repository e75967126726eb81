"""The ParaDiGMS solver: Picard iteration in a sliding window (Shih et al., NeurIPS 2023).

One ParaDiGMS iteration, as the paper's code and diffusers' ``StableDiffusionParadigmsPipeline``
run it, in fpsolve's terms (anchor ``a = lo - 1``, window rows ``lo..hi``, ``hi - a = parallel``):

1. one batched model call at states ``a .. hi-1``;
2. every row takes the Picard update ``x_r <- x_a + sum_{j <= r} (step(x_{j-1}) - x_{j-1})``
   (a cumulative sum of first-order residuals, see :func:`~fpsolve_paradigms.stopping.picard_update`),
   accepted rows included (``update_accepted = True``);
3. the rows are judged by :class:`~fpsolve_paradigms.ParadigmsOriginal`; the window slides by
   ``1 + `` the index of the first unaccepted row, which keeps its Picard value
   (:meth:`Paradigms.final_step`), so the anchor advances every iteration;
4. rows entering the window start as a copy of the last row of the previous window (fpsolve's
   ``noise_copy`` initializer and driver do exactly this).

The iteration count is the number of model calls, as ParaDiGMS' loop counts them.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from fpsolve import FixedPointSolver, StoppingRule
from fpsolve.errors import InvalidOptionError
from fpsolve.solvers import WindowView

from .stopping import ParadigmsOriginal, _tolerance, picard_update

__all__ = ["Paradigms"]


def _parallel(instance: Any, attribute: Any, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOptionError(
            f"parallel must be an int >= 1 (the window: states per model call; ParaDiGMS' default is 10); "
            f"got {value!r}."
        )


@attrs.define(frozen=True, eq=False, kw_only=True)
class Paradigms(FixedPointSolver):
    """ParaDiGMS: windowed Picard iteration with its own stopping rule and window slide.

    ``fpsolve.solve(system, solver="paradigms")`` uses ``window=parallel`` and the
    ``paradigms_original`` rule with ``tol=tolerance`` unless the caller gives ``window``,
    ``stopping`` or ``tol`` (``tol=`` always means fpsolve's ``rms`` rule).

    Args:
        parallel: window size, the states evaluated per model call (default 10, as the
            diffusers pipeline's ``parallel``).
        tolerance: ParaDiGMS' tolerance (default 0.1, the pipeline's ``tolerance``).
    """

    name = "paradigms"
    update_accepted = True

    parallel: int = attrs.field(default=10, validator=_parallel)
    tolerance: float = attrs.field(default=0.1, validator=_tolerance)

    @property
    def order(self) -> int:  # type: ignore[override]
        """1: the Picard update is built from first-order residuals, so the driver need not unroll."""
        return 1

    def step(self, view: WindowView, state: Any) -> tuple[torch.Tensor, Any]:
        """Every row takes its Picard update from the anchor."""
        return view.states + picard_update(view.first_order), state

    def final_step(self, view: WindowView, proposal: torch.Tensor, row: int) -> torch.Tensor:
        """ParaDiGMS keeps the Picard value at the row where its window stops sliding."""
        return proposal[row]

    def default_window(self) -> int:
        """``parallel``."""
        return self.parallel

    def default_stopping(self) -> StoppingRule:
        """:class:`~fpsolve_paradigms.ParadigmsOriginal` with ``tol=tolerance``."""
        return ParadigmsOriginal(tol=self.tolerance)
