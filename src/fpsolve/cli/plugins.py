"""``fpsolve plugins``: every registered component with its plugin, distribution and version.

One table per kind (samplers, solvers, stopping rules, initializers, controllers), then the
presets (a published method: solver + controller + stopping rule); aliases show the name they
stand for and their preset options. Components of an installed plugin distribution show as
``[fpsolve-paradigms 0.1.0, plugin paradigms]``; a plugin registered by hand with
:func:`fpsolve.register_plugin` has no distribution and shows its plugin name instead.
"""

from __future__ import annotations

import argparse

from ..registry import KINDS, PresetEntry, RegistryEntry, get_registry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options."""


def describe(entry: RegistryEntry) -> str:
    """What a name stands for: the class, or the alias target and its preset options."""
    if entry.alias_of is None:
        return f"{entry.cls.__module__}.{entry.cls.__qualname__}"
    preset = f" {dict(entry.preset)}" if entry.preset else ""
    return f"alias of {entry.alias_of}{preset}"


def describe_preset(entry: PresetEntry) -> str:
    """What a preset runs: its solver (name and fixed options), controller and stopping rule."""
    preset = entry.preset
    options = f" {dict(preset.options)}" if preset.options else ""
    stopping = repr(preset.stopping) if preset.stopping is not None else "rms (the default rule)"
    text = f"solver {preset.solver.name}{options}, {preset.controller!r}, stopping {stopping}"
    return f"{text}: {preset.description}" if preset.description else text


def _table(title: str, rows: list[tuple[str, str, str, str, str]]) -> None:
    """``title:`` then one line per (name, description, distribution, version, plugin), or (none)."""
    print(f"{title}:")
    if not rows:
        print("  (none)")
        return
    width = max(len(row[0]) for row in rows)
    for name, text, distribution, version, plugin in sorted(rows):
        print(f"  {name:<{width}}  {text}  [{distribution} {version}, plugin {plugin}]")


def run(args: argparse.Namespace) -> int:
    """Print one table per kind, then the presets."""
    registry = get_registry()
    for kind in KINDS:
        _table(f"{kind}s", [(e.name, describe(e), e.distribution, e.version, e.plugin)
                            for e in registry.entries[kind].values()])
    _table("presets", [(p.name, describe_preset(p), p.distribution, p.version, p.plugin)
                       for p in registry.presets.values()])
    return 0
