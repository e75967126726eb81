"""The plugin registry: built-ins through hooks, entry points, conflicts, names and options."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import types

import attrs
import pluggy
import pytest
import torch

import fpsolve
from fpsolve import registry
from fpsolve.errors import InvalidOptionError, PluginConflictError, UnknownNameError


@pytest.fixture
def fresh_registry(monkeypatch):
    """A plugin manager built from scratch for this test, restored afterwards."""
    monkeypatch.setattr(registry, "_manager", None)
    monkeypatch.setattr(registry, "_registry", None)
    yield
    registry._manager = None
    registry._registry = None


def test_builtins_register_through_the_hooks():
    manager = registry.get_plugin_manager()
    for module_name in registry.BUILTIN_PLUGINS:
        assert manager.get_plugin(module_name) is not None
    names = {kind: registry.get_registry().names(kind) for kind in registry.KINDS}
    assert {"ddim", "ddpm", "dpm_solver"} <= set(names["sampler"])
    assert {"sequential", "fp", "jacobi", "picard", "aa", "taa"} <= set(names["solver"])
    assert {"rms", "paradigms", "x0"} <= set(names["stopping rule"])
    assert "max_iters" not in names["stopping rule"]  # the one cap is the controller's (issue 12)
    assert {"fixed", "auto"} <= set(names["controller"])
    assert {"newton", "aa"} <= set(registry.get_registry().presets)
    assert {"noise_copy", "trajectory", "coarse"} <= set(names["initializer"])


def test_aliases_carry_their_presets():
    assert registry.resolve("solver", "jacobi").order == 1
    assert registry.resolve("solver", "picard").order is None
    with pytest.raises(InvalidOptionError, match="fixes order=1"):
        registry.resolve("solver", "jacobi", {"order": 3})


def test_unknown_name_lists_valid_names_and_close_matches():
    with pytest.raises(UnknownNameError) as info:
        registry.resolve("solver", "tta")
    message = str(info.value)
    assert "'taa'" in message and "Valid solver names" in message and "sequential" in message
    assert isinstance(info.value, KeyError)


def test_unknown_option_lists_valid_options(ddim_system):
    expected = r"does not take option\(s\) history; its options are: order"
    with pytest.raises(InvalidOptionError, match=expected):
        fpsolve.solve(ddim_system, "fp", history=2)
    with pytest.raises(InvalidOptionError, match="damping"):
        fpsolve.solve(ddim_system, "taa", damping=0.5)


def test_objects_classes_and_names_are_interchangeable(ddim_system):
    by_name = fpsolve.solve(ddim_system, "taa", order=20, history=3, tol=1e-6)
    by_class = fpsolve.solve(ddim_system, fpsolve.solvers.TAA, order=20, history=3, tol=1e-6)
    by_object = fpsolve.solve(ddim_system, fpsolve.solvers.TAA(order=20, history=3),
                              stopping=fpsolve.stopping.RMS(tol1=1e-6, tol2=1e-6))
    assert torch.equal(by_name.sample, by_class.sample) and torch.equal(by_name.sample, by_object.sample)


@attrs.define(frozen=True, eq=False, kw_only=True)
class HalfStep(fpsolve.solvers.FP):
    """A third-party solver: damped fixed-point iteration."""

    name = "half_step"

    def step(self, view, state):
        return view.states + 0.5 * view.residual, state


class _Plugin:
    @fpsolve.hookimpl
    def fpsolve_register_solvers(self):
        return [HalfStep]


class _FakeDistribution(importlib.metadata.Distribution):
    """Just enough of a distribution for pluggy's entry-point loader."""

    def __init__(self, entry_points):
        self._entry_points = entry_points

    def read_text(self, filename):
        if filename == "METADATA":
            return "Metadata-Version: 2.1\nName: fpsolve-halfstep\nVersion: 9.9\n"
        return None

    def locate_file(self, path):
        return path

    @property
    def entry_points(self):
        return self._entry_points


def test_plugin_from_an_entry_point_is_found_by_name(fresh_registry, monkeypatch, ddim_system):
    module = types.ModuleType("fpsolve_halfstep_plugin")
    module.fpsolve_register_solvers = _Plugin().fpsolve_register_solvers
    monkeypatch.setitem(sys.modules, "fpsolve_halfstep_plugin", module)
    entry_point = importlib.metadata.EntryPoint("halfstep", "fpsolve_halfstep_plugin", "fpsolve")
    distribution = _FakeDistribution([entry_point])
    monkeypatch.setattr(importlib.metadata, "distributions", lambda **_: [distribution])
    monkeypatch.delenv(registry.DISABLE_AUTOLOAD_ENV, raising=False)
    entry = registry.get_registry().lookup("solver", "half_step")
    assert entry.cls is HalfStep and entry.plugin == "halfstep"
    assert (entry.distribution, entry.version) == ("fpsolve-halfstep", "9.9")
    reference = fpsolve.solve(ddim_system, "sequential")
    solution = fpsolve.solve(ddim_system, "half_step", tol=1e-12)
    torch.testing.assert_close(solution.sample, reference.sample, rtol=0, atol=1e-10)
    assert any(e.name == "half_step" for e in fpsolve.list_plugins())


def test_autoload_can_be_disabled(fresh_registry, monkeypatch):
    calls = []
    monkeypatch.setattr(pluggy.PluginManager, "load_setuptools_entrypoints",
                        lambda self, group, name=None: calls.append(group) or 0)
    monkeypatch.setenv(registry.DISABLE_AUTOLOAD_ENV, "1")
    registry.get_registry()
    assert calls == []
    registry._manager = registry._registry = None
    monkeypatch.delenv(registry.DISABLE_AUTOLOAD_ENV)
    registry.get_registry()
    registry.get_registry()
    assert calls == ["fpsolve"]  # loaded lazily, once


def test_duplicate_name_names_both_plugins(fresh_registry):
    @attrs.define(frozen=True, eq=False, kw_only=True)
    class Impostor(fpsolve.solvers.FP):
        name = "taa"

    class Plugin:
        @fpsolve.hookimpl
        def fpsolve_register_solvers(self):
            return [Impostor]

    fpsolve.register_plugin(Plugin(), name="impostor-plugin")
    with pytest.raises(PluginConflictError) as info:
        registry.get_registry()
    message = str(info.value)
    assert "'taa'" in message and "fpsolve.solvers" in message and "impostor-plugin" in message


def test_registering_a_non_solver_is_refused(fresh_registry):
    class Plugin:
        @fpsolve.hookimpl
        def fpsolve_register_solvers(self):
            return [dict]

    fpsolve.register_plugin(Plugin(), name="bad-plugin")
    with pytest.raises(PluginConflictError, match="not a subclass of FixedPointSolver"):
        registry.get_registry()


def test_import_fpsolve_loads_no_plugins():
    code = ("import fpsolve, fpsolve.registry as r, sys; "
            "assert r._manager is None and r._registry is None; "
            "assert 'diffusers' not in sys.modules; print('light')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "light"


def test_adapter_hook_turns_objects_into_systems(ddim_system):
    class Wrapper:
        pass

    class Adapter:
        @fpsolve.hookimpl
        def fpsolve_make_system(self, obj, options):
            return ddim_system if isinstance(obj, Wrapper) else None

    name = fpsolve.register_plugin(Adapter(), name="wrapper-adapter")
    try:
        assert fpsolve.make_system(Wrapper()) is ddim_system
        assert fpsolve.solve(Wrapper(), "fp", tol=1e-6).converged
        with pytest.raises(InvalidOptionError, match="no fpsolve adapter"):
            fpsolve.make_system(object())
    finally:
        fpsolve.unregister_plugin(name=name)


def test_iteration_observer_hook_sees_every_iteration(ddim_system):
    seen = []

    class Observer:
        @fpsolve.hookimpl
        def fpsolve_iteration_end(self, info):
            seen.append((info.iteration, info.anchor))

    name = fpsolve.register_plugin(Observer(), name="observer")
    try:
        solution = fpsolve.solve(ddim_system, "taa", tol=1e-6)
    finally:
        fpsolve.unregister_plugin(name=name)
    assert [i for i, _ in seen] == list(range(1, solution.iterations + 1))
    assert tuple(a for _, a in seen) == solution.residuals.anchors
