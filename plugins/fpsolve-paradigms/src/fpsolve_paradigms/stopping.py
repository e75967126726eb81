"""ParaDiGMS' stopping rule, exactly as the ParaDiGMS loop computes it.

For window row ``r`` (a state index; the anchor is ``lo - 1``) ParaDiGMS computes the Picard
update ``dx_r = x_new_r - x_r`` and accepts the row when, for every sample,

    ||dx_r||^2 / (D * v_r) <= tol^2,

with ``D`` the number of elements of a sample and ``v_r`` the DDPM posterior variance that its
scheduler's ``_get_variance(timesteps[r])`` returns: the variance of the step that *leaves*
state ``r`` (fpsolve's ``step_variances[r + 1]``), and 0 for the final state ``x_0``. A zero
variance makes the error infinite, so such a row is accepted only if its update is exactly
zero (ParaDiGMS then computes 0 / 0 = NaN, which passes its ``error > tol^2`` test).

It differs from the core ``paradigms`` rule (:class:`fpsolve.stopping.Paradigms`) in three
details, which is why it has its own name: the core rule measures fpsolve's order-k residual
instead of ParaDiGMS' Picard update, scales row ``r`` by the variance of the step *producing*
it, and floors zero variances at 1e-20 instead of dividing by zero.
"""

from __future__ import annotations

import attrs
import torch

from fpsolve.errors import InvalidOptionError
from fpsolve.stopping import StoppingRule, StoppingView
from fpsolve.validators import check_real

__all__ = ["ParadigmsOriginal", "picard_update", "leaving_variances"]


def picard_update(first_order: torch.Tensor) -> torch.Tensor:
    """ParaDiGMS' update ``x_new - x`` on the window rows, from the first-order residuals ``[W, N, D]``.

    ParaDiGMS sets ``x_new_r = x_anchor + sum_{j <= r} (step(x_{j-1}) - x_{j-1})``; since
    ``step(x_{j-1}) - x_{j-1} = r1_j + x_j - x_{j-1}``, the sum telescopes to
    ``x_new_r - x_r = sum_{j <= r} r1_j``: a cumulative sum of first-order residuals.
    """
    return first_order.cumsum(0)


def leaving_variances(step_variances: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``[hi - lo + 1]``: the posterior variance of the step leaving each row ``lo..hi``.

    ``step_variances`` is the system's ``[T+1]`` vector (entry ``i``: the step producing state
    ``i``); the final state ``x_0`` leaves by no step and gets 0, as in ParaDiGMS.
    """
    steps = step_variances.shape[0] - 1
    leaving = step_variances[lo + 1 : min(hi, steps - 1) + 2]
    if hi == steps:
        leaving = torch.cat([leaving, leaving.new_zeros(1)])
    return leaving


_tolerance = check_real("tol", minimum=0.0, strict=True, hint=" (ParaDiGMS' default is 0.1)")


@attrs.define(frozen=True, eq=False, kw_only=True)
class ParadigmsOriginal(StoppingRule):
    """ParaDiGMS' rule: ``||x_new - x||^2 / (D v) <= tol^2`` for every sample (see the module).

    Args:
        tol: the tolerance, a ratio of the scheduler's noise magnitude (default 0.1, as the
            diffusers pipeline's ``tolerance``).
    """

    name = "paradigms_original"

    tol: float = attrs.field(default=0.1, validator=_tolerance)

    def converged(self, view: StoppingView) -> torch.Tensor:
        """Rows whose scaled squared Picard update is within ``tol^2`` for every sample."""
        if view.system is None:
            raise InvalidOptionError(
                "the paradigms_original rule reads the variance of the step leaving each row from the "
                "system; this StoppingView carries none (build it with system=...)."
            )
        update = picard_update(view.first_order)
        variances = leaving_variances(view.system.step_variances, view.lo, view.hi).to(update.dtype)
        size = update.shape[-1]
        # Divide by zero on purpose: ParaDiGMS does, and NaN (an exactly zero update) passes its test.
        error = update.pow(2).sum(-1) / (size * variances[:, None])
        return ~(error > self.tol**2).any(-1)
