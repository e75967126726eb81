"""Checks of user input shared by every module: numbers are checked, never coerced.

Python's ``int("16")``, ``float(True)`` and ``bool("no")`` all succeed, which turns a typo into a
silently different solve. These helpers accept what a user means by a number (Python and numpy
integers and floats, 0-d tensors of those dtypes) and refuse everything else with an
:class:`~fpsolve.errors.InvalidOptionError` that names the argument, the expected value and the
fix. ``bool`` is refused wherever a number is expected (``True`` is an ``int`` in Python, but
``tol=True`` is always a mistake), and only real booleans pass where a flag is expected.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch

from .errors import InvalidOptionError, _close_matches

__all__ = [
    "is_integer",
    "is_real",
    "as_int",
    "as_real",
    "as_flag",
    "check_int",
    "check_real",
    "check_flag",
    "close_matches",
    "did_you_mean",
]


def _scalar(value: Any) -> Any:
    """A 0-d tensor as the Python number it holds (so ``torch.tensor(5)`` counts as 5)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        return value.item()
    return value


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer number: ``int``, ``numpy.integer`` (not ``bool``)."""
    value = _scalar(value)
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return False
    return isinstance(value, numbers.Integral)


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number: int, float, numpy integer or floating (not ``bool``)."""
    value = _scalar(value)
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return False
    return isinstance(value, numbers.Real)


def as_int(name: str, value: Any, *, minimum: int | None = None, hint: str = "") -> int:
    """``value`` as an ``int``, refused unless it is an integer (``>= minimum`` when given)."""
    if not is_integer(value) or (minimum is not None and int(_scalar(value)) < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise InvalidOptionError(f"{name} must be an int{bound}{hint}; got {value!r}.")
    return int(_scalar(value))


def as_real(name: str, value: Any, *, minimum: float | None = None, strict: bool = False,
            hint: str = "") -> float:
    """``value`` as a finite ``float``, refused unless it is a real number in range.

    Args:
        minimum: the lower bound; ``strict`` makes it exclusive.
    """
    ok = is_real(value) and math.isfinite(float(_scalar(value)))
    if ok and minimum is not None:
        number = float(_scalar(value))
        ok = number > minimum if strict else number >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        raise InvalidOptionError(f"{name} must be a finite number{bound}{hint}; got {value!r}.")
    return float(_scalar(value))


def as_flag(name: str, value: Any, *, hint: str = "") -> bool:
    """``value`` as a ``bool``, refused unless it is ``True``/``False`` (or a numpy bool)."""
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_":
        return bool(value)
    raise InvalidOptionError(f"{name} must be True or False{hint}; got {value!r}.")


def check_int(name: str, *, minimum: int | None = None, optional: bool = False, hint: str = ""):
    """An attrs validator: the field is an integer ``>= minimum`` (or ``None`` when ``optional``)."""
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if optional and value is None:
            return
        as_int(name, value, minimum=minimum, hint=hint)
    return check


def check_real(name: str, *, minimum: float | None = None, strict: bool = False, hint: str = ""):
    """An attrs validator: the field is a finite real number in range."""
    def check(instance: Any, attribute: Any, value: Any) -> None:
        as_real(name, value, minimum=minimum, strict=strict, hint=hint)
    return check


def check_flag(name: str, *, hint: str = ""):
    """An attrs validator: the field is ``True`` or ``False``."""
    def check(instance: Any, attribute: Any, value: Any) -> None:
        as_flag(name, value, hint=hint)
    return check


def close_matches(name: str, valid: Iterable[str]) -> list[str]:
    """The (up to three) valid names closest to ``name``, compared case-insensitively."""
    return _close_matches(name, list(valid))


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """``" Did you mean 'x'?"`` for the closest valid names, or ``""`` when none is close."""
    close = close_matches(name, valid)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
