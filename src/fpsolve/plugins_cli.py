"""``fpsolve plugins``: every registered component with its plugin, distribution and version."""

from __future__ import annotations

import argparse

from .registry import KINDS, get_registry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options."""


def run(args: argparse.Namespace) -> int:
    """Print one table per kind."""
    registry = get_registry()
    for kind in KINDS:
        entries = sorted(registry.entries[kind].values(), key=lambda e: e.name)
        print(f"{kind}s:")
        width = max(len(e.name) for e in entries)
        for e in entries:
            target = f"alias of {e.alias_of} {dict(e.preset) or ''}".strip() if e.alias_of else (
                f"{e.cls.__module__}.{e.cls.__qualname__}")
            print(f"  {e.name:<{width}}  {target}  [{e.distribution} {e.version}, plugin {e.plugin}]")
    return 0
