"""GPU wall clock: fpsolve's parallel solve against the tuned sequential loop (issue 6).

One script, one call on a lent H100/H200 (about 5-7 minutes; ``--budget-s`` skips what does not
fit and keeps what was measured):

    python benchmarks/gpu_bench.py                      # CUDA if present; writes $OUT or docs/benchmarks
    python benchmarks/gpu_bench.py --tiny --device cpu  # tiny configs, < 1 minute, for tests

Models (DDIM, eta 0; model inputs fp16 on CUDA, solver state fp32):

* ``digits``: the trained digits UNet (``fpsolve.models.load_reference("digits")``), T = 100:
  real iteration counts. Without its weights, a random UNet of the same architecture, and every
  iteration count it gives is labelled as not from a trained model.
* ``sd15``: a random-weight UNet2DConditionModel in the SD 1.x configuration, 4x64x64 latents,
  classifier-free guidance (two rows per sample), T = 50.
* ``dit``: a random-weight DiTTransformer2DModel (diffusers default = DiT-XL/2, 4x32x32), class
  guidance, T = 100.

For each model: the latency ``t(B)`` of one denoiser call, eager and CUDA-graph; the sequential
loop (``fpsolve.solve(..., "sequential")``, eager and graph, and the system's one sequential loop
with the bare denoiser and no host synchronisation: the honest baseline); TAA at fixed windows and
at ``window="auto"``, and newton (``fpsolve.solve``'s default solver) at the full window. Per
configuration: median wall time over ``--runs`` runs after a warm-up (CUDA events around the
solve), iterations, peak memory, and the share of the wall time spent outside denoiser calls (each
call timed with its own CUDA events). Random-weight models do not converge like trained ones, so
for them the script measures the cost of an iteration at each window (a few forced iterations)
and reports ``iterations measured on the digits model at the same T and window`` x ``that cost``,
labelled as an estimate. A sync audit (``torch.cuda.set_sync_debug_mode``) counts host
synchronisations per iteration.

This script is the command line only: the models, the timing and the measurements are
:mod:`fpsolve.bench.gpu`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from fpsolve.bench.gpu import Settings, run_benchmark

ROOT = Path(__file__).resolve().parents[1]
#: The models the script knows, in report order.
MODELS = ("digits", "sd15", "dit")


def parse(argv: list[str] | None = None) -> Settings:
    """Command-line settings."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models and few steps (CPU tests, < 1 minute)"
    )
    parser.add_argument(
        "--runs", type=int, default=None, help="timed runs per configuration (default 5; tiny 1)"
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}"
    )
    parser.add_argument("--samples", type=int, default=1, help="samples per solve (default 1)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="skip configurations once this many seconds have passed (default 420)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default $OUT if set, else docs/benchmarks)"
    )
    args = parser.parse_args(argv)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    models = tuple(m for m in args.models.split(",") if m)
    unknown = set(models) - set(MODELS)
    if unknown:
        parser.error(f"unknown models: {sorted(unknown)}")
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "docs" / "benchmarks")
    runs = args.runs or (1 if args.tiny else 5)
    return Settings(device, args.tiny, runs, models, args.samples, args.budget_s, out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write the report; returns it."""
    settings = parse(argv)
    threads = torch.get_num_threads()
    if settings.tiny and settings.device.type == "cpu":
        # Tiny models gain nothing from more threads, and on a busy machine spinning threads
        # oversubscribe the cores (measured here: 20x slower with 2 threads than with 1).
        torch.set_num_threads(1)
    try:
        command = "python benchmarks/gpu_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
        return run_benchmark(settings, command)
    finally:
        torch.set_num_threads(threads)



if __name__ == "__main__":
    main()
