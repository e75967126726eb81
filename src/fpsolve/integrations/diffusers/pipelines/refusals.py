"""What an adapter refuses, and why: call options a parallel solve cannot reproduce exactly.

Each adapter declares its ``REFUSED`` (read by the support table in :mod:`.support` too) and
calls :func:`refuse_all` on the bound call before anything else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ....errors import UnsupportedError

__all__ = ["Refusals", "refuse_all", "refuse_arguments", "CALLBACK_WHY", "IP_ADAPTER_WHY"]

#: Call options an adapter refuses: ``((names, why), ...)``, read by the support table too.
Refusals = tuple[tuple[tuple[str, ...], str], ...]

CALLBACK_WHY = "per-step callbacks need the sequential loop"
IP_ADAPTER_WHY = "IP-Adapter conditioning is not wired into the parallel denoiser"


def refuse_all(pipe: Any, arguments: Mapping[str, Any], refusals: Refusals) -> None:
    """Raise :class:`UnsupportedError` for the first refused option the call sets."""
    for names, why in refusals:
        refuse_arguments(pipe, arguments, names, why)


def refuse_arguments(pipe: Any, arguments: Mapping[str, Any], names: Iterable[str], why: str) -> None:
    """Raise for any of ``names`` that the call sets (not ``None``)."""
    for name in names:
        if arguments.get(name) is not None:
            raise UnsupportedError(f"{type(pipe).__name__}(..., {name}=...) is not supported by fpsolve: "
                                   f"{why}; leave {name} unset.")
