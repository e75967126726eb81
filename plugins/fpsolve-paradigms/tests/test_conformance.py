"""The plugin passes fpsolve's conformance kit, configured tightly enough to be exact."""

from __future__ import annotations

from fpsolve_paradigms import Paradigms, ParadigmsOriginal

from fpsolve.testing import SolverConformance, StoppingRuleConformance


class TestParadigms(SolverConformance):
    # ParaDiGMS brings its own rule: at tolerance 1e-7 every accepted row is exact to ~1e-9
    # (the controller is the preset's: window 10, the proposal at the boundary, accepted rows move)
    solver = Paradigms()
    stopping = ParadigmsOriginal(tol=1e-7)
    windows = (None, 3)
    expect_registered = True


class TestParadigmsSmallWindow(SolverConformance):
    solver = Paradigms()
    stopping = ParadigmsOriginal(tol=1e-7)
    windows = (2,)  # was Paradigms(parallel=2) with the default window


class TestParadigmsOriginal(StoppingRuleConformance):
    rule = ParadigmsOriginal()
    tight_rule = ParadigmsOriginal(tol=1e-7)
    expect_registered = True


def test_the_conformance_fixture_accepts_the_default_window(fpsolve_conformance):
    fpsolve_conformance.solver(Paradigms(), stopping=ParadigmsOriginal(tol=1e-7), samplers=("ddpm",),
                               windows=(None,))
