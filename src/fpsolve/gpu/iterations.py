"""Predict how many parallel iterations a solve needs at window ``w``.

The model: with window ``w`` the solve slides ``T / w`` times, and the last window needs about as
many iterations as a full-window solve, its *plateau* ``P``:

    I(w) = min(T, P + T / w - 1)            (I(T) = P)

Checked on the Gaussian-mixture toy (``fpsolve.models.load_reference("gmm")``, DDIM, TAA m=2,
tol 1e-3, seed 0; docs/gpu.md has the table): with the prior plateau below, the prediction is
within 26% of the measured count for every window from 4 to T, for T = 25, 50, 100 and
eta = 0 and 1 (within 15% for T = 25 and 50).

The prior plateau: ``max(10, 0.12 T)`` for TAA and AA on a deterministic sampler (ParaTAA's
~0.1-0.15 T at window T for large T; the toy needs ~11 iterations at any T from 25 to 100),
1.5x that for plain FP on order-T equations, 0.6x for ``newton`` (the default solver: at window T
it took 4 iterations on the toy where TAA took 11, and 7.5-8 where TAA took 13-15 on the digits
UNet; with window T/4, 10-11 on the toy), ``0.6 T`` for order-1 FP (Jacobi), 1.5x for other
solvers, and twice as many when the sampler injects noise (eta > 0, DDPM). After a solve, the
observed iterations replace the prior: ``P = I_observed - T / w_observed + 1`` (the median over
observations of the same problem).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import attrs

from ..errors import InvalidOptionError
from ..validators import as_real

__all__ = ["IterationModel", "prior_plateau", "fit_plateau"]

#: Prior plateau factors relative to TAA, by solver name.
SOLVER_FACTORS = {"taa": 1.0, "aa": 1.0, "fp": 1.5, "newton": 0.6}
#: Factor for solvers this module does not know.
UNKNOWN_SOLVER_FACTOR = 1.5
#: Factor for samplers that inject noise at every step (eta > 0).
STOCHASTIC_FACTOR = 2.0


def prior_plateau(
    num_steps: int, *, solver: str = "taa", order: int | None = None, stochastic: bool = False
) -> float:
    """The prior number of iterations at window T (see the module docstring)."""
    if solver == "fp" and order == 1:
        plateau = 0.6 * num_steps
    else:
        plateau = max(10.0, 0.12 * num_steps) * SOLVER_FACTORS.get(solver, UNKNOWN_SOLVER_FACTOR)
    if stochastic:
        plateau *= STOCHASTIC_FACTOR
    return min(float(num_steps), plateau)


def fit_plateau(num_steps: int, observations: Sequence[tuple[int, int]]) -> float:
    """The plateau that explains observed ``(window, iterations)`` pairs (median over them)."""
    if not observations:
        raise InvalidOptionError("fit_plateau needs at least one (window, iterations) observation.")
    values = [iterations - num_steps / min(window, num_steps) + 1 for window, iterations in observations]
    return min(float(num_steps), max(1.0, statistics.median(values)))


@attrs.define(frozen=True)
class IterationModel:
    """``I(w) = min(T, P + T / w - 1)``, at least 1; call it with a window.

    Attributes:
        num_steps: T.
        plateau: P, the iterations at window T.
        source: ``"prior"`` or ``"observed"``.
    """

    num_steps: int
    plateau: float
    source: str = "prior"

    def __attrs_post_init__(self) -> None:
        as_real("plateau", self.plateau, minimum=0.0, strict=True)

    def __call__(self, window: int) -> float:
        """Predicted iterations at ``window``."""
        width = min(max(1, int(window)), self.num_steps)
        return min(float(self.num_steps), max(1.0, self.plateau + self.num_steps / width - 1))

    @classmethod
    def prior(
        cls, num_steps: int, *, solver: str = "taa", order: int | None = None, stochastic: bool = False
    ) -> IterationModel:
        """The model with the prior plateau."""
        return cls(num_steps, prior_plateau(num_steps, solver=solver, order=order, stochastic=stochastic))

    @classmethod
    def observed(cls, num_steps: int, observations: Sequence[tuple[int, int]]) -> IterationModel:
        """The model fitted to observed ``(window, iterations)`` pairs."""
        return cls(num_steps, fit_plateau(num_steps, observations), "observed")
