"""The GPU benchmark's report: ``gpu.json`` (every number) and ``gpu.md`` (the tables)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["fmt", "markdown", "write"]


def fmt(value: Any, scale: float = 1.0, digits: int = 3) -> str:
    """A number for the markdown table ('-' when absent)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        value *= scale
        return f"{value:.0f}" if abs(value) >= 10**digits else f"{value:.{digits}g}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown page."""
    meta = report["meta"]
    lines = [
        "# GPU wall clock: fpsolve against the tuned sequential loop",
        "",
        f"Measured on {meta['device']} ({meta['torch']}, diffusers {meta['diffusers']}), {meta['date']}, "
        f"{meta['seconds']:.0f} s. Command: `{meta['command']}`.",
        "",
        "Wall time: median over the runs after a warm-up (CUDA events around the whole solve). "
        "`outside` is the share of the wall time spent outside denoiser calls (each call timed with "
        "its own events). Speedups are against the sequential tight loop (no host synchronisation "
        "per step; with CUDA graphs where measured), the honest baseline. Rows whose method says "
        "(estimate) are random-weight models: iterations measured on the digits model at the same T "
        "and window x the measured cost of one iteration at that window (the first 3 iterations "
        "of a solve that cannot converge), so they are labelled estimates, not measured wall times.",
        "",
    ]
    for name, model in report["models"].items():
        lines += [
            f"## {name}",
            "",
            model["note"],
            "",
            "| method | mode | window | iterations | wall ms | ms / iteration | outside | peak GiB | "
            "speedup | note |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        base = model["baselines"].get("tight-cudagraph") or model["baselines"].get("tight-eager")
        for r in model["rows"]:
            speed = base / r["median_s"] if base and r.get("median_s") else None
            cells = [
                r["method"],
                r["mode"],
                fmt(r["window"]),
                f"{fmt(r.get('iterations'))} ({r.get('iterations_source', '')})",
                fmt(r.get("median_s"), 1e3),
                fmt(r.get("per_iteration_s"), 1e3),
                f"{fmt(r.get('outside_share'), 100, 2)}%",
                fmt(r.get("peak_gib")),
                f"{fmt(speed)}x",
                r.get("note", ""),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if model["skipped"]:
            lines += ["", "Skipped (budget): " + "; ".join(model["skipped"])]
        lines.append("")
    if report["latency"]:
        lines += ["## Latency of one denoiser call", "", "| model | mode | batch | ms |", "|---|---|---|---|"]
        lines += [
            f"| {r['model']} | {r['mode']} | {fmt(r['batch'])} | {fmt(r['ms'])} |" for r in report["latency"]
        ]
        lines.append("")
    if report["syncs"]:
        lines += [
            "## Host synchronisations",
            "",
            "| model | run | iterations | syncs | per iteration | top sources |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['run']} | {r['iterations']} | {r['syncs']} | {r['syncs_per_iteration']} | "
            f"{', '.join(f'{k} x{v}' for k, v in r['top'])} |"
            for r in report["syncs"]
        ]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path) -> None:
    """Write gpu.json and gpu.md (after every model, so a timeout keeps what was measured)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu.md").write_text(markdown(report))

