"""ChunkedEvaluator: splitting the model call, halving on out-of-memory, bit-identical results."""

from __future__ import annotations

import pytest
import torch

import fpsolve
from fpsolve.driver import DriverConfig, run
from fpsolve.errors import InvalidOptionError
from fpsolve.evaluators import ChunkedEvaluator, forget_max_batches, known_max_batch
from fpsolve.initializers import NoiseCopy
from fpsolve.stopping import RMS

from .conftest import ALPHAS_CUMPROD, make_sampler


class RowwiseDenoiser:
    """Deterministic and elementwise, so every row's output is independent of the batch it is in;
    raises a simulated CUDA out-of-memory error above ``limit`` rows."""

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.batches: list[int] = []
        self.ooms = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.limit is not None and x.shape[0] > self.limit:
            self.ooms += 1
            raise torch.cuda.OutOfMemoryError(f"simulated: {x.shape[0]} rows > {self.limit}")
        self.batches.append(x.shape[0])
        abar = ALPHAS_CUMPROD.to(x.dtype)[t.long()].view(-1, *([1] * (x.dim() - 1)))
        return torch.sin(3 * x) * (1 - abar).sqrt() + 0.2 * x


def system_with(denoiser, steps=16, batch=3):
    return fpsolve.TriangularSystem(
        sampler=make_sampler("ddim", steps),
        denoiser=denoiser,
        shape=(2, 3),
        batch=batch,
        generator=torch.Generator().manual_seed(1),
    )


@pytest.fixture(autouse=True)
def fresh_limits():
    forget_max_batches()
    yield
    forget_max_batches()


def evaluate_window(system, evaluator, positions):
    states = system.flat_noise[positions]
    return evaluator(states, positions)


def test_fixed_chunks_are_bit_identical_to_one_call():
    plain = system_with(RowwiseDenoiser())
    positions = list(range(3, 13))
    reference = plain.evaluate(plain.flat_noise[positions], positions)
    denoiser = RowwiseDenoiser()
    chunked = ChunkedEvaluator(system_with(denoiser), max_batch=7)
    result = evaluate_window(chunked.system, chunked, positions)
    assert torch.equal(result, reference)
    # 30 rows of 3 samples: max_batch 7 rounds down to whole positions (2 positions, 6 rows)
    assert denoiser.batches == [6, 6, 6, 6, 6]
    assert result.dtype == torch.float64 and result.shape == (10, 3, 6)


def test_out_of_memory_halves_the_chunk_and_remembers_it():
    denoiser = RowwiseDenoiser(limit=10)
    system = system_with(denoiser)
    positions = list(range(0, 16))  # 48 rows
    reference = system_with(RowwiseDenoiser()).evaluate(system.flat_noise[positions], positions)
    evaluator = ChunkedEvaluator(system)
    result = evaluate_window(system, evaluator, positions)
    assert torch.equal(result, reference)
    assert evaluator.max_batch == 6 and evaluator.halvings == 3  # 48 -> 24 -> 12 -> 6
    assert known_max_batch(system) == 6
    ooms = denoiser.ooms
    evaluate_window(system, evaluator, positions)
    assert denoiser.ooms == ooms  # the size is remembered: no new failures
    again = ChunkedEvaluator(system)  # a later solve of the same denoiser starts small
    assert again.max_batch == 6
    assert ChunkedEvaluator(system, remember=False).max_batch is None


def test_a_single_row_that_does_not_fit_is_an_error():
    system = system_with(RowwiseDenoiser(limit=0))
    with pytest.raises(torch.OutOfMemoryError, match="single position"):
        evaluate_window(system, ChunkedEvaluator(system), [0, 1])


def test_other_errors_propagate_unchanged():
    def broken(x, t):
        raise RuntimeError("not a memory problem")

    system = system_with(broken)
    with pytest.raises(RuntimeError, match="not a memory problem"):
        evaluate_window(system, ChunkedEvaluator(system, max_batch=3), [0, 1])


def test_chunks_never_split_a_position():
    # Pipeline denoisers condition row r on prompt r % N: a chunk starting inside a position
    # would shift every later row's prompt. With N = 3, 15 rows and an out-of-memory limit of
    # 8 rows, plain halving would give chunks of 7 + 7 + 1; whole positions give 6 + 6 + 3.
    denoiser = RowwiseDenoiser(limit=8)
    system = system_with(denoiser)
    positions = list(range(0, 5))
    evaluate_window(system, ChunkedEvaluator(system, remember=False), positions)
    assert all(size % 3 == 0 for size in denoiser.batches)
    assert denoiser.batches == [6, 6, 3]


def test_bad_options():
    with pytest.raises(InvalidOptionError):
        ChunkedEvaluator(system_with(RowwiseDenoiser()), max_batch=0)
    with pytest.raises(InvalidOptionError, match="smaller than one position"):
        ChunkedEvaluator(system_with(RowwiseDenoiser()), max_batch=2)
    with pytest.raises(InvalidOptionError):
        ChunkedEvaluator("not a system")


@pytest.mark.parametrize("solver", ["taa", "sequential"])
def test_whole_solve_is_bit_identical_under_memory_pressure(solver):
    solver_obj = fpsolve.registry.resolve("solver", solver)
    plain = run(
        system_with(RowwiseDenoiser()),
        solver_obj,
        RMS(tol1=1e-8, tol2=1e-8),
        NoiseCopy(),
        DriverConfig(window=8),
    )
    tight = system_with(RowwiseDenoiser(limit=5))
    chunked = run(
        tight,
        solver_obj,
        RMS(tol1=1e-8, tol2=1e-8),
        NoiseCopy(),
        DriverConfig(window=8),
        evaluate=ChunkedEvaluator(tight),
    )
    assert torch.equal(chunked.trajectory, plain.trajectory)
    assert chunked.iterations == plain.iterations and chunked.converged
