"""``fpsolve demo``: the README's main job on an embedded model (no download).

Samples a reference model sequentially and with TAA from the same noise, and prints iterations,
model evaluations, the reduction in sequential model calls and the error to sequential.
"""

from __future__ import annotations

import argparse

import torch

from . import samplers, solve
from .models import load_reference, spaced_timesteps
from .system import TriangularSystem


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the demo."""
    parser.add_argument("--model", default="gmm", help="reference model (gmm)")
    parser.add_argument("--steps", type=int, default=100, help="sampler steps T (default 100)")
    parser.add_argument("--samples", type=int, default=8, help="samples solved together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-3)


def run(args: argparse.Namespace) -> int:
    """Solve sequentially and with TAA, then report."""
    ref = load_reference(args.model)
    sampler = samplers.DDIM(alphas_cumprod=ref.alphas_cumprod, timesteps=spaced_timesteps(args.steps))
    system = TriangularSystem(sampler=sampler, denoiser=ref.denoiser, shape=ref.shape, batch=args.samples,
                              generator=torch.Generator().manual_seed(args.seed))
    reference = solve(system, "sequential")
    parallel = solve(system, "taa", tol=args.tol)
    error = (parallel.sample - reference.sample).abs().max().item()
    print(f"model {ref.name}, DDIM-{args.steps}, {args.samples} samples, tol {args.tol:g}")
    print(f"  sequential: {reference.iterations} model calls, {reference.model_evals} evaluations, "
          f"{reference.wall_time:.2f} s")
    print(f"  taa:        {parallel.iterations} parallel iterations, {parallel.model_evals} evaluations, "
          f"{parallel.wall_time:.2f} s, {parallel.status.name.lower()}")
    print(f"  sequential model calls reduced {reference.iterations / parallel.iterations:.1f}x; "
          f"max abs error to sequential {error:.2e}")
    return 0
