"""ParaDiGMS (Shih et al., NeurIPS 2023) as an fpsolve plugin.

Installed, it registers the solver ``paradigms`` and the stopping rule ``paradigms_original``,
so the ParaDiGMS peer is one name away::

    solution = fpsolve.solve(system, solver="paradigms")             # parallel=10, tolerance=0.1
    solution = fpsolve.solve(system, solver="paradigms", parallel=8, tolerance=0.05)

The objects work without the entry point too: ``fpsolve.solve(system, Paradigms(parallel=8))``.
"""

from __future__ import annotations

from importlib import metadata

from .solver import Paradigms
from .stopping import ParadigmsOriginal

__all__ = ["Paradigms", "ParadigmsOriginal", "__version__"]

try:
    __version__ = metadata.version("fpsolve-paradigms")
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "unknown"
