"""``solve(window="auto")`` and the latency cache (on CPU, with injected latency tables)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import fpsolve
from fpsolve.errors import InvalidOptionError
from fpsolve.gpu import (
    AutoWindowWarning,
    IterationModel,
    LatencyTable,
    forget_latencies,
    forget_observations,
    latency_table,
    measure_latency,
    remember_latency,
    resolve_auto_window,
)

from .conftest import ALPHAS_CUMPROD, make_sampler

STEPS = 16


class Model:
    """A cheap eps-model; a fresh instance per test keeps the caches apart."""

    def __call__(self, x, t):
        abar = ALPHAS_CUMPROD.to(x.dtype)[t.long()].view(-1, *([1] * (x.dim() - 1)))
        return torch.tanh(2 * x) * (1 - abar).sqrt() + 0.1 * x


def system_with(model, batch=None):
    return fpsolve.TriangularSystem(
        sampler=make_sampler("ddim", STEPS),
        denoiser=model,
        shape=(3,),
        batch=batch,
        generator=torch.Generator().manual_seed(5),
    )


@pytest.fixture(autouse=True)
def clean_caches(monkeypatch):
    monkeypatch.delenv("FPSOLVE_LATENCY_CACHE", raising=False)
    forget_latencies()
    forget_observations()
    yield
    forget_latencies()
    forget_observations()


def flat(rows=2048, seconds=1e-3):
    return {b: seconds for b in (1, rows)}


def linear(rows=2048, seconds=1e-3):
    return {1: seconds, rows: seconds * rows}


def test_flat_latency_solves_in_parallel_and_records_the_window():
    model = Model()
    system = system_with(model)
    remember_latency(model, system.shape, system.input_dtype, system.device, flat())
    solution = fpsolve.solve(system, "taa", window="auto", tol=1e-4)
    reference = fpsolve.solve(system, "sequential")
    assert solution.plan is not None and not solution.plan.use_sequential
    assert solution.window == solution.plan.window == STEPS
    assert solution.converged and solution.iterations < STEPS
    assert torch.allclose(solution.sample, reference.sample, atol=1e-4)


def test_linear_latency_falls_back_to_sequential_with_a_warning():
    model = Model()
    system = system_with(model)
    remember_latency(model, system.shape, system.input_dtype, system.device, linear())
    with pytest.warns(AutoWindowWarning, match="no window is predicted to beat sequential"):
        solution = fpsolve.solve(system, "taa", window="auto")
    assert solution.plan.use_sequential and solution.window is None
    assert solution.iterations == STEPS and solution.message == "sequential sampling completed"
    assert torch.equal(solution.sample, fpsolve.solve(system, "sequential").sample)


@pytest.mark.filterwarnings("ignore::fpsolve.gpu.AutoWindowWarning")
def test_observed_iterations_refine_the_next_plan():
    model = Model()
    system = system_with(model)
    remember_latency(model, system.shape, system.input_dtype, system.device, flat())
    first = fpsolve.solve(system, "taa", window="auto", tol=1e-3)
    # (The observer also measured this CPU's time per iteration outside the fake model latency,
    # which may make sequential look better now: the warning is filtered above.)
    plan = resolve_auto_window(
        system, fpsolve.registry.resolve("solver", "taa"), fpsolve.stopping.RMS(tol1=1e-3, tol2=1e-3)
    ).plan
    assert plan.iterations == pytest.approx(first.iterations)  # the observation replaced the prior
    other_rule = resolve_auto_window(
        system, fpsolve.registry.resolve("solver", "taa"), fpsolve.stopping.RMS(tol1=1e-6, tol2=1e-6)
    ).plan
    assert other_rule.iterations == pytest.approx(
        IterationModel.prior(STEPS)(other_rule.window)
    )  # not the same problem


def test_auto_measures_when_nothing_is_cached():
    model = Model()
    system = system_with(model, batch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutoWindowWarning)  # which way it goes depends on this CPU
        solution = fpsolve.solve(system, "taa", window="auto")
    table = latency_table(
        model, shape=system.shape, dtype=system.input_dtype, device=system.device, batches=[2], timesteps=[0]
    )
    assert set(table.seconds) == {2 * w for w in (1, 2, 4, 8, 16)}
    assert solution.converged and solution.plan is not None


def test_window_validation_and_distributed():
    system = system_with(Model())
    with pytest.raises(InvalidOptionError, match="'auto'"):
        fpsolve.solve(system, "taa", window="fast")
    with pytest.raises(InvalidOptionError, match="one device"):
        resolve_auto_window(system, fpsolve.registry.resolve("solver", "taa"), distributed=True)


def test_sequential_solver_ignores_auto():
    model = Model()
    system = system_with(model)
    remember_latency(model, system.shape, system.input_dtype, system.device, flat())
    solution = fpsolve.solve(system, "sequential", window="auto")
    assert solution.window is None and solution.iterations == STEPS


def test_fixed_windows_are_recorded_too():
    system = system_with(Model())
    assert fpsolve.solve(system, "taa", window=5).window == 5
    assert fpsolve.solve(system, "taa").window == STEPS
    assert fpsolve.solve(system, "taa", window=100).window == STEPS


# -- the latency cache ----------------------------------------------------------------------------


class Counting(torch.nn.Module):
    """A module (so it has an on-disk cache key) that counts its calls."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return x * self.scale


def test_measure_latency_reports_every_size():
    table = measure_latency(
        Counting(),
        shape=(3,),
        dtype=torch.float32,
        device="cpu",
        batches=[4, 1, 2],
        timesteps=[10, 20],
        repeats=2,
        warmup=1,
    )
    assert list(table.seconds) == [1, 2, 4] and all(s > 0 for s in table.seconds.values())
    assert table.max_batch is None and table.device == "cpu"


def test_measure_latency_stops_at_out_of_memory():
    def model(x, t):
        if x.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("simulated")
        return x

    table = measure_latency(
        model,
        shape=(2,),
        dtype=torch.float32,
        device="cpu",
        batches=[1, 2, 4, 8],
        timesteps=[0],
        repeats=1,
        warmup=0,
    )
    assert list(table.seconds) == [1, 2] and table.max_batch == 2


def test_latency_is_measured_once_per_process_and_merged():
    model = Counting()
    args = dict(shape=(3,), dtype=torch.float32, device="cpu", timesteps=[0])
    latency_table(model, batches=[1, 2], **args)
    calls = model.calls
    latency_table(model, batches=[1, 2], **args)
    assert model.calls == calls
    table = latency_table(model, batches=[1, 2, 4], **args)
    assert list(table.seconds) == [1, 2, 4] and model.calls > calls


def test_disk_cache_round_trip(tmp_path, monkeypatch):
    path = tmp_path / "latency.json"
    monkeypatch.setenv("FPSOLVE_LATENCY_CACHE", str(path))
    model = Counting()
    args = dict(shape=(3,), dtype=torch.float32, device="cpu", timesteps=[0], batches=[1, 2])
    first = latency_table(model, **args)
    stored = json.loads(path.read_text())
    assert len(stored) == 1 and "Counting:1" in next(iter(stored))
    forget_latencies()
    calls = model.calls
    second = latency_table(model, **args)  # read back from the file: nothing measured
    assert model.calls == calls and second.seconds == first.seconds
    path.write_text("{not json")
    forget_latencies()
    assert latency_table(model, **args).seconds  # a damaged cache is ignored, not fatal


def test_functions_without_a_key_stay_out_of_the_disk_cache(tmp_path):
    path = tmp_path / "latency.json"
    latency_table(
        Model(), shape=(3,), dtype=torch.float32, device="cpu", timesteps=[0], batches=[1], cache_path=path
    )
    assert not path.exists()


def test_latency_table_validation():
    with pytest.raises(InvalidOptionError):
        LatencyTable({})
    with pytest.raises(InvalidOptionError):
        LatencyTable({0: 1.0})
    merged = LatencyTable({1: 1.0}, 8, "x").merged(LatencyTable({2: 2.0}, 4, "y"))
    assert merged.seconds == {1: 1.0, 2: 2.0} and merged.max_batch == 4
    assert LatencyTable.from_json(merged.to_json()) == merged


def test_per_denoiser_memory_is_by_identity_and_dropped_with_the_denoiser():
    import gc

    from fpsolve._identity import PerDenoiser

    store = PerDenoiser()
    first, second = Model(), Model()
    store.slot(first)["seen"] = 1
    assert store.slot(second) == {} and store.slot(first) == {"seen": 1}
    del first
    gc.collect()
    assert len(store._entries) == 1  # the collected denoiser's entry is gone
    store.slot(7)["seen"] = 2  # not weakly referenceable: kept alive by the store
    assert store.slot(7) == {"seen": 2}
