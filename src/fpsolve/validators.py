"""Checks of user input shared by every module: numbers are checked, never coerced.

Python's ``int("16")``, ``float(True)`` and ``bool("no")`` all succeed, which turns a typo into a
silently different solve. These helpers accept what a user means by a number (Python and numpy
integers and floats, 0-d tensors of those dtypes) and refuse everything else with an
:class:`~fpsolve.errors.InvalidOptionError` that names the argument, the expected value and the
fix. ``bool`` is refused wherever a number is expected (``True`` is an ``int`` in Python, but
``tol=True`` is always a mistake), and only real booleans pass where a flag is expected.

Three kinds of helper, for three places a value is checked:

* ``as_int`` / ``as_real`` / ``as_flag``: check a function argument and return it as the Python
  type (``steps = as_int("steps", steps, minimum=1)``);
* ``check_int`` / ``check_real`` / ``check_flag`` / ``check_choice``: attrs validators, naming the
  field they validate unless given another name; with the converters ``integer`` and ``real``
  (numpy numbers become Python ones, anything else is left for the validator to refuse);
* the options several built-in components share, ready-made: ``order_option``,
  ``history_option``, ``ridge_option``, ``flag_option``, ``prior_option``,
  ``unit_interval_option``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .errors import InvalidOptionError, _close_matches

__all__ = [
    "is_integer",
    "is_real",
    "as_int",
    "as_real",
    "as_flag",
    "integer",
    "real",
    "check_int",
    "restart_option",
    "check_real",
    "check_flag",
    "check_choice",
    "order_option",
    "history_option",
    "ridge_option",
    "flag_option",
    "prior_option",
    "unit_interval_option",
    "close_matches",
    "did_you_mean",
]


def _scalar(value: Any) -> Any:
    """A 0-d tensor as the Python number it holds (so ``torch.tensor(5)`` counts as 5)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        return value.item()
    return value


def _is_bool(value: Any) -> bool:
    """``bool`` or a numpy bool (``numpy.bool_``, named ``numpy.bool`` since numpy 2)."""
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool"))


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer number: ``int``, ``numpy.integer`` (not ``bool``)."""
    value = _scalar(value)
    return not _is_bool(value) and isinstance(value, numbers.Integral)


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number: int, float, numpy integer or floating (not ``bool``)."""
    value = _scalar(value)
    return not _is_bool(value) and isinstance(value, numbers.Real)


def _int_bound(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in {minimum}..{maximum}"
    if minimum is not None:
        return f" >= {minimum}"
    return "" if maximum is None else f" <= {maximum}"


def as_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
           hint: str = "") -> int:
    """``value`` as an ``int``, refused unless it is an integer in ``minimum..maximum`` (each
    bound only when given)."""
    ok = is_integer(value)
    if ok:
        number = int(_scalar(value))
        ok = (minimum is None or number >= minimum) and (maximum is None or number <= maximum)
    if not ok:
        raise InvalidOptionError(f"{name} must be an int{_int_bound(minimum, maximum)}{hint}; got {value!r}.")
    return int(_scalar(value))


def _real_bound(minimum: float | None, strict: bool, maximum: float | None, strict_maximum: bool) -> str:
    if minimum is not None and maximum is not None:
        return f" in {'(' if strict else '['}{minimum:g}, {maximum:g}{')' if strict_maximum else ']'}"
    if minimum is not None:
        return f" {'>' if strict else '>='} {minimum:g}"
    return "" if maximum is None else f" {'<' if strict_maximum else '<='} {maximum:g}"


def as_real(name: str, value: Any, *, minimum: float | None = None, strict: bool = False,
            maximum: float | None = None, strict_maximum: bool = False, hint: str = "") -> float:
    """``value`` as a finite ``float``, refused unless it is a real number in range.

    Args:
        minimum, maximum: the bounds (each only when given); ``strict`` makes the lower one
            exclusive, ``strict_maximum`` the upper one.
    """
    ok = is_real(value) and math.isfinite(float(_scalar(value)))
    if ok:
        number = float(_scalar(value))
        if minimum is not None:
            ok = number > minimum if strict else number >= minimum
        if ok and maximum is not None:
            ok = number < maximum if strict_maximum else number <= maximum
    if not ok:
        bound = _real_bound(minimum, strict, maximum, strict_maximum)
        raise InvalidOptionError(f"{name} must be a finite number{bound}{hint}; got {value!r}.")
    return float(_scalar(value))


def as_flag(name: str, value: Any, *, hint: str = "") -> bool:
    """``value`` as a ``bool``, refused unless it is ``True``/``False`` (or a numpy bool)."""
    if _is_bool(value):
        return bool(value)
    raise InvalidOptionError(f"{name} must be True or False{hint}; got {value!r}.")


# -- attrs converters and validators --------------------------------------------------------------


def integer(value: Any) -> Any:
    """Converter: an integer number (numpy included) becomes an ``int``; anything else is left
    for the validator to refuse (``bool`` stays ``bool``)."""
    return int(_scalar(value)) if is_integer(value) else value


def real(value: Any) -> Any:
    """Converter: a real number (numpy included, not ``bool``) becomes a ``float``."""
    return float(_scalar(value)) if is_real(value) else value


Validator = Callable[[Any, Any, Any], None]


def _field_name(name: str | None, attribute: Any) -> str:
    return name if name is not None else getattr(attribute, "name", "value")


def check_int(name: str | None = None, *, minimum: int | None = None, maximum: int | None = None,
              optional: bool = False, hint: str = "") -> Validator:
    """An attrs validator: the field is an integer in range (or ``None`` when ``optional``).

    Args:
        name: what the message calls the option (default: the field's name).
    """
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if optional and value is None:
            return
        as_int(_field_name(name, attribute), value, minimum=minimum, maximum=maximum, hint=hint)
    return check


def check_real(name: str | None = None, *, minimum: float | None = None, strict: bool = False,
               maximum: float | None = None, strict_maximum: bool = False, optional: bool = False,
               hint: str = "") -> Validator:
    """An attrs validator: the field is a finite real number in range (or ``None`` when
    ``optional``); ``name`` defaults to the field's name."""
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if optional and value is None:
            return
        as_real(_field_name(name, attribute), value, minimum=minimum, strict=strict, maximum=maximum,
                strict_maximum=strict_maximum, hint=hint)
    return check


def check_flag(name: str | None = None, *, hint: str = "") -> Validator:
    """An attrs validator: the field is ``True`` or ``False``; ``name`` defaults to the field's."""
    def check(instance: Any, attribute: Any, value: Any) -> None:
        as_flag(_field_name(name, attribute), value, hint=hint)
    return check


def check_choice(choices: Mapping[str, str], name: str | None = None) -> Validator:
    """An attrs validator: the field is one of ``choices`` (value -> what it means, for the message)."""
    listed = [f"{value!r} ({meaning})" if meaning else repr(value) for value, meaning in choices.items()]
    expected = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " or " + listed[-1]

    def check(instance: Any, attribute: Any, value: Any) -> None:
        if not isinstance(value, str) or value not in choices:
            raise InvalidOptionError(f"{_field_name(name, attribute)} must be {expected}; got {value!r}.")
    return check


# -- options several built-in components share ------------------------------------------------------

order_option = check_int(minimum=1, optional=True,
                         hint=" (at most T), or None for T (every equation anchored at x_T)")
"""``order`` is None (meaning T) or an int >= 1; the upper bound T is checked at solve time."""

history_option = check_int(minimum=1, hint=" (1 is plain fixed-point iteration, 2 the ParaTAA default)")
"""``history`` (m) is an int >= 1; m = 1 keeps no differences and is plain FP."""

flag_option = check_flag()
"""A boolean option is exactly ``True`` or ``False`` (``"no"`` is not False)."""

prior_option = check_choice({"zero": "frozen outputs, Picard", "x0": "frozen predicted x_0"})
"""The Jacobian prior of the quasi-Newton solvers: ``"zero"`` or ``"x0"``."""

unit_interval_option = check_real(minimum=0.0, maximum=1.0)
"""A weight in [0, 1] (numpy numbers accepted, booleans refused)."""


def ridge_option(instance: Any, attribute: Any, value: float) -> None:
    """``ridge`` (lambda), or another regularisation named by its field, is a finite number >= 0."""
    name = _field_name(None, attribute)
    as_real(name, value, minimum=0.0, hint=" (default 1e-3)" if name == "ridge" else "")


restart_option = check_real(
    minimum=1.0, optional=True,
    hint=" (restart when a sample's residual norm grows by more than this factor in one iteration), or None")
"""TAA's ``restart``: None (never restart) or a finite number >= 1."""


# -- names ----------------------------------------------------------------------------------------------


def close_matches(name: str, valid: Iterable[str]) -> list[str]:
    """The (up to three) valid names closest to ``name``, compared case-insensitively."""
    return _close_matches(name, list(valid))


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """``" Did you mean 'x'?"`` for the closest valid names, or ``""`` when none is close."""
    close = close_matches(name, valid)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
