"""fpsolve's pytest plugin, loaded through the ``pytest11`` entry point once fpsolve is installed.

It gives a plugin's test suite:

* the fixture ``fpsolve_conformance``: the conformance checks as one object,
  ``fpsolve_conformance.solver(MySolver())`` (also ``.sampler``, ``.stopping_rule``,
  ``.initializer``), each raising one :class:`~fpsolve.testing.ConformanceError` that lists
  every failed check;
* the fixture ``fpsolve_problem``: :func:`fpsolve.testing.problems.make_system`, a factory of
  small standard systems;
* the option ``--fpsolve-device DEVICE`` (repeatable): the devices the conformance tests use
  (default: the CPU and a visible GPU);
* a report-header line naming fpsolve and every installed fpsolve plugin distribution.

The test-class mixins (``fpsolve.testing.SolverConformance`` and friends) work with or without
this plugin; the plugin adds the fixtures and the option.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from .checks import check_initializer, check_sampler, check_solver, check_stopping_rule
from .problems import make_system

__all__ = ["ConformanceHelper"]


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--fpsolve-device``."""
    group = parser.getgroup("fpsolve", "fpsolve conformance kit")
    group.addoption(
        "--fpsolve-device",
        action="append",
        dest="fpsolve_device",
        default=None,
        metavar="DEVICE",
        help="device for fpsolve's conformance tests (repeatable; default: cpu and cuda when visible)",
    )


def pytest_report_header(config: pytest.Config) -> str:
    """``fpsolve 0.1.0; plugins: fpsolve-paradigms 0.1.0``.

    Read from package metadata only: this hook runs in every pytest session of an environment
    that has fpsolve installed, so it must not import torch or load plugins.
    """
    from importlib import metadata

    try:
        version = metadata.version("fpsolve")
    except metadata.PackageNotFoundError:
        version = "(not installed)"
    plugins = set()
    for entry_point in metadata.entry_points(group="fpsolve"):
        dist = getattr(entry_point, "dist", None)
        plugins.add(f"{dist.name} {dist.version}" if dist is not None else entry_point.value)
    return f"fpsolve {version}; plugins: {', '.join(sorted(plugins)) or '(none)'}"


class ConformanceHelper:
    """The ``fpsolve_conformance`` fixture: run a whole conformance suite with one call.

    Args:
        devices: the devices to check (from ``--fpsolve-device``; ``None``: cpu and a visible GPU).
    """

    def __init__(self, devices: list[str] | None = None):
        self.devices = devices

    def solver(self, solver: Any, **options: Any) -> None:
        """:func:`fpsolve.testing.checks.check_solver`."""
        check_solver(solver, devices=options.pop("devices", self.devices), **options)

    def sampler(self, sampler: Any, **options: Any) -> None:
        """:func:`fpsolve.testing.checks.check_sampler`."""
        check_sampler(sampler, devices=options.pop("devices", self.devices), **options)

    def stopping_rule(self, rule: Any, **options: Any) -> None:
        """:func:`fpsolve.testing.checks.check_stopping_rule`."""
        check_stopping_rule(rule, devices=options.pop("devices", self.devices), **options)

    def initializer(self, initializer: Any, **options: Any) -> None:
        """:func:`fpsolve.testing.checks.check_initializer`."""
        check_initializer(initializer, devices=options.pop("devices", self.devices), **options)


def _selected_devices(config: pytest.Config) -> list[str] | None:
    chosen = config.getoption("fpsolve_device", default=None)
    if not chosen:
        return None
    import torch

    # An explicitly requested GPU that is absent is an error, not a silent skip.
    if any(d.startswith("cuda") for d in chosen) and not torch.cuda.is_available():
        raise pytest.UsageError("--fpsolve-device cuda was given, but no CUDA device is visible.")
    return list(chosen)


@pytest.fixture
def fpsolve_conformance(request: pytest.FixtureRequest) -> ConformanceHelper:
    """Run fpsolve's conformance checks on a component: ``fpsolve_conformance.solver(MySolver())``."""
    return ConformanceHelper(_selected_devices(request.config))


@pytest.fixture
def fpsolve_problem() -> Callable[..., Any]:
    """:func:`fpsolve.testing.problems.make_system`: ``fpsolve_problem("ddpm", steps=12, batch=None)``."""
    return make_system
