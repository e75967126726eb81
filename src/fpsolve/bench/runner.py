"""Runs a :class:`~fpsolve.bench.matrix.BenchPlan`: every cell on every seed, against sequential.

For each model, sampler and seed the runner builds ONE system (the seed draws ``x_T`` and every
step's noise for a batch of samples), solves it sequentially for the reference, then solves it
with each cell's solver from the same noise. Wall time is measured around ``fpsolve.solve``
with ``time.perf_counter``, synchronising CUDA before and after so queued kernels are counted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from typing import Any

import attrs
import numpy as np
import torch

from ..api import solve
from ..errors import InvalidOptionError
from ..models import ReferenceModel, load_reference
from ..models.digits import digits_denoiser
from ..solution import Solution
from ..system import TriangularSystem
from .curves import CapCurve, error_vs_cap
from .matrix import BenchPlan, Cell, SamplerSpec, parse_solver
from .metrics import ErrorMetrics, ToImages, compare_samples, image_converter

__all__ = [
    "SolveRecord",
    "CellResult",
    "Heatmap",
    "BenchResult",
    "Reporter",
    "count_units",
    "prepare_model",
    "run_plan",
]


def _finite(value: float | None) -> float | None:
    """JSON has no infinity: identical images (PSNR inf) are written as ``None``."""
    return None if value is None or value == float("inf") else value


@attrs.define(frozen=True)
class SolveRecord:
    """One solve of one cell on one seed (``solver``: the repr of the solver instance used, which
    pins down what a cell such as ``taa default`` meant when it ran)."""

    seed: int
    iterations: int
    model_evals: int
    wall_time: float
    status: str
    converged: bool
    error: ErrorMetrics
    solver: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "seed": self.seed,
            "iterations": self.iterations,
            "model_evals": self.model_evals,
            "wall_time_s": self.wall_time,
            "status": self.status,
            "converged": self.converged,
            "solver": self.solver,
            "rms": self.error.rms,
            "max_abs_pixels": self.error.max_abs_pixels,
            "psnr_db": _finite(self.error.psnr_db),
        }


def _records(value: Iterable[SolveRecord]) -> tuple[SolveRecord, ...]:
    return tuple(value)


@attrs.define(frozen=True)
class CellResult:
    """A cell with its per-seed records; the summaries aggregate over seeds (medians for
    costs, the worst seed for errors)."""

    cell: Cell
    samples: int
    records: tuple[SolveRecord, ...] = attrs.field(converter=_records)

    @property
    def iterations(self) -> float:
        """Median parallel iterations (model calls in sequence) over seeds."""
        return statistics.median(r.iterations for r in self.records)

    @property
    def evals_per_sample(self) -> float:
        """Median model evaluations per sample over seeds."""
        return statistics.median(r.model_evals / self.samples for r in self.records)

    @property
    def wall_time(self) -> float:
        """Median wall time in seconds over seeds (whole batch)."""
        return statistics.median(r.wall_time for r in self.records)

    @property
    def rms(self) -> float:
        """Largest model-space RMS error over seeds."""
        return max(r.error.rms for r in self.records)

    @property
    def max_abs_pixels(self) -> float | None:
        """Largest pixel difference on [0, 255] over seeds (``None`` without images)."""
        values = [r.error.max_abs_pixels for r in self.records if r.error.max_abs_pixels is not None]
        return max(values) if values else None

    @property
    def psnr_db(self) -> float | None:
        """Lowest PSNR over seeds (``inf``: identical; ``None`` without images)."""
        values = [r.error.psnr_db for r in self.records if r.error.psnr_db is not None]
        return min(values) if values else None

    @property
    def converged(self) -> bool:
        """True when the solve converged on every seed."""
        return all(r.converged for r in self.records)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the cell, the summaries and the per-seed records."""
        return {
            "model": self.cell.model,
            "sampler": self.cell.sampler.label,
            "sampler_key": self.cell.sampler.key,
            "steps": self.cell.sampler.steps,
            "solver": self.cell.solver.label,
            "solver_key": self.cell.solver.key,
            "tol": self.cell.tol,
            "stopping": self.cell.tol_label,
            "samples": self.samples,
            "iterations": self.iterations,
            "evals_per_sample": self.evals_per_sample,
            "wall_time_s": self.wall_time,
            "rms": self.rms,
            "max_abs_pixels": self.max_abs_pixels,
            "psnr_db": _finite(self.psnr_db),
            "converged": self.converged,
            "converged_seeds": sum(r.converged for r in self.records),
            "seeds": [r.to_dict() for r in self.records],
        }


@attrs.define(frozen=True, eq=False)
class Heatmap:
    """The residual trace of one solve: ``first_order`` ``[iterations, T+1]`` (NaN outside the window)."""

    model: str
    sampler: str
    solver: str
    seed: int
    first_order: np.ndarray = attrs.field(repr=False)
    anchors: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN becomes ``None``)."""
        rows = [[None if np.isnan(v) else float(v) for v in row] for row in self.first_order]
        return {
            "model": self.model,
            "sampler": self.sampler,
            "solver": self.solver,
            "seed": self.seed,
            "anchors": list(self.anchors),
            "first_order": rows,
        }


@attrs.define(frozen=True, eq=False)
class BenchResult:
    """Everything a run produced."""

    plan: BenchPlan
    cells: tuple[CellResult, ...]
    curves: tuple[CapCurve, ...]
    heatmaps: tuple[Heatmap, ...]
    meta: dict[str, Any]

    def cell(
        self, model: str, sampler_key: str, solver_key: str, tol: float | None = None
    ) -> CellResult | None:
        """The result of one cell, or ``None`` when the plan did not contain it."""
        for result in self.cells:
            c = result.cell
            if (c.model, c.sampler.key, c.solver.key, c.tol) == (model, sampler_key, solver_key, tol):
                return result
        return None


class Reporter:
    """Progress hooks of :func:`run_plan` (this base class does nothing)."""

    def begin(self, description: str) -> None:
        """Work starts: a counted unit (see :func:`count_units`), or the uncounted reference solve
        of a plan without a ``sequential`` cell (then no :meth:`end` follows)."""

    def end(self) -> None:
        """The unit of work that began last has finished."""


def count_units(plan: BenchPlan) -> int:
    """Units of work :func:`run_plan` reports: one per cell and seed, one per curve."""
    curves = 0
    if plan.curve is not None:
        for model in plan.models:
            keys = {s.key for s in plan.samplers_for(model)}
            curves += sum(k in keys for k in plan.curve.samplers) * len(plan.curve.solvers)
    return len(plan.cells()) * plan.seeds + curves


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_model(name: str, device: torch.device) -> ReferenceModel:
    """Load a reference model and put it on ``device``.

    GPU tuning (half precision, compilation) is left to a separate issue: a UNet is only moved.
    """
    ref = load_reference(name)
    if device.type != "cpu" and ref.unet is not None:
        if name not in ("digits", "digits-flow"):
            raise InvalidOptionError(f"moving the {name!r} model to {device} is not supported yet.")
        ref = attrs.evolve(ref, denoiser=digits_denoiser(ref.unet.to(device)), unet=ref.unet.to(device))
    return ref


def _timed_solve(
    system: TriangularSystem, device: torch.device, solver: str, **options: Any
) -> tuple[Solution, float]:
    _synchronize(device)
    started = time.perf_counter()
    solution = solve(system, solver, **options)
    _synchronize(device)
    return solution, time.perf_counter() - started


def _cell_options(cell: Cell) -> dict[str, Any]:
    """Keyword arguments of ``fpsolve.solve`` for a cell (nothing at all for ``taa default``)."""
    options = cell.solver.solver_options(cell.sampler.steps)
    rule = cell.solver.stopping_rule(cell.tol)
    if rule is not None:
        options["stopping"] = rule
    return options


def _record(
    seed: int,
    solution: Solution,
    wall: float,
    reference: torch.Tensor,
    to_images: ToImages | None,
) -> SolveRecord:
    error = compare_samples(solution.sample.detach().to("cpu"), reference, to_images)
    return SolveRecord(
        seed,
        solution.iterations,
        solution.model_evals,
        wall,
        solution.status.name.lower(),
        solution.converged,
        error,
        repr(solution.solver) if solution.solver is not None else "sequential",
    )


def run_plan(
    plan: BenchPlan,
    device: str | torch.device = "cpu",
    reporter: Reporter | None = None,
    models: dict[str, ReferenceModel] | None = None,
) -> BenchResult:
    """Run every cell of ``plan`` on every seed, then the curves; see the module docstring.

    Args:
        plan: what to measure.
        device: where the systems live and the models run.
        reporter: progress hooks (e.g. a rich progress bar).
        models: already loaded reference models by name (loaded with :func:`prepare_model` otherwise).
    """
    device = torch.device(device)
    reporter = reporter or Reporter()
    started = time.perf_counter()
    results: list[CellResult] = []
    curves: list[CapCurve] = []
    heatmaps: list[Heatmap] = []
    for model_name in plan.models:
        ref = (models or {}).get(model_name) or prepare_model(model_name, device)
        if ref.prediction != plan.prediction_of(model_name):
            raise InvalidOptionError(
                f"the plan takes {model_name!r} as a {plan.prediction_of(model_name)!r} model but the loaded "
                f"model predicts {ref.prediction!r}; list it in BenchPlan(predictions=...)."
            )
        to_images = image_converter(ref.to_images, ref.shape)
        # One untimed call first: lazy initialisation must not be charged to the first cell.
        ref.denoiser(
            torch.zeros((plan.samples, *ref.shape), dtype=torch.float64, device=device),
            torch.zeros(plan.samples, dtype=torch.long, device=device),
        )
        for spec in plan.samplers_for(model_name):
            cells = plan.cells(model=model_name, sampler=spec)
            records: dict[Cell, list[SolveRecord]] = {c: [] for c in cells}
            for seed in range(plan.seeds):
                system = TriangularSystem(
                    sampler=spec.build(ref),
                    denoiser=ref.denoiser,
                    shape=ref.shape,
                    batch=plan.samples,
                    device=device,
                    generator=torch.Generator().manual_seed(seed),
                )
                reporter.begin(f"{model_name} {spec.label} seed {seed}: sequential")
                sequential, sequential_wall = _timed_solve(system, device, "sequential")
                reference = sequential.sample.detach().to("cpu")
                for cell in cells:
                    if cell.solver.stopping == "sequential":
                        solution, wall = sequential, sequential_wall
                    else:
                        reporter.begin(
                            f"{model_name} {spec.label} seed {seed}: {cell.solver.label} tol {cell.tol_label}"
                        )
                        solution, wall = _timed_solve(
                            system, device, cell.solver.solver, **_cell_options(cell)
                        )
                    records[cell].append(_record(seed, solution, wall, reference, to_images))
                    if (
                        seed == 0
                        and plan.heatmap == (spec.key, cell.solver.key)
                        and not any((h.model, h.sampler) == (model_name, spec.label) for h in heatmaps)
                    ):
                        heatmaps.append(
                            Heatmap(
                                model_name,
                                spec.label,
                                cell.solver.label,
                                seed,
                                solution.residuals.first_order.numpy(),
                                solution.residuals.anchors,
                            )
                        )
                    reporter.end()
                if seed == 0:
                    curves += _curves(plan, spec, system, reference, to_images, model_name, reporter)
            results += [CellResult(c, plan.samples, records[c]) for c in cells]
    meta = {"seconds": round(time.perf_counter() - started, 1), "device": str(device)}
    return BenchResult(plan, tuple(results), tuple(curves), tuple(heatmaps), meta)


def _curves(
    plan: BenchPlan,
    spec: SamplerSpec,
    system: TriangularSystem,
    reference: torch.Tensor,
    to_images: ToImages | None,
    model: str,
    reporter: Reporter,
) -> list[CapCurve]:
    if plan.curve is None or spec.key not in plan.curve.samplers:
        return []
    curves = []
    for key in plan.curve.solvers:
        solver = parse_solver(key)
        reporter.begin(f"{model} {spec.label}: error vs iteration cap, {solver.label}")
        curves.append(
            error_vs_cap(
                system,
                solver,
                reference,
                to_images,
                plan.curve.max_iters,
                plan.curve.tiny,
                model=model,
                sampler=spec.label,
            )
        )
        reporter.end()
    return curves
