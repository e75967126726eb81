"""Built-in fixed-point solvers, registered through the ``fpsolve_register_solvers`` hook.

==============  =====================================================================
name            what it does
==============  =====================================================================
``sequential``  the reference: the sampler step by step (T model calls)
``fp``          fixed-point iteration on the order-k equations (``order``, default T)
``jacobi``      ``fp`` with k = 1 (the sampler's own equations)
``picard``      ``fp`` with k = T (every equation anchored at x_T)
``aa``          standard Anderson acceleration over the stacked window
``taa``         triangular Anderson acceleration with the safeguard (ParaTAA)
``newton``      quasi-Newton: a per-state secant estimate of the model Jacobian
``newton_diag`` quasi-DEER: a per-element (diagonal) secant estimate of the Jacobian
``newton_aa``   ``newton`` with its proposals Anderson-mixed over m iterates (multi-secant)
==============  =====================================================================
"""

from __future__ import annotations

from ..plugin_marks import hookimpl
from .anderson import AA, TAA
from .anderson_newton import AndersonNewton
from .base import FixedPointSolver, WindowView
from .diagonal_newton import DiagonalNewton
from .fp import FP
from .newton import QuasiNewton
from .sequential import Sequential

__all__ = ["FixedPointSolver", "WindowView", "FP", "AA", "TAA", "QuasiNewton", "DiagonalNewton",
           "AndersonNewton", "Sequential"]


@hookimpl
def fpsolve_register_solvers() -> list[type[FixedPointSolver]]:
    """fpsolve's own solvers."""
    return [Sequential, FP, AA, TAA, QuasiNewton, DiagonalNewton, AndersonNewton]
