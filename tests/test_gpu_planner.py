"""The window planner (pure): synthetic latency curves, the shared H200 tables, the iteration model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import fpsolve
from fpsolve.errors import InvalidOptionError
from fpsolve.gpu import (
    IterationModel,
    Plan,
    candidate_windows,
    fit_plateau,
    latency_curve,
    plan_window,
    prior_plateau,
)
from fpsolve.gpu.planner import predicted_parallel_seconds

DATA = Path(__file__).parent / "data" / "h200_latency.json"


@pytest.fixture(scope="module")
def h200():
    """``{model: {"eager"|"cudagraph": {batch: seconds}}}`` from the committed copy of the shared table."""
    models = json.loads(DATA.read_text())["models"]
    return {
        name: {mode: {int(b): ms / 1e3 for b, ms in rows.items()} for mode, rows in modes.items()}
        for name, modes in models.items()
    }


def test_committed_table_matches_the_shared_source_when_present(h200):
    shared = [Path("/work/shared/data"), Path(__file__).parents[2] / "shared" / "data"]
    source = next((p for p in shared if (p / "gpu-batch-scaling-h200-cudagraph.json").is_file()), None)
    if source is None:
        pytest.skip("shared/data is not beside this checkout")
    for row in json.loads((source / "gpu-batch-scaling-h200-cudagraph.json").read_text()):
        assert h200[row["model"]]["cudagraph"][row["batch"]] == pytest.approx(row["ms"] / 1e3)


def brute_force_best(curve, steps, samples, model, windows):
    return min(windows, key=lambda w: (predicted_parallel_seconds(curve, steps, samples, w, model(w)), w))


# -- latency curves -----------------------------------------------------------------------------


def test_interpolation_clamps_below_interpolates_between_and_scales_above():
    curve = latency_curve({2: 1.0, 4: 2.0, 8: 2.0})
    assert curve(1) == 1.0 and curve(2) == 1.0
    assert curve(3) == pytest.approx(1.5)
    assert curve(6) == pytest.approx(2.0)
    assert curve(16) == pytest.approx(4.0)  # beyond the table: proportional, never optimistic


def test_latency_curve_accepts_callables_and_rejects_bad_points():
    assert latency_curve(lambda b: 0.5 * b)(4) == 2.0
    for bad in ({}, {0: 1.0}, {2: -1.0}, {2: math.inf}):
        with pytest.raises(InvalidOptionError):
            latency_curve(bad)
    with pytest.raises(InvalidOptionError):
        latency_curve("fast")


def test_candidate_windows_cover_two_to_t():
    windows = candidate_windows(100)
    assert windows[0] == 2 and windows[-1] == 100 and windows == sorted(set(windows))
    assert all(b / a <= 1.6 for a, b in zip(windows, windows[1:], strict=False))
    assert candidate_windows(1) == [1] and candidate_windows(2) == [2]


# -- decisions on synthetic curves ----------------------------------------------------------------


def test_flat_latency_takes_the_full_window():
    plan = plan_window(lambda b: 1e-3, 100, 1, IterationModel(100, 11.0))
    assert isinstance(plan, Plan) and not plan.use_sequential
    assert plan.window == 100 and plan.batch_split == 1
    assert plan.sequential_seconds == pytest.approx(0.1)
    assert plan.predicted_seconds == pytest.approx(11e-3)
    assert plan.speedup == pytest.approx(100 / 11)
    assert "window 100" in plan.reason


def test_linear_latency_never_beats_sequential():
    # t(B) = c B: an iteration over w positions costs w steps, and I(w) * w >= T.
    plan = plan_window(lambda b: 1e-3 * b, 50, 1, IterationModel.prior(50))
    assert plan.use_sequential
    assert plan.predicted_seconds >= plan.sequential_seconds
    assert "no window is predicted to beat sequential" in plan.reason


def test_knee_curve_picks_a_window_near_the_knee():
    # Free up to 16 rows, linear after: the best window is about 16.
    plan = plan_window(lambda b: 1e-3 * max(1.0, b / 16), 100, 1, IterationModel(100, 11.0))
    assert not plan.use_sequential and 10 <= plan.window <= 34


def test_more_samples_push_towards_smaller_windows():
    curve = {1: 1e-3, 8: 1.2e-3, 64: 4e-3, 512: 32e-3}
    one = plan_window(curve, 100, 1, IterationModel(100, 11.0))
    many = plan_window(curve, 100, 16, IterationModel(100, 11.0))
    assert many.window < one.window


def test_overhead_per_iteration_can_make_sequential_win():
    model = IterationModel(50, 10.0)
    cheap = plan_window(lambda b: 1e-3 * (1 + b / 50), 50, 1, model)
    assert not cheap.use_sequential
    costly = plan_window(lambda b: 1e-3 * (1 + b / 50), 50, 1, model, iteration_overhead=5e-3)
    assert costly.use_sequential


def test_max_batch_chunks_large_calls():
    flat = {1: 1e-3, 1000: 1e-3}
    free = plan_window(flat, 100, 1, IterationModel(100, 11.0))
    limited = plan_window(flat, 100, 1, IterationModel(100, 11.0), max_batch=10)
    assert free.window == 100
    assert limited.predicted_seconds > free.predicted_seconds
    assert predicted_parallel_seconds(flat, 100, 1, 100, 1, max_batch=10) == pytest.approx(10e-3)


def test_batch_split_is_chosen_when_it_wins():
    # Superlinear latency (memory thrash above 64 rows): two groups of 8 samples beat one of 16.
    curve = lambda b: 1e-3 * (1 + b / 64) if b <= 64 else 1e-3 * (b / 16)  # noqa: E731
    plan = plan_window(curve, 8, 16, lambda w: 4.0, windows=[8])
    assert plan.batch_split > 1
    only_one = plan_window(curve, 8, 16, lambda w: 4.0, windows=[8], splits=[1])
    assert only_one.batch_split == 1 and only_one.predicted_seconds > plan.predicted_seconds


def test_min_speedup_demands_a_margin():
    model = IterationModel(100, 11.0)
    curve = lambda b: 1e-3 * (1 + b / 10)  # noqa: E731
    plain = plan_window(curve, 100, 1, model)
    assert not plain.use_sequential
    strict = plan_window(curve, 100, 1, model, min_speedup=plain.speedup * 1.01)
    assert strict.use_sequential


def test_planner_rejects_bad_arguments():
    model = IterationModel(10, 3.0)
    with pytest.raises(InvalidOptionError):
        plan_window({1: 1.0}, 0, 1, model)
    with pytest.raises(InvalidOptionError):
        plan_window({1: 1.0}, 10, 0, model)
    with pytest.raises(InvalidOptionError):
        plan_window({1: 1.0}, 10, 1, 5)
    with pytest.raises(InvalidOptionError):
        plan_window({1: 1.0}, 10, 1, lambda w: math.nan)


# -- decisions on the measured H200 tables ----------------------------------------------------------


def test_small_unet_with_graphs_takes_a_large_window(h200):
    plan = plan_window(h200["unet-16px-1M"]["cudagraph"], 100, 1, IterationModel.prior(100))
    assert not plan.use_sequential and plan.window >= 50 and plan.speedup > 3


@pytest.mark.parametrize(
    "model,steps",
    [
        ("sd15-unet", 50),
        ("dit-xl2-256", 100),
        ("unet-cifar32-36M", 100),
        ("dit-s2-256", 100),
        ("unet-16px-1M", 100),
    ],
)
@pytest.mark.parametrize("mode", ["eager", "cudagraph"])
def test_h200_plans_are_optimal_over_their_candidates(h200, model, steps, mode):
    table = h200[model][mode]
    guided = lambda b: latency_curve(table)(2 * b)  # noqa: E731  classifier-free guidance doubles the batch
    iterations = IterationModel.prior(steps)
    plan = plan_window(guided, steps, 1, iterations)
    windows = candidate_windows(steps)
    assert plan.window == brute_force_best(guided, steps, 1, iterations, windows)
    assert plan.use_sequential == (plan.predicted_seconds >= plan.sequential_seconds)
    assert plan.sequential_seconds == pytest.approx(steps * guided(1))


def test_graphs_shrink_the_best_window_of_large_models(h200):
    # CUDA graphs make batch-1 calls cheap, so big windows (which saturate the card) pay off less.
    for model, steps in (("sd15-unet", 50), ("dit-xl2-256", 100)):
        eager = plan_window(h200[model]["eager"], steps, 1, IterationModel.prior(steps))
        graph = plan_window(h200[model]["cudagraph"], steps, 1, IterationModel.prior(steps))
        assert graph.window <= eager.window
        assert graph.speedup < eager.speedup


# -- the iteration model ------------------------------------------------------------------------


def test_iteration_model_shape():
    model = IterationModel(100, 11.0)
    assert model(100) == 11.0 and model(1000) == 11.0
    assert model(10) == pytest.approx(20.0)
    assert model(1) == 100.0  # capped at T
    assert all(model(w) >= model(w + 1) for w in range(1, 100))


def test_prior_plateaus():
    assert prior_plateau(100) == pytest.approx(12.0)
    assert prior_plateau(25) == 10.0
    assert prior_plateau(100, stochastic=True) == pytest.approx(24.0)
    assert prior_plateau(100, solver="fp", order=1) == pytest.approx(60.0)
    assert prior_plateau(100, solver="fp") > prior_plateau(100)
    assert prior_plateau(5) == 5.0  # never more than T


@pytest.mark.parametrize("steps", [25, 100])
def test_the_newton_prior_follows_measured_iterations_on_the_toy(steps):
    # newton (the default solver) needs far fewer rounds than TAA; its prior must say so, within
    # the model's tolerance: measured 4 (window T) and 10-11 (window T/4) on the Gaussian-mixture
    # toy, where TAA at tol 1e-3 took 11 at window T.
    ref = fpsolve.models.load_reference("gmm")
    system = fpsolve.TriangularSystem(sampler=ref.sampler(steps), denoiser=ref.denoiser, shape=ref.shape,
                                      generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = IterationModel.prior(steps, solver="newton")
    assert model.plateau < IterationModel.prior(steps, solver="taa").plateau
    for window in (steps, steps // 4):
        measured = fpsolve.solve(system, window=window).iterations
        assert 0.5 * measured <= model(window) <= 2 * measured, (window, measured, model(window))


def test_fit_plateau_recovers_the_model():
    truth = IterationModel(100, 9.0)
    observations = [(w, round(truth(w))) for w in (8, 16, 100)]
    assert fit_plateau(100, observations) == pytest.approx(9.0, abs=0.5)
    assert IterationModel.observed(100, observations).source == "observed"
    with pytest.raises(InvalidOptionError):
        fit_plateau(100, [])
