"""``fpsolve train-reference``: train the shipped digits UNet (or, ``--objective flow``, the flow
model) with :func:`fpsolve.models.digits.train_digits`, and print what was written."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InvalidOptionError
from ..models.digits import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LR,
    DEFAULT_STEPS,
    OBJECTIVES,
    WEIGHTS_DIR,
    ddim_sample_digits,
    flow_euler_sample_digits,
    load_digits_unet,
    save_digit_grid,
    train_digits,
)

__all__ = ["add_train_parser", "add_arguments", "run_train", "run"]


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``train-reference`` sub-command on an argparse ``subparsers`` object.

    The sub-command's ``func`` default is :func:`run_train`, so a main CLI can dispatch with
    ``args.func(args)``.

    Returns:
        The new sub-parser.
    """
    parser = subparsers.add_parser(
        "train-reference",
        help="train the reference digits UNet (about 15-30 minutes on one CPU core)",
        description="Train the small DDPM (or, with --objective flow, the rectified-flow model) on the "
        "scikit-learn 8x8 digits that fpsolve ships for benchmarks.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run_train)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train-reference`` options to ``parser`` (the hook that :func:`fpsolve.cli.main` calls).

    Options: ``--out`` (default: the package weights folder), ``--steps``, ``--seed``,
    ``--threads``, ``--batch-size``, ``--lr``, ``--curve-dir``, ``--samples``, ``--no-progress``.
    """
    parser.add_argument(
        "--out",
        type=Path,
        default=WEIGHTS_DIR,
        help="folder for the weights and config (default: %(default)s)",
    )
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help="optimiser steps (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per step (default: %(default)s)"
    )
    parser.add_argument(
        "--lr", type=float, default=DEFAULT_LR, help="peak learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--curve-dir", type=Path, default=None, help="folder for the loss curve JSON/PNG (default: --out)"
    )
    parser.add_argument(
        "--objective",
        choices=list(OBJECTIVES),
        default="eps",
        help="eps: DDPM epsilon prediction (digits_unet.*); flow: rectified flow, velocity prediction "
        "(digits_flow_unet.*) (default: %(default)s)",
    )
    parser.add_argument(
        "--samples",
        type=Path,
        default=None,
        help="also write a grid of 64 samples to this PNG (DDIM-100; flow Euler-50 for --objective flow)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_train(args: argparse.Namespace) -> int:
    """Run ``train-reference`` from parsed arguments (see :func:`add_train_parser`).

    Returns:
        The process exit code: 0 on success, 2 for an invalid option (the message goes to stderr).
    """
    try:
        result = train_digits(
            args.out,
            seed=args.seed,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            threads=args.threads,
            progress=not args.no_progress,
            curve_dir=args.curve_dir,
            objective=args.objective,
        )
    except InvalidOptionError as error:
        print(f"fpsolve train-reference: {error}", file=sys.stderr)
        return 2
    name = "digits" if args.objective == "eps" else "digits-flow"
    print(
        f"trained {result['parameter_count']:,}-parameter {name} UNet: {args.steps} steps in "
        f"{result['wall_time_s']:.0f} s on {args.threads} thread(s), final loss {result['final_loss']:.4f}"
    )
    if args.samples is not None:
        unet = load_digits_unet(weights_dir=args.out, objective=args.objective)
        if args.objective == "eps":
            grid = ddim_sample_digits(unet, 64, steps=100, seed=0)
        else:
            grid = flow_euler_sample_digits(unet, 64, steps=50, seed=0)
        result["paths"].append(str(save_digit_grid(grid, args.samples)))
    for path in result["paths"]:
        print(f"wrote {path}")
    return 0


#: Alias of :func:`run_train`, the name :func:`fpsolve.cli.main` dispatches to.
run = run_train
