"""``fpsolve bench``: models x samplers x solvers x tolerances, against the sequential sample.

Modules, one job each:

* :mod:`~fpsolve.bench.matrix`: what is measured (frozen cell definitions, the full and quick plans);
* :mod:`~fpsolve.bench.metrics`: the error of a sample to the sequential one;
* :mod:`~fpsolve.bench.runner`: runs the plan's cells over the seeds;
* :mod:`~fpsolve.bench.progressive`: runs a plan slice by slice, saving every number after each;
* :mod:`~fpsolve.bench.curves`: error to sequential against an iteration cap;
* :mod:`~fpsolve.bench.report`: terminal tables, ``bench.json`` and ``index.md``;
* :mod:`~fpsolve.bench.plots`: the matplotlib figures (Agg backend);
* :mod:`~fpsolve.bench.prediction`: GPU wall times predicted from measured latency tables;
* :mod:`~fpsolve.bench.gpu`: the GPU benchmark's models, sequential baseline and timing
  (``benchmarks/gpu_bench.py``).

The ``fpsolve bench`` command is :mod:`fpsolve.cli.bench`.

Needs the ``bench`` extra (matplotlib, rich) and, for the digits model, the ``models`` extra.
"""

from __future__ import annotations

from .matrix import BenchPlan, Cell, CurvePlan, SamplerSpec, SolverSpec, full_plan, quick_plan
from .metrics import ErrorMetrics, compare_samples

__all__ = [
    "BenchPlan",
    "Cell",
    "CurvePlan",
    "SamplerSpec",
    "SolverSpec",
    "full_plan",
    "quick_plan",
    "ErrorMetrics",
    "compare_samples",
]
