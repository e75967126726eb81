"""Every error fpsolve raises on purpose.

All of them derive from :class:`FpsolveError`, and each also derives from the built-in exception a
Python user would expect (``ValueError`` for bad values, ``KeyError`` for unknown names, ...), so
``except ValueError`` keeps working. Messages name the argument, what was expected, and the fix.
Exceptions raised by a user's denoiser are never wrapped: they keep their type.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

__all__ = [
    "FpsolveError",
    "InvalidOptionError",
    "UnknownNameError",
    "PluginConflictError",
    "ShapeError",
    "DenoiserOutputError",
    "UnsupportedError",
    "PluginOutputError",
    "NotConvergedError",
    "FpsolveWarning",
    "NotConvergedWarning",
]


def _close_matches(name: Any, valid: list[str]) -> list[str]:
    """Close matches compared case-insensitively (``"TAA"`` finds ``"taa"``)."""
    by_fold: dict[str, str] = {}
    for candidate in valid:
        by_fold.setdefault(candidate.casefold(), candidate)
    folded = difflib.get_close_matches(str(name).casefold(), list(by_fold), n=3, cutoff=0.5)
    return [by_fold[f] for f in folded]


class FpsolveError(Exception):
    """Base class of every error that fpsolve raises itself."""


class InvalidOptionError(FpsolveError, ValueError):
    """An argument or option has a value outside its valid range, or is not an option at all."""


class UnknownNameError(FpsolveError, KeyError):
    """A plugin name (sampler, solver, stopping rule, initializer) that nothing registered.

    The message lists the valid names and the closest matches.
    """

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        valid = sorted(valid)
        close = _close_matches(name, valid)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        message = f"unknown {kind} {name!r}.{hint} Valid {kind} names: {', '.join(valid) or '(none)'}."
        super().__init__(message)
        self.kind, self.name, self.valid, self.close_matches = kind, name, valid, close

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return str(self.args[0])


class PluginConflictError(FpsolveError, RuntimeError):
    """Two plugins register the same name for the same kind of component."""


class ShapeError(FpsolveError, ValueError):
    """A tensor given to fpsolve has the wrong shape, dtype or device."""


class DenoiserOutputError(FpsolveError, ValueError):
    """The denoiser returned something other than a tensor of the input's shape and dtype."""


class UnsupportedError(FpsolveError, NotImplementedError):
    """A configuration fpsolve cannot reproduce exactly, refused rather than approximated."""


class PluginOutputError(FpsolveError, ValueError):
    """A plugin (solver, stopping rule, initializer, evaluator) returned something outside its
    contract: the message names the plugin, what it returned and what was expected."""


class NotConvergedError(FpsolveError, RuntimeError):
    """A solve ended without every state converging, and the caller asked for a finished result.

    Raised by :meth:`fpsolve.Solution.raise_for_status` and by
    :func:`fpsolve.integrations.diffusers.sample` (unless ``allow_unconverged=True``).

    Attributes:
        solution: the unfinished :class:`~fpsolve.Solution` (its ``status`` and ``message`` say why).
        output: what the caller would have got from the unfinished result (``sample()``: the
            decoded pipeline output), or ``None``.
    """

    def __init__(self, message: str, solution: Any, output: Any = None):
        super().__init__(message)
        self.solution, self.output = solution, output


class FpsolveWarning(UserWarning):
    """Base class of the warnings fpsolve emits (filter them with ``fpsolve.errors.FpsolveWarning``)."""


class NotConvergedWarning(FpsolveWarning, RuntimeWarning):
    """:func:`fpsolve.solve` returns a result that did not converge: a solver stopped at its
    iteration cap (status ``MAX_ITERS``), or samples became non-finite (``NONFINITE``).

    The result is still returned (it may be good enough); ``solution.raise_for_status()`` turns it
    into an error, and ``warnings.simplefilter("error", NotConvergedWarning)`` makes every such
    solve raise.
    """
