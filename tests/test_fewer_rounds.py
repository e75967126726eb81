"""Issue 14's components: the ``x0`` stopping rule, the ``extrapolate`` initializer, the Jacobian
prior of ``newton``, the diagonal-secant solver ``newton_diag``, the ``x0_forecast`` rule
and TAA's restarts.

The exactness tests use a point-mass denoiser, ``eps(x, t) = (x - sqrt(abar_t) c) / sqrt(1 - abar_t)``:
the exact eps of data concentrated at ``c``. Its predicted x_0 is ``c`` at every state, so the
frozen-x0 extrapolation is the exact trajectory and ``1 / sigma`` is its exact Jacobian.
"""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fpsolve
from fpsolve.errors import InvalidOptionError
from fpsolve.initializers import Extrapolate
from fpsolve.registry import get_registry, preset_for
from fpsolve.solvers import TAA, DiagonalNewton, QuasiNewton
from fpsolve.solvers.base import WindowView
from fpsolve.stopping import RMS, StoppingView, X0Change, X0Forecast, geometric_tail
from fpsolve.testing.problems import linear_alphas_cumprod, make_system

ABAR = linear_alphas_cumprod()
# Timesteps from 990 down to 90: every state before x_0 has sigma > 0.1, so the prior slope
# 1 / sigma stays far below the clamp and is exact for the point mass.
TIMESTEPS = list(range(990, 89, -100))


class PointMass:
    """The exact eps-predictor of data concentrated at ``center``."""

    def __init__(self, center: torch.Tensor):
        self.center = center

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = ABAR.to(x.dtype)[t].view(-1, *([1] * (x.dim() - 1)))
        return (x - abar.sqrt() * self.center) / (1 - abar).sqrt()


def _point_mass_system(sampler: str, batch: int = 2) -> fpsolve.TriangularSystem:
    # options by registered name; the class comes from the registry, the one name -> class map
    options = {"ddim": {}, "ddpm": {}, "dpm_solver": {"order": 2}}[sampler]
    cls = get_registry().lookup("sampler", sampler).cls
    center = torch.linspace(-0.8, 0.7, 6, dtype=torch.float64)
    return fpsolve.TriangularSystem(sampler=cls(alphas_cumprod=ABAR, timesteps=TIMESTEPS, **options),
                                    denoiser=PointMass(center), shape=(6,),
                                    batch=batch, generator=torch.Generator().manual_seed(5))


def _sequential(system: fpsolve.TriangularSystem) -> torch.Tensor:
    return fpsolve.solve(system, "sequential").trajectory


# -- the x0 rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddim", "ddpm", "dpm_solver"])
@pytest.mark.parametrize("solver", ["newton", "taa", "fp"])
def test_x0_rule_reaches_the_sequential_sample_as_its_tolerances_go_to_zero(kind, solver):
    system = make_system(kind, steps=12)
    exact = _sequential(system)[-1]
    errors = []
    for atol in (1e-2, 1e-5, 1e-10):
        solution = fpsolve.solve(system, solver, stopping=X0Change(atol=atol, tol=atol))
        errors.append(float((solution.sample - exact).abs().max()))
    assert errors[-1] < 1e-9  # float64: the solve is exact to rounding once both bounds are tiny
    assert errors[-1] <= errors[0]


def test_x0_rule_stops_once_the_output_moved_less_than_atol():
    """A huge ``atol`` accepts everything at the first iteration that has a previous output
    (iteration 2), and the sample is the frozen-output run from the anchor: x_0 + R^T_T."""
    system = make_system("ddim", steps=12)
    solution = fpsolve.solve(system, "fp", stopping=X0Change(atol=1e9, tol=1e-12))
    assert solution.iterations == 2
    # Iteration 2 evaluates iterate 1 and returns x_0 = G^T_T(iterate 1), which is what plain
    # Picard holds at x_0 after two iterations (fp takes the right-hand side at every row).
    with pytest.warns(fpsolve.NotConvergedWarning):  # capped on purpose
        capped = fpsolve.solve(system, "fp", tol=1e-12, max_iters=2)
    torch.testing.assert_close(solution.sample, capped.sample, rtol=0, atol=1e-12)


def test_x0_rule_with_a_tiny_atol_is_the_rms_rule():
    """Until x_0 settles, rows are judged by the RMS rule alone: with atol tiny the iterates are
    exactly those of ``RMS(tol)``."""
    system = make_system("ddpm", steps=12)
    rule = fpsolve.solve(system, "newton", stopping=X0Change(atol=1e-300, tol=1e-6))
    rms = fpsolve.solve(system, "newton", stopping=RMS(tol1=1e-6, tol2=1e-6))
    assert rule.iterations == rms.iterations
    torch.testing.assert_close(rule.trajectory, rms.trajectory, rtol=0, atol=0)


def test_one_x0_rule_instance_judges_consecutive_solves_alike():
    rule = X0Change(atol=1e-3)
    first = fpsolve.solve(make_system("ddim", steps=12), "newton", stopping=rule)
    second = fpsolve.solve(make_system("ddim", steps=12), "newton", stopping=rule)
    assert first.iterations == second.iterations
    torch.testing.assert_close(first.sample, second.sample, rtol=0, atol=0)


def test_x0_rule_with_a_sliding_window_falls_back_to_rows():
    system = make_system("ddim", steps=12)
    solution = fpsolve.solve(system, "newton", stopping=X0Change(atol=1e-12, tol=1e-12), window=4)
    torch.testing.assert_close(solution.sample, _sequential(system)[-1], rtol=0, atol=1e-9)


@pytest.mark.parametrize("options", [dict(atol=0.0), dict(atol=-1.0), dict(tol=float("nan"))])
def test_x0_rule_refuses_bad_bounds(options):
    with pytest.raises(InvalidOptionError, match="atol|tol"):
        X0Change(**options)


# -- the extrapolate initializer -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddim", "ddpm", "dpm_solver"])
@pytest.mark.parametrize("steps", [1, 3])
def test_extrapolation_is_exact_when_the_predicted_x0_does_not_change(kind, steps):
    """For the point mass every state predicts the same x_0, so holding it fixed is exact."""
    system = _point_mass_system(kind)
    guess = Extrapolate(steps=steps).initialize(system)
    assert (guess.anchor, guess.iterations, guess.valid_upto) == (steps, steps, system.num_steps)
    assert guess.model_evals == steps * system.num_samples
    exact = _sequential(system).reshape(guess.trajectory.shape)
    torch.testing.assert_close(guess.trajectory, exact, rtol=0, atol=1e-12)


def test_extrapolation_keeps_the_exact_prefix_and_the_solve_reaches_sequential():
    system = make_system("ddpm", steps=12)
    exact = _sequential(system).reshape(13, 2, -1)
    guess = Extrapolate(steps=4).initialize(system)
    torch.testing.assert_close(guess.trajectory[:5], exact[:5], rtol=0, atol=1e-12)
    solution = fpsolve.solve(system, "taa", initializer=Extrapolate(steps=4), tol=1e-12)
    assert solution.iterations <= system.num_steps
    torch.testing.assert_close(solution.sample, _sequential(system)[-1], rtol=0, atol=1e-9)


def test_extrapolation_towards_zero_makes_no_model_call():
    system = make_system("ddim", steps=8)
    guess = Extrapolate(steps=0).initialize(system)
    assert (guess.iterations, guess.model_evals, guess.anchor) == (0, 0, 0)
    sigmas = system.sigmas
    # DDIM with x_0 = 0 held fixed: s_j = sigma_j / sigma_0 * x_T.
    expected = sigmas[:, None, None] / sigmas[0] * system.flat_noise[0]
    torch.testing.assert_close(guess.trajectory, expected, rtol=0, atol=1e-12)


def test_extrapolate_refuses_negative_steps():
    with pytest.raises(InvalidOptionError, match="steps"):
        Extrapolate(steps=-1)


class PointMassVelocity:
    """The exact flow-matching velocity of data concentrated at ``center``: ``(x - c) / sigma``
    at model time ``t = 1000 sigma`` (``x = (1 - sigma) c + sigma eps`` gives ``eps - c``)."""

    def __init__(self, center: torch.Tensor):
        self.center = center

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x - self.center.to(x.dtype)) / (t.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) / 1000)


def _flow_point_mass_system(sampler: str) -> fpsolve.TriangularSystem:
    from fpsolve.testing.problems import problem_sampler

    center = torch.linspace(-0.8, 0.7, 6, dtype=torch.float64)
    return fpsolve.TriangularSystem(sampler=problem_sampler(sampler, 10), denoiser=PointMassVelocity(center),
                                    shape=(6,), batch=2, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("kind", ["ddim", "ddpm", "dpm_solver", "flow_euler", "flow_dpm_solver"])
@pytest.mark.parametrize("steps", [0, 1, 3])
def test_extrapolation_towards_the_data_is_exact_for_a_point_mass(kind, steps):
    """Held at the point mass's centre (``steps=0, x0=c``) or at the model's own prediction after
    exact steps, the extrapolation is the sequential trajectory of the point mass, for eps
    samplers and flow-matching velocity samplers alike (float64 rounding only, bound 1e-12).
    The same start towards ``x0 = 0`` is not (so the check is not vacuous)."""
    flow = kind.startswith("flow")
    system = _flow_point_mass_system(kind) if flow else _point_mass_system(kind)
    center = system.denoiser.center
    exact = _sequential(system).reshape(system.flat_noise.shape)
    initializer = Extrapolate(steps=0, x0=center) if steps == 0 else Extrapolate(steps=steps)
    guess = initializer.initialize(system)
    assert guess.valid_upto == system.num_steps
    torch.testing.assert_close(guess.trajectory, exact, rtol=0, atol=1e-12)
    towards_zero = Extrapolate(steps=0).initialize(system).trajectory
    assert float((towards_zero[-1] - exact[-1]).abs().max()) > 0.5


def test_extrapolation_x0_per_sample_and_for_all_samples():
    """``x0`` of the sample's shape is held for every sample; ``[N, *shape]`` one per sample; a
    zero ``x0`` is the default start bit for bit."""
    system = make_system("dpm_solver", steps=8, shape=(2, 3))
    per_sample = torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    both = Extrapolate(steps=0, x0=per_sample).initialize(system).trajectory
    for n in range(2):
        alone = Extrapolate(steps=0, x0=per_sample[n]).initialize(system).trajectory
        assert torch.equal(alone[:, n], both[:, n])
    assert not torch.equal(both[-1, 0], both[-1, 1])
    zero = Extrapolate(steps=0, x0=torch.zeros(2, 3)).initialize(system).trajectory
    assert torch.equal(zero, Extrapolate(steps=0).initialize(system).trajectory)
    solution = fpsolve.solve(system, initializer=Extrapolate(steps=0, x0=per_sample[0]), tol=1e-12)
    torch.testing.assert_close(solution.sample, _sequential(system)[-1], rtol=0, atol=1e-9)


def test_extrapolate_refuses_a_bad_x0():
    system = make_system("ddim", steps=6, shape=(4,))
    with pytest.raises(InvalidOptionError, match="steps=0"):
        Extrapolate(steps=2, x0=torch.zeros(4))
    with pytest.raises(fpsolve.errors.ShapeError,
                       match=r"x0 must have the sample's 4 elements.*got shape \[3\]"):
        Extrapolate(steps=0, x0=torch.zeros(3)).initialize(system)
    with pytest.raises(fpsolve.errors.ShapeError, match="x0 must be a tensor"):
        Extrapolate(steps=0, x0=[0.0] * 4).initialize(system)
    with pytest.raises(InvalidOptionError, match="finite"):
        Extrapolate(steps=0, x0=torch.full((4,), float("nan"))).initialize(system)


# -- newton's Jacobian prior ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddim", "ddpm", "dpm_solver"])
def test_newton_with_the_exact_jacobian_solves_an_affine_model_in_one_step(kind):
    """The point mass's eps is affine with slope exactly 1 / sigma: Newton with that Jacobian
    (prior x0, no secants) lands on the solution in one iteration; the second only confirms it."""
    system = _point_mass_system(kind)
    solver = QuasiNewton(prior="x0", prior_weight=1.0, clamp=1e4)
    solution = fpsolve.solve(system, solver, tol=1e-10)
    assert solution.iterations <= 2
    torch.testing.assert_close(solution.sample, _sequential(system)[-1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["ddim", "ddpm", "dpm_solver"])
@pytest.mark.parametrize("options", [dict(), dict(prior="zero", prior_weight=0.0),
                                     dict(prior="x0", prior_weight=1.0)])
def test_newton_variants_reach_the_sequential_sample(kind, options):
    system = make_system(kind, steps=12)
    solution = fpsolve.solve(system, QuasiNewton(**options), tol=1e-12)
    assert solution.iterations <= system.num_steps
    torch.testing.assert_close(solution.sample, _sequential(system)[-1], rtol=0, atol=1e-9)


def test_newton_defaults_are_the_measured_best_and_bring_the_x0_rule():
    solver = QuasiNewton()
    assert (solver.prior, solver.prior_weight) == ("x0", 0.5)
    assert isinstance(preset_for(QuasiNewton).stopping, X0Forecast)  # newton's preset brings x0_forecast
    assert (X0Change().atol, X0Change().tol) == (1.5e-2, 2e-5)
    forecast = X0Forecast()
    assert (forecast.atol, forecast.tol, forecast.bound, forecast.trust) == (1.5e-2, 5e-6, 1.2e-2, 3e-2)
    system = make_system("ddim", steps=12)
    solution = fpsolve.solve(system)  # the default solver is newton with its own rule
    assert isinstance(solution.solver, QuasiNewton)
    assert float((solution.sample - _sequential(system)[-1]).abs().max()) <= 1.5e-2


@pytest.mark.parametrize("options", [dict(prior="eps"), dict(prior_weight=1.5), dict(prior_weight=-0.1)])
def test_newton_refuses_bad_prior_options(options):
    with pytest.raises(InvalidOptionError, match="prior"):
        QuasiNewton(**options)


# -- newton_diag -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddim", "ddpm", "dpm_solver"])
def test_diagonal_secant_with_infinite_shrink_is_the_scalar_secant(kind):
    """``shrink -> inf`` pulls every element's slope to the state's scalar secant: ``newton``."""
    system = make_system(kind, steps=12)
    diagonal = fpsolve.solve(system, DiagonalNewton(shrink=1e12, prior="zero"), tol=1e-8)
    scalar = fpsolve.solve(system, QuasiNewton(prior="zero", prior_weight=0.0), tol=1e-8)
    assert diagonal.iterations == scalar.iterations
    torch.testing.assert_close(diagonal.trajectory, scalar.trajectory, rtol=0, atol=1e-9)


def test_diagonal_secant_is_exact_for_an_elementwise_affine_model():
    system = _point_mass_system("ddim")
    solution = fpsolve.solve(system, DiagonalNewton(clamp=1e4), tol=1e-10)
    assert solution.iterations <= 2
    torch.testing.assert_close(solution.sample, _sequential(system)[-1], rtol=0, atol=1e-10)


def test_diagonal_secant_needs_the_whole_window():
    with pytest.raises(InvalidOptionError, match="order"):
        fpsolve.solve(make_system("ddim", steps=12), DiagonalNewton(order=3))


@pytest.mark.parametrize("options", [dict(damping=1.0), dict(shrink=-1.0), dict(prior="none")])
def test_diagonal_secant_refuses_bad_options(options):
    with pytest.raises(InvalidOptionError):
        DiagonalNewton(**options)


# -- the x0_forecast rule ------------------------------------------------------------------------


def _output_views(system: fpsolve.TriangularSystem, outputs: list[torch.Tensor],
                  residuals: list[float] | None = None) -> list[StoppingView]:
    """Views whose window is the last row alone, with ``x_0 + R^T_T`` equal to each given output and
    a first-order residual far above any row tolerance (so only the output can accept the row).
    ``residuals``: the value of each iteration's ``R^T_T`` (default 0: the state x_0 is the output,
    so the stall guard has nothing to refuse)."""
    steps = system.num_steps
    views = []
    memory: dict = {}  # one solve's record, shared by its views as the driver shares it
    for iteration, output in enumerate(outputs, start=1):
        residual = torch.full_like(output, 0.0 if residuals is None else residuals[iteration - 1])
        state = (output - residual)[None]
        views.append(StoppingView(iteration, steps, steps, state, torch.ones_like(state),
                                  residual[None], system.sigmas[steps:], system.step_variances[steps:],
                                  system, memory))
    return views


def _first_acceptance(rule: X0Change, views: list[StoppingView]) -> int | None:
    return next((view.iteration for view in views if bool(rule.converged(view).all())), None)


def test_geometric_tail_is_the_remaining_error_of_a_linear_contraction():
    rho, size = torch.tensor(0.3, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    changes = [rho ** (k - 1) * (1 - rho) * size for k in (1, 2, 3)]  # |x_k - x_(k-1)| for x_k = rho^k v
    torch.testing.assert_close(geometric_tail(changes[2], changes[1]), rho**3 * size)
    assert geometric_tail(changes[1], changes[2]).isinf()  # growing: no forecast


@settings(max_examples=40, deadline=None)
@given(rho=st.floats(0.02, 0.9), scale=st.floats(1e-3, 10.0), bound=st.floats(1e-4, 1e-1),
       seed=st.integers(0, 2**16))
def test_x0_forecast_accepts_a_linear_contraction_only_once_its_error_is_within_the_bound(
        rho, scale, bound, seed):
    """Outputs ``x_k = x* + rho^k v``: the forecast is then the exact error, so the rule accepts at
    the first ``k`` whose error is at most ``bound`` (never before), and never later than ``x0``."""
    system = make_system("ddim", steps=4, shape=(3,), batch=2)
    generator = torch.Generator().manual_seed(seed)
    limit = torch.randn(2, 3, dtype=torch.float64, generator=generator)
    direction = scale * torch.randn(2, 3, dtype=torch.float64, generator=generator)
    size = float(direction.abs().max())
    count = math.ceil(math.log(bound / (4 * size)) / math.log(rho)) + 3 if size > bound else 3
    outputs = [limit + rho**k * direction for k in range(1, count + 1)]  # ends below bound / 4
    errors = [float((x - limit).abs().max()) for x in outputs]
    rule = X0Forecast(atol=1e-300, bound=bound, trust=1e300)
    accepted = _first_acceptance(rule, _output_views(system, outputs))
    assert accepted is not None
    assert errors[accepted - 1] <= bound * (1 + 1e-9)
    if accepted >= 4:  # the forecast needs two changes: from iteration 3 on it is exact
        assert errors[accepted - 2] > bound * (1 - 1e-9)
    for atol in (1e-6, 1e-3, 1e-1):
        old = _first_acceptance(X0Change(atol=atol), _output_views(system, outputs))
        new = _first_acceptance(X0Forecast(atol=atol, bound=bound), _output_views(system, outputs))
        assert old is None or (new is not None and new <= old)  # None: never accepted


def test_x0_forecast_does_not_trust_a_small_ratio_of_large_changes():
    """A stall (changes 100, 1, then 0.9, 0.85, 0.8): the ratio 0.01 at iteration 3 forecasts an
    error of 0.01 while the output still has far to go; the rule ignores it because the change (1)
    is above ``trust``, and the slow contraction after it forecasts a large error."""
    system = make_system("ddim", steps=4, shape=(1,), batch=1)
    values = [0.0, 100.0, 101.0, 101.9, 102.75, 103.55]
    outputs = [torch.full((1, 1), v, dtype=torch.float64) for v in values]
    views = _output_views(system, outputs)
    assert _first_acceptance(X0Forecast(atol=1e-6, bound=0.02, trust=0.5), views) is None
    assert _first_acceptance(X0Forecast(atol=1e-6, bound=0.02, trust=2.0), views) == 3


@pytest.mark.parametrize("solver", ["newton", "taa", "fp"])
@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_x0_forecast_stops_no_later_than_the_x0_rule_and_reaches_the_sequential_sample(kind, solver):
    system = make_system(kind, steps=12)
    exact = _sequential(system)[-1]
    for atol in (1e-2, 1e-4):
        old = fpsolve.solve(system, solver, stopping=X0Change(atol=atol, tol=1e-6))
        new = fpsolve.solve(system, solver,
                            stopping=X0Forecast(atol=atol, bound=atol, trust=2 * atol, tol=1e-6))
        assert new.iterations <= old.iterations
    tight = fpsolve.solve(system, solver,
                          stopping=X0Forecast(atol=1e-11, bound=1e-11, trust=1e-10, tol=1e-11))
    assert float((tight.sample - exact).abs().max()) < 1e-9


@pytest.mark.parametrize("rule", [X0Change(atol=1e-2), X0Forecast(atol=1e-2, bound=8e-3, trust=2e-2)])
def test_the_stall_guard_refuses_a_settled_output_whose_residual_does_not_shrink(rule):
    """Changes 1, 0.1, 5e-3, 2e-3 of the output: without the guard the x0 rules accept it at
    iteration 4. With the last row's residual R^T_T stuck at 0.2 (the memorising denoiser's TAA
    stall: 0.23, then 0.22) the default guard (0.7) refuses every settled output; a residual that
    halves each iteration (a converging solve), or one below ``atol``, lets the same outputs be
    accepted at iteration 4."""
    system = make_system("ddim", steps=4, shape=(2,), batch=1)
    values = [0.0, 1.0, 1.1, 1.105, 1.107, 1.1071]
    outputs = [torch.full((1, 2), v, dtype=torch.float64) for v in values]
    assert rule.stall == 0.7
    unguarded = attrs.evolve(rule, stall=None)
    assert _first_acceptance(unguarded, _output_views(system, outputs, [0.2] * 6)) == 4
    assert _first_acceptance(rule, _output_views(system, outputs, [0.2] * 6)) is None
    halving = [0.8 / 2**k for k in range(6)]
    assert _first_acceptance(rule, _output_views(system, outputs, halving)) == 4
    assert _first_acceptance(rule, _output_views(system, outputs, [0.2, 0.2, 0.2, 5e-3, 5e-3, 5e-3])) == 4
    slow = [0.8 * 0.8**k for k in range(6)]  # shrinking, but by less than the guard's 0.7
    assert _first_acceptance(rule, _output_views(system, outputs, slow)) is None
    assert _first_acceptance(attrs.evolve(rule, stall=0.9), _output_views(system, outputs, slow)) == 4


@pytest.mark.parametrize("solver", ["newton", "taa", "fp"])
@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_the_stall_guard_never_delays_a_converging_solve(kind, solver):
    """On the core problems every solver's stop with the guard (the default) is the stop without
    it, and the tight rule still reaches the sequential sample (the guard only refuses while
    R^T_T > atol and not shrinking)."""
    system = make_system(kind, steps=12)
    exact = _sequential(system)[-1]
    for atol in (1e-2, 1e-4):
        for rule in (X0Change(atol=atol, tol=1e-6), X0Forecast(atol=atol, tol=1e-6)):
            plain = fpsolve.solve(system, solver, stopping=attrs.evolve(rule, stall=None))
            guarded = fpsolve.solve(system, solver, stopping=rule)
            assert guarded.iterations == plain.iterations
    tight = fpsolve.solve(system, solver,
                          stopping=X0Forecast(atol=1e-11, bound=1e-11, trust=1e-10, tol=1e-11))
    assert float((tight.sample - exact).abs().max()) < 1e-9


@pytest.mark.parametrize("stall", [0.0, -1.0, 1.5, float("inf"), float("nan")])
def test_the_stall_guard_refuses_a_bad_factor(stall):
    with pytest.raises(InvalidOptionError, match="stall"):
        X0Change(stall=stall)


@pytest.mark.parametrize("options", [dict(bound=0.0), dict(trust=-1.0), dict(bound=float("inf"))])
def test_x0_forecast_refuses_bad_bounds(options):
    with pytest.raises(InvalidOptionError, match="bound|trust"):
        X0Forecast(**options)


# -- TAA restarts -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddim", "ddpm", "dpm_solver"])
def test_taa_that_never_restarts_is_taa(kind):
    """A restart factor no residual growth reaches keeps every column: the iterates are ParaTAA's."""
    system = make_system(kind, steps=12)
    for history in (2, 3):
        plain = fpsolve.solve(system, TAA(history=history), tol=1e-8)
        never = fpsolve.solve(system, TAA(history=history, restart=1e300), tol=1e-8)
        assert never.iterations == plain.iterations
        torch.testing.assert_close(never.trajectory, plain.trajectory, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["ddim", "ddpm", "dpm_solver"])
@pytest.mark.parametrize("history", [3, 5])
def test_restarting_taa_reaches_the_sequential_sample_within_T(kind, history):
    system = make_system(kind, steps=12)
    solution = fpsolve.solve(system, TAA(history=history, restart=1.0), tol=1e-11)
    assert solution.iterations <= system.num_steps  # the driver's safeguard still holds
    torch.testing.assert_close(solution.sample, _sequential(system)[-1], rtol=0, atol=1e-9)
    anchors = solution.residuals.anchors
    assert all(b > a for a, b in zip(anchors, anchors[1:], strict=False))


def test_a_restart_drops_the_history_of_the_sample_whose_residual_grew():
    """Two samples; the second one's residual grows, so it takes the plain FP step (the right-hand
    side) while the first keeps its Anderson correction."""
    system = make_system("ddim", steps=6, batch=2)
    solver = TAA(history=3, restart=1.5)
    state = solver.init(system)
    generator = torch.Generator().manual_seed(0)
    width, trajectory = 6, torch.zeros(7, 2, 4, dtype=torch.float64)
    outputs = torch.zeros(6, 2, 4, dtype=torch.float64)
    proposals = []
    for iteration, scale in enumerate(([1.0, 1.0], [0.5, 0.5], [0.25, 4.0]), start=1):
        states = torch.randn(width, 2, 4, dtype=torch.float64, generator=generator)
        residual = torch.randn(width, 2, 4, dtype=torch.float64, generator=generator)
        residual = residual * torch.tensor(scale, dtype=torch.float64)[None, :, None]
        view = WindowView(iteration, 1, 6, states, states + residual, residual, residual,
                          torch.full((width,), iteration), trajectory, outputs)
        proposal, state = solver.step(view, state)
        proposals.append((proposal, view.rhs))
    proposal, rhs = proposals[-1]
    torch.testing.assert_close(proposal[:, 1], rhs[:, 1], rtol=0, atol=0)  # restarted: plain FP
    assert not torch.allclose(proposal[:, 0], rhs[:, 0])  # kept its history: Anderson step


@pytest.mark.parametrize("restart", [0.5, -1.0, float("inf"), "yes"])
def test_taa_refuses_a_bad_restart_factor(restart):
    with pytest.raises(InvalidOptionError, match="restart"):
        TAA(restart=restart)


# -- the default on the shipped digits model --------------------------------------------------------


def test_the_default_reproduces_a_digits_ddim25_sample_within_one_grey_level_in_few_rounds():
    """``fpsolve.solve(system)`` (newton, the ``x0_forecast`` rule) on the shipped digits UNet,
    DDIM-25, 2 samples of seed 11. Measured (benchmarks/iterations_study.py, 2-core x86_64): 6
    rounds, 1 grey level; 8 leaves room for another BLAS (float32 model)."""
    pytest.importorskip("diffusers")
    from fpsolve.bench.matrix import parse_sampler
    from fpsolve.models import load_reference

    ref = load_reference("digits")
    system = fpsolve.TriangularSystem(sampler=parse_sampler("ddim-25").build(ref), denoiser=ref.denoiser,
                                      shape=ref.shape, batch=2, generator=torch.Generator().manual_seed(11))
    sequential = fpsolve.solve(system, "sequential").sample
    solution = fpsolve.solve(system)
    grey = ref.to_images(solution.sample).astype(int) - ref.to_images(sequential).astype(int)
    assert solution.converged and solution.iterations <= 8
    assert abs(grey).max() <= 1


def test_one_rule_instance_judges_interleaved_solves_as_it_judges_each_alone():
    """The x0 rules keep their record in the solve's StoppingView.memory, not in the rule: one
    instance shared by two solves whose iterations interleave (an observer of one solve runs the
    other, one iteration before the first would stop) stops each exactly where a rule of its own
    does. (A rule that kept the record itself lost the first solve's history there and stopped
    it later.)"""
    # Rows at 1e-13, so that the output rule, not the rows, ends each solve (checked below).
    rule = X0Forecast(tol=1e-13, atol=1e-4, bound=1e-4, trust=1e-3)
    first, second = make_system("ddim", steps=20, batch=2), make_system("ddpm", steps=20, batch=2)
    alone = [fpsolve.solve(system, "newton", stopping=attrs.evolve(rule)) for system in (first, second)]
    for system, own in zip((first, second), alone, strict=True):
        rows_only = fpsolve.solve(system, "newton", stopping=RMS(tol1=1e-13, tol2=1e-13))
        assert own.iterations < rows_only.iterations  # the output rule stopped it
    inner: list[fpsolve.Solution] = []

    def interleave(info):
        if info.iteration == alone[0].iterations - 1 and not inner:  # just before the output rule stops
            inner.append(fpsolve.solve(second, "newton", stopping=rule))

    outer = fpsolve.solve(first, "newton", stopping=rule, observers=[interleave])
    assert inner, "the observer did not run the second solve"
    for shared, own in ((outer, alone[0]), (inner[0], alone[1])):
        assert shared.iterations == own.iterations
        assert torch.equal(shared.sample, own.sample)
