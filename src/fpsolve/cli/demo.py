"""``fpsolve demo``: the README's main job, on the shipped digits model (no download).

Samples a grid of digits twice from the same noise: sequentially (T model calls in a row) and
with TAA (``fpsolve.solve(system, "taa")``, default options). It prints the parallel iterations,
the model evaluations, the reduction in sequential model calls (T / iterations), the largest
pixel difference to the sequential grid, the measured CPU times (median of ``--repeats`` runs)
with what they mean, and the wall-time ratio *predicted* for a GPU from latency tables measured
on an NVIDIA H200 (:func:`fpsolve.bench.prediction.predict_gpu` on its
:data:`~fpsolve.bench.prediction.LATENCY_TABLE`). It saves one labelled figure, ``demo.png``: the
sequential grid, the TAA grid, their difference and the TAA solve's residual heatmap with the
anchor. Without the digits weights it falls back to the closed-form ``gmm`` model (64-dimensional
vectors, drawn as rows of values instead of images).

The model is chosen by name through :func:`fpsolve.models.load_reference`: every name it
knows (:func:`fpsolve.models.available_references`) is a valid ``--model``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from ..api import solve
from ..bench.metrics import compare_samples, image_converter
from ..bench.prediction import predict_gpu
from ..cli_output import check_output_dir
from ..errors import InvalidOptionError
from ..models import ReferenceModel, available_references, load_reference
from ..progress import JobProgress
from ..system import TriangularSystem

__all__ = ["add_arguments", "run", "DEFAULT_OUT", "FIGURE_NAME"]

#: Where the figure goes by default.
DEFAULT_OUT = Path("fpsolve-demo")
#: The figure's file name inside ``--out``.
FIGURE_NAME = "demo.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the demo."""
    parser.add_argument(
        "--model",
        choices=available_references(),
        default="digits",
        help="reference model (default digits; gmm when the digits weights are missing)",
    )
    parser.add_argument(
        "--steps", type=int, default=50, help="sampler steps T: DDIM, flow Euler for digits-flow (default 50)"
    )
    parser.add_argument("--samples", type=int, default=8, help="digits in the grid (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each solve; times are their median (default 3)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared or busy CPU, multi-threaded model calls "
        "can be many times slower)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"folder for the figure {FIGURE_NAME} (default ./{DEFAULT_OUT}/; checked before sampling)",
    )


def _load(name: str) -> ReferenceModel:
    """The requested model; the digits model falls back to gmm, with a message, when unavailable."""
    if name != "digits":
        return load_reference(name)
    try:
        return load_reference("digits")
    except (FileNotFoundError, ImportError) as error:
        print(
            f"fpsolve demo: the digits model is unavailable ({error}).\n"
            "  Falling back to the 'gmm' model (64-dimensional vectors, drawn as rows of values).",
            file=sys.stderr,
        )
        return load_reference("gmm")


def run(args: argparse.Namespace) -> int:
    """Sample sequentially and with TAA from the same noise, report, and save the figure."""
    for name, low in (("steps", 2), ("samples", 1), ("threads", 1), ("repeats", 1)):
        if getattr(args, name) < low:
            raise InvalidOptionError(f"--{name} must be >= {low}; got {getattr(args, name)}.")
    check_output_dir(args.out)  # before minutes of sampling, not after
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _demo(args)
    finally:
        torch.set_num_threads(previous_threads)  # in-process callers (tests) keep their setting


def _timed(system: TriangularSystem, solver: str, repeats: int, progress: JobProgress) -> tuple[Any, float]:
    """The solution (identical every run) and the median wall time of ``repeats`` runs."""
    times, solution = [], None
    for run_index in range(repeats):
        label = f"{solver} run {run_index + 1}/{repeats}"
        solution = solve(system, solver, observers=[progress.observer(label, system.num_steps)])
        times.append(solution.wall_time)
    return solution, statistics.median(times)


def _parameters(ref: ReferenceModel) -> int | None:
    return None if ref.unet is None else sum(p.numel() for p in ref.unet.parameters())


def _sampler(ref: ReferenceModel, steps: int) -> Any:
    """The sequential sampler the demo solves for ``ref``: the model's own (``ref.sampler``):
    DDIM (eta 0) on its training schedule, or flow Euler for a flow-matching model."""
    return ref.sampler(steps)


def _label(ref: ReferenceModel, sampler: Any, steps: int) -> str:
    """A short name of the sampler for titles: ``DDIM-50`` or ``FlowEuler-50``."""
    return f"DDIM-{steps}" if ref.prediction == "epsilon" else f"{type(sampler).__name__}-{steps}"


def _demo(args: argparse.Namespace) -> int:
    ref = _load(args.model)
    steps = args.steps
    sampler = _sampler(ref, steps)
    system = TriangularSystem(
        sampler=sampler,
        denoiser=ref.denoiser,
        shape=ref.shape,
        batch=args.samples,
        generator=torch.Generator().manual_seed(args.seed),
    )
    progress = JobProgress(2 * args.repeats * steps, "fpsolve demo")
    try:
        sequential, sequential_s = _timed(system, "sequential", args.repeats, progress)
        parallel, parallel_s = _timed(system, "taa", args.repeats, progress)  # the library defaults
    finally:
        progress.close()
    timing = f"median of {args.repeats} runs" if args.repeats > 1 else "1 run"
    eta = " (eta 0)" if ref.prediction == "epsilon" else ""
    print(f"model {ref.name}, {_label(ref, sampler, steps)}{eta}, {args.samples} samples, seed {args.seed}")
    print(
        f"  sequential: {sequential.iterations} model calls in sequence, {sequential.model_evals} model "
        f"evaluations, {sequential_s:.2f} s CPU ({timing})"
    )
    print(
        f"  taa:        {parallel.iterations} parallel iterations, {parallel.model_evals} model evaluations, "
        f"{parallel_s:.2f} s CPU ({timing}), {parallel.status.name.lower()}"
    )
    print(
        f"  sequential model calls reduced {steps / parallel.iterations:.1f}x (T / iterations = "
        f"{steps} / {parallel.iterations})"
    )
    to_images = image_converter(ref.to_images, ref.shape)
    if to_images is not None:
        errors = compare_samples(parallel.sample, sequential.sample, to_images)
        print(
            f"  max pixel difference to sequential: {errors.max_abs_pixels:g} (on [0, 255]); "
            f"PSNR {errors.psnr_db:.1f} dB"
        )
        difference = f"max |difference| {errors.max_abs_pixels:g} of 255"
    else:
        error = (parallel.sample - sequential.sample).abs().max().item()
        print(f"  max abs difference to sequential: {error:.2e} (gmm vectors, no pixels)")
        difference = f"max |difference| {error:.1e}"
    extra = parallel.model_evals / sequential.model_evals
    print(
        f"  CPU times: taa made {extra:.1f}x the model evaluations of sequential, batched in "
        f"{parallel.iterations} calls.\n"
        "    A CPU runs a batch of B rows about B times slower than one row, so on a CPU the "
        "parallel solve is slower;\n"
        "    it pays where a batch costs little more than one row: on a GPU."
    )
    parameters = _parameters(ref)
    predictions = predict_gpu(steps, args.samples, parallel.iterations, parameters)
    first = predictions[0]
    size = "the closest measured size" if parameters else f"as if {ref.name} were a network of that size"
    print(
        f"  PREDICTED for one {first['device']} (not measured here), from latency tables measured there "
        f"for {first['model']} ({first['params_m']:g}M parameters, {size}):"
    )
    for p in predictions:
        how = "CUDA graphs" if p["mode"] == "cudagraph" else "eager"
        print(
            f"    {how + ':':<13} sequential {1e3 * p['sequential_s']:.1f} ms, "
            f"taa {1e3 * p['parallel_s']:.1f} ms "
            f"-> taa {p['ratio']:.1f}x {'faster' if p['ratio'] >= 1 else 'slower'}"
        )
    titles = (
        f"sequential: {sequential.iterations} model calls in a row ({sequential_s:.2f} s CPU)",
        f"taa: {parallel.iterations} parallel iterations, {parallel.model_evals} model evaluations "
        f"({parallel_s:.2f} s CPU)",
        f"|taa - sequential|: {difference}",
        f"taa residual per iteration ({parallel.iterations} iterations, T = {steps})",
    )
    label = _label(ref, sampler, steps)
    title = f"fpsolve demo: {ref.name}, {label}, {args.samples} samples, seed {args.seed}"
    from ..bench.plots import save_comparison_figure  # needs matplotlib (the "bench" extra)

    path = save_comparison_figure(
        to_images,
        sequential.sample,
        parallel.sample,
        parallel.residuals,
        titles,
        title,
        args.out / FIGURE_NAME,
    )
    print(f"  wrote {path} (the two grids, their difference, and the residual heatmap with the anchor)")
    return 0
