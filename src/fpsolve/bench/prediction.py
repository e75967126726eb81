"""What a parallel solve would take on a GPU, predicted from latency tables measured there.

``fpsolve demo`` prints these predictions next to the CPU times it measures: on a CPU a batch of
B rows costs about B times one row, so only a GPU's latency curve shows what the parallel solve
gains. The shipped table (:data:`LATENCY_TABLE`) was measured on one NVIDIA H200.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..gpu.planner import latency_curve, predicted_parallel_seconds

__all__ = ["LATENCY_TABLE", "predict_gpu"]

#: Denoiser latency by batch size measured on one NVIDIA H200 (see its ``source`` field).
LATENCY_TABLE = Path(__file__).resolve().parents[1] / "data" / "h200_latency.json"


def predict_gpu(
    num_steps: int, samples: int, iterations: int, parameters: int | None, table: Path = LATENCY_TABLE
) -> list[dict[str, Any]]:
    """Predicted wall times of the sequential loop and of a full-window parallel solve on the GPU
    of ``table``, for the measured model closest in size to ``parameters`` (the smallest if None).

    Sequential: ``T * t(N)``; parallel: ``iterations`` calls over the unfinished positions of the
    window (:func:`fpsolve.gpu.planner.predicted_parallel_seconds`). One entry per measured mode
    (``eager``, ``cudagraph``) with ``sequential_s``, ``parallel_s``, ``ratio`` (sequential /
    parallel) and the model's name and size.
    """
    data = json.loads(Path(table).read_text())
    models = data["models"]
    size_m = (parameters or 0) / 1e6
    name = min(models, key=lambda m: abs(np.log(models[m]["params_m"] / max(size_m, 1e-3))))
    found = []
    for mode in ("eager", "cudagraph"):
        points = {int(b): ms / 1e3 for b, ms in models[name][mode].items()}
        curve = latency_curve(points)
        sequential = num_steps * curve(samples)
        parallel = predicted_parallel_seconds(curve, num_steps, samples, num_steps, iterations)
        found.append(
            dict(
                mode=mode,
                model=name,
                params_m=models[name]["params_m"],
                device=data["device"],
                sequential_s=sequential,
                parallel_s=parallel,
                ratio=sequential / parallel,
            )
        )
    return found
