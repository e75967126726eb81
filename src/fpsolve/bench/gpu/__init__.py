"""The GPU wall-clock benchmark: fpsolve's parallel solve against the tuned sequential loop.

``benchmarks/gpu_bench.py`` is its command line; the parts live here, one job per module:

* :mod:`~fpsolve.bench.gpu.config`: what one run measures (:class:`Settings`) and its
  wall-clock :class:`Budget`;
* :mod:`~fpsolve.bench.gpu.models`: the models (digits UNet, SD 1.x UNet, DiT) with guidance;
* :mod:`~fpsolve.bench.gpu.timing`: the sequential baseline with no host synchronisation
  (:func:`tight_sequential`, the system's one sequential loop), synchronised medians, peak
  memory and the host-sync audit;
* :mod:`~fpsolve.bench.gpu.harness`: the measurements of each model and :func:`run_benchmark`;
* :mod:`~fpsolve.bench.gpu.report`: ``gpu.json`` and ``gpu.md``.

Needs the ``models`` extra (diffusers).
"""

from __future__ import annotations

from .config import TOL, Budget, Settings
from .harness import ModelBench, latency_rows, row, run_benchmark, windows_for
from .models import (
    GuidedDiT,
    GuidedUNet,
    ModelSpec,
    build_digits,
    build_dit,
    build_sd15,
    make_system,
    model_dtype,
    scaled_linear_alphas_cumprod,
)
from .report import fmt, markdown, write
from .timing import count_syncs, peak_gib, peak_reset, tight_sequential, timed

__all__ = [
    "TOL",
    "Settings",
    "Budget",
    "ModelSpec",
    "GuidedUNet",
    "GuidedDiT",
    "scaled_linear_alphas_cumprod",
    "build_digits",
    "build_sd15",
    "build_dit",
    "model_dtype",
    "make_system",
    "tight_sequential",
    "peak_reset",
    "peak_gib",
    "timed",
    "count_syncs",
    "windows_for",
    "latency_rows",
    "row",
    "ModelBench",
    "run_benchmark",
    "fmt",
    "markdown",
    "write",
]
