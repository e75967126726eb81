"""ParaDiGMS (Shih et al., NeurIPS 2023) as an fpsolve plugin.

Installed, it registers the solver ``paradigms``, the stopping rule ``paradigms_original`` and
the preset ``paradigms`` (the solver with ParaDiGMS' window, rule and window slide), so the
ParaDiGMS peer is one name away::

    solution = fpsolve.solve(system, solver="paradigms")             # parallel=10, tolerance=0.1
    solution = fpsolve.solve(system, solver="paradigms", window=8,   # parallel=8, tolerance=0.05
                             stopping=ParadigmsOriginal(tol=0.05))

Without the entry point, the preset's parts are objects too:
``fpsolve.solve(system, Paradigms(), window=PARADIGMS.controller, stopping=PARADIGMS.stopping)``.
"""

from __future__ import annotations

from importlib import metadata

from .plugin import PARADIGMS
from .solver import Paradigms
from .stopping import ParadigmsOriginal

__all__ = ["PARADIGMS", "Paradigms", "ParadigmsOriginal", "__version__"]

try:
    __version__ = metadata.version("fpsolve-paradigms")
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "unknown"
