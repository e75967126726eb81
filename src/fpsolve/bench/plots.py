"""The benchmark's figures, drawn with matplotlib's object API on the Agg canvas.

``matplotlib.figure.Figure`` is used without ``pyplot``: no global figure state and no GUI
backend, so plotting works headless and never changes the caller's backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .curves import CapCurve
from .runner import BenchResult, CellResult

__all__ = ["plot_iterations_vs_steps", "plot_error_vs_cap", "plot_residual_heatmap", "draw_residual_heatmap"]

_DPI = 110
#: One marker per solver, so solvers with identical numbers stay distinguishable.
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")


def _save(fig: Figure, path: str | Path, dpi: int = _DPI) -> Path:
    """Save atomically (a temporary file renamed into place): a reader never sees half a PNG."""
    from ..cli_output import atomic_write

    path = Path(path)
    with atomic_write(path) as temporary:
        fig.savefig(temporary, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path


def _legend_outside(fig: Figure, ax: Axes) -> None:
    """One legend below the panels, so it never hides a line or the title."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=8)


def plot_iterations_vs_steps(result: BenchResult, model: str, path: str | Path, tol: float | None) -> Path:
    """Median parallel iterations against the number of steps T, one line per solver, one panel
    per sampler family. Solvers with the RMS rule are drawn at tolerance ``tol``; hollow markers
    mark cells that did not converge on every seed; the dashed line is sequential (T)."""
    families: dict[str, list] = {}
    for spec in result.plan.samplers:
        families.setdefault(spec.family_label, []).append(spec)
    fig = Figure(figsize=(max(4.2 * len(families), 6.0), 4.4), layout="constrained")
    axes = fig.subplots(1, len(families), squeeze=False)[0]
    for ax, (family, specs) in zip(axes, families.items(), strict=True):
        steps = sorted({s.steps for s in specs})
        ax.plot(steps, steps, color="grey", ls="--", lw=1, label="sequential (T)")
        for solver in result.plan.solvers:
            if solver.stopping == "sequential":
                continue
            cell_tol = tol if solver.uses_tolerance else None
            points: list[tuple[int, CellResult]] = []
            for spec in sorted(specs, key=lambda s: s.steps):
                cell = result.cell(model, spec.key, solver.key, cell_tol)
                if cell is not None:
                    points.append((spec.steps, cell))
            if not points:
                continue
            xs, ys = [t for t, _ in points], [c.iterations for _, c in points]
            marker = _MARKERS[result.plan.solvers.index(solver) % len(_MARKERS)]
            (line,) = ax.plot(xs, ys, marker=marker, lw=1.4, label=solver.label)
            for t, c in points:
                if not c.converged:
                    ax.plot([t], [c.iterations], marker=marker, ms=10, mfc="white", mec=line.get_color())
        ax.set_title(family)
        ax.set_xlabel("sampler steps T")
        ax.set_ylabel("parallel iterations (median over seeds)")
        ax.set_xticks(steps)
        ax.grid(True, alpha=0.3)
    tol_text = f"RMS tol {tol:g}" if tol is not None else "default stopping"
    fig.suptitle(f"{model}: iterations to converge ({tol_text})")
    _legend_outside(fig, axes[-1])
    return _save(fig, path)


def plot_error_vs_cap(curves: Sequence[CapCurve], path: str | Path) -> Path:
    """Error to the sequential sample after n parallel iterations, per solver, one column per
    sampler: the max pixel difference on [0, 255] (image models) and the model-space RMS."""
    samplers = list(dict.fromkeys(c.sampler for c in curves))
    solvers = list(dict.fromkeys(c.solver for c in curves))
    images = any(e.max_abs_pixels is not None for c in curves for e in c.errors)
    rows = 2 if images else 1
    fig = Figure(figsize=(max(4.6 * len(samplers), 6.0), 3.2 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, len(samplers), squeeze=False)
    for col, sampler in enumerate(samplers):
        for curve in (c for c in curves if c.sampler == sampler):
            rms = np.maximum([e.rms for e in curve.errors], 1e-12)  # log axis: keep exact zeros visible
            marker = _MARKERS[solvers.index(curve.solver) % len(_MARKERS)]
            axes[-1, col].plot(curve.caps, rms, marker=marker, ms=4, label=curve.solver)
            if images:
                pixels = [e.max_abs_pixels for e in curve.errors]
                axes[0, col].plot(curve.caps, pixels, marker=marker, ms=4, label=curve.solver)
        axes[-1, col].set_yscale("log")
        axes[-1, col].set_ylabel("RMS error (model space)")
        if images:
            # symlog: pixel errors reach exactly 0, which a log axis cannot show.
            axes[0, col].set_yscale("symlog", linthresh=1)
            axes[0, col].set_ylim(bottom=0)
            axes[0, col].set_ylabel("max |pixel diff| on [0, 255]")
        axes[0, col].set_title(f"{curves[0].model} {sampler}")
        axes[-1, col].set_xlabel("iteration cap n")
        for ax in axes[:, col]:
            ax.grid(True, which="both", alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_outside(fig, axes[0, -1])
    fig.suptitle("error to the sequential sample after n parallel iterations")
    return _save(fig, path)


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
