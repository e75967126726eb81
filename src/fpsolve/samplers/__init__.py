"""Built-in samplers, registered through the ``fpsolve_register_samplers`` hook.

* ``ddim``: DDIM with ``eta`` (0 = ODE, 1 = DDPM-like ancestral noise);
* ``ddpm``: ancestral DDPM with the posterior variance, any timestep stride;
* ``dpm_solver``: DPM-Solver++ multistep (data prediction), orders 1-3.
"""

from __future__ import annotations

from ..hookspecs import hookimpl
from .base import AffineForm, SequentialSampler
from .dpm_solver import DPMSolver
from .vp import DDIM, DDPM, VPSampler

__all__ = ["AffineForm", "SequentialSampler", "VPSampler", "DDIM", "DDPM", "DPMSolver"]


@hookimpl
def fpsolve_register_samplers() -> list[type[SequentialSampler]]:
    """fpsolve's own samplers."""
    return [DDIM, DDPM, DPMSolver]
