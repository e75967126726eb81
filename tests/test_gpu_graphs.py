"""CUDAGraphDenoiser (pass-through on CPU; capture bookkeeping with a fake graph), timing, and the
half-precision model path (fp16/bf16 model inputs, fp32/fp64 solver state)."""

from __future__ import annotations

import warnings

import pytest
import torch

import fpsolve
from fpsolve.errors import InvalidOptionError
from fpsolve.gpu import CUDAGraphDenoiser, CUDAGraphWarning, DeviceTimer, TimedDenoiser
from fpsolve.gpu.graphs import _CapturedCall

from .conftest import ALPHAS_CUMPROD, make_sampler


def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Elementwise and deterministic; works in any floating dtype."""
    abar = ALPHAS_CUMPROD.to(x.device)[t.long()].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(2 * x) * (1 - abar).sqrt() + 0.1 * x


def system_with(denoiser, steps=10, dtype=torch.float64, model_dtype=None, batch=None):
    return fpsolve.TriangularSystem(
        sampler=make_sampler("ddim", steps),
        denoiser=denoiser,
        shape=(2, 4),
        batch=batch,
        generator=torch.Generator().manual_seed(3),
        dtype=dtype,
        model_dtype=model_dtype,
    )


# -- pass-through on a CPU -----------------------------------------------------------------------


def test_cpu_wrapper_is_a_transparent_pass_through():
    graphed = CUDAGraphDenoiser(eps_model, (2, 4), torch.float64, "cpu")
    assert not graphed.enabled and graphed.captured_sizes == ()
    x, t = torch.randn(5, 2, 4, dtype=torch.float64), torch.tensor([999, 500, 500, 10, 0])
    assert torch.equal(graphed(x, t), eps_model(x, t))
    assert graphed.captured_sizes == ()


@pytest.mark.parametrize("solver", ["sequential", "taa"])
def test_solve_with_the_wrapper_equals_the_plain_solve(solver):
    options = {} if solver == "sequential" else dict(window=4)  # the sequential loop takes no window
    plain = fpsolve.solve(system_with(eps_model), solver, **options)
    wrapped = fpsolve.solve(
        system_with(CUDAGraphDenoiser(eps_model, (2, 4), torch.float64, "cpu")), solver, **options
    )
    assert torch.equal(wrapped.trajectory, plain.trajectory)
    assert wrapped.iterations == plain.iterations


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_asking_for_cuda_without_cuda_warns_and_passes_through():
    with pytest.warns(CUDAGraphWarning, match="not available"):
        graphed = CUDAGraphDenoiser(eps_model, (2, 4), torch.float16, "cuda")
    assert not graphed.enabled


def test_bad_options():
    with pytest.raises(InvalidOptionError):
        CUDAGraphDenoiser("model", (2,), torch.float32, "cpu")
    with pytest.raises(InvalidOptionError):
        CUDAGraphDenoiser(eps_model, (2,), torch.float32, "cpu", warmup=0)
    with pytest.raises(InvalidOptionError):
        CUDAGraphDenoiser(eps_model, (2,), torch.float32, "cpu", batch_multiple=0)
    with pytest.raises(InvalidOptionError):
        CUDAGraphDenoiser(eps_model, (2,), "float32", "cpu")


# -- capture bookkeeping, with a fake graph (no CUDA needed) ------------------------------------------


class FakeGraph:
    """Replays "the captured call" by running the model on the static buffers in place."""

    def __init__(self, model, x, t, out):
        self.model, self.x, self.t, self.out, self.replays = model, x, t, out, 0

    def replay(self):
        self.replays += 1
        self.out.copy_(self.model(self.x, self.t))


def fake_capturing(monkeypatch, graphed, fail_with=None):
    """Turn ``graphed`` on (as if on CUDA) with a capture that builds a FakeGraph."""
    captures = []

    def capture(x, t, size):
        if fail_with is not None:
            raise fail_with
        static_x = torch.empty((size, *graphed.shape), dtype=graphed.dtype)
        static_t = torch.empty((size,), dtype=t.dtype)
        out = torch.empty_like(static_x)
        captures.append(size)
        return _CapturedCall(FakeGraph(graphed.denoiser, static_x, static_t, out), static_x, static_t, out)

    monkeypatch.setattr(graphed, "_enabled", True)
    monkeypatch.setattr(graphed, "_capture", capture)
    return captures


def test_one_capture_per_batch_size_then_replays(monkeypatch):
    graphed = CUDAGraphDenoiser(eps_model, (2, 4), torch.float64, "cpu")
    captures = fake_capturing(monkeypatch, graphed)
    for size in (3, 5, 3, 3, 5):
        x, t = torch.randn(size, 2, 4, dtype=torch.float64), torch.randint(0, 1000, (size,))
        out = graphed(x, t)
        assert torch.equal(out, eps_model(x, t))
    assert captures == [3, 5] and graphed.captured_sizes == (3, 5)
    held = graphed(x, t)
    graphed(torch.zeros_like(x), t)
    assert torch.equal(held, eps_model(x, t))  # results are copies, not the static output buffer


def test_batch_multiple_pads_and_trims(monkeypatch):
    graphed = CUDAGraphDenoiser(eps_model, (2, 4), torch.float64, "cpu", batch_multiple=4)
    captures = fake_capturing(monkeypatch, graphed)
    for size in (1, 3, 4, 5, 7):
        x, t = torch.randn(size, 2, 4, dtype=torch.float64), torch.randint(0, 1000, (size,))
        out = graphed(x, t)
        assert out.shape == x.shape and torch.equal(out, eps_model(x, t))
    assert captures == [4, 8]


def test_failed_capture_warns_once_and_stays_eager(monkeypatch):
    graphed = CUDAGraphDenoiser(eps_model, (2, 4), torch.float64, "cpu")
    fake_capturing(
        monkeypatch, graphed, fail_with=RuntimeError("operation not permitted when stream is capturing")
    )
    x, t = torch.randn(2, 2, 4, dtype=torch.float64), torch.tensor([10, 20])
    with pytest.warns(CUDAGraphWarning, match="capture failed"):
        out = graphed(x, t)
    assert torch.equal(out, eps_model(x, t))
    assert not graphed.enabled and "not permitted" in graphed.disabled_reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(graphed(x, t), eps_model(x, t))  # no second warning, no second try


def test_out_of_memory_during_capture_propagates(monkeypatch):
    graphed = CUDAGraphDenoiser(eps_model, (2, 4), torch.float64, "cpu")
    fake_capturing(monkeypatch, graphed, fail_with=torch.cuda.OutOfMemoryError("simulated"))
    with pytest.raises(torch.OutOfMemoryError):
        graphed(torch.randn(2, 2, 4, dtype=torch.float64), torch.tensor([10, 20]))
    assert graphed.disabled_reason is None  # still willing to capture a smaller batch


def test_mismatched_input_runs_eagerly_with_one_warning(monkeypatch):
    graphed = CUDAGraphDenoiser(eps_model, (2, 4), torch.float16, "cpu")
    captures = fake_capturing(monkeypatch, graphed)
    x, t = torch.randn(2, 2, 4, dtype=torch.float64), torch.tensor([10, 20])
    with pytest.warns(CUDAGraphWarning, match="calling eagerly"):
        assert torch.equal(graphed(x, t), eps_model(x, t))
    assert captures == []


# -- timing -----------------------------------------------------------------------------------------


def test_timed_denoiser_counts_calls_rows_and_time():
    timed = TimedDenoiser(eps_model, "cpu")
    system = system_with(timed)
    with DeviceTimer("cpu") as total:
        fpsolve.solve(system, "sequential")
    assert timed.calls == 10 and timed.rows == 10
    assert 0 < timed.seconds <= total.seconds
    timed.reset()
    assert timed.calls == 0 and timed.seconds == 0


# -- the half-precision model path ------------------------------------------------------------------


@pytest.mark.parametrize("model_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
def test_half_precision_model_inputs_with_full_precision_state(model_dtype, state_dtype):
    seen = []

    def model(x, t):
        seen.append(x.dtype)
        return eps_model(x, t)

    system = system_with(model, dtype=state_dtype, model_dtype=model_dtype, batch=2)
    positions = [0, 1, 2]
    out = system.evaluate(system.flat_noise[positions], positions)
    assert seen == [model_dtype] and out.dtype == state_dtype
    x, t = system.model_inputs(system.flat_noise[positions], positions)
    assert torch.equal(out.reshape(x.shape), eps_model(x, t).to(state_dtype))  # outputs cast back exactly

    reference = fpsolve.solve(system, "sequential")
    parallel = fpsolve.solve(system, "taa", tol=1e-6)
    assert parallel.converged and parallel.trajectory.dtype == state_dtype
    assert set(seen) == {model_dtype}
    assert (parallel.sample - reference.sample).abs().max() < 1e-4


def test_model_computing_in_fp32_and_returning_fp16():
    def model(x, t):
        assert x.dtype == torch.float16
        return eps_model(x.float(), t).to(x.dtype)

    system = system_with(model, dtype=torch.float32, model_dtype=torch.float16)
    solution = fpsolve.solve(system, "taa", tol=1e-6)
    reference = fpsolve.solve(system, "sequential")
    assert solution.converged and (solution.sample - reference.sample).abs().max() < 1e-4
