"""attrs validators shared by the built-in solvers (messages name the option and the fix).

The general checks live in :mod:`fpsolve.validators` and are re-exported here, so a solver
module needs one import. Numbers are checked, never coerced: numpy integers pass as ints
(:func:`integer`, the converter, turns them into ``int``), ``bool`` and strings are refused.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import InvalidOptionError
from ..validators import (
    as_flag,
    as_int,
    as_real,
    check_flag,
    check_int,
    check_real,
    close_matches,
    did_you_mean,
    is_integer,
    is_real,
)

__all__ = [
    "integer", "real", "order_option", "history_option", "ridge_option", "flag_option",
    "as_flag", "as_int", "as_real", "check_flag", "check_int", "check_real", "close_matches",
    "did_you_mean", "is_integer", "is_real", "prior_option", "unit_interval_option",
]


def integer(value: Any) -> Any:
    """Converter: an integer number (numpy included) becomes an ``int``; anything else is left
    for the validator to refuse (``bool`` stays ``bool``)."""
    return int(value) if is_integer(value) else value


def real(value: Any) -> Any:
    """Converter: a real number (numpy included, not ``bool``) becomes a ``float``."""
    return float(value) if is_real(value) else value


def order_option(instance: Any, attribute: Any, value: int | None) -> None:
    """``order`` is None (meaning T) or an int >= 1; the upper bound T is checked at solve time."""
    if value is not None and not (is_integer(value) and value >= 1):
        raise InvalidOptionError(
            f"order must be an int in 1..T, or None for T (every equation anchored at x_T); got {value!r}."
        )


def history_option(instance: Any, attribute: Any, value: int) -> None:
    """``history`` (m) is an int >= 1; m = 1 keeps no differences and is plain FP."""
    if not (is_integer(value) and value >= 1):
        raise InvalidOptionError(
            f"history must be an int >= 1 (1 is plain fixed-point iteration, 2 the ParaTAA default); "
            f"got {value!r}."
        )


def ridge_option(instance: Any, attribute: Any, value: float) -> None:
    """``ridge`` (lambda) is a finite number >= 0."""
    name = attribute.name if attribute is not None else "ridge"
    as_real(name, value, minimum=0.0, hint=" (default 1e-3)" if name == "ridge" else "")


def flag_option(instance: Any, attribute: Any, value: Any) -> None:
    """A boolean option is exactly ``True`` or ``False`` (``"no"`` is not False)."""
    as_flag(attribute.name, value)


def prior_option(instance: Any, attribute: Any, value: str) -> None:
    """The Jacobian prior of the quasi-Newton solvers: ``"zero"`` or ``"x0"``."""
    if value not in ("zero", "x0"):
        raise InvalidOptionError(
            f"{attribute.name} must be 'zero' (frozen outputs, Picard) or 'x0' (frozen predicted x_0); "
            f"got {value!r}."
        )


def unit_interval_option(instance: Any, attribute: Any, value: float) -> None:
    """A weight in [0, 1] (numpy numbers accepted, booleans refused)."""
    if not (is_real(value) and 0 <= float(value) <= 1):
        raise InvalidOptionError(f"{attribute.name} must be a number in [0, 1]; got {value!r}.")


def restart_option(instance: Any, attribute: Any, value: float | None) -> None:
    """A restart factor: None (never restart) or a finite number >= 1 (the residual growth that
    triggers a restart)."""
    if value is not None and not (is_real(value) and math.isfinite(float(value)) and float(value) >= 1):
        raise InvalidOptionError(
            f"{attribute.name} must be None (no restart) or a finite number >= 1 (restart when a sample's "
            f"residual norm grows by more than this factor in one iteration); got {value!r}."
        )
