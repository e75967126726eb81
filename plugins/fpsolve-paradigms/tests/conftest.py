"""Hypothesis profile and fpsolve's pytest plugin (fixtures ``fpsolve_conformance``, ``fpsolve_problem``).

``pytest_plugins`` makes the fixtures available before fpsolve declares its ``pytest11`` entry
point; once it does, the entry point is named after the module and this line is a no-op.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

pytest_plugins = ["fpsolve.testing.pytest_plugin"]

settings.register_profile(
    "fpsolve-paradigms",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("fpsolve-paradigms")
