"""Every error fpsolve raises on purpose.

All of them derive from :class:`FpsolveError`, and each also derives from the built-in exception a
Python user would expect (``ValueError`` for bad values, ``KeyError`` for unknown names, ...), so
``except ValueError`` keeps working. Messages name the argument, what was expected, and the fix.
Exceptions raised by a user's denoiser are never wrapped: they keep their type.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "FpsolveError",
    "InvalidOptionError",
    "UnknownNameError",
    "PluginConflictError",
    "ShapeError",
    "DenoiserOutputError",
    "UnsupportedError",
]


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
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
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
