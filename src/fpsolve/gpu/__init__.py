"""GPU execution: CUDA graphs, memory-safe chunking, latency measurement and window planning.

* :class:`CUDAGraphDenoiser`: one captured CUDA graph per batch size (pass-through on a CPU);
* :class:`ChunkedEvaluator`: the iteration's model call split into chunks that fit, halving on
  out-of-memory (``fpsolve.solve`` uses it automatically on CUDA); defined in
  :mod:`fpsolve.evaluators`, re-exported here;
* :func:`measure_latency` / :func:`latency_table`: ``t(B)`` of a denoiser on its device, cached;
* :func:`plan_window` / :class:`Plan`: the window with the smallest predicted wall time, or
  sequential (pure: unit-testable with synthetic latency curves);
* :class:`IterationModel`: iterations against window, a prior refined by observed solves;
* ``fpsolve.solve(..., window="auto")`` ties these together: :class:`AutoWindow`, the ``"auto"``
  controller this package registers (:mod:`fpsolve.gpu.auto`).

Nothing here needs a GPU to import or to run: CUDA code runs only behind device checks.
"""

from __future__ import annotations

from ..evaluators import ChunkedEvaluator, forget_max_batches, known_max_batch
from .auto import AutoChoice, AutoWindow, AutoWindowWarning, forget_observations, resolve_auto_window
from .graphs import CUDAGraphDenoiser, CUDAGraphWarning
from .iterations import IterationModel, fit_plateau, prior_plateau
from .latency import (
    LatencyTable,
    denoiser_cache_key,
    forget_latencies,
    latency_table,
    measure_latency,
    remember_latency,
)
from .planner import Plan, candidate_windows, latency_curve, plan_window, predicted_parallel_seconds
from .timing import DeviceTimer, TimedDenoiser, synchronize

__all__ = [
    "CUDAGraphDenoiser",
    "CUDAGraphWarning",
    "ChunkedEvaluator",
    "known_max_batch",
    "forget_max_batches",
    "LatencyTable",
    "measure_latency",
    "latency_table",
    "remember_latency",
    "forget_latencies",
    "denoiser_cache_key",
    "Plan",
    "plan_window",
    "latency_curve",
    "candidate_windows",
    "predicted_parallel_seconds",
    "IterationModel",
    "prior_plateau",
    "fit_plateau",
    "AutoChoice",
    "AutoWindow",
    "AutoWindowWarning",
    "resolve_auto_window",
    "forget_observations",
    "DeviceTimer",
    "TimedDenoiser",
    "synchronize",
]
