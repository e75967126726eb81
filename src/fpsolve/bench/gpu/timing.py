"""Timing on a device: the sequential baseline with no host synchronisation, medians of
synchronised runs with the time inside denoiser calls, peak memory and a host-sync audit."""

from __future__ import annotations

import collections
import statistics
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ...gpu import DeviceTimer, TimedDenoiser
from ...system import TriangularSystem
from .config import Settings

__all__ = ["tight_sequential", "peak_reset", "peak_gib", "timed", "count_syncs"]


def tight_sequential(system: TriangularSystem) -> torch.Tensor:
    """The sequential baseline at its fastest: the system's one sequential loop
    (:meth:`~fpsolve.TriangularSystem.sequential`) with the bare denoiser (no output validation)
    and no finiteness check, so no step waits for the host; returns the trajectory
    ``[T+1, *batch, *shape]``. With CUDA graphs behind ``system.denoiser`` this is the honest
    baseline a parallel solve must beat."""

    def bare(states: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        x, t = system.model_inputs(states, positions)
        with torch.no_grad():
            out = system.denoiser(x, t)
        return out.reshape(states.shape[0], system.num_samples, system.state_size)

    return system.unflatten(system.sequential(bare, check_finite=False).states)


def peak_reset(device: torch.device) -> None:
    """Start a peak-memory measurement."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated memory since :func:`peak_reset`, GiB (None off CUDA)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def timed(
    run: Callable[[], Any], timer: TimedDenoiser, settings: Settings, warmup: int | None = None
) -> dict[str, Any]:
    """Median wall time of ``run`` over ``settings.runs`` runs after ``warmup`` runs (default
    ``settings.warmup``), with the time spent inside denoiser calls, and peak memory."""
    result = None
    for _ in range(settings.warmup if warmup is None else warmup):
        result = run()
    walls, inside = [], []
    peak_reset(settings.device)
    for _ in range(settings.runs):
        timer.reset()
        with DeviceTimer(settings.device) as clock:
            result = run()
        walls.append(clock.seconds)
        inside.append(timer.seconds)
    median = statistics.median(walls)
    model = statistics.median(inside)
    return {
        "median_s": median,
        "min_s": min(walls),
        "max_s": max(walls),
        "runs": len(walls),
        "model_s": model,
        "outside_share": max(0.0, 1 - model / median),
        "calls": timer.calls,
        "peak_gib": peak_gib(settings.device),
        "result": result,
    }


def count_syncs(run: Callable[[], Any], device: torch.device) -> dict[str, Any] | None:
    """Host synchronisations during ``run`` (CUDA sync debug mode), with their top source lines."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return {"syncs": len(syncs), "top": where.most_common(6), "result": result}

