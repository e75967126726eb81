"""The solver reproduces ParaDiGMS' loop, transcribed here from its algorithm (no diffusers needed).

The transcription below follows the diffusers pipeline's loop statement by statement, on the
system's own one-step coefficients (DDIM or DDPM, any timesteps): window ``[begin, end)`` of
model calls, Picard update by cumulative sums of drifts and pre-drawn noise, error scaled by the
variance of the step leaving each state (0 appended for ``x_0``), slide by ``1 + ind``, and new
window entries initialised with the last state of the previous window.
"""

from __future__ import annotations

import torch
from fpsolve_paradigms import ParadigmsOriginal
from hypothesis import given
from hypothesis import strategies as st

import fpsolve
from fpsolve.testing import strategies as fst


def paradigms_loop(system: fpsolve.TriangularSystem, parallel: int, tolerance: float):
    """ParaDiGMS' loop. Returns (iterations, model evaluations, trajectory [T+1, N, D])."""
    form = system.affine_form  # one-step samplers: state[:, 0], output[:, 0], noise
    steps, samples, size = system.num_steps, system.num_samples, system.state_size
    noise = system.flat_noise
    buffer = noise[0].expand(steps + 1, samples, size).clone()
    noise_array = form.noise[1:, None, None] * noise[1:]  # noise_array[j]: the noise of the step leaving j
    variances = torch.cat([system.sampler.step_variances()[1:], torch.zeros(1, dtype=torch.float64)])
    inverse_variance_norm = (1.0 / variances)[:, None] / size
    timesteps = torch.tensor(system.sampler.timesteps)
    parallel = min(parallel, steps)
    begin, end, iterations, evaluations = 0, parallel, 0, 0
    while begin < steps:
        block = buffer[begin:end]
        eps = system.evaluate(block, list(range(begin, end)))
        evaluations += (end - begin) * samples
        denoised = (
            form.state[begin + 1 : end + 1, 0, None, None] * block
            + form.output[begin + 1 : end + 1, 0, None, None] * eps
        )
        new = (
            buffer[begin][None] + torch.cumsum(denoised - block, 0) + torch.cumsum(noise_array[begin:end], 0)
        )
        error = (new - buffer[begin + 1 : end + 1]).pow(2).sum(-1) * inverse_variance_norm[
            begin + 1 : end + 1
        ]
        error = torch.nn.functional.pad(error, (0, 0, 0, 1), value=1e9)
        ind = int(torch.argmax((error > tolerance**2).max(dim=1).values.int()))
        new_begin = begin + min(1 + ind, parallel)
        new_end = min(new_begin + parallel, steps)
        buffer[begin + 1 : end + 1] = new
        buffer[end : new_end + 1] = buffer[end][None]
        iterations += 1
        begin, end = new_begin, new_end
    assert timesteps.numel() == steps
    return iterations, evaluations, buffer


@given(system=fst.systems(kinds=("ddim", "ddpm"), min_steps=2, max_steps=24, max_dim=5), data=st.data())
def test_the_solver_is_the_paradigms_loop(system, data):
    parallel = data.draw(st.integers(1, system.num_steps), label="parallel")
    tolerance = data.draw(st.sampled_from([0.3, 0.1, 0.02]), label="tolerance")
    iterations, evaluations, trajectory = paradigms_loop(system, parallel, tolerance)
    solution = fpsolve.solve(system, "paradigms", window=parallel, stopping=ParadigmsOriginal(tol=tolerance))
    assert solution.converged
    assert (solution.iterations, solution.model_evals) == (iterations, evaluations)
    expected = system.unflatten(trajectory)
    torch.testing.assert_close(solution.trajectory, expected, rtol=0, atol=1e-10 * (1 + expected.abs().max()))


@given(system=fst.systems(min_steps=2, max_steps=12))
def test_a_tight_tolerance_reproduces_the_sequential_sample(system):
    reference = fpsolve.solve(system, "sequential")
    solution = fpsolve.solve(system, "paradigms", window=5, stopping=ParadigmsOriginal(tol=1e-9))
    assert solution.iterations <= system.num_steps
    torch.testing.assert_close(solution.sample, reference.sample, rtol=0, atol=1e-8)
