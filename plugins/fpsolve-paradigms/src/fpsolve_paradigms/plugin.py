"""The hook implementations that the ``fpsolve`` entry point of this distribution names.

fpsolve loads this module from the entry-point group ``fpsolve`` and calls its registration
hooks; nothing else is needed for ``solver="paradigms"`` to resolve. The method's loop policy
(window, boundary row, accepted rows, stopping rule) is the :data:`PARADIGMS` preset.
"""

from __future__ import annotations

import fpsolve
from fpsolve.control import Controller, Preset

from .solver import Paradigms
from .stopping import ParadigmsOriginal

#: ParaDiGMS as its code runs it: window ``parallel = 10``; every row, accepted ones included,
#: takes the Picard update; the row where the window stops sliding keeps its Picard value (the
#: proposal, not an exact step) and the window slides past it; ``ParadigmsOriginal(tol=0.1)``.
PARADIGMS = Preset(
    name="paradigms",
    solver=Paradigms,
    controller=Controller(window=10, boundary="proposal", update_accepted=True),
    stopping=ParadigmsOriginal(tol=0.1),
    description="ParaDiGMS (Shih et al., 2023): windowed Picard iteration, parallel=10, tolerance=0.1",
)


@fpsolve.hookimpl
def fpsolve_register_solvers() -> list[type[fpsolve.FixedPointSolver]]:
    """The ParaDiGMS solver (a different kind from the core ``paradigms`` stopping rule)."""
    return [Paradigms]


@fpsolve.hookimpl
def fpsolve_register_stopping_rules() -> list[type[fpsolve.StoppingRule]]:
    """ParaDiGMS' stopping rule exactly as its loop computes it."""
    return [ParadigmsOriginal]


@fpsolve.hookimpl
def fpsolve_register_presets() -> list[Preset]:
    """ParaDiGMS' window, stopping rule and window slide, as the ``paradigms`` preset."""
    return [PARADIGMS]
