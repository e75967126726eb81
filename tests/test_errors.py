"""Bad input gets a clear error (naming the argument, the expectation, the fix), never a silently
wrong answer."""

from __future__ import annotations

import pytest
import torch

import fpsolve
from fpsolve.errors import DenoiserOutputError, FpsolveError, InvalidOptionError, ShapeError

from .conftest import ALPHAS_CUMPROD, make_sampler, make_system


def system_with(denoiser, steps=12, dim=4, **options):
    return fpsolve.TriangularSystem(sampler=make_sampler("ddim", steps), denoiser=denoiser, shape=(dim,),
                                    generator=torch.Generator().manual_seed(0), **options)


@pytest.mark.parametrize("solver", ["sequential", "taa"])
def test_denoiser_returning_the_wrong_shape(solver):
    system = system_with(lambda x, t: x[:, :2])
    expected = r"returned shape \[\d+, 2\] for an input of shape \[\d+, 4\]"
    with pytest.raises(DenoiserOutputError, match=expected):
        fpsolve.solve(system, solver)


def test_denoiser_returning_the_wrong_dtype():
    system = system_with(lambda x, t: x.float())
    expected = "returned dtype torch.float32 for an input of dtype torch.float64"
    with pytest.raises(DenoiserOutputError, match=expected):
        fpsolve.solve(system, "taa")


def test_denoiser_returning_no_tensor():
    with pytest.raises(DenoiserOutputError, match="must return a torch.Tensor"):
        fpsolve.solve(system_with(lambda x, t: x.numpy()), "fp")


def test_exceptions_of_the_model_keep_their_type():
    class ModelBroke(RuntimeError):
        pass

    def denoiser(x, t):
        raise ModelBroke("CUDA out of memory (simulated)")

    with pytest.raises(ModelBroke):
        fpsolve.solve(system_with(denoiser), "taa")


@pytest.mark.parametrize("solver", ["taa", "fp", "sequential"])
def test_nan_from_the_denoiser_stops_and_names_iteration_and_position(solver):
    calls = []
    poisoned_timestep = make_sampler("ddim", 12).timesteps[5]

    def denoiser(x, t):
        calls.append(1)
        out = 0.1 * x
        hits = (t == poisoned_timestep).nonzero()
        if len(calls) >= 3 and hits.numel() and "poisoned" not in calls:
            out[hits[0, 0], 1] = float("nan")  # one element, at state index 5
            calls.append("poisoned")
        return out

    options = {} if solver == "sequential" else dict(tol=1e-12)  # the sequential loop takes no tol
    with pytest.warns(fpsolve.errors.NotConvergedWarning, match="NONFINITE"):
        solution = fpsolve.solve(system_with(denoiser), solver, **options)
    iteration = calls.index("poisoned")
    assert solution.status is fpsolve.Status.NONFINITE and not solution.converged
    assert f"iteration {iteration}" in solution.message or f"step {iteration}" in solution.message
    assert "position 5" in solution.message and f"timestep {poisoned_timestep}" in solution.message
    assert torch.isfinite(solution.trajectory).all()
    assert solution.iterations == iteration


def test_nan_keeps_the_last_finite_iterate():
    healthy = system_with(lambda x, t: 0.1 * x + 0.05)
    calls = []

    def denoiser(x, t):
        calls.append(1)
        out = 0.1 * x + 0.05
        return out * float("nan") if len(calls) == 2 else out

    broken = fpsolve.TriangularSystem(sampler=healthy.sampler, denoiser=denoiser, shape=(4,),
                                      noise=healthy.flat_noise.reshape(13, 4))
    with pytest.warns(fpsolve.errors.NotConvergedWarning):
        stopped = fpsolve.solve(broken, "fp", tol=1e-12)
    with pytest.warns(fpsolve.errors.NotConvergedWarning):
        one_iteration = fpsolve.solve(healthy, "fp", stopping=fpsolve.stopping.RMS(tol1=1e-12), max_iters=1)
    assert stopped.status is fpsolve.Status.NONFINITE and "iteration 2" in stopped.message
    assert one_iteration.status is fpsolve.Status.MAX_ITERS
    assert torch.equal(stopped.trajectory, one_iteration.trajectory)


@pytest.mark.parametrize(
    ("steps", "match"),
    [([999, 500, 500, 0], "strictly decreasing"), ([10, 20, 0], "strictly decreasing"),
     ([1000, 10], r"must lie in \[0, 999\]"), ([5, -1], r"must lie in \[0, 999\]"), ([], "at least one")],
)
def test_bad_timesteps(steps, match):
    with pytest.raises(InvalidOptionError, match=match):
        fpsolve.samplers.DDIM(alphas_cumprod=ALPHAS_CUMPROD, timesteps=steps)


@pytest.mark.parametrize("tol", [0, -1e-3, float("nan")])
def test_bad_tolerance(ddim_system, tol):
    with pytest.raises(InvalidOptionError, match="tol must be a finite number > 0"):
        fpsolve.solve(ddim_system, "taa", tol=tol)


@pytest.mark.parametrize("window", [0, -3, 2.5])
def test_bad_window(ddim_system, window):
    with pytest.raises(InvalidOptionError, match="window must be an int >= 1"):
        fpsolve.solve(ddim_system, "taa", window=window)


@pytest.mark.parametrize("order", [0, 21, -1])
def test_order_outside_one_to_T(ddim_system, order):
    with pytest.raises(InvalidOptionError, match="order"):
        fpsolve.solve(ddim_system, "taa", order=order)
    with pytest.raises(InvalidOptionError, match="1..T = 1..20" if order == 21 else "order must be"):
        fpsolve.solve(ddim_system, "fp", order=order)


@pytest.mark.parametrize("history", [0, -1, 1.5])
def test_bad_history(ddim_system, history):
    with pytest.raises(InvalidOptionError, match="history must be an int >= 1"):
        fpsolve.solve(ddim_system, "taa", history=history)


def test_noise_of_the_wrong_shape():
    sampler = make_sampler("ddim", 10)
    with pytest.raises(ShapeError, match=r"noise must have shape .* = \[11, 4\].*got \[10, 4\]"):
        fpsolve.TriangularSystem(sampler=sampler, denoiser=lambda x, t: x, shape=(4,),
                                 noise=torch.zeros(10, 4, dtype=torch.float64))
    with pytest.raises(ShapeError, match=r"\[11, 3, 4\]"):
        fpsolve.TriangularSystem(sampler=sampler, denoiser=lambda x, t: x, shape=(4,), batch=3,
                                 noise=torch.zeros(11, 2, 4))


def test_noise_with_a_batch_axis_sets_the_batch():
    system = fpsolve.TriangularSystem(sampler=make_sampler("ddim", 10), denoiser=lambda x, t: 0.1 * x,
                                      shape=(4,), noise=torch.randn(11, 3, 4, dtype=torch.float64))
    assert system.batch == 3
    assert fpsolve.solve(system, "taa").sample.shape == (3, 4)


def test_generator_and_noise_together_are_refused():
    with pytest.raises(InvalidOptionError, match="either noise= or generator="):
        fpsolve.TriangularSystem(sampler=make_sampler("ddim", 3), denoiser=lambda x, t: x, shape=(2,),
                                 noise=torch.zeros(4, 2), generator=torch.Generator())


def test_tol_and_stopping_together_are_refused(ddim_system):
    with pytest.raises(InvalidOptionError, match="not both"):
        fpsolve.solve(ddim_system, "taa", tol=1e-3, stopping="rms")


def test_every_error_is_an_fpsolve_error():
    for cls in (InvalidOptionError, ShapeError, DenoiserOutputError):
        assert issubclass(cls, FpsolveError) and issubclass(cls, ValueError)


def test_sampler_options_are_validated():
    with pytest.raises(InvalidOptionError, match="eta must be"):
        make_sampler("ddim", 5, eta=-1.0)
    with pytest.raises(InvalidOptionError, match="order must be 1, 2 or 3"):
        make_sampler("dpm_solver", 5, order=4)
    with pytest.raises(InvalidOptionError, match="final_alpha_cumprod must lie in"):
        make_sampler("ddim", 5, final_alpha_cumprod=1.5)
    with pytest.raises(InvalidOptionError, match="shape must be"):
        make_system(make_sampler("ddim", 5), dim=0)
