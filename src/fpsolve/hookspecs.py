# mypy: disable-error-code="empty-body"
# (hook specifications are signatures with docstrings; pluggy never calls their bodies)
"""Every hook fpsolve calls, with its contract.

A plugin is a module or object with functions decorated by :data:`fpsolve.hookimpl`, named after
these specifications. It may accept fewer arguments than the specification lists (hooks grow by
adding arguments). Third-party plugins are found through the entry-point group ``fpsolve``;
fpsolve's own samplers, solvers, stopping rules and initializers register through the same hooks.

Hooks, by phase:

* registration: :func:`fpsolve_register_samplers`, :func:`fpsolve_register_solvers`,
  :func:`fpsolve_register_stopping_rules`, :func:`fpsolve_register_initializers`,
  :func:`fpsolve_register_controllers`, :func:`fpsolve_register_presets`;
* adapters: :func:`fpsolve_make_system` (first non-``None`` result wins);
* observation: :func:`fpsolve_iteration_end`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

from .plugin_marks import hookimpl as hookimpl  # re-exported: plugins mark hooks with it

if TYPE_CHECKING:
    from .control import Controller, Preset
    from .driver import IterationInfo
    from .initializers import Initializer
    from .samplers.base import SequentialSampler
    from .solvers.base import FixedPointSolver
    from .stopping import StoppingRule
    from .system import TriangularSystem

hookspec = pluggy.HookspecMarker("fpsolve")


@hookspec
def fpsolve_register_samplers() -> list[type[SequentialSampler]]:
    """Return the :class:`~fpsolve.SequentialSampler` classes this plugin provides.

    Each class sets ``name`` (its registry name) and may set ``aliases``.
    """


@hookspec
def fpsolve_register_solvers() -> list[type[FixedPointSolver]]:
    """Return the :class:`~fpsolve.FixedPointSolver` classes this plugin provides."""


@hookspec
def fpsolve_register_stopping_rules() -> list[type[StoppingRule]]:
    """Return the :class:`~fpsolve.StoppingRule` classes this plugin provides."""


@hookspec
def fpsolve_register_initializers() -> list[type[Initializer]]:
    """Return the :class:`~fpsolve.Initializer` classes this plugin provides."""


@hookspec
def fpsolve_register_controllers() -> list[type[Controller]]:
    """Return the :class:`~fpsolve.control.Controller` classes this plugin provides.

    Each class (a :class:`~fpsolve.control.Controller` subclass, an attrs class taking its
    fields as keywords) sets ``name``; ``fpsolve.solve(..., window=name)`` builds it with the
    preset's policy (``safeguard``, ``boundary``, ``update_accepted``) and the caller's or the
    preset's ``max_iters``, then calls its :meth:`~fpsolve.control.Controller.prepare`. fpsolve
    registers ``fixed`` (the plain controller) and, from :mod:`fpsolve.gpu`, ``auto``.
    """


@hookspec
def fpsolve_register_presets() -> list[Preset]:
    """Return the :class:`~fpsolve.control.Preset` objects this plugin provides.

    A preset names a published method: a solver class with the controller (window, safeguard,
    boundary row, accepted rows, cap) and stopping rule it is published with.
    ``fpsolve.solve(system, name)`` runs it; the caller's ``window=``, ``max_iters=``, ``tol=``
    and ``stopping=`` override its parts. A preset named after its solver class is also what an
    instance of that class gets. fpsolve's own (``newton``, ``aa``) register through this hook.
    """


@hookspec(firstresult=True)
def fpsolve_make_system(obj: Any, options: dict[str, Any]) -> TriangularSystem | None:
    """Turn a user object (a pipeline, a model wrapper, ...) into a :class:`~fpsolve.TriangularSystem`.

    Return ``None`` for objects this adapter does not handle; the first non-``None`` result is
    used. ``options`` holds the keyword arguments the caller gave for the system.
    """


@hookspec
def fpsolve_iteration_end(info: IterationInfo) -> None:
    """Called after every parallel iteration of every solve, with a read-only summary.

    Use it for progress reporting and traces; it must not modify tensors it is given.
    """
