"""The plugin manager and the name registry built from its hooks.

``import fpsolve`` creates nothing: the plugin manager is made on first use, registers the
built-in plugin modules, then (once, unless ``FPSOLVE_DISABLE_PLUGIN_AUTOLOAD`` is set) loads
third-party plugins from the entry-point group ``fpsolve``. The registry of names is rebuilt
from the registration hooks whenever the set of plugins changes.

The built-in plugin modules are NAMED in :data:`BUILTIN_PLUGINS` and imported by name when the
plugin manager is made (as pytest loads its default plugins), so the registry needs no import
of a module above it (``fpsolve.gpu.auto`` registers the ``"auto"`` controller this way).
``tests/test_architecture.py`` allows exactly these by-name loads and checks them for cycles.

Besides the component kinds (:data:`KINDS`), the registry holds the named presets
(:class:`fpsolve.control.Preset`: solver + controller + stopping rule) from
``fpsolve_register_presets``; :func:`lookup_preset` and :func:`preset_for` find them.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Mapping
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .control import Preset
from .driver import IterationInfo, Observer
from .errors import InvalidOptionError, PluginConflictError, UnknownNameError
from .plugin_marks import forget_origins, record_origin
from .validators import close_matches

__all__ = [
    "ENTRY_POINT_GROUP",
    "DISABLE_AUTOLOAD_ENV",
    "KINDS",
    "RegistryEntry",
    "Registry",
    "get_plugin_manager",
    "get_registry",
    "register_plugin",
    "unregister_plugin",
    "list_plugins",
    "resolve",
    "plugin_of",
    "iteration_hook",
    "PresetEntry",
    "lookup_preset",
    "preset_for",
    "registered_classes",
]

ENTRY_POINT_GROUP = "fpsolve"
DISABLE_AUTOLOAD_ENV = "FPSOLVE_DISABLE_PLUGIN_AUTOLOAD"

#: Built-in plugin modules, registered exactly like third-party plugins (imported by name).
BUILTIN_PLUGINS = ("fpsolve.samplers", "fpsolve.solvers", "fpsolve.stopping", "fpsolve.initializers",
                   "fpsolve.control", "fpsolve.gpu.auto")

#: kind -> (registration hook name, dotted path of the base class)
KINDS: dict[str, tuple[str, str]] = {
    "sampler": ("fpsolve_register_samplers", "fpsolve.samplers.base:SequentialSampler"),
    "solver": ("fpsolve_register_solvers", "fpsolve.solvers.base:FixedPointSolver"),
    "stopping rule": ("fpsolve_register_stopping_rules", "fpsolve.stopping:StoppingRule"),
    "initializer": ("fpsolve_register_initializers", "fpsolve.initializers:Initializer"),
    "controller": ("fpsolve_register_controllers", "fpsolve.control:Controller"),
}

_lock = threading.RLock()
_manager: pluggy.PluginManager | None = None
_registry: Registry | None = None


def _base_class(kind: str) -> type:
    module, _, name = KINDS[kind][1].partition(":")
    return getattr(importlib.import_module(module), name)


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created (and plugins loaded) on first call."""
    global _manager
    with _lock:
        if _manager is None:
            manager = pluggy.PluginManager("fpsolve")
            manager.add_hookspecs(hookspecs)
            for module_name in BUILTIN_PLUGINS:
                manager.register(importlib.import_module(module_name), name=module_name)
            if not os.environ.get(DISABLE_AUTOLOAD_ENV):
                manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
            manager.check_pending()
            _manager = manager
        return _manager


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin object (module or instance with hook implementations) by hand."""
    global _registry
    with _lock:
        registered = get_plugin_manager().register(plugin, name=name)
        _registry = None
        if registered is None:
            raise InvalidOptionError(f"plugin {name or plugin!r} is blocked or already registered.")
        return registered


def unregister_plugin(plugin: object | None = None, name: str | None = None) -> None:
    """Remove a plugin registered earlier (by object or by name)."""
    global _registry
    with _lock:
        get_plugin_manager().unregister(plugin=plugin, name=name)
        _registry = None


@attrs.define(frozen=True)
class RegistryEntry:
    """One registered name: the class, its option presets, and where it came from."""

    kind: str
    name: str
    cls: type
    preset: Mapping[str, Any]
    plugin: str
    distribution: str
    version: str
    alias_of: str | None = None


@attrs.define(frozen=True)
class PresetEntry:
    """One registered preset and the plugin that registered it."""

    preset: Preset
    plugin: str
    distribution: str
    version: str

    @property
    def name(self) -> str:
        """The preset's name."""
        return self.preset.name


@attrs.define(frozen=True)
class Registry:
    """Names of every registered component, by kind (``sampler``, ``solver``, ...), and the presets."""

    entries: Mapping[str, Mapping[str, RegistryEntry]]
    presets: Mapping[str, PresetEntry] = attrs.field(factory=dict)

    def names(self, kind: str) -> list[str]:
        """Every registered name of a kind, aliases included, sorted."""
        return sorted(self.entries[kind])

    def primary(self, kind: str) -> list[RegistryEntry]:
        """One entry per registered class of a kind (aliases left out)."""
        return [e for e in self.entries[kind].values() if e.alias_of is None]

    def lookup(self, kind: str, name: str) -> RegistryEntry:
        """The entry for ``name`` (case-insensitive: ``"TAA"`` is ``"taa"``); an unknown name lists
        the valid ones and close matches."""
        table = self.entries[kind]
        if name in table:
            return table[name]
        folded = [entry for key, entry in table.items() if key.casefold() == str(name).casefold()]
        if len(folded) == 1:
            return folded[0]
        raise UnknownNameError(kind, name, table) from None


def _distributions(manager: pluggy.PluginManager) -> dict[str, tuple[str, str]]:
    from importlib import metadata

    result = {}
    for plugin, dist in manager.list_plugin_distinfo():
        name = manager.get_name(plugin)
        if name is not None:
            result[name] = (dist.metadata["name"], dist.version)
    try:
        own = ("fpsolve", metadata.version("fpsolve"))
    except metadata.PackageNotFoundError:  # running from a source tree
        own = ("fpsolve", "unknown")
    for module_name in BUILTIN_PLUGINS:
        result[module_name] = own
    return result


def _build_registry(manager: pluggy.PluginManager) -> Registry:
    distributions = _distributions(manager)
    entries: dict[str, dict[str, RegistryEntry]] = {}
    for kind, (hook_name, _) in KINDS.items():
        base = _base_class(kind)
        table: dict[str, RegistryEntry] = {}
        # Call each implementation ourselves so every class is attributed to its plugin.
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            classes = impl.function() or []
            dist, version = distributions.get(impl.plugin_name, (impl.plugin_name, "unknown"))
            for cls in classes:
                if not (isinstance(cls, type) and issubclass(cls, base)):
                    raise PluginConflictError(
                        f"plugin {impl.plugin_name!r} registered {cls!r} as a {kind}, but it is not a "
                        f"subclass of {base.__name__}."
                    )
                name = getattr(cls, "name", "")
                if not name:
                    raise PluginConflictError(
                        f"plugin {impl.plugin_name!r} registered {cls.__name__} without a 'name'."
                    )
                # Aliases are not inherited: a subclass gets only the aliases it declares itself.
                own_aliases = vars(cls).get("aliases", {})
                names: list[tuple[str, dict[str, Any], str | None]] = [(name, {}, None)]
                names += [(alias, dict(preset), name) for alias, preset in own_aliases.items()]
                for entry_name, preset, alias_of in names:
                    previous = table.get(entry_name)
                    if previous is not None and previous.cls is not cls:
                        raise PluginConflictError(
                            f"the {kind} name {entry_name!r} is registered twice: by plugin "
                            f"{previous.plugin!r} ({previous.cls.__module__}.{previous.cls.__qualname__}) "
                            f"and by plugin {impl.plugin_name!r} ({cls.__module__}.{cls.__qualname__}). "
                            "Uninstall or block one of them (PluginManager.set_blocked), or rename a class."
                        )
                    table[entry_name] = RegistryEntry(kind, entry_name, cls, preset, impl.plugin_name,
                                                      dist, version, alias_of)
        entries[kind] = table
    # The driver names the plugin behind a component in its errors from this record.
    forget_origins()
    for table in entries.values():
        for entry in table.values():
            record_origin(entry.cls, entry.plugin)
    return Registry(entries, _collect_presets(manager, distributions))


def _collect_presets(manager: pluggy.PluginManager,
                     distributions: Mapping[str, tuple[str, str]]) -> dict[str, PresetEntry]:
    presets: dict[str, PresetEntry] = {}
    for impl in manager.hook.fpsolve_register_presets.get_hookimpls():
        dist, version = distributions.get(impl.plugin_name, (impl.plugin_name, "unknown"))
        given: Any = impl.function() or []
        for preset in given:
            if not isinstance(preset, Preset):
                raise PluginConflictError(
                    f"plugin {impl.plugin_name!r} registered {preset!r} as a preset, but it is not an "
                    "fpsolve.control.Preset(name=..., solver=..., controller=..., stopping=...)."
                )
            previous = presets.get(preset.name)
            if previous is not None:
                raise PluginConflictError(
                    f"the preset name {preset.name!r} is registered twice: by plugin {previous.plugin!r} "
                    f"and by plugin {impl.plugin_name!r}. Uninstall or block one of them "
                    "(PluginManager.set_blocked), or rename a preset."
                )
            presets[preset.name] = PresetEntry(preset, impl.plugin_name, dist, version)
    return presets


def lookup_preset(name: str) -> Preset | None:
    """The preset registered as ``name`` (case-insensitive), or ``None`` when there is none."""
    presets = get_registry().presets
    if name in presets:
        return presets[name].preset
    folded = [entry for key, entry in presets.items() if key.casefold() == str(name).casefold()]
    return folded[0].preset if len(folded) == 1 else None


def preset_for(solver_class: type) -> Preset | None:
    """The preset a solver class (or instance's class) gets when no preset is named: the one
    registered under the class's own ``name`` for that class, searched up the class's bases (a
    subclass that registers no preset of its own keeps its base's policy); ``None`` if none."""
    presets = get_registry().presets
    for klass in solver_class.__mro__:
        name = vars(klass).get("name")
        entry = presets.get(name) if isinstance(name, str) else None
        if entry is not None and entry.preset.solver is klass:
            return entry.preset
    return None



def iteration_hook() -> Observer:
    """An observer that calls every plugin's ``fpsolve_iteration_end`` hook with its ``info``.

    The api puts it first among a solve's observers; the driver itself knows no registry.
    """
    hook = get_plugin_manager().hook.fpsolve_iteration_end

    def notify_plugins(info: IterationInfo) -> None:
        hook(info=info)

    return notify_plugins


def get_registry() -> Registry:
    """The current registry of names (built lazily, rebuilt after plugin changes)."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = _build_registry(get_plugin_manager())
        return _registry


def list_plugins() -> list[RegistryEntry]:
    """Every registered sampler, solver, stopping rule and initializer, aliases included."""
    registry = get_registry()
    return [entry for kind in KINDS for entry in sorted(registry.entries[kind].values(),
                                                        key=lambda e: e.name)]


def option_names(cls: type) -> list[str]:
    """The keyword options a component class accepts (its attrs fields that take arguments)."""
    if attrs.has(cls):
        return [f.alias or f.name for f in attrs.fields(cls) if f.init]
    return []


def plugin_of(cls: type) -> str | None:
    """The name of the plugin that registered ``cls`` (any kind), or ``None`` if none did."""
    try:
        registry = get_registry()
    except Exception:  # an error message must not fail because a plugin is broken
        return None
    for table in registry.entries.values():
        for entry in table.values():
            if entry.cls is cls:
                return entry.plugin
    return None


def _check_options(kind: str, label: str, cls: type, options: Mapping[str, Any],
                   also: Mapping[str, str] | None = None) -> None:
    """Refuse options ``cls`` does not take, suggesting close matches among its options and
    ``also`` (other accepted names, e.g. solve()'s own arguments, mapped to where they belong)."""
    valid = option_names(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        also = dict(also or {})
        hints = []
        for name in unknown:
            close = close_matches(name, valid + sorted(set(also) - set(valid)))
            if close:
                where = [f"{c!r}" + (f" ({also[c]})" if c in also and c not in valid else "") for c in close]
                hints.append(f" For {name!r}, did you mean {' or '.join(where)}?")
        hint = "".join(hints)
        raise InvalidOptionError(
            f"{kind} {label!r} does not take option(s) {', '.join(unknown)}; its options are: "
            f"{', '.join(valid) or '(none)'}.{hint}"
        )


def resolve(kind: str, spec: Any, options: Mapping[str, Any] | None = None,
            also: Mapping[str, str] | None = None) -> Any:
    """Turn a name, a class or an instance into an instance of a component kind.

    ``options`` are constructor arguments (or, for an instance, fields to replace). Unknown names
    and unknown options raise errors that list what is valid; an option that contradicts an
    alias's preset (``solver="jacobi", order=3``) is refused. ``also`` names other arguments the
    caller accepts (``{"window": "an argument of solve()"}``), so that a typo finds them too.
    """
    options = {k: v for k, v in (options or {}).items()}
    base = _base_class(kind)
    if isinstance(spec, base):
        if options:
            _check_options(kind, type(spec).__name__, type(spec), options, also)
            return attrs.evolve(spec, **options)  # type: ignore[misc]  # components are attrs classes
        return spec
    if isinstance(spec, type) and issubclass(spec, base):
        _check_options(kind, spec.__name__, spec, options, also)
        return spec(**options)
    if isinstance(spec, str):
        entry = get_registry().lookup(kind, spec)
        _check_options(kind, spec, entry.cls, options, also)
        for key, value in entry.preset.items():
            if key in options and options[key] != value:
                raise InvalidOptionError(
                    f"{kind} {spec!r} fixes {key}={value!r}; got {key}={options[key]!r}. "
                    f"Use {entry.alias_of!r} to choose {key} freely."
                )
        return entry.cls(**{**entry.preset, **options})
    raise InvalidOptionError(
        f"{kind} must be a registered name, a {base.__name__} subclass or instance; got {spec!r}."
    )


def registered_classes(kind: str, base: type | None = None) -> dict[str, type[Any]]:
    """``{name: class}`` of every registered component of a kind, aliases left out, by name.

    The one name -> class map: command lines, benchmarks and test problems derive their lists
    from it (a sampler a plugin registers joins them), instead of keeping tables of their own.

    Args:
        kind: ``"sampler"``, ``"solver"``, ``"stopping rule"`` or ``"initializer"``.
        base: keep only subclasses of this class (e.g. :class:`~fpsolve.samplers.FlowSampler`:
            the samplers built on a flow-matching schedule).

    Raises:
        UnknownNameError: for an unknown ``kind``.
    """
    if kind not in KINDS:
        raise UnknownNameError("component kind", kind, KINDS)
    entries = sorted(get_registry().primary(kind), key=lambda entry: entry.name)
    return {entry.name: entry.cls for entry in entries if base is None or issubclass(entry.cls, base)}
