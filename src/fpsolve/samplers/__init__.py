"""Built-in samplers, registered through the ``fpsolve_register_samplers`` hook.

* ``ddim``: DDIM with ``eta`` (0 = ODE, 1 = DDPM-like ancestral noise);
* ``ddpm``: ancestral DDPM with the posterior variance, any timestep stride;
* ``dpm_solver``: DPM-Solver++ multistep (data prediction), orders 1-3;
* ``flow_euler``: flow-matching Euler (velocity model, continuous time);
* ``flow_euler_stochastic``: flow Euler re-noising the predicted data at each step;
* ``flow_dpm_solver``: DPM-Solver++ multistep on a flow-matching schedule, orders 1-3;
* ``flow_unipc``: UniPC multistep predictor-corrector on a flow-matching schedule, orders 1-3.
"""

from __future__ import annotations

from ..plugin_marks import hookimpl
from .base import MODEL_OUTPUTS, AffineForm, SequentialSampler
from .dpm_solver import DPMSolver
from .flow import FlowDPMSolver, FlowEuler, FlowSampler, FlowUniPC, StochasticFlowEuler
from .vp import DDIM, DDPM, VPSampler

__all__ = ["AffineForm", "SequentialSampler", "MODEL_OUTPUTS", "VPSampler", "DDIM", "DDPM", "DPMSolver",
           "FlowSampler", "FlowEuler", "StochasticFlowEuler", "FlowDPMSolver", "FlowUniPC"]


@hookimpl
def fpsolve_register_samplers() -> list[type[SequentialSampler]]:
    """fpsolve's own samplers."""
    return [DDIM, DDPM, DPMSolver, FlowEuler, StochasticFlowEuler, FlowDPMSolver, FlowUniPC]
