"""Memory kept per denoiser object without keeping the denoiser alive.

The latency cache and the chunk-size memory are keyed by "this denoiser, this input shape, this
dtype, this device". Identity (not equality) of the denoiser is what matters: two closures of
the same factory, or two equal attrs objects, may stand for different networks.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["PerDenoiser", "denoiser_cache_key", "input_key"]


def input_key(shape: tuple[int, ...], dtype: Any, device: Any) -> tuple[tuple[int, ...], str, str]:
    """A hashable key for one input signature of a denoiser."""
    return tuple(int(s) for s in shape), str(dtype), str(device)


class PerDenoiser:
    """One inner dict per denoiser object (by identity), dropped when the denoiser is collected.

    Objects that cannot be weakly referenced are kept alive by the store instead, so a recycled
    ``id`` can never pick up another object's entry.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Callable[[], Any], dict[Any, Any]]] = {}

    def slot(self, denoiser: Any) -> dict[Any, Any]:
        """The inner dict of ``denoiser`` (created empty on first use)."""
        key = id(denoiser)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is denoiser:
            return entry[1]

        def forget(_: Any, key: int = key) -> None:
            self._entries.pop(key, None)

        ref: Callable[[], Any]
        try:
            ref = weakref.ref(denoiser, forget)
        except TypeError:
            ref = _Strong(denoiser)
        self._entries[key] = (ref, {})
        return self._entries[key][1]

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()


class _Strong:
    """A strong reference with the call interface of ``weakref.ref``."""

    def __init__(self, obj: Any):
        self.obj = obj

    def __call__(self) -> Any:
        return self.obj


def denoiser_cache_key(denoiser: Any) -> str | None:
    """A name that identifies the model across processes, or ``None`` if there is no safe one.

    A ``cache_key`` attribute (string) wins; wrappers of this module forward their model's key;
    a ``torch.nn.Module`` is named by its class and parameter count. Plain functions have no
    safe name (two closures of one factory may wrap different networks): give them a
    ``cache_key`` attribute to cache their latency on disk.
    """
    key = getattr(denoiser, "cache_key", None)
    if isinstance(key, str) and key:
        return key
    if isinstance(denoiser, torch.nn.Module):
        count = sum(p.numel() for p in denoiser.parameters())
        return f"{type(denoiser).__module__}.{type(denoiser).__qualname__}:{count}"
    return None
