"""Installed, the plugin is one name away: ``fpsolve.solve(system, solver="paradigms")``."""

from __future__ import annotations

import subprocess
import sys

import fpsolve_paradigms
import pytest
import torch
from fpsolve_paradigms import PARADIGMS, Paradigms, ParadigmsOriginal

import fpsolve
from fpsolve.control import Controller
from fpsolve.errors import InvalidOptionError
from fpsolve.registry import get_registry
from fpsolve.testing.problems import make_system


def test_the_entry_point_registers_a_solver_a_rule_and_the_preset():
    registry = get_registry()
    solver = registry.lookup("solver", "paradigms")
    rule = registry.lookup("stopping rule", "paradigms_original")
    assert solver.cls is Paradigms and rule.cls is ParadigmsOriginal
    preset = registry.presets["paradigms"]
    assert preset.preset is PARADIGMS and preset.plugin == solver.plugin
    assert PARADIGMS.controller == Controller(window=10, boundary="proposal", update_accepted=True)
    assert isinstance(PARADIGMS.stopping, ParadigmsOriginal) and PARADIGMS.stopping.tol == 0.1
    assert (solver.distribution, solver.version) == ("fpsolve-paradigms", fpsolve_paradigms.__version__)
    # the core stopping rule of the same name is a different kind: no conflict
    assert registry.lookup("stopping rule", "paradigms").cls is fpsolve.stopping.Paradigms


def test_solve_by_name_uses_parallel_and_tolerance():
    system = make_system("ddim", steps=25, batch=2)
    by_name = fpsolve.solve(system, solver="paradigms")
    by_object = fpsolve.solve(system, Paradigms(), window=10, stopping=ParadigmsOriginal(tol=0.1))
    by_parts = fpsolve.solve(system, Paradigms(), window=PARADIGMS.controller, stopping=PARADIGMS.stopping)
    assert max(hi - lo + 1 for lo, hi in by_name.residuals.windows) == 10
    assert by_name.iterations == by_object.iterations == by_parts.iterations
    assert torch.equal(by_name.trajectory, by_object.trajectory)
    assert torch.equal(by_name.trajectory, by_parts.trajectory)
    # ParaDiGMS' parallel=4, tolerance=0.05: window= and the rule's tol
    small = fpsolve.solve(system, "paradigms", window=4, stopping=ParadigmsOriginal(tol=0.05))
    assert max(hi - lo + 1 for lo, hi in small.residuals.windows) == 4
    assert small.iterations >= 25 // 4 and small.converged


def test_options_are_validated():
    with pytest.raises(InvalidOptionError, match="window must be an int >= 1"):
        fpsolve.solve(make_system("ddim"), "paradigms", window=0)
    with pytest.raises(InvalidOptionError, match="tol must be a finite number > 0"):
        ParadigmsOriginal(tol=-1.0)
    with pytest.raises(InvalidOptionError, match="does not take option"):
        fpsolve.solve(make_system("ddim"), "paradigms", order=3)


def test_fpsolve_plugins_lists_the_distribution_and_version():
    out = subprocess.run(
        [sys.executable, "-m", "fpsolve", "plugins"], capture_output=True, text=True, check=True
    )
    lines = [line for line in out.stdout.splitlines() if "fpsolve_paradigms" in line]
    assert len(lines) == 2, out.stdout
    assert all(f"fpsolve-paradigms {fpsolve_paradigms.__version__}" in line for line in lines)
