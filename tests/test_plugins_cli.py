"""``fpsolve plugins`` lists every registered name (controllers included) with its distribution and
version, then every preset with the solver, controller and stopping rule it runs."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import attrs
import pytest

import fpsolve
from fpsolve import registry
from fpsolve.cli import main


def run_plugins(capsys) -> str:
    assert main(["plugins"]) == 0
    return capsys.readouterr().out


def sections(out: str) -> dict[str, list[str]]:
    """The printed tables: kind -> lines."""
    tables: dict[str, list[str]] = {}
    for line in out.splitlines():
        if not line.startswith(" "):
            current = tables.setdefault(line.rstrip(":").removesuffix("s"), [])
        else:
            current.append(line)
    return tables


def test_every_registered_name_is_listed_with_its_distribution(capsys):
    out = run_plugins(capsys)
    tables = sections(out)
    assert set(tables) == set(registry.KINDS) | {"preset"}  # every kind, controllers included, then presets
    for entry in fpsolve.list_plugins():
        line = next((line for line in tables[entry.kind] if line.split()[:1] == [entry.name]), None)
        assert line is not None, f"{entry.kind} {entry.name!r} is missing:\n{out}"
        assert f"[{entry.distribution} {entry.version}, plugin {entry.plugin}]" in line
        if entry.alias_of:
            assert f"alias of {entry.alias_of}" in line
        else:
            assert f"{entry.cls.__module__}.{entry.cls.__qualname__}" in line
    assert f"[fpsolve {importlib.metadata.version('fpsolve')}, plugin fpsolve.solvers]" in out
    assert "{'order': 1}" in next(line for line in tables["solver"] if "jacobi" in line)
    controllers = {line.split()[0]: line for line in tables["controller"]}
    assert "fpsolve.gpu.auto.AutoWindow" in controllers["auto"]
    assert "plugin fpsolve.gpu.auto]" in controllers["auto"]
    assert "fpsolve.control.Controller" in controllers["fixed"]
    presets = registry.get_registry().presets
    assert {"newton", "aa"} <= set(presets)
    assert [line.split()[0] for line in tables["preset"]] == sorted(presets)
    for entry in presets.values():
        line = next(line for line in tables["preset"] if line.split()[0] == entry.name)
        assert f"[{entry.distribution} {entry.version}, plugin {entry.plugin}]" in line
        assert f"solver {entry.preset.solver.name}" in line and repr(entry.preset.controller) in line
        rule = repr(entry.preset.stopping) if entry.preset.stopping is not None else "rms (the default rule)"
        assert f"stopping {rule}" in line and entry.preset.description in line
    assert "safeguard=False" in next(line for line in tables["preset"] if line.split()[0] == "aa")
    assert "X0Forecast(" in next(line for line in tables["preset"] if line.split()[0] == "newton")


@attrs.define(frozen=True, eq=False, kw_only=True)
class Damped(fpsolve.solvers.FP):
    """A hand-registered solver."""

    name = "damped_for_cli"


@attrs.define(frozen=True, eq=False, kw_only=True)
class Patient(fpsolve.Controller):
    """A hand-registered controller."""

    name = "patient_for_cli"


class HandPlugin:
    @fpsolve.hookimpl
    def fpsolve_register_solvers(self):
        return [Damped]

    @fpsolve.hookimpl
    def fpsolve_register_controllers(self):
        return [Patient]

    @fpsolve.hookimpl
    def fpsolve_register_presets(self):
        return [fpsolve.Preset(name="damped_preset_for_cli", solver=Damped, options={"order": 1},
                               controller=fpsolve.Controller(window=3), description="a damped method")]


def test_hand_registered_plugins_are_listed_by_plugin_name(capsys):
    name = fpsolve.register_plugin(HandPlugin(), name="hand-plugin")
    try:
        out = run_plugins(capsys)
    finally:
        fpsolve.unregister_plugin(name=name)
    tables = sections(out)
    line = next(line for line in tables["solver"] if "damped_for_cli" in line)
    assert "test_plugins_cli.Damped" in line and "plugin hand-plugin]" in line
    line = next(line for line in tables["controller"] if "patient_for_cli" in line)
    assert "test_plugins_cli.Patient" in line and "plugin hand-plugin]" in line
    line = next(line for line in tables["preset"] if line.split()[0] == "damped_preset_for_cli")
    assert "solver damped_for_cli {'order': 1}, Controller(window=3," in line
    assert "stopping rms (the default rule): a damped method" in line and "plugin hand-plugin]" in line


def test_a_kind_without_names_says_so(capsys, monkeypatch):
    empty = registry.Registry({kind: {} for kind in registry.KINDS})
    monkeypatch.setattr("fpsolve.cli.plugins.get_registry", lambda: empty)
    assert run_plugins(capsys).count("(none)") == len(registry.KINDS) + 1  # and no presets


def test_an_installed_plugin_distribution_shows_its_version():
    try:
        version = importlib.metadata.version("fpsolve-paradigms")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fpsolve-paradigms is not installed (pip install -e plugins/fpsolve-paradigms)")
    out = subprocess.run(
        [sys.executable, "-m", "fpsolve", "plugins"], capture_output=True, text=True, check=True
    ).stdout
    tables = sections(out)
    solver = next(line for line in tables["solver"] if line.split()[:1] == ["paradigms"])
    rule = next(line for line in tables["stopping rule"] if line.split()[:1] == ["paradigms_original"])
    preset = next(line for line in tables["preset"] if line.split()[:1] == ["paradigms"])
    for line in (solver, rule, preset):
        assert f"[fpsolve-paradigms {version}, plugin paradigms]" in line
    assert "stopping ParadigmsOriginal(tol=0.1)" in preset and "Controller(window=10," in preset
    core = next(line for line in tables["stopping rule"] if line.split()[:1] == ["paradigms"])
    assert "fpsolve.stopping.Paradigms" in core and "[fpsolve " in core
