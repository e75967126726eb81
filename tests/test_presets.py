"""Presets carry the loop policy that solvers carried as members before issue 12.

``tests/data/presets_reference.json`` holds, for every solver name registered on main before the
change (commit 399f89a, the ParaDiGMS plugin installed) and two toy problems (float64 DDIM-12
and DDPM-12, two samples), the iterations, model evaluations, status, window and the final
sample (as float hex) of ``solve(toy, name)`` with and without explicit window / tol /
stopping / max_iters, plus solver instances, classes, a safeguarded ``aa`` and the MaxIters
rule as a cap. Through the presets and controllers every one of them must give the same
iterations, evaluations, status and window exactly, and the same sample within the float64
rounding of the machine (``SAMPLE_TOL``).

Why not bit for bit: the reference holds one machine's bits, and float64 sums round differently
on other CPUs. On 2026-12-02, on another x86_64 CPU, 154 of the 158 samples differed from the
reference in their last bits: at most 1.1e-13 absolute and 1.5e-14 relative (samples of size
1-6). Every integer still matched. A change to the loop policy moves these samples far more. In
the reference, the ``tol=1e-6`` run of each solver differs from its default run by 2e-7 to
1.7e-4 relative, wherever the two differ at all (``test_the_sample_tolerance_tells_policies_apart``).

When a default VALUE changes on purpose (e.g. issue 14 retunes newton), re-record with
``python -m tests.test_presets`` from the repository root and say so in the commit; never to
make a failing test pass.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest

import fpsolve
from fpsolve.control import Controller
from fpsolve.registry import get_registry
from fpsolve.solvers import AA, QuasiNewton
from fpsolve.stopping import RMS
from fpsolve.testing.problems import make_system

#: Relative, and absolute for entries near 0: about 65x the largest relative (1.5e-14) and 9x the
#: largest absolute (1.1e-13) difference measured between two CPUs (see above).
SAMPLE_TOL = 1e-12

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


def _floats(hexes: list[str]) -> list[float]:
    """The sample a reference entry stores as float hex (lossless), back as floats."""
    return [float.fromhex(v) for v in hexes]


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
def test_every_preset_reproduces_main(key):
    expected = REFERENCE[key]
    if "/paradigms/" in key and "paradigms" not in get_registry().names("solver"):
        pytest.skip("the fpsolve-paradigms plugin is not installed")
    got = _outcome(key)
    status = "MAX_ITERS" if expected["status"] == "STOPPED" else expected["status"]  # the one cap
    assert (got["iterations"], got["model_evals"], got["status"], got["window"]) == (
        expected["iterations"], expected["model_evals"], status, expected["window"])
    got_sample, expected_sample = _floats(got["sample"]), _floats(expected["sample"])
    assert all(math.isclose(g, e, rel_tol=SAMPLE_TOL, abs_tol=SAMPLE_TOL)
               for g, e in zip(got_sample, expected_sample, strict=True)), (got_sample, expected_sample)


def test_the_sample_tolerance_tells_policies_apart():
    """Two loop policies that give different samples differ by far more than ``SAMPLE_TOL``.

    The default and ``tol=1e-6`` runs of one solver in the reference are that case: where their
    samples differ, the largest relative difference must be over 1000x the tolerance, or the
    comparison above could not see a change of policy.
    """
    gaps = []
    for key, outcome in REFERENCE.items():
        tight_key = key.removesuffix("/default") + "/tol"
        if not key.endswith("/default") or tight_key not in REFERENCE:
            continue
        a, b = _floats(outcome["sample"]), _floats(REFERENCE[tight_key]["sample"])
        if a != b:
            gaps.append(max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)))
    assert len(gaps) >= 10  # most solvers stop elsewhere at a tighter tolerance
    assert min(gaps) > 1000 * SAMPLE_TOL


if __name__ == "__main__":  # re-record (see the module docstring)
    path = Path(__file__).parent / "data" / "presets_reference.json"
    path.write_text(json.dumps({key: _outcome(key) for key in sorted(REFERENCE)}, indent=0, sort_keys=True))
    print(f"wrote {len(REFERENCE)} outcomes to {path}")
