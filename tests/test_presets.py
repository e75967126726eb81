"""Presets carry the loop policy that solvers carried as members before issue 12, bit for bit.

``tests/data/presets_reference.json`` holds, for every solver name registered on main before the
change (commit 399f89a, the ParaDiGMS plugin installed) and two toy problems (float64 DDIM-12
and DDPM-12, two samples), the iterations, model evaluations, status, window and the final
sample (as float hex) of ``solve(toy, name)`` with and without explicit window / tol /
stopping / max_iters, plus solver instances, classes, a safeguarded ``aa`` and the MaxIters
rule as a cap. Every one of them must come out identical through the presets and controllers.

When a default VALUE changes on purpose (e.g. issue 14 retunes newton), re-record with
``python -m tests.test_presets`` from the repository root and say so in the commit; never to
make a failing test pass.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

import fpsolve
from fpsolve.control import Controller
from fpsolve.registry import get_registry
from fpsolve.solvers import AA, QuasiNewton
from fpsolve.stopping import RMS
from fpsolve.testing.problems import make_system

REFERENCE = json.loads((Path(__file__).parent / "data" / "presets_reference.json").read_text())

CASES = {
    "default": {},
    "window": {"window": 4},
    "tol": {"tol": 1e-6},
    "stopping": {"stopping": "paradigms"},
    "max_iters": {"max_iters": 3},
    "window_max_iters": {"window": 3, "max_iters": 5},
}

#: The calls that used a removed interface on main, in the new one (same numbers expected).
MOVED = {
    "instance/newton_clamp20": lambda s: fpsolve.solve(s, QuasiNewton(clamp=20.0)),
    "instance/aa_history3": lambda s: fpsolve.solve(s, AA(history=3)),
    "class/newton": lambda s: fpsolve.solve(s, QuasiNewton),
    # was solve(s, "aa", safeguard=True): the safeguard is the controller's now
    "safeguarded/aa": lambda s: fpsolve.solve(s, "aa", window=Controller(safeguard=True)),
    "safeguarded/aa_window4": lambda s: fpsolve.solve(s, "aa", window=Controller(window=4, safeguard=True)),
    # was stopping=RMS(1e-12, 0) & MaxIters(3): one cap, status MAX_ITERS instead of STOPPED
    "cap/taa_rule3": lambda s: fpsolve.solve(s, "taa", stopping=RMS(tol1=1e-12, tol2=0.0), max_iters=3),
}


def _call(key: str):
    system_name, rest = key.split("/", 1)
    if rest in MOVED:
        return system_name, MOVED[rest]
    name, case = rest.rsplit("/", 1)
    return system_name, lambda s: fpsolve.solve(s, name, **CASES[case])


def _outcome(key: str) -> dict:
    system_name, call = _call(key)
    system = make_system(system_name, steps=12, shape=(4,), batch=2, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # capped solves warn that they did not converge
        solution = call(system)
    return dict(iterations=solution.iterations, model_evals=solution.model_evals,
                status=solution.status.name, window=solution.window,
                sample=[float(v).hex() for v in solution.sample.flatten().tolist()])


@pytest.mark.parametrize("key", sorted(REFERENCE))
def test_every_preset_reproduces_main_bit_for_bit(key):
    expected = REFERENCE[key]
    if "/paradigms/" in key and "paradigms" not in get_registry().names("solver"):
        pytest.skip("the fpsolve-paradigms plugin is not installed")
    got = _outcome(key)
    status = "MAX_ITERS" if expected["status"] == "STOPPED" else expected["status"]  # the one cap
    assert (got["iterations"], got["model_evals"], got["status"], got["window"]) == (
        expected["iterations"], expected["model_evals"], status, expected["window"])
    assert got["sample"] == expected["sample"]


if __name__ == "__main__":  # re-record (see the module docstring)
    path = Path(__file__).parent / "data" / "presets_reference.json"
    path.write_text(json.dumps({key: _outcome(key) for key in sorted(REFERENCE)}, indent=0, sort_keys=True))
    print(f"wrote {len(REFERENCE)} outcomes to {path}")
