"""Nothing silently wrong (issue 10): every bad input is named, plugin outputs are checked at the
seam, an unfinished result never passes for a finished one, the model never writes into the
trajectory, and one failing sample does not take the batch down with it.

Each test reproduces one case of the issue; on the code before it, each one fails (a coerced
value accepted, a raw ``TypeError``/``IndexError``, a corrupted reference, a lost sample).
"""

from __future__ import annotations

import warnings

import attrs
import numpy as np
import pytest
import torch

import fpsolve
from fpsolve.control import Controller
from fpsolve.driver import DriverConfig, run, run_sequential
from fpsolve.errors import (
    DenoiserOutputError,
    InvalidOptionError,
    NotConvergedError,
    NotConvergedWarning,
    PluginOutputError,
    ShapeError,
    UnknownNameError,
)
from fpsolve.evaluators import ChunkedEvaluator
from fpsolve.initializers import Coarse, FromTrajectory, NoiseCopy
from fpsolve.samplers import DDIM
from fpsolve.solvers import FP, TAA
from fpsolve.stopping import RMS

from .conftest import ALPHAS_CUMPROD, make_sampler, make_system


def linear(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A row-wise denoiser: a sample's output never depends on the other rows of the batch."""
    return 0.1 * x + 0.01 * torch.tanh(x)


def plain_system(steps: int = 10, dim: int = 4, batch: int | None = None, denoiser=linear):
    return fpsolve.TriangularSystem(sampler=make_sampler("ddim", steps), denoiser=denoiser, shape=(dim,),
                                    batch=batch, generator=torch.Generator().manual_seed(0))


# -- inputs are checked, not coerced ------------------------------------------------------------------

@pytest.mark.parametrize(("options", "match"), [
    (dict(shape="16"), "shape must be an int or a tuple of ints"),  # was (1, 6)
    (dict(shape=(4, "2")), "shape must be an int or a tuple of ints"),
    (dict(batch=True), r"batch must be an int >= 1"),
    (dict(batch=2.0), r"batch must be an int >= 1"),
    (dict(generator=0), "generator must be a torch.Generator"),
    (dict(noise="abc"), "noise must be a floating-point torch.Tensor"),
    (dict(device="meta"), "device 'meta' holds no data"),
    (dict(device="not-a-device"), "device must be a torch.device or a device name"),
])
def test_system_arguments_are_checked(options, match):
    arguments = dict(sampler=make_sampler("ddim", 5), denoiser=linear, shape=(4,)) | options
    with pytest.raises((InvalidOptionError, ShapeError), match=match):
        fpsolve.TriangularSystem(**arguments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a usable CUDA device")
def test_cuda_device_without_cuda_is_refused_with_the_fix():
    with pytest.raises(InvalidOptionError, match=r"torch sees no CUDA device .*use device='cpu'"):
        fpsolve.TriangularSystem(sampler=make_sampler("ddim", 5), denoiser=linear, shape=(4,), device="cuda")


def test_numpy_numbers_are_numbers():
    system = fpsolve.TriangularSystem(sampler=make_sampler("ddim", 8), denoiser=linear, shape=(np.int64(4),),
                                      batch=np.int64(2), generator=torch.Generator().manual_seed(0))
    assert system.shape == (4,) and system.batch == 2 and type(system.batch) is int
    solution = fpsolve.solve(system, "taa", window=np.int64(5), max_iters=np.int32(8), tol=np.float64(1e-6),
                             history=np.int64(3), ridge=np.float32(1e-3))
    assert solution.converged and solution.window == 5 and type(solution.window) is int
    assert DriverConfig(window=np.int64(5)).window == 5
    assert TAA(order=np.int64(3)).order == 3
    assert DDIM(alphas_cumprod=ALPHAS_CUMPROD, timesteps=np.array([999, 500, 0])).timesteps == (999, 500, 0)


@pytest.mark.parametrize(("timesteps", "match"), [
    ([999.7, 500.2, 0.9], "timesteps must be integers"),  # was (999, 500, 0)
    (torch.tensor([999.7, 500.2, 0.9]), "fractional values"),
    ([True, False], "timesteps must be integers"),
    (["999", "0"], "timesteps must be integers"),
    (50, r"timesteps must be a sequence of model timesteps.*spaced_timesteps\(T\)"),
    ("999", "timesteps must be a sequence"),
    (torch.tensor([[999, 500], [400, 0]]), r"timesteps must be 1-D .*got shape \[2, 2\]"),
    ([[999, 500], [400, 0]], "nested sequences"),
])
def test_timesteps_are_integers_in_one_dimension(timesteps, match):
    with pytest.raises(InvalidOptionError, match=match):
        DDIM(alphas_cumprod=ALPHAS_CUMPROD, timesteps=timesteps)


def test_integral_floats_are_timesteps():
    assert DDIM(alphas_cumprod=ALPHAS_CUMPROD, timesteps=[999.0, 0.0]).timesteps == (999, 0)


@pytest.mark.parametrize(("call", "match"), [
    (lambda s: fpsolve.solve(s, "taa", tol=True), "tol must be a finite number > 0"),
    (lambda s: fpsolve.solve(s, "taa", tol="1e-3"), "tol must be a finite number > 0"),
    (lambda s: fpsolve.solve(s, "taa", window=True), "window must be an int >= 1"),
    (lambda s: fpsolve.solve(s, "taa", max_iters=True), "max_iters must be an int >= 1"),
    (lambda s: fpsolve.solve(s, "taa", history=True), "history must be an int >= 1"),
    (lambda s: fpsolve.solve(s, "taa", ridge="0.1"), "ridge must be a finite number >= 0"),
    (lambda s: fpsolve.solve(s, "taa", progress="yes"), "progress must be True or False"),
    (lambda s: fpsolve.solve(s, "taa", observers=[3]), r"observers\[0\] is 3, not a callable"),
    (lambda s: fpsolve.solve(s, "taa", observers=print), "observers must be a list of callables"),
])
def test_solve_arguments_are_checked(call, match):
    with pytest.raises(InvalidOptionError, match=match):
        call(plain_system())


@pytest.mark.parametrize(("make", "match"), [
    (lambda: Controller(safeguard="no"), "safeguard must be True or False; got 'no'"),  # was True
    (lambda: Controller(safeguard=1), "safeguard must be True or False"),
    (lambda: TAA(order=True), "order must be an int"),
    (lambda: FP(order=2.0), "order must be an int"),
    (lambda: Coarse(steps=2.5), r"coarse steps must be an int in 1..T"),
    (lambda: FromTrajectory(solve_last=True), r"solve_last must be an int"),
    (lambda: RMS(tol1=True), "tol1 must be a finite number > 0"),
    (lambda: Controller(max_iters=True), "max_iters must be an int >= 1"),
    (lambda: fpsolve.stopping.MaxIters(3), r"MaxIters stopping rule is gone .* Pass max_iters=n"),
    (lambda: make_sampler("ddim", 5, eta="0.5"), "eta must be a finite number"),
    (lambda: make_sampler("ddim", 5, noise_final_step="no"), "noise_final_step must be True or False"),
    (lambda: make_sampler("dpm_solver", 5, order=True), "order must be 1, 2 or 3"),
    (lambda: make_sampler("dpm_solver", 5, lower_order_final="yes"),
     "lower_order_final must be True or False"),
])
def test_component_options_are_checked(make, match):
    with pytest.raises(InvalidOptionError, match=match):
        make()


# -- schedules are checked at construction ----------------------------------------------------------

def test_a_flipped_schedule_is_refused():
    with pytest.raises(InvalidOptionError, match="non-increasing .*Is the schedule flipped"):
        DDIM(alphas_cumprod=ALPHAS_CUMPROD.flip(0), timesteps=[999, 500, 0])


def test_a_non_monotone_schedule_is_refused():
    bumpy = ALPHAS_CUMPROD.clone()
    bumpy[500] = 0.99
    with pytest.raises(InvalidOptionError, match=r"rises from .* at t=499 to 0.99 at t=500"):
        DDIM(alphas_cumprod=bumpy, timesteps=[999, 500, 0])


def test_no_noise_at_a_used_timestep_is_refused_at_construction():
    clean_start = ALPHAS_CUMPROD.clone()
    clean_start[0] = 1.0
    expected = r"alphas_cumprod is 1.0 \(no noise\) at the timestep\(s\) \[0\]"
    with pytest.raises(InvalidOptionError, match=expected):
        DDIM(alphas_cumprod=clean_start, timesteps=[999, 500, 0])
    DDIM(alphas_cumprod=clean_start, timesteps=[999, 500, 1])  # unused there: fine


def test_a_final_state_noisier_than_the_last_step_is_refused():
    with pytest.raises(InvalidOptionError, match="the last step would add noise"):
        DDIM(alphas_cumprod=ALPHAS_CUMPROD, timesteps=[999, 10],
             final_alpha_cumprod=float(ALPHAS_CUMPROD[500]))


# -- options that do nothing are refused; hints find solve()'s arguments too -----------------------

@pytest.mark.parametrize("options", [dict(max_iters=3), dict(window=4), dict(stopping="rms"), dict(tol=1e-3),
                                     dict(initializer="noise_copy")])
def test_the_sequential_loop_refuses_options_it_would_ignore(options):
    (name,) = options
    with pytest.raises(InvalidOptionError, match=f"solver 'sequential' .* uses no {name}; drop it"):
        fpsolve.solve(plain_system(), "sequential", **options)


def test_a_misspelt_option_suggests_solve_arguments_and_solver_options():
    system = plain_system()
    expected = r"For 'windw', did you mean 'window' \(an argument of solve\(\)\)"
    with pytest.raises(InvalidOptionError, match=expected):
        fpsolve.solve(system, "taa", windw=5)
    with pytest.raises(InvalidOptionError, match=r"For 'histroy', did you mean 'history'"):
        fpsolve.solve(system, "taa", histroy=3)
    with pytest.raises(InvalidOptionError, match=r"For 'max_iter', did you mean 'max_iters'"):
        fpsolve.solve(system, "fp", max_iter=3)


def test_names_are_case_insensitive():
    system = plain_system()
    assert torch.equal(fpsolve.solve(system, "TAA").sample, fpsolve.solve(system, "taa").sample)
    assert fpsolve.solve(system, "taa", stopping="RMS").converged
    with pytest.raises(UnknownNameError, match="Did you mean 'taa'"):
        fpsolve.solve(system, "TAx")


# -- plugin outputs are checked at the seam, naming the plugin ---------------------------------------

class ShortVerdict(fpsolve.StoppingRule):
    name = "short_verdict"

    def converged(self, view):
        return torch.ones(view.hi - view.lo, dtype=torch.bool)  # one row short


class FloatVerdict(fpsolve.StoppingRule):
    name = "float_verdict"

    def converged(self, view):
        return torch.ones(view.hi - view.lo + 1)


class ListVerdict(fpsolve.StoppingRule):
    name = "list_verdict"

    def converged(self, view):
        return [True] * (view.hi - view.lo + 1)


@pytest.mark.parametrize(("rule", "got"), [
    (ShortVerdict(), r"a torch.bool tensor of shape \[9\]"),
    (FloatVerdict(), r"a torch.float32 tensor of shape \[10\]"),
    (ListVerdict(), "a list"),
])
def test_a_stopping_rule_verdict_of_the_wrong_shape_or_dtype_names_the_rule(rule, got):
    expected = (rf"stopping rule '{rule.name}' \(tests.test_reliability.{type(rule).__name__}\) "
                rf"returned {got} from converged\(\); it must return a torch.bool tensor of shape "
                r"\[W\] = \[10\]")
    with pytest.raises(PluginOutputError, match=expected):
        fpsolve.solve(plain_system(), "taa", stopping=rule)


@attrs.define(frozen=True, eq=False)
class DropsARow(fpsolve.FixedPointSolver):
    name = "drops_a_row"
    order: int | None = None

    def step(self, view, state):
        return view.rhs[1:], state


@attrs.define(frozen=True, eq=False)
class Float32Proposal(fpsolve.FixedPointSolver):
    name = "float32_proposal"
    order: int | None = None

    def step(self, view, state):
        return view.rhs.float(), state


@pytest.mark.parametrize(("solver", "got"), [(DropsARow(), r"shape \[9, 1, 4\]"),
                                             (Float32Proposal(),
                                              r"a torch.float32 tensor of shape \[10, 1, 4\]")])
def test_a_solver_proposing_the_wrong_rows_names_the_solver(solver, got):
    with pytest.raises(PluginOutputError, match=rf"solver '{solver.name}' .* returned .*{got} from step\(\); "
                                                r"expected a torch.float64 tensor of shape \[10, 1, 4\]"):
        fpsolve.solve(plain_system(), solver)


def test_a_nan_initial_trajectory_is_reported_as_such():
    system = plain_system()
    trajectory = fpsolve.solve(system, "sequential").trajectory.clone()
    trajectory[3] = float("nan")
    calls = []
    watched = fpsolve.TriangularSystem(sampler=system.sampler,
                                       denoiser=lambda x, t: calls.append(1) or linear(x, t),
                                       shape=(4,), noise=system.flat_noise.reshape(11, 4))
    expected = (r"initial trajectory from initializer 'trajectory' .* is not finite: state 3, sample 0 "
                r"holds NaN or inf \(before any model")
    with pytest.raises(InvalidOptionError, match=expected):
        fpsolve.solve(watched, "taa", initializer=FromTrajectory(trajectory=trajectory))
    assert not calls  # nothing was blamed on (or asked of) the denoiser


# -- no unfinished result passes for a finished one ------------------------------------------------

def test_raise_for_status():
    system = make_system(make_sampler("ddim", 20), dim=8)
    done = fpsolve.solve(system, "taa")
    assert done.raise_for_status() is done
    with pytest.warns(NotConvergedWarning):
        capped = fpsolve.solve(system, "taa", max_iters=2, tol=1e-10)
    with pytest.raises(NotConvergedError, match="did not converge .*MAX_ITERS") as error:
        capped.raise_for_status()
    assert error.value.solution is capped and error.value.output is None
    assert issubclass(NotConvergedError, RuntimeError) and fpsolve.NotConvergedError is NotConvergedError


class StopAfter2(fpsolve.StoppingRule):
    """Judges no row; ends the solve after two iterations for its own reason."""

    def stop(self, iteration):
        return "two iterations are enough" if iteration >= 2 else None


def test_a_solver_stopping_at_its_cap_warns():
    """``aa`` (no safeguard) used to end at MAX_ITERS up to 3% off without a word."""
    system = make_system(make_sampler("ddim", 20), dim=8)
    with pytest.warns(NotConvergedWarning, match=r"solver 'aa' returns an unconverged result: reached "
                                                 r"max_iters=3 .*\(status MAX_ITERS\).*raise_for_status"):
        solution = fpsolve.solve(system, "aa", max_iters=3)
    assert solution.status is fpsolve.Status.MAX_ITERS
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotConvergedWarning)
        fpsolve.solve(system, "aa")  # a converged solve is silent
        fpsolve.solve(system, "taa", stopping=RMS(tol1=1e-12) & StopAfter2())  # asked for: STOPPED


# -- the state is never aliased to the model ------------------------------------------------------

def halving(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The same outputs as :func:`linear`, but it scribbles over its input afterwards."""
    out = linear(x, t)
    x.mul_(0.5)
    t.zero_()
    return out


@pytest.mark.parametrize("solver", ["sequential", "taa", "fp", "aa", "newton"])
@pytest.mark.parametrize("batch", [None, 3])
def test_a_denoiser_writing_into_its_input_changes_nothing(solver, batch):
    clean = fpsolve.solve(plain_system(batch=batch), solver)
    dirty = fpsolve.solve(plain_system(batch=batch, denoiser=halving), solver)
    assert torch.equal(dirty.trajectory, clean.trajectory)  # was 363 off for sequential
    assert dirty.iterations == clean.iterations


def test_a_denoiser_writing_into_its_input_changes_nothing_in_chunks():
    clean_system, dirty_system = plain_system(batch=3), plain_system(batch=3, denoiser=halving)
    parts = dict(solver=TAA(), stopping=RMS(), initializer=NoiseCopy(), controller=Controller(window=4))
    clean = run(clean_system, **parts)
    dirty = run(dirty_system, **parts, evaluate=ChunkedEvaluator(dirty_system, max_batch=3, remember=False))
    assert torch.equal(dirty.trajectory, clean.trajectory)
    chunked = ChunkedEvaluator(dirty_system, max_batch=3, remember=False)
    reference = run_sequential(clean_system)
    assert torch.equal(run_sequential(dirty_system, evaluate=chunked).trajectory, reference.trajectory)


@pytest.mark.parametrize("solver", ["sequential", "taa"])
def test_a_denoiser_writing_into_its_input_changes_nothing_as_a_graph(monkeypatch, solver):
    from fpsolve.gpu import CUDAGraphDenoiser

    from .test_gpu_graphs import fake_capturing

    graphed = CUDAGraphDenoiser(halving, (4,), torch.float64, "cpu")
    captures = fake_capturing(monkeypatch, graphed)
    clean = fpsolve.solve(plain_system(batch=2), solver)
    dirty = fpsolve.solve(plain_system(batch=2, denoiser=graphed), solver)
    assert captures and torch.equal(dirty.trajectory, clean.trajectory)


# -- per-sample failure -----------------------------------------------------------------------------

class BreaksOneSample:
    """Non-finite outputs for one sample of the batch from the ``from_call``-th call on."""

    def __init__(self, samples: int, sample: int, from_call: int):
        self.samples, self.sample, self.from_call, self.calls = samples, sample, from_call, 0

    def __call__(self, x, t):
        self.calls += 1
        out = linear(x, t)
        if self.calls >= self.from_call:
            out[self.sample::self.samples] = float("nan")  # rows are position-major
        return out


@pytest.mark.parametrize("solver", ["taa", "fp", "newton", "sequential"])
def test_one_nan_sample_is_named_and_the_others_finish(solver):
    healthy = plain_system(steps=12, batch=3)
    broken = fpsolve.TriangularSystem(sampler=healthy.sampler, denoiser=BreaksOneSample(3, 1, from_call=3),
                                      shape=(4,), noise=healthy.flat_noise.reshape(13, 3, 4))
    options = {} if solver == "sequential" else dict(tol=1e-10)
    reference = fpsolve.solve(healthy, "sequential")
    with pytest.warns(NotConvergedWarning, match="NONFINITE"):
        solution = fpsolve.solve(broken, solver, **options)
    assert solution.status is fpsolve.Status.NONFINITE
    assert "1 of 3 samples became non-finite" in solution.message
    assert "sample 1: the denoiser returned non-finite values at " in solution.message
    assert solution.converged_samples.tolist() == [True, False, True]
    assert torch.isfinite(solution.trajectory).all()  # the failed sample keeps its last finite iterate
    for sample in (0, 2):  # was 171 off: the healthy samples finish as if alone
        error = (solution.sample[sample] - reference.sample[sample]).abs().max().item()
        assert error <= (0.0 if solver == "sequential" else 1e-8), (sample, error)


def test_every_sample_failing_stops_the_solve():
    healthy = plain_system(batch=2)

    calls = []

    def denoiser(x, t):
        calls.append(1)
        return linear(x, t) * (float("nan") if len(calls) > 1 else 1.0)

    broken = fpsolve.TriangularSystem(sampler=healthy.sampler, denoiser=denoiser, shape=(4,),
                                      noise=healthy.flat_noise.reshape(11, 2, 4))
    with pytest.warns(NotConvergedWarning):
        solution = fpsolve.solve(broken, "taa")
    assert solution.status is fpsolve.Status.NONFINITE and solution.iterations == 2
    assert "no sample is left to solve" in solution.message
    assert solution.converged_samples.tolist() == [False, False]


@attrs.define(frozen=True, eq=False)
class PoisonsSampleZero(fpsolve.FixedPointSolver):
    """FP whose proposal for sample 0 turns NaN at iteration 2."""

    name = "poisons_sample_zero"
    order: int | None = None

    def step(self, view, state):
        proposal = view.rhs.clone()
        if view.iteration == 2:
            proposal[:, 0] = float("nan")
        return proposal, state


def test_a_solver_blowing_up_on_one_sample_freezes_only_that_sample():
    system = plain_system(batch=2)
    reference = fpsolve.solve(system, "sequential")
    with pytest.warns(NotConvergedWarning):
        solution = fpsolve.solve(system, PoisonsSampleZero(), tol=1e-10)
    expected = "sample 0: solver 'poisons_sample_zero' produced non-finite values at iteration 2"
    assert expected in solution.message
    assert solution.converged_samples.tolist() == [False, True]
    assert (solution.sample[1] - reference.sample[1]).abs().max() <= 1e-8


def test_converged_samples_of_ordinary_solves():
    system = plain_system(batch=2)
    assert fpsolve.solve(system, "taa").converged_samples.tolist() == [True, True]
    assert fpsolve.solve(plain_system(), "sequential").converged_samples.tolist() == [True]
    with pytest.warns(NotConvergedWarning):
        capped = fpsolve.solve(system, "fp", max_iters=1, tol=1e-12)
    assert capped.converged_samples.tolist() == [False, False]


# -- diffusers-free wrong model output through scheduler_system ------------------------------------

def test_scheduler_system_with_a_model_of_the_wrong_output_shape():
    diffusers = pytest.importorskip("diffusers")
    from fpsolve.integrations.diffusers import scheduler_system

    scheduler = diffusers.DDIMScheduler()
    scheduler.set_timesteps(5)
    system = scheduler_system(scheduler, lambda x, t: x[:, :1], shape=(2, 4, 4), batch=1,
                              generator=torch.Generator().manual_seed(0))
    expected = (r"the model returned shape \[\d+, 1, 4, 4\] for an input of shape \[\d+, 2, 4, 4\]"
                r".*Check the shape=")
    with pytest.raises(DenoiserOutputError, match=expected):
        fpsolve.solve(system, "taa")
