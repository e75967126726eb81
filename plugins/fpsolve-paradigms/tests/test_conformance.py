"""The plugin passes fpsolve's conformance kit, configured tightly enough to be exact."""

from __future__ import annotations

from fpsolve_paradigms import Paradigms, ParadigmsOriginal

from fpsolve.testing import SolverConformance, StoppingRuleConformance


class TestParadigms(SolverConformance):
    # ParaDiGMS brings its own rule: at tolerance 1e-7 every accepted row is exact to ~1e-9
    solver = Paradigms(tolerance=1e-7)
    windows = (None, 3)
    expect_registered = True


class TestParadigmsSmallWindow(SolverConformance):
    solver = Paradigms(parallel=2, tolerance=1e-7)
    windows = (None,)


class TestParadigmsOriginal(StoppingRuleConformance):
    rule = ParadigmsOriginal()
    tight_rule = ParadigmsOriginal(tol=1e-7)
    expect_registered = True


def test_the_conformance_fixture_accepts_the_default_window(fpsolve_conformance):
    fpsolve_conformance.solver(Paradigms(tolerance=1e-7), samplers=("ddpm",), windows=(None,))
