"""``fpsolve sample``: sample a reference model, on one process or on many with torchrun.

    fpsolve sample --model gmm --sampler ddim --steps 100 --solver taa --samples 8 --out x.pt
    torchrun --nproc-per-node 4 -m fpsolve sample --steps 100 --window 100 --out x.pt

Under torchrun (or srun with ``MASTER_ADDR``/``MASTER_PORT`` exported) the process group is
initialised from the environment: gloo on CPU, nccl on CUDA. Every rank solves; only rank 0
prints and writes ``--out``. Without those variables the command runs as a single process.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from .errors import FpsolveError, InvalidOptionError

SAMPLERS = ("ddim", "ddpm", "dpm_solver")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fpsolve sample``."""
    parser.add_argument("--model", default="digits",
                        help="reference model: digits (falls back to gmm if it cannot be loaded) or gmm")
    parser.add_argument("--sampler", default="ddim", choices=SAMPLERS,
                        help="sequential sampler (default ddim)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps T (default 50)")
    parser.add_argument("--solver", default="taa",
                        help="taa (default), fp, picard, jacobi, aa, sequential, ...")
    parser.add_argument("--window", type=int, default=None, help="positions per iteration (default T)")
    parser.add_argument("--tol", type=float, default=None,
                        help="rms stopping tolerance (default: the rms rule's default, 2e-4)")
    parser.add_argument("--max-iters", type=int, default=None, help="cap on parallel iterations")
    parser.add_argument("--samples", type=int, default=4, help="samples N (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                        help="solver state dtype (default float64)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda:LOCAL_RANK when CUDA is available, else cpu")
    parser.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"),
                        help="process-group backend (auto: nccl on cuda, gloo on cpu)")
    parser.add_argument("--shard", default="window", choices=("window", "samples", "auto"),
                        help="window (default: the single-process result, bit for bit, on batch-invariant "
                             "models), samples (each rank its own samples), auto (fpsolve.distributed.plan)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a collective may wait for a lost rank before failing (default 600)")
    parser.add_argument("--out", type=Path, default=None, help="save the samples (torch.save) to this file")


# -- process group ---------------------------------------------------------------------------------


def _launch_environment() -> dict[str, str] | None:
    """RANK/WORLD_SIZE/LOCAL_RANK from torchrun, or from SLURM when MASTER_ADDR/PORT are set."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {"RANK": env["RANK"], "WORLD_SIZE": env["WORLD_SIZE"],
                "LOCAL_RANK": env.get("LOCAL_RANK", "0")}
    if "SLURM_PROCID" in env and "MASTER_ADDR" in env and "MASTER_PORT" in env:
        return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env.get("SLURM_NTASKS", "1"),
                "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    return None


def _device(args: argparse.Namespace, local_rank: int) -> torch.device:
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InvalidOptionError(
            "--device cuda was asked for but torch sees no CUDA device; use --device cpu.")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)  # nccl and all_gather_object use the current device
    return device


def _init_group(args: argparse.Namespace, device: torch.device, launch: dict[str, str]) -> bool:
    """Initialise the default process group from the environment; False when there is nothing to do."""
    import torch.distributed as dist

    world = int(launch["WORLD_SIZE"])
    if world <= 1 or dist.is_initialized():
        return False
    backend = args.backend if args.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend=backend, init_method="env://", rank=int(launch["RANK"]), world_size=world,
                            timeout=timedelta(seconds=args.timeout))
    return True


# -- model and system ------------------------------------------------------------------------------


def _load_model(name: str, device: torch.device, say: Any) -> Any:
    from .models import load_reference

    try:
        ref = load_reference(name)
    except Exception as error:  # the digits UNet needs its weights file and the models extra
        if name != "digits":
            raise
        say(f"fpsolve sample: the digits model could not be loaded ({type(error).__name__}: {error}); "
            "using the gmm reference model instead.")
        return load_reference("gmm")
    if ref.unet is not None and device.type != "cpu":
        from .models import digits

        # the digits denoiser runs the UNet where the UNet lives: rebuild it on this rank's GPU
        ref = type(ref)(ref.name, digits.digits_denoiser(ref.unet.to(device)), ref.alphas_cumprod,
                        ref.shape, ref.to_images, ref.unet)
    return ref


def _system(args: argparse.Namespace, ref: Any, device: torch.device) -> Any:
    from . import samplers
    from .models import spaced_timesteps
    from .system import TriangularSystem

    classes = {"ddim": samplers.DDIM, "ddpm": samplers.DDPM, "dpm_solver": samplers.DPMSolver}
    sampler = classes[args.sampler](alphas_cumprod=ref.alphas_cumprod, timesteps=spaced_timesteps(args.steps))
    # noise is drawn on the CPU from the seed, so every rank (and a single process) has the same
    return TriangularSystem(sampler=sampler, denoiser=ref.denoiser, shape=ref.shape, batch=args.samples,
                            generator=torch.Generator().manual_seed(args.seed),
                            dtype=getattr(torch, args.dtype), device=device)


# -- the command ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Sample, print a summary on rank 0 and save ``--out`` on rank 0."""
    import torch.distributed as dist

    from .distributed import plan, solve_distributed

    launch = _launch_environment()
    local_rank = int(launch["LOCAL_RANK"]) if launch else 0
    rank = int(launch["RANK"]) if launch else 0
    created = False
    try:
        device = _device(args, local_rank)
        created = _init_group(args, device, launch) if launch else False
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1

        def say(text: str) -> None:
            if rank == 0:
                print(text, flush=True)

        ref = _load_model(args.model, device, say)
        system = _system(args, ref, device)
        options: dict[str, Any] = dict(window=args.window, tol=args.tol, max_iters=args.max_iters)
        width = min(args.window or args.steps, args.steps)
        chosen = plan(args.samples, width, world, shard=args.shard)
        if distributed:
            solution = solve_distributed(system, args.solver, shard=chosen.mode, **options)
        else:
            from .api import solve

            solution = solve(system, args.solver, **options)
        per_iteration = solution.wall_time / max(solution.iterations, 1)
        say(f"model {ref.name}, {args.sampler}-{args.steps}, solver {args.solver}, window {width}, "
            f"{args.samples} samples, seed {args.seed}, {world} process(es) on {device.type}"
            + (f", {chosen.mode.rstrip('s')} sharding ({chosen.reason})" if world > 1 else ""))
        say(f"  {solution.iterations} iterations, {solution.model_evals} model evaluations, "
            f"{solution.wall_time:.3f} s ({1e3 * per_iteration:.2f} ms per iteration), "
            f"{solution.status.name.lower()}")
        if rank == 0 and args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"samples": solution.sample.cpu(), "model": ref.name, "sampler": args.sampler,
                        "steps": args.steps, "solver": args.solver, "window": width, "tol": args.tol,
                        "seed": args.seed, "world_size": world, "shard": chosen.mode,
                        "iterations": solution.iterations, "model_evals": solution.model_evals,
                        "status": solution.status.name, "wall_time": solution.wall_time}, args.out)
            say(f"  saved {tuple(solution.sample.shape)} samples to {args.out}")
        return 0
    except FpsolveError as error:
        print(f"fpsolve sample (rank {rank}): {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        if created:
            dist.destroy_process_group()
