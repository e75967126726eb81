"""attrs validators shared by the built-in solvers (messages name the option and the fix)."""

from __future__ import annotations

import math
from typing import Any

from ..errors import InvalidOptionError


def order_option(instance: Any, attribute: Any, value: int | None) -> None:
    """``order`` is None (meaning T) or an int >= 1; the upper bound T is checked at solve time."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidOptionError(
            f"order must be an int in 1..T, or None for T (every equation anchored at x_T); got {value!r}."
        )


def history_option(instance: Any, attribute: Any, value: int) -> None:
    """``history`` (m) is an int >= 1; m = 1 keeps no differences and is plain FP."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOptionError(
            f"history must be an int >= 1 (1 is plain fixed-point iteration, 2 the ParaTAA default); "
            f"got {value!r}."
        )


def ridge_option(instance: Any, attribute: Any, value: float) -> None:
    """``ridge`` (lambda) is a finite number >= 0."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise InvalidOptionError(f"{attribute.name} must be a finite number >= 0; got {value!r}.")


def prior_option(instance: Any, attribute: Any, value: str) -> None:
    """The Jacobian prior of the quasi-Newton solvers: ``"zero"`` or ``"x0"``."""
    if value not in ("zero", "x0"):
        raise InvalidOptionError(
            f"{attribute.name} must be 'zero' (frozen outputs, Picard) or 'x0' (frozen predicted x_0); "
            f"got {value!r}."
        )


def unit_interval_option(instance: Any, attribute: Any, value: float) -> None:
    """A weight in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise InvalidOptionError(f"{attribute.name} must be a number in [0, 1]; got {value!r}.")
