"""The hook implementations that the ``fpsolve`` entry point of this distribution names.

fpsolve loads this module from the entry-point group ``fpsolve`` and calls its registration
hooks; nothing else is needed for ``solver="paradigms"`` to resolve.
"""

from __future__ import annotations

import fpsolve

from .solver import Paradigms
from .stopping import ParadigmsOriginal


@fpsolve.hookimpl
def fpsolve_register_solvers() -> list[type[fpsolve.FixedPointSolver]]:
    """The ParaDiGMS solver (a different kind from the core ``paradigms`` stopping rule)."""
    return [Paradigms]


@fpsolve.hookimpl
def fpsolve_register_stopping_rules() -> list[type[fpsolve.StoppingRule]]:
    """ParaDiGMS' stopping rule exactly as its loop computes it."""
    return [ParadigmsOriginal]
