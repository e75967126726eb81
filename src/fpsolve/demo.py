"""``fpsolve demo``: the README's main job, on the shipped digits model (no download).

Samples a grid of digits twice from the same noise: sequentially (T model calls in a row) and
with TAA (``fpsolve.solve(system, "taa")``, default options), then prints the parallel
iterations, the model evaluations, the reduction in sequential model calls (T / iterations) and
the largest pixel difference to the sequential grid, and saves both grids and the TAA solve's
residual heatmap as PNGs. Without the digits weights it falls back to the closed-form ``gmm``
model (64-dimensional vectors: no image grids then).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import solve
from .bench.metrics import ToImages, compare_samples, image_converter
from .models import ReferenceModel, load_reference
from .system import TriangularSystem

__all__ = ["add_arguments", "run", "DEFAULT_OUT"]

#: Where the PNGs go by default.
DEFAULT_OUT = Path("fpsolve-demo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the demo."""
    parser.add_argument(
        "--model",
        choices=["digits", "digits-flow", "gmm"],
        default="digits",
        help="reference model (default digits; gmm when the digits weights are missing)",
    )
    parser.add_argument(
        "--steps", type=int, default=50, help="sampler steps T: DDIM, flow Euler for digits-flow (default 50)"
    )
    parser.add_argument("--samples", type=int, default=8, help="digits in the grid (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared or busy CPU, multi-threaded model calls "
        "can be many times slower)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"folder for the PNGs (default ./{DEFAULT_OUT}/)"
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
            "  Falling back to the 'gmm' model (64-dimensional vectors): no image grids are saved.",
            file=sys.stderr,
        )
        return load_reference("gmm")


def _save_pngs(
    to_images: ToImages | None,
    sequential: torch.Tensor,
    parallel: torch.Tensor,
    residuals: torch.Tensor,
    anchors: tuple[int, ...],
    title: str,
    out: Path,
) -> list[Path]:
    from .bench.plots import plot_residual_heatmap

    written = []
    if to_images is not None:
        from .models.digits import save_digit_grid  # grayscale [N, H, W] grids, like the digits

        nrow = min(8, sequential.shape[0])
        written += [
            save_digit_grid(to_images(sequential), out / "sequential.png", nrow=nrow, scale=6),
            save_digit_grid(to_images(parallel), out / "taa.png", nrow=nrow, scale=6),
        ]
    written.append(plot_residual_heatmap(residuals.numpy(), out / "residuals.png", title, anchors))
    return written


def run(args: argparse.Namespace) -> int:
    """Sample sequentially and with TAA from the same noise, report, and save the PNGs."""
    if args.steps < 2 or args.samples < 1 or args.threads < 1:
        print("fpsolve demo: --steps must be >= 2, --samples and --threads >= 1.", file=sys.stderr)
        return 2
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _demo(args)
    finally:
        torch.set_num_threads(previous_threads)  # in-process callers (tests) keep their setting


def _demo(args: argparse.Namespace) -> int:
    ref = _load(args.model)
    sampler = ref.sampler(args.steps)  # the model's own: DDIM (eta 0), or flow Euler for a flow model
    system = TriangularSystem(
        sampler=sampler,
        denoiser=ref.denoiser,
        shape=ref.shape,
        batch=args.samples,
        generator=torch.Generator().manual_seed(args.seed),
    )
    sequential = solve(system, "sequential")
    parallel = solve(system, "taa")  # the library defaults, whatever they are
    steps = args.steps
    label = f"DDIM-{steps} (eta 0)" if ref.prediction == "epsilon" else f"{type(sampler).__name__}-{steps}"
    print(f"model {ref.name}, {label}, {args.samples} samples, seed {args.seed}")
    print(
        f"  sequential: {sequential.iterations} model calls in sequence, {sequential.model_evals} model "
        f"evaluations, {sequential.wall_time:.1f} s"
    )
    print(
        f"  taa:        {parallel.iterations} parallel iterations, {parallel.model_evals} model evaluations, "
        f"{parallel.wall_time:.1f} s, {parallel.status.name.lower()}"
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
    else:
        error = (parallel.sample - sequential.sample).abs().max().item()
        print(f"  max abs difference to sequential: {error:.2e} (gmm vectors, no pixels)")
    title = f"{ref.name} {label.split(' ')[0]}, taa: first-order residual per iteration"
    for path in _save_pngs(
        to_images,
        sequential.sample,
        parallel.sample,
        parallel.residuals.first_order,
        parallel.residuals.anchors,
        title,
        args.out,
    ):
        print(f"  wrote {path}")
    return 0
