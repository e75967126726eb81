"""Hypothesis profile of the plugin's tests.

fpsolve's pytest plugin (fixtures ``fpsolve_conformance``, ``fpsolve_problem``) is loaded through
fpsolve's ``pytest11`` entry point.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "fpsolve-paradigms",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("fpsolve-paradigms")
