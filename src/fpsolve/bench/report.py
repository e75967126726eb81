"""Presenting a :class:`~fpsolve.bench.runner.BenchResult`: rich tables in the terminal,
``bench.json`` (every number, per seed) and ``index.md`` (tables + the embedded plots)."""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..cli_output import write_text_atomic
from .matrix import BenchPlan
from .runner import BenchResult, CellResult

__all__ = [
    "SCHEMA",
    "COLUMNS",
    "IMAGE_COLUMNS",
    "cell_row",
    "headline_rows",
    "to_json",
    "write_json",
    "write_markdown",
    "print_tables",
    "cpu_name",
]

#: Identifies the layout of ``bench.json``; bump it when fields change meaning.
SCHEMA = "fpsolve-bench/1"

#: Columns of the per-sampler tables.
COLUMNS = (
    "solver",
    "stopping",
    "iterations",
    "T / iter",
    "evals / sample",
    "wall s",
    "RMS err",
    "max px err",
    "PSNR dB",
    "converged",
)
#: Columns that only image models fill.
IMAGE_COLUMNS = ("max px err", "PSNR dB")


def cpu_name() -> str:
    """The processor's model name for a report's machine line (``/proc/cpuinfo``'s "model name"
    where there is one, else what :mod:`platform` says)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu


def _iterations(result: CellResult) -> str:
    values = [r.iterations for r in result.records]
    spread = f" [{min(values)}-{max(values)}]" if min(values) != max(values) else ""
    return f"{result.iterations:g}{spread}"


def _psnr(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.1f}"


def cell_row(result: CellResult) -> list[str]:
    """The table row of one cell (strings, in :data:`COLUMNS` order)."""
    converged = sum(r.converged for r in result.records)
    return [
        result.cell.solver.label,
        result.cell.tol_label,
        _iterations(result),
        f"{result.cell.sampler.steps / result.iterations:.1f}x",
        f"{result.evals_per_sample:g}",
        f"{result.wall_time:.2f}",
        f"{result.rms:.1e}",
        "-" if result.max_abs_pixels is None else f"{result.max_abs_pixels:g}",
        _psnr(result.psnr_db),
        f"{converged}/{len(result.records)}",
    ]


def headline_rows(result: BenchResult, model: str) -> list[list[str]]:
    """Per sampler: ``solve()``'s default (``newton default``) and ``taa default`` against ``fp k=T``
    (first tolerance) and the ParaDiGMS rule,
    as "iterations (error)", the error being the max pixel difference (or the RMS without images)."""
    tol = result.plan.tolerances[0] if result.plan.tolerances else None

    def brief(cell: CellResult | None) -> str:
        if cell is None:
            return "-"
        error = f"{cell.max_abs_pixels:g} px" if cell.max_abs_pixels is not None else f"RMS {cell.rms:.0e}"
        return f"{cell.iterations:g} ({error}){'' if cell.converged else '*'}"

    rows = []
    for spec in result.plan.samplers_for(model):
        rows.append(
            [
                spec.label,
                str(spec.steps),
                brief(result.cell(model, spec.key, "newton-default")),
                brief(result.cell(model, spec.key, "taa-default")),
                brief(result.cell(model, spec.key, "fp-kT", tol)),
                brief(result.cell(model, spec.key, "fp-paradigms")),
            ]
        )
    return rows


def _plan_dict(plan: BenchPlan) -> dict[str, Any]:
    curve = None
    if plan.curve is not None:
        curve = {
            "samplers": list(plan.curve.samplers),
            "solvers": list(plan.curve.solvers),
            "max_iters": plan.curve.max_iters,
            "tiny": plan.curve.tiny,
        }
    return {
        "models": list(plan.models),
        "samplers": [s.key for s in plan.samplers],
        "solvers": [s.key for s in plan.solvers],
        "tolerances": list(plan.tolerances),
        "seeds": plan.seeds,
        "samples": plan.samples,
        "curve": curve,
        "heatmap": list(plan.heatmap) if plan.heatmap else None,
        "quick": plan.quick,
    }


def to_json(result: BenchResult, plots: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """The whole result as JSON-ready data (see :data:`SCHEMA`); ``plots``: file names per model."""
    return {
        "schema": SCHEMA,
        "meta": dict(result.meta),
        "plan": _plan_dict(result.plan),
        "cells": [c.to_dict() for c in result.cells],
        "curves": [c.to_dict() for c in result.curves],
        "heatmaps": [h.to_dict() for h in result.heatmaps],
        "plots": {k: list(v) for k, v in (plots or {}).items()},
    }


def write_json(
    result: BenchResult, path: str | Path, plots: Mapping[str, Sequence[str]] | None = None
) -> Path:
    """Write :func:`to_json` to ``path`` (strict JSON: no NaN or infinity)."""
    return write_text_atomic(Path(path), json.dumps(to_json(result, plots), indent=1, allow_nan=False) + "\n")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def write_markdown(
    result: BenchResult, path: str | Path, plots: Mapping[str, Sequence[str]], command: str
) -> Path:
    """Write the report page: how it was made, the headline, the plots, per-sampler tables, and
    links to the other ``*.md`` reports already in the folder."""
    plan, meta = result.plan, result.meta
    # What each "default" cell resolved to in this run (the library's defaults may change).
    resolved: dict[str, set[str]] = {}
    for cell in (c for c in result.cells if c.cell.solver.stopping == "default"):
        resolved.setdefault(cell.cell.solver.label, set()).update(r.solver for r in cell.records)
    defaults = "; ".join(f"`{label}` = `{'`, `'.join(sorted(r))}`" for label, r in resolved.items())
    lines = [
        "# Benchmark: parallel sampling against the sequential sampler",
        "",
        f"Generated by `{command}` in {meta.get('seconds', '?')} s on {meta.get('machine', 'unknown')}, "
        f"{meta.get('date', '')}{' (QUICK plan: a reduced matrix)' if plan.quick else ''}. "
        "Every number, per seed, is in [`bench.json`](bench.json).",
        "",
        f"- Each cell solves a batch of {plan.samples} sample(s) on each of {plan.seeds} seed(s) (a seed "
        "draws x_T and every step's noise) from the same noise as the sequential sampler, window = T.",
        "- **iterations**: parallel iterations (rounds of one batched model call), median over seeds, "
        "[min-max] when seeds differ; **T / iter**: the reduction in sequential model calls.",
        "- **evals / sample**: model evaluations per sample (sequential: T); **wall s**: median seconds "
        "for the whole batch. A parallel solve makes more evaluations in total, so on a CPU it is not "
        "faster in wall time: the gain needs hardware that evaluates the window in parallel.",
        "- **Errors** to the sequential sample, worst seed: RMS in model space; for image models the max "
        "pixel difference on [0, 255] and the PSNR of the 8-bit images (inf: identical).",
        "- Solvers: `fp k=1` / `fp k=T` fixed-point iteration on the order-1 / order-T equations; `aa` "
        "standard Anderson; `taa m=...` triangular Anderson with history m, order T; these use the RMS rule "
        "(tol1 = tol2 = tol) at each tolerance (`fp k=1`, the slowest, at the first only). "
        "`fp k=T + paradigms` is ParaDiGMS' rule at tol 0.1. Stopping `default`: "
        "`fpsolve.solve(system, name)` with no options at all, so the library's default solver "
        "options and stopping rule" + (f" (in this run: {defaults})." if defaults else ".")
        + " Stopping `x0`: the `x0` rule at its defaults (stop once the output x_0 moved by at most "
        "1.5e-2 in an iteration; rows at RMS 2e-5): `newton secant only` is newton before issue 14, "
        "`newton prior only` takes the slope 1/sigma without secants, `newton_diag` a per-element "
        "secant; `taa + x0 rule` and `fp k=T + x0 rule` compare the solvers at the same rule.",
        "- Plots: iterations against T; the error after n parallel iterations (`max_iters=n` with "
        "`RMS(1e-10)`, seed 0); the per-position residual of one solve by iteration.",
        "",
    ]
    for model in plan.models:
        lines += [
            f"## {model}",
            "",
            "Headline: iterations (max error to sequential); `*` = not converged on every seed.",
            "",
        ]
        tol = plan.tolerances[0] if plan.tolerances else None
        lines += _md_table(
            [
                "sampler",
                "T",
                "newton default (solve's default)",
                "taa default",
                f"fp k=T, tol {tol:g}" if tol else "fp k=T",
                "fp k=T + paradigms",
            ],
            headline_rows(result, model),
        )
        lines.append("")
        for name in plots.get(model, ()):
            lines += [f"![{name}]({name})", ""]
        for spec in plan.samplers_for(model):
            rows = [cell_row(c) for c in result.cells if c.cell.model == model and c.cell.sampler == spec]
            lines += [f"### {model} {spec.label}", ""] + _md_table(COLUMNS, rows) + [""]
    path = Path(path)
    # Other reports written into the same folder (by other scripts) are reached from this page.
    others = sorted(p for p in path.parent.glob("*.md") if p.name != path.name)
    if others:
        lines += ["## Other reports in this folder", ""] + [f"- [{p.stem}]({p.name})" for p in others] + [""]
    return write_text_atomic(path, "\n".join(lines))


def print_tables(result: BenchResult, console: Any) -> None:
    """Print one rich table per model and sampler, then the headline, to a rich ``console``."""
    from rich.table import Table

    for model in result.plan.models:
        images = any(c.max_abs_pixels is not None for c in result.cells if c.cell.model == model)
        keep = [i for i, column in enumerate(COLUMNS) if images or column not in IMAGE_COLUMNS]
        for spec in result.plan.samplers_for(model):
            table = Table(title=f"{model} {spec.label}", title_justify="left")
            for index in keep:
                table.add_column(COLUMNS[index], justify="left" if index < 2 else "right", no_wrap=index < 2)
            for cell in (c for c in result.cells if c.cell.model == model and c.cell.sampler == spec):
                row = cell_row(cell)
                table.add_row(*(row[i] for i in keep), style=None if cell.converged else "red")
            console.print(table)
        headline = Table(title=f"{model}: the defaults vs fp k=T and the paradigms rule",
                         title_justify="left")
        for column in ("sampler", "T", "newton default", "taa default", "fp k=T", "fp k=T + paradigms"):
            headline.add_column(column)
        for row in headline_rows(result, model):
            headline.add_row(*row)
        console.print(headline)
