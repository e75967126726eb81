"""``fpsolve plugins``: every registered component with its plugin, distribution and version.

One table per kind (samplers, solvers, stopping rules, initializers); aliases show the name they
stand for and their preset options. Components of an installed plugin distribution show as
``[fpsolve-paradigms 0.1.0, plugin paradigms]``; a plugin registered by hand with
:func:`fpsolve.register_plugin` has no distribution and shows its plugin name instead.
"""

from __future__ import annotations

import argparse

from ..registry import KINDS, RegistryEntry, get_registry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options."""


def describe(entry: RegistryEntry) -> str:
    """What a name stands for: the class, or the alias target and its preset options."""
    if entry.alias_of is None:
        return f"{entry.cls.__module__}.{entry.cls.__qualname__}"
    preset = f" {dict(entry.preset)}" if entry.preset else ""
    return f"alias of {entry.alias_of}{preset}"


def run(args: argparse.Namespace) -> int:
    """Print one table per kind."""
    registry = get_registry()
    for kind in KINDS:
        entries = sorted(registry.entries[kind].values(), key=lambda e: e.name)
        print(f"{kind}s:")
        if not entries:
            print("  (none)")
            continue
        width = max(len(e.name) for e in entries)
        for e in entries:
            print(f"  {e.name:<{width}}  {describe(e)}  [{e.distribution} {e.version}, plugin {e.plugin}]")
    return 0
