"""Gradients through a solve: the adjoint triangular system equals autograd through the loop.

For a solved trajectory ``F(s) = 0`` the implicit function theorem gives every gradient from one
linear triangular (adjoint) system; fpsolve solves it in parallel with the forward solve's
solver and window. The tests state: (1) the gradients to the noise, the denoiser's parameters
and closed-over conditioning equal autograd through the sequential loop (float64, relative error
<= 1e-6 at tight tolerance) for DDIM, DDPM and DPM-Solver with a batch; (2) torch's gradcheck
agrees on a tiny case; (3) no VJP ever covers more states than the window; (4) misuse is refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fpsolve
from fpsolve.adjoint import AdjointSampler, denoiser_parameters, gradient_record
from fpsolve.errors import InvalidOptionError
from fpsolve.evaluators import ChunkedEvaluator, choose, kind_for
from fpsolve.samplers import DPMSolver
from fpsolve.testing.problems import problem_sampler

from .conftest import ALPHAS_CUMPROD, spaced

DIM, BATCH = 6, 3


class TinyNet(torch.nn.Module):
    """A float64 eps-model: the Gaussian posterior mean plus a small learned MLP term."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = torch.nn.Linear(DIM + 1, 12).double()
        self.out = torch.nn.Linear(12, DIM).double()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = (1 - ALPHAS_CUMPROD[t.long()]).sqrt()[:, None]
        features = torch.cat([x, (t.double() / 1000)[:, None]], 1)
        return 0.5 * sigma * x + 0.3 * self.out(torch.tanh(self.hidden(features)))


def make_denoiser(seed: int = 0):
    net = TinyNet(seed)
    condition = torch.randn(DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 5),
                            requires_grad=True)

    def denoiser(x, t):  # closes over the module and a conditioning tensor
        return net(x, t) + 0.2 * torch.tanh(condition) * x

    return denoiser, net, condition


#: Test samplers by id: (registered sampler name, options). The class comes from the registry
#: (problem_sampler: the linear schedule, evenly spaced timesteps), not from a map of our own.
SAMPLERS = {
    "ddim": ("ddim", {}),
    "ddim_eta1": ("ddim", {"eta": 1.0}),
    "ddpm": ("ddpm", {}),
    "dpm_solver_3m": ("dpm_solver", {"order": 3}),
}


def make_sampler(kind: str, steps: int):
    """The test sampler ``kind`` of :data:`SAMPLERS` with ``steps`` steps."""
    name, options = SAMPLERS[kind]
    return problem_sampler(name, steps, **options)


def sequential_loop(sampler, denoiser, noise):
    """The sampler's recurrence written out step by step (autograd records every step)."""
    form = sampler.affine_form()
    steps = torch.tensor(sampler.timesteps)
    states, outputs = [noise[0]], []
    for i in range(1, sampler.num_steps + 1):
        outputs.append(denoiser(states[i - 1], steps[i - 1].expand(noise.shape[1])))
        value = form.noise[i] * noise[i]
        for lag in range(1, form.lags + 1):
            if i - lag >= 0 and (form.state[i, lag - 1] != 0 or form.output[i, lag - 1] != 0):
                value = (value + form.state[i, lag - 1] * states[i - lag]
                         + form.output[i, lag - 1] * outputs[i - lag])
        states.append(value)
    return torch.stack(states)


def loss_of(trajectory, target):
    # reads the sample and an intermediate state: both the terminal and the interior cotangents
    middle = trajectory.shape[0] // 2
    return ((trajectory[-1] - target) ** 2).sum() + trajectory[middle].sin().sum()


def relative_error(got, want):
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
@pytest.mark.parametrize("solver", ["taa", "fp", "newton"])
def test_gradients_equal_autograd_through_the_sequential_loop(kind, solver):
    steps = 10
    sampler = make_sampler(kind, steps)
    denoiser, net, condition = make_denoiser()
    noise = torch.randn(steps + 1, BATCH, DIM, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    target = torch.randn(BATCH, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    inputs = [noise, condition, *net.parameters()]
    want = torch.autograd.grad(loss_of(sequential_loop(sampler, denoiser, noise), target), inputs)

    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=denoiser, shape=(DIM,), noise=noise)
    solution = fpsolve.solve(system, solver, tol=1e-12, differentiable=True)
    got = torch.autograd.grad(loss_of(solution.trajectory, target), inputs)
    for name, g, w in zip(["noise", "condition", *[n for n, _ in net.named_parameters()]], got, want,
                          strict=True):
        assert relative_error(g, w) <= 1e-6, (name, relative_error(g, w))
    record = gradient_record(solution)
    assert record is not None and record.backward_calls == 1 and record.adjoint.converged


def test_gradients_with_a_sliding_window_never_differentiate_more_states_than_the_window():
    steps, window = 16, 4
    sampler = make_sampler("ddim", steps)
    net = TinyNet(3)
    calls = []

    def denoiser(x, t):
        if torch.is_grad_enabled() and x.requires_grad:
            calls.append(x.shape[0])
        return net(x, t)

    x_T = torch.randn(BATCH, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(4),
                      requires_grad=True)
    rest = torch.randn(steps, BATCH, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    noise = torch.cat([x_T[None], rest])
    target = torch.zeros(BATCH, DIM, dtype=torch.float64)
    want = torch.autograd.grad(loss_of(sequential_loop(sampler, denoiser, noise), target), [x_T])[0]
    calls.clear()
    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=denoiser, shape=(DIM,), noise=noise)
    solution = fpsolve.solve(system, "taa", tol=1e-12, window=window, differentiable=True)
    got = torch.autograd.grad(loss_of(solution.trajectory, target), [x_T])[0]
    assert relative_error(got, want) <= 1e-6
    assert calls and max(calls) <= window * BATCH  # activations of at most one window at a time


def test_the_adjoint_solve_takes_the_choosers_evaluator_chunked_on_cuda(monkeypatch):
    """The adjoint's model calls (VJPs) go through fpsolve.evaluators.choose, as the forward
    solve's do: on a CUDA device they are chunked. The chooser is asked with the adjoint system;
    what it picks for a CUDA device is made to run on the CPU system, one position per chunk, and
    the gradients equal the plain ones."""
    steps = 12
    sampler = make_sampler("ddim", steps)
    denoiser, net, condition = make_denoiser(2)
    noise = torch.randn(steps + 1, BATCH, DIM, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(6)).requires_grad_(True)
    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=denoiser, shape=(DIM,), noise=noise)

    def gradient():
        solution = fpsolve.solve(system, "taa", tol=1e-12, window=5, differentiable=True)
        return torch.autograd.grad(solution.sample.pow(2).sum(), [noise, condition])

    plain = gradient()
    asked, rows = [], []

    def chunked_as_on_cuda(target, *, distributed=None):
        asked.append(target)
        if not isinstance(target.sampler, AdjointSampler):
            return choose(target, distributed=distributed)
        assert kind_for(torch.device("cuda", 0), distributed) == "chunked"
        on_cuda = copy.copy(target)
        object.__setattr__(on_cuda, "device", torch.device("cuda", 0))
        evaluator = choose(on_cuda, distributed=distributed)
        assert isinstance(evaluator, ChunkedEvaluator)
        evaluator.system = target  # chosen for CUDA, run on the CPU system it was asked for
        evaluator.max_batch = target.num_samples  # one position per chunk: really split
        return evaluator

    denoise = fpsolve.TriangularSystem.denoise

    def counting(self, x, t):
        if isinstance(self.sampler, AdjointSampler):
            rows.append(x.shape[0])
        return denoise(self, x, t)

    monkeypatch.setattr(fpsolve.TriangularSystem, "denoise", counting)
    monkeypatch.setattr(fpsolve.adjoint, "choose_evaluator", chunked_as_on_cuda)
    monkeypatch.setattr(fpsolve.api, "choose_evaluator", chunked_as_on_cuda)
    chunked = gradient()
    assert [type(t.sampler) for t in asked] == [type(sampler), AdjointSampler]  # forward, then adjoint
    assert rows and set(rows) == {BATCH}  # every VJP call was one position of the window
    for got, want in zip(chunked, plain, strict=True):
        assert relative_error(got, want) <= 1e-12  # float64; row-wise model: chunks change nothing


def test_the_adjoint_is_solved_in_parallel_in_fewer_rounds_than_steps():
    # a moderate tolerance: the adjoint converges like the forward solve, far below T rounds
    steps = 40
    sampler = make_sampler("ddim", steps)
    denoiser, net, condition = make_denoiser(1)
    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=denoiser, shape=(DIM,), batch=BATCH,
                                      generator=torch.Generator().manual_seed(0))
    solution = fpsolve.solve(system, "taa", tol=1e-6, differentiable=True, params=[condition])
    solution.sample.pow(2).sum().backward()
    record = gradient_record(solution)
    assert record.adjoint.iterations < steps // 2
    reference = fpsolve.solve(system, "sequential", differentiable=True, params=[condition])
    want = torch.autograd.grad(reference.sample.pow(2).sum(), [condition])[0]
    assert relative_error(condition.grad, want) <= 1e-4
    assert all(p.grad is None for p in net.parameters())  # params= names exactly what is differentiated


def test_gradcheck_on_a_tiny_problem():
    sampler = DPMSolver(alphas_cumprod=ALPHAS_CUMPROD, timesteps=spaced(4), order=2)
    weight = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) / 3

    def run(noise, condition):
        def denoiser(x, t):
            return torch.tanh(x @ weight + condition) * (t[:, None].double() / 1000 + 0.5)

        system = fpsolve.TriangularSystem(sampler=sampler, denoiser=denoiser, shape=(3,), noise=noise)
        return fpsolve.solve(system, "taa", tol=1e-13, differentiable=True, params=[condition]).trajectory

    noise = torch.randn(5, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8),
                        requires_grad=True)
    condition = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(9),
                            requires_grad=True)
    assert torch.autograd.gradcheck(run, (noise, condition), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradients_reach_a_non_leaf_conditioning_and_the_encoder_behind_it():
    sampler = make_sampler("ddim", 8)
    net = TinyNet(2)
    encoder = torch.nn.Linear(2, DIM).double()
    prompt = torch.tensor([0.3, -0.7], dtype=torch.float64)
    embedding = encoder(prompt)  # requires grad through the encoder's weights

    def denoiser(x, t):
        return net(x, t) + 0.1 * embedding * x

    params = denoiser_parameters(denoiser)
    assert any(p is embedding for p in params) and len(params) == 1 + len(list(net.parameters()))
    noise = torch.randn(9, BATCH, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = torch.autograd.grad(sequential_loop(sampler, denoiser, noise)[-1].sum(), [encoder.weight],
                               retain_graph=True)[0]
    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=denoiser, shape=(DIM,), noise=noise)
    solution = fpsolve.solve(system, "taa", tol=1e-12, differentiable=True)
    got = torch.autograd.grad(solution.sample.sum(), [encoder.weight])[0]
    assert relative_error(got, want) <= 1e-6


def test_the_adjoint_sampler_is_strictly_triangular_with_the_coupling_coefficients():
    sampler = make_sampler("ddim", 5)
    form = AdjointSampler(sampler.affine_form()).affine_form()
    assert form.num_steps == 5 and (form.state == 0).all() and form.noise[0] == 0
    # w_{T-1} (position 1) reads only w_T = 0 through the last step's output coefficient
    assert torch.isclose(form.output[1, 0], sampler.affine_form().output[5, 0])


def test_differentiable_solve_refusals():
    sampler = make_sampler("ddim", 4)
    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=lambda x, t: 0.1 * x, shape=(2,),
                                      generator=torch.Generator().manual_seed(0))
    with pytest.raises(InvalidOptionError, match="nothing requires grad"):
        fpsolve.solve(system, differentiable=True)
    with pytest.raises(InvalidOptionError, match="options of differentiable=True"):
        fpsolve.solve(system, params=[torch.zeros(1)])
    with pytest.raises(InvalidOptionError, match="differentiable must be True or False"):
        fpsolve.solve(system, differentiable="yes")

    weight = torch.ones(2, dtype=torch.float64, requires_grad=True)

    def frozen(x, t):
        with torch.no_grad():
            return x * weight * 0.1

    frozen_system = fpsolve.TriangularSystem(sampler=sampler, denoiser=frozen, shape=(2,),
                                             generator=torch.Generator().manual_seed(0))
    solution = fpsolve.solve(frozen_system, differentiable=True, params=[weight])
    with pytest.raises(InvalidOptionError, match="no_grad"):
        solution.sample.sum().backward()


@settings(max_examples=15, deadline=None)
@given(kind=st.sampled_from(["ddim", "ddpm", "dpm_solver_3m"]), steps=st.integers(2, 10),
       window_fraction=st.floats(0.1, 1.0), solver=st.sampled_from(["taa", "fp"]),
       chunk=st.sampled_from([None, 1, 3]), seed=st.integers(0, 2**16))
def test_property_the_adjoint_solve_is_exact_for_any_window_and_chunk(kind, steps, window_fraction, solver,
                                                                      chunk, seed):
    """Implicit function theorem: at tol -> 0, the adjoint gradient is autograd's, whatever the
    window (the anchor moves over the adjoint like over the forward) and the VJP chunking."""
    sampler = make_sampler(kind, steps)
    weight = torch.randn(DIM, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) / DIM
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def denoiser(x, t):
        return scale * torch.tanh(x @ weight) + 1e-4 * t[:, None].double() * x

    noise = torch.randn(steps + 1, 2, DIM, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(seed + 1)).requires_grad_(True)
    want = torch.autograd.grad(sequential_loop(sampler, denoiser, noise).sin().sum(), [noise, scale])
    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=denoiser, shape=(DIM,), noise=noise)
    window = max(1, round(window_fraction * steps))
    solution = fpsolve.solve(system, solver, tol=1e-13, window=window, differentiable=True, vjp_chunk=chunk)
    got = torch.autograd.grad(solution.trajectory.sin().sum(), [noise, scale])
    for g, w in zip(got, want, strict=True):
        assert relative_error(g, w) <= 1e-8
