"""The GPU benchmark's measurements: per model, latency tables, the sequential loops, the
parallel solves (measured on a trained model, estimated on random-weight ones) and a sync audit;
:func:`run_benchmark` runs them all and writes the report after every model."""

from __future__ import annotations

import platform
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from ... import api
from ...errors import NotConvergedWarning
from ...gpu import (
    CUDAGraphDenoiser,
    IterationModel,
    LatencyTable,
    TimedDenoiser,
    forget_latencies,
    forget_observations,
    measure_latency,
    plan_window,
    remember_latency,
)
from ...models import spaced_timesteps
from ...solution import Status
from ...stopping import RMS
from ...system import TriangularSystem
from .config import TOL, Budget, Settings
from .models import ModelSpec, build_digits, build_dit, build_sd15, make_system
from .report import write
from .timing import count_syncs, tight_sequential, timed

__all__ = ["windows_for", "latency_rows", "row", "ModelBench", "run_benchmark"]


def windows_for(steps: int, tiny: bool = False) -> list[int]:
    """Fixed windows to compare: T, T/2, T/4, T/8 and 4 (at least 2); --tiny: T and 2."""
    chosen = (steps, 2) if tiny else (steps, steps // 2, steps // 4, steps // 8, 4)
    return sorted({w for w in chosen if 2 <= w <= steps})


def latency_rows(
    spec: ModelSpec, denoisers: dict[str, Any], settings: Settings, tables: dict[str, LatencyTable]
) -> list[dict[str, Any]]:
    """``t(B)`` of each mode's denoiser at the batch sizes the windows (and auto's grid) use; the
    tables are stored in ``tables`` by mode."""
    rows = []
    grid = [1, *windows_for(spec.steps, settings.tiny)]
    w = 2
    while w < spec.steps and not settings.tiny:  # window="auto" measures powers of two: cover them
        grid.append(w)
        w *= 2
    sizes = sorted({settings.samples * w for w in grid})
    timesteps = spaced_timesteps(spec.steps)
    repeats, warmup = (1, 1) if settings.tiny else (7, 2)
    for mode in settings.modes:
        table = measure_latency(
            denoisers[mode],
            shape=spec.shape,
            dtype=spec.model_dtype,
            device=settings.device,
            batches=sizes,
            timesteps=timesteps,
            repeats=repeats,
            warmup=warmup,
        )
        tables[mode] = table
        for batch, seconds in table.seconds.items():
            rows.append({"model": spec.name, "mode": mode, "batch": batch, "ms": round(seconds * 1e3, 4)})
        if table.max_batch is not None:
            rows.append(
                {
                    "model": spec.name,
                    "mode": mode,
                    "batch": None,
                    "ms": None,
                    "note": f"out of memory above batch {table.max_batch}",
                }
            )
    return rows


def row(
    spec: ModelSpec,
    method: str,
    mode: str,
    window: int | None,
    stats: dict[str, Any],
    *,
    iterations: float,
    iterations_source: str,
    samples: int,
    estimated: bool = False,
    note: str = "",
) -> dict[str, Any]:
    """One line of the report."""
    out = {
        "model": spec.name,
        "method": method,
        "mode": mode,
        "window": window,
        "samples": samples,
        "iterations": iterations,
        "iterations_source": iterations_source,
        "estimated": estimated,
        "note": note,
    }
    out.update({k: v for k, v in stats.items() if k != "result"})
    if iterations:
        out["per_iteration_s"] = (
            stats["median_s"] / iterations if not estimated else stats.get("per_iteration_s")
        )
    return out


class ModelBench:
    """All measurements of one model."""

    def __init__(
        self,
        spec: ModelSpec,
        settings: Settings,
        budget: Budget,
        digits_iterations: Callable[..., tuple[int, str]],
    ):
        self.spec, self.settings, self.budget = spec, settings, budget
        self.digits_iterations = digits_iterations
        self.eager = TimedDenoiser(spec.denoiser, settings.device)
        self.graph_model = CUDAGraphDenoiser(spec.denoiser, spec.shape, spec.model_dtype, settings.device)
        self.graph = TimedDenoiser(self.graph_model, settings.device)
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.tables: dict[str, LatencyTable] = {}

    def measure_latency(self) -> list[dict[str, Any]]:
        """Latency tables of both modes, handed to window="auto" so it does not measure again."""
        spec = self.spec
        rows = latency_rows(
            spec, {"eager": spec.denoiser, "cudagraph": self.graph_model}, self.settings, self.tables
        )
        for mode, timer in (("eager", self.eager), ("cudagraph", self.graph)):
            if mode in self.tables:  # the timing wrapper adds microseconds: same curve
                remember_latency(timer, spec.shape, spec.model_dtype, self.settings.device, self.tables[mode])
        return rows

    def system(self, graphs: bool) -> TriangularSystem:
        """The model's problem with the eager or the graph denoiser (timed)."""
        return make_system(self.spec, self.graph if graphs else self.eager, self.settings)

    def go(self, label: str) -> bool:
        """Whether to run configuration ``label`` (False, and noted, when the budget is spent)."""
        if self.budget.left():
            print(f"[{self.budget.elapsed:6.1f}s] {self.spec.name}: {label}", flush=True)
            return True
        self.skipped.append(label)
        return False

    def sequential(self) -> dict[str, float]:
        """Sequential loops; returns their median wall times by label."""
        baselines: dict[str, float] = {}
        for mode in self.settings.modes:
            graphs = mode == "cudagraph"
            system, timer = self.system(graphs), (self.graph if graphs else self.eager)
            reference = None
            if self.go(f"sequential solve ({mode})"):
                stats = timed(partial(api.solve, system, "sequential"), timer, self.settings)
                self.add_sequential("sequential (fpsolve.solve)", mode, stats)
                baselines[f"solve-{mode}"] = stats["median_s"]
                reference = stats["result"].sample
                if not stats["result"].converged:
                    self.rows[-1]["note"] = f"INVALID: {stats['result'].message}"
            if self.go(f"sequential tight loop ({mode})"):
                stats = timed(partial(tight_sequential, system), timer, self.settings)
                note = ""
                if reference is not None:
                    same = torch.equal(stats["result"][-1], reference)
                    note = "same sample as fpsolve.solve" if same else "DIFFERENT sample from fpsolve.solve"
                self.add_sequential("sequential (tight loop, no host sync)", mode, stats, note)
                baselines[f"tight-{mode}"] = stats["median_s"]
        return baselines

    def forced_iteration_cost(
        self, window: int, graphs: bool, iterations: int = 3, solver: str = "taa"
    ) -> dict[str, Any]:
        """Wall time of the first ``iterations`` iterations of ``solver`` at ``window`` (tolerance
        unreachable)."""
        system, timer = self.system(graphs), (self.graph if graphs else self.eager)
        rule = RMS(tol1=1e-30, tol2=0.0)  # unreachable: the cap ends the solve (status MAX_ITERS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotConvergedWarning)
            stats = timed(
                lambda: api.solve(system, solver, window=window, stopping=rule, max_iters=iterations),
                timer, self.settings,
            )
        stats["per_iteration_s"] = stats["median_s"] / iterations
        solution = stats["result"]
        if solution.status is not Status.MAX_ITERS or solution.iterations != iterations:
            # e.g. NONFINITE: a random fp16 model overflowed, and the time is not that of `iterations`
            stats["note"] = f"INVALID cost: {solution.status.name} after {solution.iterations} iterations"
        return stats

    def parallel_measured(self) -> None:
        """TAA with real convergence (the trained model): fixed windows and auto; then newton
        (``fpsolve.solve``'s default solver) at the full window, next to taa."""
        spec = self.spec
        for mode in self.settings.modes:
            graphs = mode == "cudagraph"
            system, timer = self.system(graphs), (self.graph if graphs else self.eager)
            windows: list[int | str] = [*windows_for(spec.steps, self.settings.tiny), "auto"]
            configs = [("taa", window) for window in windows]
            configs.append(("newton", spec.steps))
            for solver, window in configs:
                if not self.go(f"{solver} window={window} ({mode})"):
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a sequential fallback is reported in the row
                    stats = timed(
                        partial(api.solve, system, solver, window=window, tol=TOL),
                        timer,
                        self.settings,
                        warmup=None if window != "auto" or self.settings.tiny else 2,
                    )
                solution = stats["result"]
                note = "" if solution.converged else solution.message
                if window == "auto":
                    plan = solution.plan
                    note = (
                        f"auto chose {'sequential' if plan.use_sequential else f'window {plan.window}'}: "
                        f"{plan.reason}"
                    )
                self.rows.append(
                    row(
                        spec,
                        f"{solver} window={window}",
                        mode,
                        solution.window,
                        stats,
                        samples=self.settings.samples,
                        iterations=solution.iterations,
                        iterations_source="measured" if spec.trained else "measured, untrained model",
                        note=note,
                    )
                )

    def parallel_estimated(self) -> None:
        """Random weights: cost per iteration measured, iterations from the digits model."""
        steps = self.spec.steps
        costs: dict[tuple[str, int], float] = {}
        for mode in self.settings.modes:
            graphs = mode == "cudagraph"
            for window in windows_for(steps, self.settings.tiny):
                if not self.go(f"cost per iteration, window={window} ({mode})"):
                    continue
                stats = self.forced_iteration_cost(window, graphs)
                costs[(mode, window)] = stats["per_iteration_s"]
                self.add_estimate("taa", mode, window, stats, *self.digits_iterations(steps, window))
            self.newton_estimated(mode, graphs)
        self.auto_estimated(costs)

    def newton_estimated(self, mode: str, graphs: bool) -> None:
        """newton (``fpsolve.solve``'s default solver) at the full window, next to taa: its cost
        per iteration measured here, its iterations on the digits model at the same T."""
        steps = self.spec.steps
        if not self.go(f"newton cost per iteration, window={steps} ({mode})"):
            return
        stats = self.forced_iteration_cost(steps, graphs, solver="newton")
        self.add_estimate("newton", mode, steps, stats, *self.digits_iterations(steps, steps, "newton"))

    def add_sequential(self, method: str, mode: str, stats: dict[str, Any], note: str = "") -> None:
        """The row of a sequential baseline: T model calls, measured."""
        self.rows.append(row(self.spec, method, mode, None, stats, samples=self.settings.samples,
                             iterations=self.spec.steps, iterations_source="T", note=note))

    def add_estimate(self, solver: str, mode: str, window: int, stats: dict[str, Any], iterations: int,
                     source: str) -> None:
        """The row of an estimated parallel solve: ``iterations`` (from ``source``) times the
        measured cost of one iteration at ``window``."""
        estimate = dict(stats, median_s=iterations * stats["per_iteration_s"], min_s=None, max_s=None)
        self.rows.append(
            row(
                self.spec,
                f"{solver} window={window} (estimate)",
                mode,
                window,
                estimate,
                samples=self.settings.samples,
                iterations=iterations,
                iterations_source=source,
                estimated=True,
                note="wall = iterations x measured cost of an iteration at this window",
            )
        )

    def auto_estimated(self, costs: dict[tuple[str, int], float]) -> None:
        """The planner on the measured graph latency and the digits iteration counts."""
        spec, steps = self.spec, self.spec.steps
        mode = self.settings.modes[-1]
        if mode not in self.tables or not self.go(f"window=auto plan ({mode})"):
            return
        windows = windows_for(steps, self.settings.tiny)
        observed = [(w, self.digits_iterations(steps, w)[0]) for w in windows]
        table = self.tables[mode]
        overheads = [
            costs[(mode, w)] - table.seconds.get(self.settings.samples * w, 0.0)
            for w in windows
            if (mode, w) in costs
        ]
        plan = plan_window(
            table.seconds,
            steps,
            self.settings.samples,
            IterationModel.observed(steps, observed),
            iteration_overhead=max(0.0, statistics.median(overheads)) if overheads else 0.0,
        )
        if plan.use_sequential:
            note, wall = f"auto chose sequential: {plan.reason}", None
        else:
            cost = (
                costs.get((mode, plan.window))
                or self.forced_iteration_cost(plan.window, mode == "cudagraph")["per_iteration_s"]
            )
            wall = self.digits_iterations(steps, plan.window)[0] * cost
            note = f"auto chose window {plan.window}: {plan.reason}"
        self.rows.append(
            {
                "model": spec.name,
                "method": "taa window=auto (estimate)",
                "mode": mode,
                "window": None if plan.use_sequential else plan.window,
                "samples": self.settings.samples,
                "median_s": wall,
                "iterations": plan.iterations,
                "estimated": True,
                "iterations_source": "digits model at the same T",
                "note": note,
                "predicted_s": plan.predicted_seconds,
            }
        )

    def sync_audit(self) -> list[dict[str, Any]]:
        """Host synchronisations per iteration of a TAA solve and of the sequential solve (graphs)."""
        out: list[dict[str, Any]] = []
        if self.settings.device.type != "cuda" or not self.go("sync audit"):
            return out
        system = self.system(True)
        # At most 5 TAA iterations: a random-weight model may need many, and 5 show the pattern.
        for label, run in (
            (
                "taa window=T",
                partial(api.solve, system, "taa", window=self.spec.steps, tol=TOL, max_iters=5),
            ),
            ("sequential (fpsolve.solve)", partial(api.solve, system, "sequential")),
            ("sequential (tight loop)", partial(tight_sequential, system)),
        ):
            run()  # captures any new graph sizes first: a capture's own synchronisations do not count
            audit = count_syncs(run, self.settings.device)
            if audit is None:  # off CUDA: nothing to count (returned above already)
                continue
            result = audit.pop("result")
            iterations = getattr(result, "iterations", self.spec.steps)
            out.append(
                {
                    "model": self.spec.name,
                    "run": label,
                    "iterations": iterations,
                    "syncs": audit["syncs"],
                    "syncs_per_iteration": round(audit["syncs"] / iterations, 2),
                    "top": audit["top"],
                }
            )
        return out



def run_benchmark(settings: Settings, command: str) -> dict[str, Any]:
    """Measure every model of ``settings`` and write ``gpu.json`` and ``gpu.md`` to
    ``settings.out`` after each (so a timeout keeps what was measured); returns the report.
    ``command`` is recorded as the command line that ran it."""
    import diffusers  # the models extra; only its version is read here

    budget = Budget(settings.budget_s)

    report: dict[str, Any] = {
        "meta": {
            "device": torch.cuda.get_device_name(settings.device)
            if settings.device.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()})",
            "torch": f"torch {torch.__version__}"
            + (f", CUDA {torch.version.cuda}" if torch.version.cuda else ""),
            "diffusers": diffusers.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": command,
            "tiny": settings.tiny,
            "runs": settings.runs,
            "samples": settings.samples,
            "tol": TOL,
            "seconds": 0.0,
        },
        "models": {},
        "latency": [],
        "syncs": [],
    }
    forget_latencies()
    forget_observations()
    digits_cache: dict[tuple[int, int, str], tuple[int, str]] = {}
    digits_spec: ModelSpec | None = None

    def digits_iterations(steps: int, window: int, solver: str = "taa") -> tuple[int, str]:
        """Iterations of ``solver`` on the digits model at T = steps and this window (measured once)."""
        nonlocal digits_spec
        if (steps, window, solver) not in digits_cache:
            digits_spec = digits_spec or build_digits(settings, steps)
            system = make_system(digits_spec, digits_spec.denoiser, settings, steps)
            solution = api.solve(system, solver, window=window, tol=TOL)
            source = "digits model" if digits_spec.trained else "digits model, UNTRAINED"
            digits_cache[(steps, window, solver)] = (solution.iterations, f"{source}, T={steps}")
        return digits_cache[(steps, window, solver)]

    builders = {
        "digits": lambda: build_digits(settings, 6 if settings.tiny else 100),
        "sd15": lambda: build_sd15(settings),
        "dit": lambda: build_dit(settings),
    }
    for name in settings.models:
        if not budget.left():
            report["models"][name] = {
                "note": "skipped: budget spent",
                "rows": [],
                "baselines": {},
                "skipped": [name],
            }
            continue
        spec = builders[name]()
        bench = ModelBench(spec, settings, budget, digits_iterations)
        if bench.go("latency"):
            report["latency"] += bench.measure_latency()
        baselines = bench.sequential()
        if spec.trained or name == "digits":
            bench.parallel_measured()
        else:
            bench.parallel_estimated()
        report["syncs"] += bench.sync_audit()
        report["models"][name] = {
            "note": spec.note,
            "steps": spec.steps,
            "rows": bench.rows,
            "baselines": baselines,
            "skipped": bench.skipped,
            "graph_sizes": list(bench.graph_model.captured_sizes),
            "graph_disabled": bench.graph_model.disabled_reason,
        }
        report["meta"]["seconds"] = budget.elapsed
        write(report, settings.out)
        del bench, spec
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    report["meta"]["seconds"] = budget.elapsed
    write(report, settings.out)
    print((settings.out / "gpu.md").read_text())
    return report
