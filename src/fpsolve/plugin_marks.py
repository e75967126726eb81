"""Plugin bookkeeping that every layer may read: the hook marker and who registered what.

This module sits at the bottom of fpsolve's layers (it imports nothing of fpsolve's), so that
fpsolve's own samplers, solvers, stopping rules and initializers can mark their registration
hooks, and the driver can name the plugin behind a component in an error message, without
importing the registry above them. The registry writes :data:`_origins` when it builds its table.
"""

from __future__ import annotations

import weakref

import pluggy

__all__ = ["hookimpl", "plugin_of_class", "record_origin", "forget_origins"]

#: Marks a plugin's hook implementations (re-exported as :data:`fpsolve.hookimpl`).
hookimpl = pluggy.HookimplMarker("fpsolve")

# class -> name of the plugin that registered it; weak keys so a dropped class is forgotten.
_origins: weakref.WeakKeyDictionary[type, str] = weakref.WeakKeyDictionary()


def record_origin(cls: type, plugin: str) -> None:
    """Remember that plugin ``plugin`` registered ``cls`` (called by the registry)."""
    _origins[cls] = plugin


def forget_origins() -> None:
    """Drop every recorded origin (the registry calls this before it rebuilds its table)."""
    _origins.clear()


def plugin_of_class(cls: type) -> str | None:
    """The plugin that registered ``cls`` in the registry built last, or ``None``."""
    return _origins.get(cls)
