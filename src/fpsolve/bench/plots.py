"""The benchmark's figures, drawn with matplotlib's object API on the Agg canvas.

``matplotlib.figure.Figure`` is used without ``pyplot``: no global figure state and no GUI
backend, so plotting works headless and never changes the caller's backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator, MaxNLocator, NullFormatter

from ..api import resolve_method, resolve_stopping
from ..cli_output import atomic_write
from ..stopping import X0Change, X0Forecast
from .curves import CapCurve
from .matrix import SolverSpec
from .metrics import ToImages
from .runner import BenchResult

__all__ = [
    "plot_iterations_vs_steps",
    "plot_error_vs_cap",
    "plot_residual_heatmap",
    "draw_residual_heatmap",
    "stopping_text",
    "iterations_figure",
    "error_vs_cap_figure",
    "save_comparison_figure",
]

_DPI = 110
#: One marker per solver, so solvers with identical numbers stay distinguishable.
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")


def _save(fig: Figure, path: str | Path, dpi: int = _DPI) -> Path:
    """Save atomically (a temporary file renamed into place): a reader never sees half a PNG."""
    path = Path(path)
    with atomic_write(path) as temporary:
        fig.savefig(temporary, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path


def _legend_outside(fig: Figure, handles: Sequence[Any], labels: Sequence[str]) -> None:
    """One legend below the panels, so it never hides a line or the title; only drawn series."""
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), fontsize=8)


def stopping_text(solver: SolverSpec, tol: float | None) -> str:
    """The stopping rule a series was drawn at, read from the code: ``rms 0.001``,
    ``paradigms 0.1``, ``default: rms 0.0002``, ``default: x0 0.015 (rows rms 2e-05)``,
    ``default: x0_forecast 0.012 (x0 0.015, rows rms 5e-06)``."""
    rule = solver.stopping_rule(tol) if solver.stopping != "sequential" else None
    prefix = ""
    if rule is None:
        if solver.stopping == "sequential":
            return "exact"

        preset = resolve_method(solver.solver)[1]
        rule = resolve_stopping(None, None, preset)  # the preset's, else rms
        prefix = "default: "
    if isinstance(rule, X0Forecast):  # its bound is on the forecast error of x_0, with the x0 rule's atol
        return f"{prefix}x0_forecast {rule.bound:g} (x0 {rule.atol:g}, rows rms {rule.tol:g})"
    if isinstance(rule, X0Change):  # its own bound is atol on x_0; tol is the rows' rule
        return f"{prefix}x0 {rule.atol:g} (rows rms {rule.tol:g})"
    rule_class: Any = type(rule)
    fields = attrs.fields(rule_class) if attrs.has(rule_class) else ()
    tols = [getattr(rule, f.name) for f in fields if f.name.startswith("tol")]
    value = f" {tols[0]:g}" if tols and all(t == tols[0] for t in tols) else ""
    return f"{prefix}{type(rule).__name__.lower()}{value}"


def _dodge(count: int, width: float) -> list[float]:
    """Offsets that spread ``count`` series over ``width``, centred on 0."""
    return [width * (k - (count - 1) / 2) / max(count, 1) for k in range(count)]


def series_colors(solvers: Sequence[SolverSpec]) -> dict[str, Any]:
    """One distinct colour per solver series: matplotlib's 10-colour cycle while it suffices,
    ``tab20`` beyond (the full matrix has 15 rows; the cycle would give two series one colour)."""
    if len(solvers) <= 10:
        return {solver.key: f"C{k}" for k, solver in enumerate(solvers)}
    palette = matplotlib.colormaps["tab20"]
    return {solver.key: palette(k % 20) for k, solver in enumerate(solvers)}


def plot_iterations_vs_steps(result: BenchResult, model: str, path: str | Path, tol: float | None) -> Path:
    """Save :func:`iterations_figure` to ``path``."""
    return _save(iterations_figure(result, model, tol), path)


def iterations_figure(result: BenchResult, model: str, tol: float | None) -> Figure:
    """Median parallel iterations against the number of steps T, one series per solver (labelled
    with its stopping rule), one panel per sampler family. A family with one step count draws
    bars; several draw lines, offset sideways so equal values stay visible. Hatched bars and
    hollow markers mark cells that did not converge on every seed; dashed grey is sequential (T)."""
    families: dict[str, list] = {}
    for spec in result.plan.samplers_for(model):  # the samplers this model runs
        families.setdefault(spec.family_label, []).append(spec)
    solvers = [s for s in result.plan.solvers if s.stopping != "sequential"]
    fig = Figure(figsize=(max(4.6 * len(families), 6.4), 4.8), layout="constrained")
    axes = fig.subplots(1, len(families), squeeze=False)[0]
    legend: dict[str, Any] = {}
    for ax, (family, specs) in zip(axes, families.items(), strict=True):
        steps = sorted({s.steps for s in specs})
        series = []
        for solver in solvers:
            cell_tol = tol if solver.uses_tolerance else None
            points = [
                (spec.steps, cell)
                for spec in sorted(specs, key=lambda s: s.steps)
                if (cell := result.cell(model, spec.key, solver.key, cell_tol)) is not None
            ]
            if points:
                series.append((solver, f"{solver.label} ({stopping_text(solver, cell_tol)})", points))
        colors = series_colors(solvers)
        if len(steps) == 1:
            offsets = _dodge(len(series), 0.8)
            for offset, (solver, label, points) in zip(offsets, series, strict=True):
                (_, cell) = points[0]
                bar = ax.bar(
                    offset,
                    cell.iterations,
                    width=0.8 / max(len(series), 1) * 0.9,
                    color=colors[solver.key],
                    hatch=None if cell.converged else "//",
                    edgecolor="black" if not cell.converged else colors[solver.key],
                    label=label,
                )
                ax.bar_label(bar, fmt="%g", fontsize=8)
                legend.setdefault(label, bar)
            line = ax.axhline(steps[0], color="grey", ls="--", lw=1)
            legend.setdefault("sequential (T model calls)", line)
            ax.set_xticks([])
            ax.set_xlabel(f"T = {steps[0]} steps")
            ax.set_ylim(0, steps[0] * 1.12)
        else:
            (line,) = ax.plot(steps, steps, color="grey", ls="--", lw=1)
            legend.setdefault("sequential (T model calls)", line)
            offsets = _dodge(len(series), 0.04 * (steps[-1] - steps[0]))
            for offset, (solver, label, points) in zip(offsets, series, strict=True):
                xs = [t + offset for t, _ in points]
                ys = [c.iterations for _, c in points]
                marker = _MARKERS[result.plan.solvers.index(solver) % len(_MARKERS)]
                (drawn,) = ax.plot(xs, ys, marker=marker, lw=1.4, color=colors[solver.key])
                legend.setdefault(label, drawn)
                for x, (_, c) in zip(xs, points, strict=True):
                    if not c.converged:
                        ax.plot(
                            [x], [c.iterations], marker=marker, ms=10, mfc="white", mec=colors[solver.key]
                        )
            ax.set_xticks(steps)
            ax.set_xlabel("sampler steps T")
        ax.set_title(family)
        ax.set_ylabel("parallel iterations (median over seeds)")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{model}: parallel iterations to converge (stopping rule in brackets)")
    _legend_outside(fig, list(legend.values()), list(legend))
    return fig


def _power_of_ten(value: float) -> str:
    exponent = round(float(np.log10(value)))
    return f"$10^{{{exponent}}}$" if np.isclose(value, 10.0**exponent) else f"{value:g}"


def _same_floor(ax: Axes, floor: float, label: str) -> None:
    """A log axis whose lowest tick, at ``floor``, reads ``label``: exact zeros are drawn there."""
    ticks = [floor] + [t for t in ax.get_yticks() if t > floor * 1.5]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FixedFormatter([label] + [_power_of_ten(t) for t in ticks[1:]]))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(bottom=floor / 1.5)


def plot_error_vs_cap(curves: Sequence[CapCurve], path: str | Path) -> Path:
    """Save :func:`error_vs_cap_figure` to ``path``."""
    return _save(error_vs_cap_figure(curves), path)


def error_vs_cap_figure(curves: Sequence[CapCurve]) -> Figure:
    """Error to the sequential sample after n parallel iterations, per solver, one column per
    sampler: the max pixel difference on [0, 255] (image models) and the model-space RMS, on log
    axes; an exact zero is drawn on the lowest tick, labelled "identical" (a log axis has no 0).
    Series are offset sideways so equal values stay visible."""
    samplers = list(dict.fromkeys(c.sampler for c in curves))
    solvers = list(dict.fromkeys(c.solver for c in curves))
    images = any(e.max_abs_pixels is not None for c in curves for e in c.errors)
    rows = 2 if images else 1
    fig = Figure(figsize=(max(4.6 * len(samplers), 6.4), 3.2 * rows + 1.0), layout="constrained")
    axes = fig.subplots(rows, len(samplers), squeeze=False)
    offsets = dict(zip(solvers, _dodge(len(solvers), 0.3), strict=True))
    legend: dict[str, Any] = {}
    rms_floor, pixel_floor = 1e-12, 0.5
    for col, sampler in enumerate(samplers):
        for curve in (c for c in curves if c.sampler == sampler):
            xs = [cap + offsets[curve.solver] for cap in curve.caps]
            rms = np.maximum([e.rms for e in curve.errors], rms_floor)
            marker = _MARKERS[solvers.index(curve.solver) % len(_MARKERS)]
            color = f"C{solvers.index(curve.solver)}"
            (line,) = axes[-1, col].plot(xs, rms, marker=marker, ms=4, color=color)
            legend.setdefault(curve.solver, line)
            if images:
                pixels = np.maximum([float(e.max_abs_pixels or 0) for e in curve.errors], pixel_floor)
                axes[0, col].plot(xs, pixels, marker=marker, ms=4, color=color)
        axes[-1, col].set_yscale("log")
        axes[-1, col].set_ylabel("RMS error (model space)")
        if images:
            axes[0, col].set_yscale("log")
            axes[0, col].set_ylabel("max |pixel diff| on [0, 255]")
        axes[0, col].set_title(f"{curves[0].model} {sampler}")
        axes[-1, col].set_xlabel("iteration cap n")
        for ax in axes[:, col]:
            ax.grid(True, which="major", alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.canvas.draw()  # settle the automatic log ticks before relabelling the floor
    for col in range(len(samplers)):
        errors = [e for c in curves if c.sampler == samplers[col] for e in c.errors]
        if any(e.rms <= rms_floor for e in errors):
            _same_floor(axes[-1, col], rms_floor, "identical")
        if images and any(e.max_abs_pixels == 0 for e in errors):
            _same_floor(axes[0, col], pixel_floor, "identical")
    _legend_outside(fig, list(legend.values()), list(legend))
    fig.suptitle("error to sequential after n parallel iterations (n = the cap)")
    return fig


def draw_residual_heatmap(
    fig: Figure, ax: Axes, first_order: np.ndarray, title: str, anchors: Sequence[int] | None = None
) -> None:
    """Draw the residual heatmap of :func:`plot_residual_heatmap` on ``ax`` (with its colour bar)."""
    data = np.asarray(first_order, dtype=np.float64)
    positive = data[np.isfinite(data) & (data > 0)]
    floor = positive.min() if positive.size else 1e-12
    # Exact zeros (e.g. the sequential trace) would vanish on a log scale: show them at the floor.
    shown = np.ma.masked_invalid(np.where(data == 0, floor, data))
    vmax = positive.max() if positive.size else 1.0
    image = ax.imshow(
        shown,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        norm=LogNorm(vmin=floor, vmax=max(vmax, floor * 10)),
        extent=(-0.5, data.shape[1] - 0.5, len(data) + 0.5, 0.5),
    )
    if anchors is not None and len(anchors):
        # A staircase: during iteration i (a row of the image) states 0..anchors[i] are final.
        xs = np.repeat(np.asarray(anchors, dtype=np.float64) + 0.5, 2)
        ys = np.stack([np.arange(len(anchors)) + 0.5, np.arange(len(anchors)) + 1.5], 1).ravel()
        ax.plot(xs, ys, color="red", lw=1.2, label="anchor: states left of it are final")
        ax.legend(loc="lower left", fontsize=7)
    fig.colorbar(image, ax=ax, label="first-order residual RMS")
    ax.set_xlabel("position (0 = x_T, T = x_0)")
    ax.set_ylabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)


def plot_residual_heatmap(
    first_order: np.ndarray, path: str | Path, title: str, anchors: Sequence[int] | None = None
) -> Path:
    """Residual RMS per position (x, ``x_T`` left) and iteration (y, first at the top), on a log
    colour scale; blank where a position was outside the window. ``anchors`` are drawn as the
    line of final states."""
    fig = Figure(figsize=(7.5, 3.2 + 0.08 * min(len(first_order), 60)), layout="constrained")
    draw_residual_heatmap(fig, fig.subplots(), first_order, title, anchors)
    return _save(fig, path)


# -- fpsolve demo's figure ------------------------------------------------------------------------


def _tile_pictures(images: np.ndarray, nrow: int, fill: float) -> np.ndarray:
    """``[N, H, W]`` images as one ``[rows*(H+1)+1, nrow*(W+1)+1]`` grid with 1-pixel borders."""
    n, h, w = images.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1), fill, dtype=np.float64)
    for k in range(n):
        r, c = divmod(k, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = images[k]
    return grid


def _batch_pictures(to_images: ToImages | None, sample: torch.Tensor) -> np.ndarray:
    """``[N, H, W]`` pictures of a batch: images on [0, 255], or each vector as a 1-row strip."""
    if to_images is not None:
        return np.asarray(to_images(sample), dtype=np.float64)
    flat = sample.detach().double().flatten(1).numpy()
    return flat[:, None, :]


def save_comparison_figure(
    to_images: ToImages | None,
    sequential: torch.Tensor,
    parallel: torch.Tensor,
    residuals: Any,
    titles: tuple[str, str, str, str],
    title: str,
    path: Path,
) -> Path:
    """``fpsolve demo``'s one figure: the sequential and the parallel grid, their difference and
    the parallel solve's residual heatmap, labelled; images when ``to_images`` is given, else each
    vector drawn as a row of values."""
    seq, par = _batch_pictures(to_images, sequential), _batch_pictures(to_images, parallel)
    nrow = min(8, len(seq)) if to_images is not None else 1
    images = to_images is not None
    low, high = (
        (0.0, 255.0) if images else (float(min(seq.min(), par.min())), float(max(seq.max(), par.max())))
    )
    grids = [_tile_pictures(seq, nrow, low), _tile_pictures(par, nrow, low),
             _tile_pictures(np.abs(par - seq), nrow, 0.0)]
    aspect = grids[0].shape[0] / grids[0].shape[1]
    # digits keep their shape; vectors fill the width
    aspect_mode: Literal["equal", "auto"] = "equal" if images else "auto"
    fig = Figure(figsize=(9.0, 3 * max(1.3, 8.0 * aspect) + 3.6), layout="constrained")
    spec = fig.add_gridspec(4, 1, height_ratios=[1, 1, 1, 2.2])
    for row, (grid, label) in enumerate(zip(grids, titles[:3], strict=True)):
        ax = fig.add_subplot(spec[row])
        if row < 2:
            image = ax.imshow(
                grid, cmap="gray", vmin=low, vmax=high, interpolation="nearest", aspect=aspect_mode
            )
        else:
            # the difference on its own scale (at least 1 pixel level), hot = larger
            image = ax.imshow(
                grid,
                cmap="magma",
                vmin=0,
                vmax=max(float(grid.max()), 1.0 if images else 1e-12),
                interpolation="nearest",
                aspect=aspect_mode,
            )
        unit = (
            ("pixel value" if row < 2 else "|difference|")
            if images
            else ("value" if row < 2 else "|difference|")
        )
        fig.colorbar(image, ax=ax, label=unit, fraction=0.04)
        ax.set_title(label, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    draw_residual_heatmap(
        fig, fig.add_subplot(spec[3]), residuals.first_order.numpy(), titles[3], residuals.anchors
    )
    fig.suptitle(title)
    return _save(fig, path)
