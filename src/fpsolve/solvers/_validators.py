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
        raise InvalidOptionError(f"ridge must be a finite number >= 0 (default 1e-3); got {value!r}.")
