"""One source for each thing (issue 12, item 4): the schedules and timestep grids, the step
coefficients' accessor and the shared validators, each checked against what it replaced."""

from __future__ import annotations

import tempfile

import attrs
import numpy as np
import pytest
import torch
from fpsolve_paradigms.stopping import ParadigmsOriginal
from hypothesis import given
from hypothesis import strategies as st

import fpsolve
from fpsolve import validators
from fpsolve.adjoint import differentiable_solution
from fpsolve.bench.matrix import CurvePlan, SamplerSpec, quick_plan
from fpsolve.distributed import plan
from fpsolve.errors import InvalidOptionError
from fpsolve.evaluators import ChunkedEvaluator
from fpsolve.gpu import CUDAGraphDenoiser, IterationModel, LatencyTable, measure_latency, plan_window
from fpsolve.gpu.planner import latency_curve
from fpsolve.initializers import Extrapolate
from fpsolve.models import digits, load_reference
from fpsolve.samplers import DDIM, DPMSolver, FlowEuler
from fpsolve.schedules import (
    flow_sigmas,
    leading_timesteps,
    linear_alphas_cumprod,
    shifted_flow_sigmas,
    spaced_timesteps,
)
from fpsolve.solvers import TAA, DiagonalNewton, QuasiNewton
from fpsolve.stopping import RMS
from fpsolve.testing import problems

from .conftest import make_sampler

# -- schedules: bit-identical to the formulas each copy wrote out --------------------------------


def old_linear(n, b0, b1):
    return torch.cumprod(1 - torch.linspace(b0, b1, n, dtype=torch.float64), 0)


def old_spaced(steps, n):
    return torch.linspace(n - 1, 0, steps).round().long().tolist()


def test_the_linear_schedule_is_ddpms_bit_for_bit():
    assert torch.equal(linear_alphas_cumprod(), old_linear(1000, 1e-4, 0.02))
    betas = torch.linspace(digits.BETA_START, digits.BETA_END, digits.NUM_TRAIN_TIMESTEPS,
                           dtype=torch.float64)
    assert torch.equal(digits.digits_alphas_cumprod(), torch.cumprod(1.0 - betas, dim=0))  # digits' old lines
    assert linear_alphas_cumprod().dtype == torch.float64


@given(st.integers(1, 2000), st.floats(1e-5, 0.01), st.floats(0.0, 0.05))
def test_the_linear_schedule_matches_the_formula(n, b0, extra):
    assert torch.equal(linear_alphas_cumprod(n, b0, b0 + extra), old_linear(n, b0, b0 + extra))


@given(st.integers(1, 1000).flatmap(lambda n: st.tuples(st.integers(1, n), st.just(n))))
def test_spaced_timesteps_match_the_formula(case):
    steps, n = case
    assert spaced_timesteps(steps, n) == old_spaced(steps, n)
    assert spaced_timesteps(np.int64(steps), np.int32(n)) == old_spaced(steps, n)


@pytest.mark.parametrize("steps", [1, 2, 7, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 3])
def test_shifted_flow_sigmas_match_the_formula(steps, shift):
    even = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    assert torch.equal(shifted_flow_sigmas(steps, shift), shift * even / (1 + (shift - 1) * even))


@given(st.integers(1, 1000).flatmap(lambda n: st.tuples(st.integers(1, n), st.just(n))))
def test_leading_timesteps_match_the_digits_formula(case):
    """The formula ddim_sample_digits (and the inversion page and benchmark) wrote out."""
    steps, n = case
    old = (torch.arange(steps) * (n // steps)).flip(0).tolist()
    assert leading_timesteps(steps, n) == old
    assert leading_timesteps(np.int64(steps), np.int32(n)) == old


@pytest.mark.parametrize("steps", [1, 7, 25, 100, 1000])
def test_flow_sigmas_match_the_digits_formula(steps):
    """The formula fpsolve.models.digits.flow_sigmas wrote out, bit for bit."""
    old = torch.cat([torch.linspace(1.0, 1.0 / 1000, steps, dtype=torch.float64),
                     torch.zeros(1, dtype=torch.float64)])
    assert torch.equal(flow_sigmas(steps), old)
    assert torch.equal(flow_sigmas(steps, 1000), old)
    assert torch.equal(digits.flow_sigmas(steps), old)  # the digits flow model's: 1000 training levels


def test_every_public_home_is_the_one_implementation():
    assert fpsolve.models.linear_alphas_cumprod is linear_alphas_cumprod
    assert fpsolve.models.spaced_timesteps is spaced_timesteps
    assert problems.linear_alphas_cumprod is linear_alphas_cumprod
    assert problems.spaced_timesteps is spaced_timesteps
    assert problems.shifted_flow_sigmas is shifted_flow_sigmas


@pytest.mark.parametrize("call, name", [
    (lambda: spaced_timesteps(0), "num_steps"),
    (lambda: spaced_timesteps(1001), "num_steps must lie in 1..1000"),
    (lambda: spaced_timesteps(True), "num_steps"),
    (lambda: spaced_timesteps(2.0), "num_steps"),
    (lambda: spaced_timesteps(10, 0), "num_train_steps"),
    (lambda: linear_alphas_cumprod(True), "num_train_steps"),
    (lambda: linear_alphas_cumprod(10, 0.0), "beta_start"),
    (lambda: linear_alphas_cumprod(10, 0.02, 0.01), "beta_start <= beta_end"),
    (lambda: shifted_flow_sigmas(4, 0.0), "shift"),
    (lambda: leading_timesteps(0), "num_steps"),
    (lambda: leading_timesteps(1001), r"num_steps must be an int in 1\.\.1000"),
    (lambda: leading_timesteps(5, 4), r"num_steps must be an int in 1\.\.4"),
    (lambda: flow_sigmas(0), "steps"),
    (lambda: flow_sigmas(2.0), "steps must be an int"),
    (lambda: flow_sigmas(4, True), "num_train_steps"),
])
def test_bad_schedule_arguments_name_the_argument(call, name):
    with pytest.raises(InvalidOptionError, match=name):
        call()


# -- the step coefficients' accessor ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddim", "dpm_solver"])
def test_coefficients_are_the_affine_form_on_the_device(kind):
    sampler = make_sampler(kind, 9)
    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=problems.problem_denoiser(sampler, 4, 0),
                                      shape=(4,), dtype=torch.float32)
    coefficients = system.coefficients()
    form = system.affine_form
    for name in ("state", "output", "noise"):
        value = getattr(coefficients, name)
        assert value.dtype == torch.float32 and value.device == system.device
        assert torch.equal(value, getattr(form, name).to(torch.float32))
    state, output, noise = coefficients  # unpacks in this order
    assert state is coefficients.state and noise is coefficients.noise
    assert system.coefficients() is coefficients  # computed once


# -- validators: one module; numpy numbers accepted, bools refused, the right option named ----------

def _system():
    sampler = make_sampler("ddim", 6)
    return fpsolve.TriangularSystem(sampler=sampler, denoiser=problems.problem_denoiser(sampler, 4, 0),
                                    shape=(4,), batch=2)


def _identity(x, t):
    return x


def _scratch_png():
    """A throwaway path for save_digit_grid's cases (the ACCEPTS table has no tmp_path)."""
    return tempfile.mkdtemp() + "/grid.png"


ABAR = linear_alphas_cumprod()
FLOW_SIGMAS = torch.linspace(1, 0, 5, dtype=torch.float64)

#: (what builds it from one value, a numpy value it accepts, the message refusing ``True``)
ACCEPTS = [
    (lambda v: plan(v, 10, 2), np.int64(8), "num_samples must be an int >= 1"),
    (lambda v: plan(8, v, 2), np.int32(10), "window must be an int >= 1"),
    (lambda v: plan(8, 10, v), np.int16(2), "world_size must be an int >= 1"),
    (lambda v: ChunkedEvaluator(_system(), max_batch=v), np.int64(4),
     "max_batch must be an int >= 1 or None"),
    (lambda v: CUDAGraphDenoiser(_identity, (4,), torch.float32, "cpu", warmup=v), np.int64(3),
     "CUDAGraphDenoiser: warmup must be an int >= 1"),
    (lambda v: CUDAGraphDenoiser(_identity, (4,), torch.float32, "cpu", batch_multiple=v), np.int64(8),
     "CUDAGraphDenoiser: batch_multiple must be an int >= 1"),
    (lambda v: measure_latency(_identity, shape=(4,), dtype=torch.float32, device="cpu", batches=[1],
                               timesteps=[0], repeats=v, warmup=0),
     np.int64(1), "repeats must be an int >= 1"),
    (lambda v: measure_latency(_identity, shape=(4,), dtype=torch.float32, device="cpu", batches=[1],
                               timesteps=[0], repeats=1, warmup=v),
     np.int64(0), "warmup must be an int >= 0"),
    (lambda v: plan_window({1: 1.0}, v, 1, lambda w: 3.0), np.int64(10), "num_steps must be an int >= 1"),
    (lambda v: plan_window({1: 1.0}, 10, v, lambda w: 3.0), np.int64(2), "samples must be an int >= 1"),
    (lambda v: plan_window({1: 1.0}, 10, 1, lambda w: 3.0, min_speedup=v), np.float64(1.1),
     "min_speedup must be a finite number > 0"),
    (lambda v: IterationModel(10, v), np.float32(4.0), "plateau must be a finite number > 0"),
    (lambda v: FlowEuler(sigmas=FLOW_SIGMAS, num_train_timesteps=v), np.int64(1000),
     "num_train_timesteps must be an int >= 1"),
    (lambda v: DPMSolver(alphas_cumprod=ABAR, timesteps=[999, 500, 0], order=v), np.int64(2),
     "order must be 1, 2 or 3"),
    (lambda v: DDIM(alphas_cumprod=ABAR, timesteps=[999, 500, 0], eta=v), np.float32(0.5),
     "eta must be a finite number >= 0"),
    (lambda v: Extrapolate(steps=v), np.int64(2), "extrapolate steps must be an int >= 0"),
    (lambda v: TAA(history=v), np.int64(3), "history must be an int >= 1"),
    (lambda v: TAA(order=v), np.int64(3), "order must be an int >= 1"),
    (lambda v: TAA(ridge=v), np.float64(0.01), "ridge must be a finite number >= 0"),
    (lambda v: QuasiNewton(clamp=v), np.float64(20.0), "clamp must be a finite number >= 0"),  # not "ridge"
    (lambda v: QuasiNewton(prior_weight=v), np.float32(0.25),
     r"prior_weight must be a finite number in \[0, 1\]"),
    (lambda v: fpsolve.Controller(safeguard=v), np.bool_(False), "safeguard must be True or False"),
    # moved onto fpsolve.validators after the redesign merged (issue 12's loose ends)
    (lambda v: SamplerSpec("ddim", v), np.int64(50), r"sampler steps must be an int in 2\.\.1000"),
    (lambda v: CurvePlan(["ddim-4"], ["taa-m2"], max_iters=v), np.int64(5),
     "curve max_iters must be an int >= 1"),
    (lambda v: attrs.evolve(quick_plan(["gmm"]), seeds=v), np.int64(2), "seeds must be an int >= 1"),
    (lambda v: attrs.evolve(quick_plan(["gmm"]), samples=v), np.int32(3), "samples must be an int >= 1"),
    (lambda v: attrs.evolve(quick_plan(["gmm"]), tolerances=[v]), np.float64(1e-3),
     r"tolerances must be a finite number in \(0, 1\)"),
    (lambda v: DiagonalNewton(damping=v), np.float32(0.5), r"damping must be a finite number in \[0, 1\)"),
    (lambda v: RMS(tol1=v), np.float64(1e-3), "tol1 must be a finite number > 0"),
    (lambda v: RMS(tol2=v), np.float64(0.0), "tol2 must be a finite number >= 0"),
    (lambda v: ParadigmsOriginal(tol=v), np.float32(0.1),
     r"tol must be a finite number > 0 \(ParaDiGMS' default is 0\.1\)"),
    (lambda v: fpsolve.solve(_system(), "taa", differentiable=v), np.bool_(False),
     "differentiable must be True or False"),
    (lambda v: load_reference("gmm").sampler(v), np.int64(5), "num_steps must be an int"),
    (lambda v: LatencyTable({v: 1.0}), np.int64(4), "a latency point's batch must be an int >= 1"),
    (lambda v: LatencyTable({4: v}), np.float32(0.5),
     "the seconds of the latency point at batch 4 must be a finite number > 0"),
    (lambda v: latency_curve({v: 1.0}), np.int32(2), "a latency point's batch must be an int >= 1"),
    (lambda v: measure_latency(_identity, shape=(4,), dtype=torch.float32, device="cpu", batches=[v],
                               timesteps=[0], repeats=1, warmup=0),
     np.int64(2), "a batch size in batches must be an int >= 1"),
    (lambda v: digits.save_digit_grid(np.zeros((1, 2, 2), np.uint8), _scratch_png(), nrow=v), np.int64(1),
     "save_digit_grid: nrow must be an int >= 1"),
    (lambda v: digits.save_digit_grid(np.zeros((1, 2, 2), np.uint8), _scratch_png(), scale=v), np.int64(1),
     "save_digit_grid: scale must be an int >= 1"),
]


@pytest.mark.parametrize("build, value, refusal", ACCEPTS,
                         ids=[case[2].split(" must")[0] for case in ACCEPTS])
def test_numpy_numbers_pass_and_bools_are_refused_by_name(build, value, refusal):
    build(value)  # a numpy number is a number
    refused = "yes" if isinstance(value, np.bool_) else True
    with pytest.raises(InvalidOptionError, match=refusal):
        build(refused)


def test_latency_points_are_checked_not_truncated():
    assert LatencyTable({"4": 2.0, 1: np.float64(1.0)}).seconds == {1: 1.0, 4: 2.0}  # JSON keys, sorted
    assert LatencyTable.from_json(LatencyTable({8: 3.0}).to_json()).seconds == {8: 3.0}
    with pytest.raises(InvalidOptionError, match="batch must be an int >= 1; got 2.5"):  # was int(2.5) = 2
        LatencyTable({2.5: 1.0})
    with pytest.raises(InvalidOptionError, match="batch 4 must be a finite number > 0; got inf"):
        latency_curve({4: float("inf")})
    with pytest.raises(InvalidOptionError, match="at least one"):
        LatencyTable({})


def test_checked_values_become_python_numbers():
    assert type(TAA(history=np.int64(3)).history) is int
    assert type(FlowEuler(sigmas=FLOW_SIGMAS, num_train_timesteps=np.int64(500)).num_train_timesteps) is int
    assert type(Extrapolate(steps=np.int64(2)).steps) is int
    assert type(DDIM(alphas_cumprod=ABAR, timesteps=[999, 0], eta=np.float32(0.5)).eta) is float
    assert ChunkedEvaluator(_system(), max_batch=np.int64(4), remember=False).max_batch == 4


def test_the_invert_and_adjoint_checks_name_their_option():
    system = _system()
    with pytest.raises(InvalidOptionError, match="exact must be True or False"):
        fpsolve.invert(system, torch.zeros(2, 4), exact="yes")
    solution = fpsolve.solve(system, "taa")
    cases = [(dict(adjoint_tol=True), "adjoint_tol must be a finite number > 0 \\(relative\\)"),
             (dict(adjoint_tol=0.0), "adjoint_tol must be a finite number > 0"),
             (dict(vjp_chunk=True), "vjp_chunk must be an int >= 1 or None"),
             (dict(vjp_chunk=0), "vjp_chunk must be an int >= 1 or None")]
    for options, message in cases:
        with pytest.raises(InvalidOptionError, match=message):
            differentiable_solution(system, solution, TAA(), controller=fpsolve.Controller(), **options)


def test_the_helpers():
    assert validators.as_int("n", np.int64(5), minimum=1, maximum=9) == 5
    assert validators.as_int("n", torch.tensor(5)) == 5
    with pytest.raises(InvalidOptionError, match=r"^n must be an int in 1\.\.9; got 10\.$"):
        validators.as_int("n", 10, minimum=1, maximum=9)
    with pytest.raises(InvalidOptionError, match="n must be an int"):
        validators.as_int("n", np.bool_(True))
    assert validators.as_real("x", np.float16(0.5), minimum=0.0, maximum=1.0, strict_maximum=True) == 0.5
    with pytest.raises(InvalidOptionError, match=r"x must be a finite number in \[0, 1\); got 1\.0\."):
        validators.as_real("x", 1.0, minimum=0.0, maximum=1.0, strict_maximum=True)
    with pytest.raises(InvalidOptionError, match="x must be a finite number"):
        validators.as_real("x", float("nan"))
    assert validators.as_flag("f", np.bool_(True)) is True
    with pytest.raises(InvalidOptionError, match="f must be True or False"):
        validators.as_flag("f", 1)
    assert validators.integer(np.int8(3)) == 3 and validators.integer(True) is True
    assert validators.real(np.float32(0.5)) == 0.5 and validators.real("0.5") == "0.5"


def test_attrs_validators_name_their_field_unless_told():
    @attrs.define(frozen=True)
    class Options:
        width: int = attrs.field(default=1, converter=validators.integer,
                                 validator=validators.check_int(minimum=1))
        rate: float = attrs.field(default=0.5, validator=validators.check_real("learning rate", minimum=0.0))
        mode: str = attrs.field(default="a", validator=validators.check_choice({"a": "first", "b": ""}))

    assert Options(width=np.int64(2)).width == 2
    with pytest.raises(InvalidOptionError, match="^width must be an int >= 1; got 0.$"):
        Options(width=0)
    with pytest.raises(InvalidOptionError, match="^learning rate must be a finite number >= 0"):
        Options(rate=True)
    with pytest.raises(InvalidOptionError, match=r"^mode must be 'a' \(first\) or 'b'; got 'c'\.$"):
        Options(mode="c")


def test_no_solver_validator_shim():
    """The solvers use fpsolve.validators itself: the old re-export module is gone."""
    with pytest.raises(ImportError):
        __import__("fpsolve.solvers._validators")
