"""Running a benchmark plan one (model, sampler) slice at a time, saving every number after each.

``fpsolve bench`` (:mod:`fpsolve.cli.bench`) runs its plan through :func:`run_progressively`, so
an interrupted run keeps what it measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch

from . import runner  # called through the module: tests replace runner.run_plan
from .matrix import BenchPlan
from .report import write_json
from .runner import BenchResult, Reporter

__all__ = ["merge_results", "run_progressively"]


def merge_results(plan: BenchPlan, parts: list[Any]) -> Any:
    """One :class:`~fpsolve.bench.runner.BenchResult` of ``plan`` from the results of its parts
    (each a (model, sampler) slice of it, in the plan's order)."""
    return BenchResult(
        plan,
        tuple(c for part in parts for c in part.cells),
        tuple(c for part in parts for c in part.curves),
        tuple(h for part in parts for h in part.heatmaps),
        {
            "seconds": round(sum(part.meta.get("seconds", 0.0) for part in parts), 1),
            "device": parts[0].meta.get("device") if parts else "",
        },
    )


def run_progressively(
    plan: BenchPlan, device: torch.device, reporter: Reporter, models: dict[str, Any], json_path: Path
) -> Any:
    """Run ``plan`` one (model, sampler) slice at a time, rewriting ``json_path`` (atomically)
    after each with every finished number, so an interrupted run keeps what it measured.

    A slice runs exactly what the whole plan runs for it (cells, the curves and the heatmap of
    its sampler, in the same order, from the same seeds); the returned result equals a run of
    the whole plan. The partial files say so in ``meta.partial``.
    """

    slices = [(model, spec) for model in plan.models for spec in plan.samplers_for(model)]  # fitting pairs
    parts = []
    for done, (model, spec) in enumerate(slices, start=1):
        part_plan = attrs.evolve(plan, models=[model], samplers=[spec])
        parts.append(runner.run_plan(part_plan, device, reporter, models=models))
        if done < len(slices):
            partial = merge_results(plan, parts)
            partial.meta["partial"] = f"{done} of {len(slices)} (model, sampler) groups finished"
            write_json(partial, json_path)
    return merge_results(plan, parts)
