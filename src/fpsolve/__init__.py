"""fpsolve: parallel diffusion sampling by solving the whole trajectory as a triangular system.

Quick start::

    import torch, fpsolve
    sampler = fpsolve.samplers.DDIM(alphas_cumprod=abar, timesteps=steps, eta=0.0)
    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=eps_model, shape=(64,),
                                      generator=torch.Generator().manual_seed(0))
    solution = fpsolve.solve(system, solver="taa", tol=1e-3)

``import fpsolve`` loads no plugins; entry points are read on first use of the registry.
"""

from __future__ import annotations

from . import adjoint, control, errors, initializers, inversion, samplers, solvers, stopping
from .api import make_system, solve
from .control import Controller, Preset
from .driver import DriverConfig as DriverConfig  # the former name of Controller, kept importable
from .driver import IterationInfo
from .errors import NotConvergedError, NotConvergedWarning
from .hookspecs import hookimpl
from .initializers import Initializer
from .inversion import invert
from .registry import list_plugins, register_plugin, unregister_plugin
from .samplers.base import SequentialSampler
from .solution import ResidualTrace, Solution, Status
from .solvers.base import FixedPointSolver
from .stopping import StoppingRule
from .system import TriangularSystem

__version__ = "0.1.0"

__all__ = [
    "solve",
    "invert",
    "make_system",
    "Solution",
    "Status",
    "ResidualTrace",
    "TriangularSystem",
    "SequentialSampler",
    "FixedPointSolver",
    "StoppingRule",
    "Initializer",
    "Controller",
    "Preset",
    "IterationInfo",
    "hookimpl",
    "errors",
    "NotConvergedError",
    "NotConvergedWarning",
    "list_plugins",
    "register_plugin",
    "unregister_plugin",
    "samplers",
    "solvers",
    "stopping",
    "control",
    "initializers",
    "adjoint",
    "inversion",
    "models",
]


def __getattr__(name: str):
    # fpsolve.models pulls in optional dependencies for the trained reference models: load lazily.
    if name == "models":
        import importlib

        return importlib.import_module(".models", __name__)
    raise AttributeError(f"module 'fpsolve' has no attribute {name!r}")
