"""Test-class mixins: subclass one in a plugin's tests and pytest runs the whole conformance suite.

::

    from fpsolve.testing import SolverConformance

    class TestHalfStep(SolverConformance):
        solver = HalfStep()

Each mixin turns the checks of :mod:`fpsolve.testing.checks` into separate, parametrized tests
(one per check, problem, window, dtype and device), so a failure names exactly what broke. The
class attributes configure the suite; only the component itself is required. Mixin names do not
start with ``Test``, so pytest collects only your subclasses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from ..control import Controller
from ..initializers import Initializer
from ..registry import get_registry
from ..samplers.base import SequentialSampler
from ..solvers.base import FixedPointSolver
from ..stopping import StoppingRule
from ..system import TriangularSystem
from . import checks
from . import strategies as fst
from .problems import SAMPLER_KINDS, make_system

__all__ = ["SolverConformance", "SamplerConformance", "StoppingRuleConformance", "InitializerConformance"]

DTYPES = (torch.float32, torch.float64)
DEVICES = ("cpu", "cuda")

# Inherited @given tests run on a different class per plugin; that is the point of a mixin.
_PROPERTY_SETTINGS = settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)


def _require_device(device: str, request: Any) -> None:
    """Skip a device test when the device is absent or deselected with ``--fpsolve-device``."""
    chosen = request.config.getoption("fpsolve_device", default=None)
    if chosen and device not in chosen:
        pytest.skip(f"device {device} not selected (--fpsolve-device {' '.join(chosen)})")
    if device == "cuda" and not torch.cuda.is_available():
        if chosen:  # asked for explicitly: an absent GPU is an error, not a silent skip
            pytest.fail("--fpsolve-device cuda was given, but no CUDA device is visible.")
        pytest.skip("no CUDA device visible")


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Conformance:
    """Shared machinery: class-level parametrization from the subclass's attributes."""

    kind: ClassVar[str] = ""
    #: set True to require that the component's ``name`` resolves to its class in the registry
    #: (i.e. that the plugin's entry point is installed).
    expect_registered: ClassVar[bool] = False

    def _component(self) -> Any:
        raise NotImplementedError

    def pytest_generate_tests(self, metafunc: Any) -> None:
        """Parametrize ``sampler_kind``, ``window``, ``dtype`` and ``device`` from the class attributes."""
        cls = metafunc.cls
        if "sampler_kind" in metafunc.fixturenames:
            metafunc.parametrize("sampler_kind", list(getattr(cls, "samplers", SAMPLER_KINDS)))
        if "window" in metafunc.fixturenames:
            windows = list(getattr(cls, "windows", (None, 3)))
            metafunc.parametrize("window", windows, ids=[f"window={w}" for w in windows])
        if "dtype" in metafunc.fixturenames:
            metafunc.parametrize("dtype", DTYPES, ids=[_dtype_id(d) for d in DTYPES])
        if "device" in metafunc.fixturenames:
            metafunc.parametrize("device", DEVICES)
        if "shape_case" in metafunc.fixturenames:
            cases = list(checks.SHAPE_CASES)
            ids = [f"batch={b}-shape={'x'.join(map(str, s))}-T={t}" for b, s, t in cases]
            metafunc.parametrize("shape_case", cases, ids=ids)

    def test_registered(self) -> None:
        """With ``expect_registered``, the component's name resolves to its class."""
        if not self.expect_registered:
            pytest.skip("expect_registered is False")
        component = self._component()
        entry = get_registry().lookup(self.kind, component.name)
        assert entry.cls is type(component), (
            f"the {self.kind} name {component.name!r} resolves to "
            f"{entry.cls.__module__}.{entry.cls.__qualname__} from {entry.distribution}, "
            f"not to {type(component).__qualname__}"
        )


class SolverConformance(_Conformance):
    """The solver suite. Set ``solver``; optionally the attributes below.

    Attributes:
        solver: the solver instance under test (required).
        stopping: the tight stopping rule for parity (default: the rule of the solver's preset
            if it has one, else ``rms`` at 1e-12); give a method that brings its own rule a
            tight one, e.g. ``ParadigmsOriginal(tol=1e-7)``.
        claims_at_most_steps: hold the solver to T iterations (default: whether the controller
            of its preset, :func:`~fpsolve.testing.checks.solver_controller`, is safeguarded).
        samplers: problem samplers (default ``ddim``, ``ddpm``, ``dpm_solver``).
        windows: windows for parity and the iteration bound (``None``: the controller's window).
        controller: the loop policy to test the solver under (default: its preset's, e.g. a
            method published with ``Controller(boundary="proposal")``).
        atol: float64 parity tolerance, relative to the trajectory's scale.
        max_examples: examples of the hypothesis property on random problems.
    """

    kind = "solver"
    solver: ClassVar[FixedPointSolver]
    stopping: ClassVar[StoppingRule | None] = None
    claims_at_most_steps: ClassVar[bool | None] = None
    controller: ClassVar[Controller | None] = None
    samplers: ClassVar[Sequence[str]] = SAMPLER_KINDS
    windows: ClassVar[Sequence[int | None]] = (None, 3)
    atol: ClassVar[float] = 1e-8

    def _component(self) -> FixedPointSolver:
        return self.solver

    def _claims_bound(self) -> bool:
        claim = self.claims_at_most_steps
        if claim is not None:
            return claim
        return checks.solver_controller(self.solver, self.controller).bounds_iterations()

    def test_interface(self) -> None:
        """A frozen attrs FixedPointSolver with a name and a valid order."""
        checks.check_solver_interface(self.solver)

    def test_step_contract(self, sampler_kind: str) -> None:
        """Proposals have the window's shape, dtype and device."""
        checks.check_solver_step_contract(self.solver, make_system(sampler_kind))

    def test_matches_sequential(self, sampler_kind: str, window: int | None) -> None:
        """At a tight tolerance the solve reproduces the sequential trajectory."""
        checks.check_solver_parity(
            self.solver, make_system(sampler_kind), window=window, stopping=self.stopping, atol=self.atol,
            controller=self.controller,
        )

    def test_at_most_T_iterations(self, sampler_kind: str, window: int | None) -> None:
        """From a random guess, with no early acceptance: done within T iterations, and exact."""
        if not self._claims_bound():
            pytest.skip("the solver does not claim at most T iterations (its controller has safeguard=False)")
        checks.check_solver_iteration_bound(self.solver, make_system(sampler_kind), window=window,
                                            controller=self.controller)

    def test_deterministic(self, sampler_kind: str) -> None:
        """Two solves give bit-identical trajectories."""
        checks.check_solver_determinism(self.solver, make_system(sampler_kind), stopping=self.stopping,
                                        controller=self.controller)

    def test_shapes(self, shape_case: tuple[int | None, tuple[int, ...], int]) -> None:
        """No batch axis, matrix-shaped samples, and T = 1."""
        checks.check_solver_shapes(self.solver, stopping=self.stopping, atol=self.atol, cases=[shape_case],
                                   controller=self.controller)

    def test_dtype(self, dtype: torch.dtype) -> None:
        """The result keeps the system's dtype and matches that dtype's sequential sample."""
        checks.check_solver_dtype(self.solver, dtype, stopping=self.stopping, controller=self.controller)

    def test_device(self, device: str, request: Any) -> None:
        """The result stays on the system's device and matches the CPU."""
        _require_device(device, request)
        checks.check_solver_device(self.solver, device, stopping=self.stopping, controller=self.controller)

    @_PROPERTY_SETTINGS
    @given(system=fst.systems(max_steps=8, max_dim=4, max_batch=2))
    def test_random_problems_match_sequential(self, system: TriangularSystem) -> None:
        """Random samplers, schedules, timestep lists, shapes and batches (hypothesis)."""
        checks.check_solver_parity(self.solver, system, stopping=self.stopping, atol=self.atol,
                                   controller=self.controller)


class SamplerConformance(_Conformance):
    """The sampler suite. Set ``sampler``; optionally override :meth:`reference_trajectory`.

    Attributes:
        sampler: the sampler instance under test (required); its timesteps must lie in
            ``[0, 1000)`` if it has no ``alphas_cumprod`` of its own (the toy model's schedule).
    """

    kind = "sampler"
    sampler: ClassVar[SequentialSampler]

    def _component(self) -> SequentialSampler:
        return self.sampler

    def reference_trajectory(self, system: TriangularSystem) -> torch.Tensor | None:
        """Your own sequential loop's trajectory for ``system`` (see
        :func:`~fpsolve.testing.checks.check_sampler_reference`); ``None`` skips that test."""
        return None

    def test_interface(self) -> None:
        """A SequentialSampler with a valid affine form and schedules."""
        checks.check_sampler_interface(self.sampler)

    def test_deterministic(self) -> None:
        """Coefficients and schedules are the same on every call."""
        checks.check_sampler_determinism(self.sampler)

    def test_parallel_solvers_match_sequential(self) -> None:
        """fp (k = 1, k = T) and taa (m = 2, 3), with and without a window, within T iterations."""
        checks.check_sampler_parity(self.sampler)

    def test_no_batch_axis(self) -> None:
        """One sample without a batch axis."""
        checks.check_sampler_parity(self.sampler, batch=None)

    def test_matches_own_loop(self) -> None:
        """fpsolve's sequential run of the affine form equals :meth:`reference_trajectory`."""
        if self.reference_trajectory(make_system(self.sampler)) is None:
            pytest.skip("reference_trajectory() is not implemented")

        def reference(system: TriangularSystem) -> torch.Tensor:
            trajectory = self.reference_trajectory(system)
            assert trajectory is not None  # implemented: it returned a trajectory just above
            return trajectory

        checks.check_sampler_reference(self.sampler, reference)

    def test_dtype(self, dtype: torch.dtype) -> None:
        """Solves in float32 and float64."""
        checks.check_sampler_dtype_device(self.sampler, dtype)

    def test_device(self, device: str, request: Any) -> None:
        """Solves on every device."""
        _require_device(device, request)
        checks.check_sampler_dtype_device(self.sampler, torch.float64, device)


class StoppingRuleConformance(_Conformance):
    """The stopping-rule suite. Set ``rule``; set ``tight_rule`` to also check parity.

    Attributes:
        rule: the rule instance under test (required).
        tight_rule: the rule in a configuration that must reproduce the sequential sample
            (e.g. a tiny tolerance); ``None`` skips the parity test.
        samplers: problem samplers.
    """

    kind = "stopping rule"
    rule: ClassVar[StoppingRule]
    tight_rule: ClassVar[StoppingRule | None] = None
    samplers: ClassVar[Sequence[str]] = SAMPLER_KINDS

    def _component(self) -> StoppingRule:
        return self.rule

    def test_verdict_contract(self, sampler_kind: str) -> None:
        """``converged`` gives None or a [W] bool tensor on the view's device, deterministically."""
        checks.check_stopping_rule_contract(self.rule, make_system(sampler_kind))

    def test_with_every_solver(self, sampler_kind: str) -> None:
        """fp, jacobi and taa run with it, alone and combined with rms: finite, at most T iterations."""
        checks.check_stopping_rule_in_solves(self.rule, make_system(sampler_kind))

    def test_tight_rule_matches_sequential(self, sampler_kind: str) -> None:
        """With ``tight_rule``, fp and taa reproduce the sequential sample."""
        if self.tight_rule is None:
            pytest.skip("tight_rule is not set")
        checks.check_stopping_rule_parity(self.tight_rule, make_system(sampler_kind))

    def test_dtype(self, dtype: torch.dtype) -> None:
        """Views in float32 and float64."""
        checks.check_stopping_rule_contract(self.rule, make_system("ddim", dtype=dtype))

    def test_device(self, device: str, request: Any) -> None:
        """Views on every device."""
        _require_device(device, request)
        checks.check_stopping_rule_contract(self.rule, make_system("ddim", device=device))


class InitializerConformance(_Conformance):
    """The initializer suite. Set ``initializer``, or override :meth:`make_initializer` for one
    that needs the system (e.g. an earlier trajectory).

    Attributes:
        initializer: the initializer instance under test.
        samplers: problem samplers.
    """

    kind = "initializer"
    initializer: ClassVar[Initializer | None] = None
    samplers: ClassVar[Sequence[str]] = SAMPLER_KINDS

    def _component(self) -> Initializer:
        return self.make_initializer(make_system("ddim"))

    def make_initializer(self, system: TriangularSystem) -> Initializer:
        """The initializer to test on ``system`` (default: ``initializer``)."""
        if self.initializer is None:
            raise TypeError("set the class attribute initializer, or override make_initializer(system).")
        return self.initializer

    def _check(self, check: Callable[[Initializer, TriangularSystem], Any], system: TriangularSystem) -> None:
        check(self.make_initializer(system), system)

    def test_contract(self, sampler_kind: str) -> None:
        """A guess of the right shape, dtype and device that keeps x_T."""
        self._check(checks.check_initializer_contract, make_system(sampler_kind))

    def test_solvers_reach_sequential(self, sampler_kind: str) -> None:
        """fp and taa reach the sequential sample from the guess within T iterations."""
        self._check(checks.check_initializer_parity, make_system(sampler_kind))

    def test_deterministic(self, sampler_kind: str) -> None:
        """Two calls give the same guess."""
        self._check(checks.check_initializer_determinism, make_system(sampler_kind))

    def test_shapes(self, shape_case: tuple[int | None, tuple[int, ...], int]) -> None:
        """No batch axis, matrix-shaped samples, and T = 1."""
        batch, shape, steps = shape_case
        system = make_system("ddim", steps=steps, shape=shape, batch=batch)
        self._check(checks.check_initializer_contract, system)
        self._check(checks.check_initializer_parity, system)

    def test_dtype(self, dtype: torch.dtype) -> None:
        """float32 and float64 systems."""
        system = make_system("ddim", dtype=dtype)
        self._check(checks.check_initializer_contract, system)
        self._check(checks.check_initializer_parity, system)

    def test_device(self, device: str, request: Any) -> None:
        """Systems on every device."""
        _require_device(device, request)
        system = make_system("ddim", device=device)
        self._check(checks.check_initializer_contract, system)
        self._check(checks.check_initializer_parity, system)
