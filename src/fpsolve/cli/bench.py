"""``fpsolve bench``: run the benchmark matrix, print tables, write JSON, markdown and plots.

    fpsolve bench --model digits digits-flow --out docs/benchmarks   # the committed report (full matrix)
    fpsolve bench --quick                                   # a reduced matrix, under two minutes

The matrix can be narrowed from the command line (``--samplers ddim-10 --solvers taa-default``),
which the tests use to run a tiny version of the real command.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from ..bench import runner  # called through the module: tests replace runner.prepare_model, run_plan
from ..bench.matrix import SOLVERS, BenchPlan, CurvePlan, full_plan, parse_sampler, parse_solver, quick_plan
from ..bench.progressive import run_progressively
from ..bench.report import cpu_name, print_tables, write_json, write_markdown
from ..bench.runner import Reporter
from ..cli_output import check_output_dir
from ..errors import FpsolveError, InvalidOptionError

__all__ = [
    "add_arguments",
    "run",
    "build_plan",
    "DEFAULT_OUT",
    "QUICK_OUT",
]

#: Where the full report goes by default (the committed one).
DEFAULT_OUT = Path("docs/benchmarks")
#: Where ``--quick`` writes by default, so a quick run never overwrites the committed report.
QUICK_OUT = Path("fpsolve-bench-quick")


def _csv(text: str) -> list[str]:
    return [item for item in (part.strip() for part in text.split(",")) if item]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fpsolve bench``."""
    parser.add_argument(
        "--model",
        nargs="+",
        choices=["digits", "digits-flow", "gmm"],
        default=None,
        help="reference model(s); default digits, or gmm (with a message) when the "
        "digits weights are missing",
    )
    parser.add_argument(
        "--quick", action="store_true", help="reduced matrix (under two minutes on 2 CPU cores)"
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1); full 2, quick 1")
    parser.add_argument(
        "--samples", type=int, default=None, help="samples per seed, solved as one batch; full 1, quick 2"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default {DEFAULT_OUT}/, with --quick {QUICK_OUT}/)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (cpu; cuda is accepted)")
    parser.add_argument(
        "--samplers",
        type=_csv,
        default=None,
        help="comma list replacing the sampler axis, e.g. ddim-25,ddpm-100,dpm2m-50",
    )
    parser.add_argument(
        "--solvers",
        type=_csv,
        default=None,
        help=f"comma list replacing the solver axis; keys: {', '.join(SOLVERS)}",
    )
    parser.add_argument(
        "--tolerances", type=_csv, default=None, help="comma list of RMS tolerances, e.g. 1e-3,1e-4"
    )
    parser.add_argument(
        "--curve-max-iters", type=int, default=None, help="largest iteration cap of the curves (>= 1)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads during the run (default 1: on a shared or busy CPU, "
        "multi-threaded small model calls are many times slower)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib figures")


def build_plan(args: argparse.Namespace, models: list[str]) -> BenchPlan:
    """The full or quick plan with the command-line overrides applied."""
    if args.curve_max_iters is not None and args.curve_max_iters < 1:
        raise InvalidOptionError(
            f"--curve-max-iters must be an iteration cap >= 1; got {args.curve_max_iters} "
            "(leave it out for the plan's default)."
        )
    plan = quick_plan(models) if args.quick else full_plan(models)
    changes: dict[str, Any] = {}
    if args.samplers:
        changes["samplers"] = [parse_sampler(s) for s in args.samplers]
    if args.solvers:
        changes["solvers"] = [parse_solver(s) for s in args.solvers]
    if args.tolerances:
        try:
            changes["tolerances"] = [float(t) for t in args.tolerances]
        except ValueError:
            raise InvalidOptionError(
                f"--tolerances must be numbers; got {','.join(args.tolerances)!r}."
            ) from None
    if args.seeds is not None:
        changes["seeds"] = args.seeds
    if args.samples is not None:
        changes["samples"] = args.samples
    plan = attrs.evolve(plan, **changes)
    return attrs.evolve(plan, curve=_fit_curve(plan, args.curve_max_iters), heatmap=_fit_heatmap(plan))


def _fit_curve(plan: BenchPlan, max_iters: int | None) -> CurvePlan | None:
    """Keep the curve plan within the (possibly narrowed) axes."""
    if plan.curve is None:
        return None
    samplers = [s.key for s in plan.samplers]
    solvers = [s.key for s in plan.solvers if s.stopping != "sequential"]
    if not solvers:
        return None
    keep_samplers = [k for k in plan.curve.samplers if k in samplers] or samplers[:1]
    keep_solvers = [k for k in plan.curve.solvers if k in solvers] or solvers
    return attrs.evolve(
        plan.curve,
        samplers=keep_samplers,
        solvers=keep_solvers,
        max_iters=plan.curve.max_iters if max_iters is None else max_iters,
    )


def _fit_heatmap(plan: BenchPlan) -> tuple[str, str] | None:
    """Keep the heatmap's sampler and solver within the (possibly narrowed) axes."""
    samplers = [s.key for s in plan.samplers]
    solvers = [s.key for s in plan.solvers if s.stopping != "sequential"]
    if plan.heatmap is None or not solvers:
        return None
    sampler, solver = plan.heatmap
    return (sampler if sampler in samplers else samplers[-1], solver if solver in solvers else solvers[-1])


def _models(requested: list[str] | None, device: torch.device) -> dict[str, Any]:
    """Load the requested models; with no request, digits, or gmm when its weights are missing."""
    if requested:
        return {name: runner.prepare_model(name, device) for name in dict.fromkeys(requested)}
    try:
        return {"digits": runner.prepare_model("digits", device)}
    except (FileNotFoundError, ImportError) as error:
        print(
            f"fpsolve bench: the digits model is unavailable ({error}); benchmarking the 'gmm' model "
            "instead (no image metrics).",
            file=sys.stderr,
        )
        return {"gmm": runner.prepare_model("gmm", device)}


def _machine(device: torch.device, threads: int) -> str:
    where = f"{cpu_name()}, {os.cpu_count()} cores, {threads} torch thread{'s' if threads > 1 else ''}"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} ({where})"
    return f"{where}, torch {torch.__version__}"


def _command(args: argparse.Namespace, models: list[str], out: Path) -> str:
    parts = ["fpsolve bench", "--model " + " ".join(models)]
    parts += ["--quick"] if args.quick else []
    for flag, value in (
        ("--seeds", args.seeds),
        ("--samples", args.samples),
        ("--samplers", ",".join(args.samplers or []) or None),
        ("--solvers", ",".join(args.solvers or []) or None),
        ("--tolerances", ",".join(args.tolerances or []) or None),
        ("--curve-max-iters", args.curve_max_iters),
    ):
        if value is not None:
            parts.append(f"{flag} {value}")
    if args.device != "cpu":
        parts.append(f"--device {args.device}")
    if args.threads != 1:
        parts.append(f"--threads {args.threads}")
    return " ".join(parts + [f"--out {out.as_posix()}"])


class _RichReporter(Reporter):
    """Drives a rich progress bar over the plan's units of work."""

    def __init__(self, progress: Any, total: int):
        self.progress = progress
        self.task = progress.add_task("benchmark", total=total)

    def begin(self, description: str) -> None:
        """Show what runs now."""
        self.progress.update(self.task, description=description)

    def end(self) -> None:
        """Advance the bar by one unit."""
        self.progress.advance(self.task)


def _write_plots(result: Any, out: Path) -> dict[str, list[str]]:
    from ..bench import plots  # needs matplotlib (the "bench" extra); --no-plots runs without it

    written: dict[str, list[str]] = {}
    for model in result.plan.models:
        names = written.setdefault(model, [])
        tol = result.plan.tolerances[0] if result.plan.tolerances else None
        names.append(
            plots.plot_iterations_vs_steps(result, model, out / f"bench-{model}-iterations.png", tol).name
        )
        curves = [c for c in result.curves if c.model == model]
        if curves:
            names.append(plots.plot_error_vs_cap(curves, out / f"bench-{model}-error-vs-cap.png").name)
        for heatmap in (h for h in result.heatmaps if h.model == model):
            title = (
                f"{model} {heatmap.sampler}, {heatmap.solver}, seed {heatmap.seed}: residual per iteration"
            )
            names.append(
                plots.plot_residual_heatmap(
                    heatmap.first_order, out / f"bench-{model}-residuals.png", title, heatmap.anchors
                ).name
            )
    return written


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and write its outputs; 2 on a bad option."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


    if args.threads < 1:
        print("fpsolve bench: --threads must be >= 1.", file=sys.stderr)
        return 2
    console = Console()
    if not console.is_terminal:  # piped or captured: rich would wrap the tables at 80 columns
        console = Console(width=140)
    try:
        device = torch.device(args.device)
        plan = build_plan(args, args.model or ["digits"])  # checks the options before any model loads
        models = _models(args.model, device)
        plan = attrs.evolve(plan, models=list(models))
        out = check_output_dir(args.out or (QUICK_OUT if args.quick else DEFAULT_OUT))  # before the run
    except (FpsolveError, RuntimeError, OSError, ImportError) as error:
        # a bad option, a device torch cannot use, missing weights / extras of a requested model,
        # or an --out that cannot be written
        print(f"fpsolve bench: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
            reporter = _RichReporter(progress, runner.count_units(plan))
            result = run_progressively(plan, device, reporter, models, out / "bench.json")
    finally:
        torch.set_num_threads(previous_threads)  # in-process callers (tests) keep their setting
    print_tables(result, console)
    command = _command(args, list(models), out)
    result.meta.update(
        command=command,
        machine=_machine(device, args.threads),
        seconds=round(time.perf_counter() - started, 1),
        date=time.strftime("%Y-%m-%d"),
    )
    # every number first (atomically), so a failure while plotting loses none of them
    write_json(result, out / "bench.json")
    plot_files = {} if args.no_plots else _write_plots(result, out)
    written = [
        write_json(result, out / "bench.json", plot_files),
        write_markdown(result, out / "index.md", plot_files, command),
    ]
    written += [out / name for names in plot_files.values() for name in names]
    console.print(
        f"benchmark finished in {result.meta['seconds']} s; wrote " + ", ".join(str(p) for p in written)
    )
    return 0
