"""The conformance kit can fail: deliberately broken plugins are rejected, each by the right check.

Also runs the kit the way a plugin author does, from a separate test file through pytest (the
mixins and the ``fpsolve_conformance`` fixture of the pytest plugin), and checks the plugin's
entry point, option and report header.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import textwrap

import attrs
import pytest
import torch

import fpsolve
from fpsolve.control import Controller
from fpsolve.initializers import InitialGuess, NoiseCopy
from fpsolve.testing import ConformanceError, checks
from fpsolve.testing.problems import make_sampler, make_system

pytest_plugins = ["pytester"]

# -- broken solvers ----------------------------------------------------------------------------


@attrs.define(frozen=True, eq=False, kw_only=True)
class BiasedFinal(fpsolve.solvers.FP):
    """Proposes biased values; under a controller that makes the boundary row final with the
    proposal (PROPOSAL) it never reproduces the sequential sample."""

    name = "biased_final"

    def step(self, view, state):
        return view.rhs + 1e-3, state


#: The loop policy that makes the boundary row (and x_0) final with the solver's proposal.
PROPOSAL = Controller(boundary="proposal")


@attrs.define(frozen=True, eq=False, kw_only=True)
class RandomDamping(fpsolve.solvers.FP):
    """Damps with the global random generator: converges, but differently every run."""

    name = "random_damping"

    def step(self, view, state):
        damping = 0.5 + 0.5 * torch.rand(())
        return view.states + damping.to(view.states) * view.residual, state


@attrs.define(frozen=True, eq=False, kw_only=True)
class SinglePrecision(fpsolve.solvers.FP):
    """Returns float32 proposals for float64 states (the driver would silently cast them)."""

    name = "single_precision"

    def step(self, view, state):
        return view.rhs.float(), state


@attrs.define(frozen=True, eq=False, kw_only=True)
class OneRow(fpsolve.solvers.FP):
    """Proposes only the first row of the window."""

    name = "one_row"

    def step(self, view, state):
        return view.rhs[:1], state


@attrs.define(frozen=True, eq=False, kw_only=True)
class Stalling(fpsolve.solvers.FP):
    """Unsafeguarded and never moves; a test class that claims the T bound for it must fail."""

    name = "stalling"

    def step(self, view, state):
        return view.states, state


@attrs.define(eq=False, kw_only=True)
class Mutable(fpsolve.FixedPointSolver):
    """Not frozen: a solver must be an immutable config."""

    name = "mutable"

    order: int | None = None

    def step(self, view, state):
        return view.rhs, state


@attrs.define(frozen=True, eq=False, kw_only=True)
class Nameless(fpsolve.solvers.FP):
    """No registry name."""

    name = ""


def test_good_solvers_pass_every_check():
    checks.check_solver(fpsolve.solvers.TAA(), samplers=("ddim",), windows=(None,))
    checks.check_solver(fpsolve.solvers.FP(order=1), samplers=("dpm_solver",), windows=(3,))


@pytest.mark.parametrize(
    "solver, check, message",
    [
        (BiasedFinal(), lambda s: checks.check_solver_parity(s, make_system("ddim"), controller=PROPOSAL),
         "max abs error"),
        (
            RandomDamping(),
            lambda s: checks.check_solver_determinism(s, make_system("ddim")),
            "not deterministic",
        ),
        (
            SinglePrecision(),
            lambda s: checks.check_solver_step_contract(s, make_system("ddim")),
            "dtype torch.float32",
        ),
        (OneRow(), lambda s: checks.check_solver_step_contract(s, make_system("ddim")), "has shape"),
        (
            Stalling(),
            lambda s: checks.check_solver_iteration_bound(s, make_system("ddim"),
                                                          controller=Controller(safeguard=False)),
            "claims at most T",
        ),
        (Mutable(), checks.check_solver_interface, "frozen"),
        (Nameless(), checks.check_solver_interface, "name"),
        (fpsolve.solvers.Sequential(), checks.check_solver_interface, "reserved for the reference"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, fpsolve.FixedPointSolver) else "",
)
def test_broken_solvers_are_rejected_by_the_right_check(solver, check, message):
    with pytest.raises(ConformanceError, match=message) as info:
        check(solver)
    assert type(solver).__name__ in str(info.value)  # the message names the component


def test_the_whole_suite_lists_every_failure():
    with pytest.raises(ConformanceError) as info:
        checks.check_solver(BiasedFinal(), samplers=("ddim", "ddpm"), windows=(None,), devices=["cpu"],
                            controller=PROPOSAL)
    message = str(info.value)
    assert "BiasedFinal 'biased_final' failed" in message
    assert "parity [ddim, window=None]" in message and "parity [ddpm, window=None]" in message
    assert "dtype torch.float64" in message and "device cpu" in message


# -- broken samplers, rules, initializers --------------------------------------------------------


@attrs.define(frozen=True, eq=False, kw_only=True)
class ShortVariances(fpsolve.samplers.DDIM):
    """step_variances() of length T instead of T+1."""

    name = "short_variances"

    def step_variances(self):
        return super().step_variances()[1:]


@attrs.define(frozen=True, eq=False, kw_only=True)
class Flaky(fpsolve.samplers.DDIM):
    """Coefficients that change between calls."""

    name = "flaky"

    calls = itertools.count(1)  # a new factor on every call, never a repeat (a float32 rand() was:
    # 1 + 1e-6 * rand() rounds to one of about 8 float32 values, so two calls could agree)

    def affine_form(self):
        form = super().affine_form()
        return attrs.evolve(form, output=form.output * (1 + 1e-6 * next(Flaky.calls)))


def ddim_loop(system):
    """An author's own DDIM loop (eta 0), the reference the affine form must equal."""
    abar = system.sampler.state_alphas_cumprod()
    states = [system.flat_noise[0]]
    for i, t in enumerate(system.sampler.timesteps):
        x = states[-1]
        eps = system.denoiser(x, torch.full((x.shape[0],), t))
        x0 = (x - (1 - abar[i]).sqrt() * eps) / abar[i].sqrt()
        states.append(abar[i + 1].sqrt() * x0 + (1 - abar[i + 1]).sqrt() * eps)
    return system.unflatten(torch.stack(states))


def test_samplers_are_checked():
    ddim = make_sampler("ddim")
    checks.check_sampler(ddim, reference=ddim_loop, devices=["cpu"])
    with pytest.raises(ConformanceError, match=r"step_variances\(\) must return a tensor \[T\+1\]"):
        checks.check_sampler_interface(
            ShortVariances(alphas_cumprod=ddim.alphas_cumprod, timesteps=ddim.timesteps)
        )
    with pytest.raises(ConformanceError, match="differs between two calls"):
        checks.check_sampler_determinism(Flaky(alphas_cumprod=ddim.alphas_cumprod, timesteps=ddim.timesteps))
    ddpm = make_sampler("ddpm")  # not what ddim_loop computes
    with pytest.raises(ConformanceError, match="disagrees with its own sampling loop"):
        checks.check_sampler_reference(ddpm, ddim_loop)


@attrs.define(frozen=True, eq=False)
class Ragged(fpsolve.StoppingRule):
    """One verdict too many."""

    name = "ragged"

    def converged(self, view):
        return torch.ones(view.hi - view.lo + 2, dtype=torch.bool, device=view.states.device)


@attrs.define(frozen=True, eq=False)
class Scores(fpsolve.StoppingRule):
    """Float scores instead of bool verdicts."""

    name = "scores"

    def converged(self, view):
        return view.first_order.pow(2).mean((-1, -2))


@attrs.define(frozen=True, eq=False)
class CoinFlip(fpsolve.StoppingRule):
    """Random verdicts."""

    name = "coin_flip"

    def converged(self, view):
        return torch.rand(view.hi - view.lo + 1, device=view.states.device) < 0.5


@attrs.define(frozen=True, eq=False)
class AcceptAll(fpsolve.StoppingRule):
    """Accepts every row at once: fine as a rule, wrong as a claim of exactness."""

    name = "accept_all"

    def converged(self, view):
        return torch.ones(view.hi - view.lo + 1, dtype=torch.bool, device=view.states.device)


def test_stopping_rules_are_checked():
    checks.check_stopping_rule(
        fpsolve.stopping.RMS(),
        tight=fpsolve.stopping.RMS(tol1=1e-12, tol2=1e-12),
        samplers=("ddim",),
        devices=["cpu"],
    )
    system = make_system("ddim")
    with pytest.raises(ConformanceError, match=r"bool tensor \[W\]"):
        checks.check_stopping_rule_contract(Ragged(), system)
    with pytest.raises(ConformanceError, match=r"bool tensor \[W\].*torch.float64"):
        checks.check_stopping_rule_contract(Scores(), system)
    with pytest.raises(ConformanceError, match="not deterministic"):
        checks.check_stopping_rule_contract(CoinFlip(), system)
    checks.check_stopping_rule_in_solves(AcceptAll(), system)  # runs safely...
    with pytest.raises(ConformanceError, match="max abs error"):
        checks.check_stopping_rule_parity(AcceptAll(), system)  # ...but is not exact


@attrs.define(frozen=True, eq=False)
class NewNoise(NoiseCopy):
    """Replaces x_T by a fresh draw."""

    name = "new_noise"

    def initialize(self, system):
        guess = super().initialize(system)
        guess.trajectory[0] = torch.randn_like(guess.trajectory[0])
        return guess


@attrs.define(frozen=True, eq=False)
class Overreaching(NoiseCopy):
    """Claims guesses beyond the last state."""

    name = "overreaching"

    def initialize(self, system):
        guess = super().initialize(system)
        return InitialGuess(guess.trajectory, valid_upto=system.num_steps + 1)


@attrs.define(frozen=True, eq=False)
class Downcast(NoiseCopy):
    """Returns a float32 guess for a float64 system."""

    name = "downcast"

    def initialize(self, system):
        guess = super().initialize(system)
        return InitialGuess(guess.trajectory.float(), valid_upto=0)


def test_initializers_are_checked():
    checks.check_initializer(NoiseCopy(), samplers=("ddim",), devices=["cpu"])
    system = make_system("ddpm")
    for broken, message in (
        (NewNoise(), "changed x_T"),
        (Overreaching(), "valid_upto <= T"),
        (Downcast(), "dtype torch.float32"),
    ):
        with pytest.raises(ConformanceError, match=message):
            checks.check_initializer_contract(broken, system)


# -- the kit as a plugin author uses it: a separate test file run by pytest ----------------------

PLUGIN_TESTS = textwrap.dedent("""
    import attrs
    import pytest
    import fpsolve
    from fpsolve.control import Controller
    from fpsolve.testing import ConformanceError, SolverConformance, StoppingRuleConformance


    @attrs.define(frozen=True, eq=False, kw_only=True)
    class HalfStep(fpsolve.solvers.FP):
        name = "half_step"

        def step(self, view, state):
            return view.states + 0.5 * view.residual, state


    @attrs.define(frozen=True, eq=False, kw_only=True)
    class BiasedFinal(fpsolve.solvers.FP):
        name = "biased_final"

        def step(self, view, state):
            return view.rhs + 1e-3, state


    class TestHalfStep(SolverConformance):
        solver = HalfStep()
        samplers = ("ddim",)
        windows = (None,)


    class TestBiasedFinal(SolverConformance):
        solver = BiasedFinal()
        controller = Controller(boundary="proposal")
        samplers = ("ddim",)
        windows = (None,)


    class TestRMS(StoppingRuleConformance):
        rule = fpsolve.stopping.RMS()
        samplers = ("ddpm",)


    def test_fixture_accepts_a_good_solver(fpsolve_conformance):
        fpsolve_conformance.solver(HalfStep(), samplers=("ddim",), windows=(None,))


    def test_fixture_rejects_a_broken_solver(fpsolve_conformance):
        with pytest.raises(ConformanceError, match="biased_final"):
            fpsolve_conformance.solver(BiasedFinal(), samplers=("ddim",), windows=(None,),
                                       controller=Controller(boundary="proposal"))


    def test_problem_fixture(fpsolve_problem):
        assert fpsolve_problem("ddpm", steps=5, batch=None).num_steps == 5
""")


@pytest.fixture
def isolated(pytester, monkeypatch):
    """A pytester whose runs load only fpsolve's pytest plugin, whatever is installed."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    return pytester


def test_a_plugin_test_file_uses_the_mixins_and_fixtures(isolated):
    isolated.makepyfile(test_my_plugin=PLUGIN_TESTS)
    result = isolated.runpytest_inprocess(
        "-p", "fpsolve.testing.pytest_plugin", "-q", "-rfEs", "--fpsolve-device", "cpu"
    )
    outcomes = result.parseoutcomes()
    failed = [line for line in result.outlines if line.startswith("FAILED")]
    # the broken solver fails exactly where it is broken, and nowhere else
    assert failed and all("TestBiasedFinal" in line for line in failed), result.outlines
    assert {line.split("::")[2].split("[")[0].split(" ")[0] for line in failed} >= {
        "test_matches_sequential",
        "test_at_most_T_iterations",
        "test_shapes",
        "test_dtype",
        "test_random_problems_match_sequential",
    }
    assert not any(
        "TestBiasedFinal::test_deterministic" in line or "TestBiasedFinal::test_step_contract" in line
        for line in failed
    )
    assert outcomes["passed"] > 20 and outcomes["failed"] == len(failed)
    # --fpsolve-device cpu deselects the GPU tests with a reason
    assert any("device cuda not selected" in line for line in result.outlines)


def test_the_pytest_plugin_refuses_an_absent_gpu(isolated):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    isolated.makepyfile(
        test_gpu="""
        def test_needs_gpu(fpsolve_conformance):
            pass
    """
    )
    result = isolated.runpytest_inprocess("-p", "fpsolve.testing.pytest_plugin", "--fpsolve-device", "cuda")
    assert result.ret != 0
    assert any("no CUDA device is visible" in line for line in result.outlines + result.errlines)


def test_report_header_names_fpsolve_and_its_plugins(isolated):
    isolated.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = isolated.runpytest_inprocess("-p", "fpsolve.testing.pytest_plugin")
    assert any(
        line.startswith(f"fpsolve {importlib.metadata.version('fpsolve')}; plugins:")
        for line in result.outlines
    )


def test_the_pytest11_entry_point_is_declared():
    points = [
        ep
        for ep in importlib.metadata.entry_points(group="pytest11")
        if ep.value == "fpsolve.testing.pytest_plugin"
    ]
    if not points:
        pytest.skip(
            "the installed fpsolve declares no pytest11 entry point yet; pyproject.toml needs "
            "[project.entry-points.pytest11] "
            '"fpsolve.testing.pytest_plugin" = "fpsolve.testing.pytest_plugin" (then reinstall)'
        )
    # named after the module, so `-p fpsolve.testing.pytest_plugin` and pytest_plugins = [...] stay no-ops
    assert points[0].name == "fpsolve.testing.pytest_plugin"
