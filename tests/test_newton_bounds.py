"""Issue 14, rounds 4-6: the exact-Newton diagnostic and the Jacobian-model experiments are right.

``benchmarks/exact_newton.py`` claims a lower bound on the rounds of any quasi-Newton solver:
exact Newton steps on the first-order equations with the model's true Jacobian-vector products.
On a Gaussian data distribution the exact eps is linear in x, so one exact Newton step from any
start lands on the sequential trajectory; a scalar slope (newton's prior) cannot, because the
data are anisotropic. ``BroydenNewton`` (benchmarks/iterations_study.py) solves the window's
linear recurrence with a rank-1 Jacobian per state in closed form; it must equal the row by
row recurrence, and so must the shared-basis scans of the subspace models (round 5).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import attrs
import pytest
import torch

import fpsolve
from fpsolve.registry import get_registry
from fpsolve.solvers.base import WindowView
from fpsolve.testing.checks import _window_view
from fpsolve.testing.problems import linear_alphas_cumprod

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ABAR = linear_alphas_cumprod()
TIMESTEPS = list(range(990, 89, -100))
# Per-coordinate variances of the Gaussian data: from far below to far above the noise levels,
# so the exact Jacobian's eigenvalues sigma / (sigma^2 + abar lambda) differ widely from 1/sigma.
VARIANCES = torch.tensor([0.0, 0.01, 0.1, 0.5, 1.0, 4.0], dtype=torch.float64)


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class GaussianEps:
    """The exact eps of zero-mean Gaussian data with diagonal covariance ``VARIANCES``:
    ``eps = sigma x / (abar lambda + sigma^2)`` per coordinate (linear in x)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = ABAR.to(x.dtype)[t].view(-1, 1)
        sigma2 = 1 - abar
        return sigma2.sqrt() * x / (abar * VARIANCES.to(x.dtype) + sigma2)


def _system(sampler: str) -> fpsolve.TriangularSystem:
    options = {"ddim": {}, "ddpm": {}, "dpm_solver": {"order": 2}}[sampler]
    cls = get_registry().lookup("sampler", sampler).cls
    return fpsolve.TriangularSystem(sampler=cls(alphas_cumprod=ABAR, timesteps=TIMESTEPS, **options),
                                    denoiser=GaussianEps(), shape=(6,), batch=2,
                                    generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm_solver"])
def test_one_exact_newton_step_solves_a_linear_model(sampler: str) -> None:
    """Newton with the true Jacobian is exact on linear eps: one step from the noise copy gives
    the sequential trajectory (central differences of a linear map are exact up to rounding;
    measured error 1e-13, bound 1e-9). The scalar prior 1/sigma is not exact here."""
    exact_newton = _load("exact_newton")
    system = _system(sampler)
    sequential = fpsolve.solve(system, "sequential").trajectory.reshape(system.flat_noise.shape)
    start = system.flat_noise[:1].expand_as(system.flat_noise).clone()
    exact = exact_newton.newton_step(system, start, "exact", {})
    assert (exact - sequential).abs().max() < 1e-9
    prior = exact_newton.newton_step(system, start, "prior", {})
    assert (prior - sequential).abs().max() > 1e-3


def _window(system: fpsolve.TriangularSystem, lo: int,
            generator: torch.Generator) -> tuple[torch.Tensor, WindowView]:
    """Random first-order residuals on the window ``lo..T`` and the solver's view of them."""
    steps, samples, size = system.num_steps, system.num_samples, system.state_size
    residual = torch.randn(steps - lo + 1, samples, size, generator=generator, dtype=torch.float64)
    view = WindowView(iteration=2, lo=lo, hi=steps, states=residual, rhs=residual, residual=residual,
                      first_order=residual, age=torch.ones(steps - lo + 1, dtype=torch.long),
                      trajectory=torch.zeros(steps + 1, samples, size, dtype=torch.float64))
    return residual, view


def _row_by_row(system: fpsolve.TriangularSystem, residual: torch.Tensor, lo: int,
                jacobian: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The linearised recurrence solved one row at a time from the anchor ``lo - 1``:
    ``delta_r = residual_r + sum_l A[lo+r, l] delta_(r-l) + B[lo+r, l] J_(lo+r-l) delta_(r-l)``."""
    state_coef, output_coef, _ = system.coefficients()
    delta = torch.zeros_like(residual)
    for r in range(residual.shape[0]):
        acc = residual[r].clone()
        for lag in range(1, state_coef.shape[1] + 1):
            c = r - lag
            if c < 0:
                break
            acc += (state_coef[lo + r, lag - 1] * delta[c]
                    + output_coef[lo + r, lag - 1] * jacobian(lo + c, delta[c]))
        delta[r] = acc
    return delta


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver"])
def test_broyden_correction_solves_the_rank_one_recurrence(sampler: str) -> None:
    """``delta = P r + G diag(s) w`` equals the row-by-row recurrence
    ``delta_i = r_i + sum_l A[i,l] delta_(i-l) + B[i,l] (gamma delta + w (v . delta))_(i-l)``
    (float64; rounding only, bound 1e-10), on a window that does not start at x_T."""
    study = _load("iterations_study")
    system = _system(sampler)
    steps, samples, size = system.num_steps, system.num_samples, system.state_size
    generator = torch.Generator().manual_seed(0)
    gamma = torch.rand(steps + 1, samples, generator=generator, dtype=torch.float64) * 3
    v = torch.randn(steps + 1, samples, size, generator=generator, dtype=torch.float64)
    w = torch.randn(steps + 1, samples, size, generator=generator, dtype=torch.float64) * 0.3
    lo = 3
    residual, view = _window(system, lo, generator)
    state_coef, output_coef, _ = system.coefficients()
    solver = study.BroydenNewton()
    closed = solver._broyden(view, gamma, v, w, state_coef, output_coef)

    def jacobian(j: int, vector: torch.Tensor) -> torch.Tensor:  # gamma I + w v^T at state j
        return gamma[j, :, None] * vector + w[j] * (v[j] * vector).sum(-1, keepdim=True)

    delta = _row_by_row(system, residual, lo, jacobian)
    assert (closed - delta).abs().max() < 1e-10
    # the rank-1 part matters: without it the correction is newton's scalar one
    scalar = solver._correction(view, gamma, state_coef, output_coef)
    assert (scalar - delta).abs().max() > 1e-3


def test_rank_two_broyden_reproduces_its_secant_pairs_in_the_recurrence() -> None:
    """``MultiBroydenNewton`` (rank 2): ``J_j = gamma_j I + W_j V_j^T`` with ``V = dX (dX^T dX)^-1``
    and ``W = dE - gamma dX`` maps each kept step to its output change (``J dX = dE``), and its
    closed form equals the row-by-row recurrence with that J. Float64; the solver adds a ridge of
    1e-10 times the Gram trace, which moves the result by 9e-9 here (measured): bound 1e-7."""
    study = _load("iterations_study")
    system = _system("dpm_solver")
    steps, samples, size = system.num_steps, system.num_samples, system.state_size
    generator = torch.Generator().manual_seed(1)
    gamma = torch.rand(steps + 1, samples, generator=generator, dtype=torch.float64) * 3
    xs = torch.randn(steps + 1, samples, size, 2, generator=generator, dtype=torch.float64)
    es = torch.randn(steps + 1, samples, size, 2, generator=generator, dtype=torch.float64) * 0.3
    lo = 2
    residual, view = _window(system, lo, generator)
    state_coef, output_coef, _ = system.coefficients()
    closed = study.MultiBroydenNewton(rank=2, bound=1e12)._multi(view, gamma, xs, es, state_coef,
                                                                  output_coef)

    def jacobian(j: int, vector: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N, D]
        dx, de = xs[j], es[j]  # [N, D, 2]
        v = dx @ torch.linalg.inv(dx.transpose(-1, -2) @ dx)
        w = de - gamma[j, :, None, None] * dx
        return gamma[j, :, None] * vector + (w @ (v.transpose(-1, -2) @ vector[..., None]))[..., 0]

    assert (jacobian(5, xs[5, ..., 0]) - es[5, ..., 0]).abs().max() < 1e-10
    delta = _row_by_row(system, residual, lo, jacobian)
    assert (closed - delta).abs().max() < 1e-7
    rank_one = study.MultiBroydenNewton(rank=1, bound=1e12)._multi(view, gamma, xs[..., :1], es[..., :1],
                                                                   state_coef, output_coef)
    assert (rank_one - delta).abs().max() > 1e-3  # the second pair matters


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver"])
def test_subspace_correction_solves_the_shared_basis_recurrence(sampler: str) -> None:
    """Round 5's tangent models (``TangentNewton``, ``ProbedTangentNewton``) and round 4's
    ``SubspaceNewton`` use ``J_j = sum_a s_ja u_a u_a^T + gamma_j (I - U U^T)`` with one
    orthonormal ``U`` per sample; their correction, one scalar scan per direction and one on the
    complement, equals the row-by-row recurrence with that J (float64; rounding only, bound 1e-10),
    and differs from newton's scalar scan with ``gamma`` alone (the subspace's slopes matter)."""
    study = _load("iterations_study")
    system = _system(sampler)
    steps, samples, size = system.num_steps, system.num_samples, system.state_size
    generator = torch.Generator().manual_seed(2)
    gamma = torch.rand(steps + 1, samples, generator=generator, dtype=torch.float64) * 3
    basis, _ = torch.linalg.qr(torch.randn(samples, size, 3, generator=generator, dtype=torch.float64))
    slopes = torch.rand(steps + 1, samples, 3, generator=generator, dtype=torch.float64) * 3 - 1
    lo = 2
    residual, view = _window(system, lo, generator)
    state_coef, output_coef, _ = system.coefficients()
    solver = study.TangentNewton()
    split = study.subspace_correction(solver, view, basis, slopes, gamma, state_coef, output_coef)

    def jacobian(j: int, vector: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N, D]
        coords = torch.einsum("ndr,nd->nr", basis, vector)
        inside = torch.einsum("ndr,nr->nd", basis, coords)
        return (gamma[j, :, None] * (vector - inside)
                + torch.einsum("ndr,nr->nd", basis, slopes[j] * coords))

    delta = _row_by_row(system, residual, lo, jacobian)
    assert (split - delta).abs().max() < 1e-10
    scalar = solver._correction(view, gamma, state_coef, output_coef)
    assert (scalar - delta).abs().max() > 1e-3


@pytest.mark.parametrize("rank", [2, 5, 9])
def test_nystrom_eigen_is_exact_within_its_probes_and_never_above_p(rank: int) -> None:
    """``nystrom_eigen`` (the core of ``exact_newton.tangent_projection`` and the study's
    ``ProbedTangentNewton``) approximates a symmetric PSD ``P`` from ``y = P omega``: with ``p = 5``
    random probes it reproduces ``P`` when ``rank(P) <= p`` (float64; rounding of the
    pseudo-inverse only: measured max error 7e-16, bound 1e-8), and otherwise gives ``P_nys <= P``
    in the Loewner order (``P - P_nys`` PSD, the defining property of the Nystrom approximation;
    smallest eigenvalue measured -2e-15, bound -1e-10) with a real gap (measured 0.35, bound 1e-2),
    so neither the exact case nor the bound holds by accident."""
    exact_newton = _load("exact_newton")
    generator = torch.Generator().manual_seed(rank)
    samples, size, probes = 2, 12, 5
    basis, _ = torch.linalg.qr(torch.randn(samples, size, rank, generator=generator, dtype=torch.float64))
    spectrum = 0.1 + 0.9 * torch.rand(samples, rank, generator=generator, dtype=torch.float64)
    target = basis @ torch.diag_embed(spectrum) @ basis.transpose(1, 2)  # eigenvalues in [0.1, 1]
    omega = torch.randn(samples, size, probes, generator=generator, dtype=torch.float64)
    vectors, values = exact_newton.nystrom_eigen(omega, target @ omega)
    approx = vectors @ torch.diag_embed(values) @ vectors.transpose(1, 2)
    gap = (target - approx).abs().max()
    if rank <= probes:
        assert gap < 1e-8
    else:
        assert torch.linalg.eigvalsh(target - approx).min() > -1e-10
        assert gap > 1e-2


def _first_view(system: fpsolve.TriangularSystem) -> WindowView:
    """The first iteration's view of the whole window from the noise copy (every row, x_T to x_0),
    built as the conformance kit builds its views."""
    steps = system.num_steps
    trajectory = system.flat_noise[:1].expand_as(system.flat_noise).clone()
    return _window_view(system, trajectory, 1, steps, steps, 1, torch.ones(steps, dtype=torch.long))


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver"])
def test_speculative_candidates_differ_from_newton_only_at_the_low_noise_rows(sampler: str) -> None:
    """Round 6's ``SpeculativeNewton`` counts its extra evaluations as the low-noise rows only
    (``sigma < sigma_max``), because another slope there changes newton's correction only on
    those rows: every candidate equals newton's proposal above the first low-noise row (exactly:
    the same scan), every alternative differs from it below (so the check is not vacuous), and
    each sample's chosen rows are one of the candidates. Without alternatives it is newton,
    iterate for iterate (float64, exact equality)."""
    study = _load("iterations_study")
    system = _system(sampler)
    sigma_max = float(system.sigmas[-3]) + 1e-9  # the last three states: rows T-1 and T move
    late = system.sigmas < sigma_max
    first_late = int(late.nonzero()[0])
    view = _first_view(system)
    newton = fpsolve.solvers.QuasiNewton()
    # slopes off the prior (as after a few secants), so that no alternative is newton's own slope
    generator = torch.Generator().manual_seed(4)
    state = newton.init(system)
    state = attrs.evolve(state, gamma=state.gamma * (0.5 + torch.rand(state.gamma.shape, generator=generator,
                                                                       dtype=torch.float64)))
    expected, _ = newton.step(view, state)
    solver = study.SpeculativeNewton(sigma_max=sigma_max)
    proposal, _ = solver.step(view, (state, system))
    alternatives = solver.late_candidates(view, state, late)
    assert len(alternatives) == 2
    above, below = slice(0, first_late - view.lo), slice(first_late - view.lo, None)
    for candidate in (proposal, *alternatives):
        assert torch.equal(candidate[above], expected[above])
    for alternative in alternatives:
        assert float((alternative[below] - expected[below]).abs().max()) > 1e-3
    for n in range(system.num_samples):
        assert any(torch.equal(proposal[below, n], c[below, n]) for c in (expected, *alternatives))
    plain = fpsolve.solve(system, study.SpeculativeNewton(sigma_max=sigma_max, alternatives=()))
    reference = fpsolve.solve(system, newton)
    assert plain.iterations == reference.iterations
    assert torch.equal(plain.trajectory, reference.trajectory)


CENTER = torch.linspace(-0.8, 0.7, 6, dtype=torch.float64)


class PointMassModel:
    """The exact model of data concentrated at ``CENTER``: every state predicts ``x_0 = CENTER``.
    ``eps = (x - sqrt(abar) c) / sqrt(1 - abar)`` at a VP timestep, or the velocity
    ``(x - c) / sigma`` at flow model time ``t = 1000 sigma``."""

    def __init__(self, flow: bool):
        self.flow = flow

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.flow:
            return (x - CENTER.to(x.dtype)) / (t.to(x.dtype).view(-1, 1) / 1000)
        abar = ABAR.to(x.dtype)[t].view(-1, 1)
        return (x - abar.sqrt() * CENTER.to(x.dtype)) / (1 - abar).sqrt()


def _round7_system(sampler: str, denoiser: object, seed: int) -> fpsolve.TriangularSystem:
    if sampler == "flow_euler":
        from fpsolve.testing.problems import problem_sampler

        built = problem_sampler("flow_euler", 10)
    else:
        options = {"ddim": {}, "ddpm": {}, "dpm_solver": {"order": 2}}[sampler]
        cls = get_registry().lookup("sampler", sampler).cls
        built = cls(alphas_cumprod=ABAR, timesteps=TIMESTEPS, **options)
    return fpsolve.TriangularSystem(sampler=built, denoiser=denoiser, shape=(6,), batch=2,
                                    generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm_solver", "flow_euler"])
def test_neighbour_starts_are_exact_where_the_neighbour_is_the_answer(sampler: str) -> None:
    """Round 7's ``NeighbourStart`` (study script). Two exact cases, float64: (1) holding x_0 at
    the point mass's centre is the sequential trajectory of the point mass (``frozen_x0_guess``,
    the sampler's own steps on VP samplers, the straight line for flow Euler; rounding only,
    bound 1e-12), and the mean of its neighbours' samples is that centre, so ``mode="mean"``
    gives it too; (2) a neighbour with the system's own noise makes ``mode="trajectory"`` the
    sequential trajectory bit for bit (the shift is zero), while another neighbour moves every
    row but ``x_T``, which stays the system's own (so neither case holds by accident)."""
    study = _load("iterations_study")
    flow = sampler == "flow_euler"
    point = _round7_system(sampler, PointMassModel(flow), seed=3)
    exact = fpsolve.solve(point, "sequential").trajectory.reshape(point.flat_noise.shape)
    held = study.frozen_x0_guess(point, CENTER.expand(2, -1))
    assert (held - exact).abs().max() < 1e-12
    mean = study.NeighbourStart(mode="mean", pool=3).initialize(point).trajectory
    assert (mean - exact).abs().max() < 1e-12

    # a model whose x_0 depends on the noise (Gaussian data; for flow the kit's smooth velocity)
    if flow:
        from fpsolve.testing.problems import problem_denoiser

        model = problem_denoiser(point.sampler, 6, seed=2)
    else:
        model = GaussianEps()
    smooth = _round7_system(sampler, model, seed=7)
    sequential = fpsolve.solve(smooth, "sequential").trajectory.reshape(smooth.flat_noise.shape)
    own = study.NeighbourStart(mode="trajectory", seed=7).initialize(smooth)
    assert own.valid_upto == smooth.num_steps and own.anchor == 0
    assert torch.equal(own.trajectory, sequential)
    other = study.NeighbourStart(mode="trajectory", seed=8).initialize(smooth).trajectory
    assert torch.equal(other[0], smooth.flat_noise[0])
    # every later row moves: least at the first (DDIM: 3e-4, the shift is nearly exact at high noise)
    assert float((other[1:] - sequential[1:]).abs().amax(dim=(1, 2)).min()) > 1e-5


@pytest.mark.parametrize(("first", "growth"), [(0.25, "double"), (0.2, "linear")])
def test_scheduled_window_is_the_window_the_driver_uses(first: float, growth: str) -> None:
    """Round 7's ``ScheduledWindow`` (study script) reaches the driver through a hook (the
    driver reads a controller's window once per solve): the windows recorded by the driver must
    be ``lo = anchor + 1``, ``hi = min(anchor + width_k, T)`` with ``width_k`` the schedule's
    (``first T``, doubled or added each iteration), and the solve still reaches the sequential
    sample (float64: the error of tol 1e-12 rows, measured 2e-14, bound 1e-9)."""
    study = _load("iterations_study")
    system = _system("ddim")
    steps = system.num_steps
    solution = fpsolve.solve(system, window=study.ScheduledWindow(first=first, growth=growth),
                             tol=1e-12)
    start = round(first * steps)
    anchors = (0, *solution.residuals.anchors)
    for k, (lo, hi) in enumerate(solution.residuals.windows, start=1):
        width = start * 2 ** (k - 1) if growth == "double" else start * k
        assert (lo, hi) == (anchors[k - 1] + 1, min(anchors[k - 1] + width, steps))
    assert solution.residuals.windows[0][1] < steps  # the schedule is not the full window
    exact = fpsolve.solve(system, "sequential").sample
    assert (solution.sample - exact).abs().max() < 1e-9
