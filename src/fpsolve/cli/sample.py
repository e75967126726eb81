"""``fpsolve sample``: sample a reference model, on one process or on many with torchrun.

    fpsolve sample --model gmm --sampler ddim --steps 100 --solver taa --samples 8 --out x.pt
    torchrun --nproc-per-node 4 -m fpsolve sample --steps 100 --window 100 --out x.pt

Under torchrun (or srun with ``MASTER_ADDR``/``MASTER_PORT`` exported) the process group is
initialised from the environment: gloo on CPU, nccl on CUDA. Every rank solves; only rank 0
prints and writes ``--out``. Without those variables the command runs as a single process.

``--out`` chooses the format by its suffix (see :data:`OUT_FORMATS`); a folder gets a file named
after the run (:func:`default_file_name`). The path is checked before sampling, and the file is
written atomically (a temporary file renamed into place), so a failure never leaves half a file.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
import torch

from .. import api, models, samplers
from ..bench.metrics import image_converter
from ..cli_output import atomic_write, check_output_dir
from ..control import Controller
from ..distributed import plan, solve_distributed
from ..errors import FpsolveError, InvalidOptionError
from ..models import digits
from ..models.digits import save_digit_grid
from ..registry import get_registry, registered_classes
from ..stopping import RMS
from ..system import TriangularSystem


def vp_samplers() -> tuple[str, ...]:
    """The registered samplers ``--sampler`` builds for an epsilon model: variance-preserving
    ones (:class:`~fpsolve.samplers.VPSampler`, built on the model's ``alphas_cumprod``) whose
    model returns the noise."""
    return tuple(name for name, cls in registered_classes("sampler", samplers.VPSampler).items()
                 if cls.prediction == "epsilon")


def flow_samplers() -> tuple[str, ...]:
    """The registered samplers ``--sampler`` builds for a flow model: flow-matching ones
    (:class:`~fpsolve.samplers.FlowSampler`, built on the model's ``flow_sigmas``) whose model
    returns the velocity."""
    return tuple(name for name, cls in registered_classes("sampler", samplers.FlowSampler).items()
                 if cls.prediction == "velocity")


def sampler_choices() -> tuple[str, ...]:
    """``--sampler`` choices, from the registry: ``auto`` (the model's own, ``ref.sampler``: DDIM
    for an epsilon model, flow Euler for a flow model), then :func:`vp_samplers` (epsilon models)
    and :func:`flow_samplers` (flow models)."""
    return ("auto", *vp_samplers(), *flow_samplers())

#: ``--out`` suffix -> what the file holds.
OUT_FORMATS: dict[str, str] = {
    ".pt": "torch.save of a dict: the samples tensor [N, *shape] under 'samples', and the run's "
    "settings and counts (model, sampler, steps, solver, window, tol, seed, iterations, status, ...)",
    ".safetensors": "the samples tensor under 'samples'; the run's settings as string metadata",
    ".png": "the samples as one image grid (image models such as digits only)",
}


def default_file_name(args: argparse.Namespace, model: str) -> str:
    """The file a folder given to ``--out`` receives, e.g. ``samples-digits-ddim50-taa-seed0.pt``
    (``--sampler auto`` is named after the sampler it picks: ddim, or flow_euler for a flow model)."""
    sampler = args.sampler
    if sampler == "auto":
        sampler = "flow_euler" if models.reference_prediction(model) == "velocity" else "ddim"
    return f"samples-{model}-{sampler}{args.steps}-{args.solver}-seed{args.seed}.pt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fpsolve sample``."""
    parser.add_argument("--model", default="digits", choices=models.available_references(),
                        help="reference model (default digits; gmm if the digits model cannot be loaded)")
    parser.add_argument("--sampler", default="auto", choices=sampler_choices(),
                        help="sequential sampler (default auto: the model's own, DDIM for an epsilon "
                             "model, flow_euler for digits-flow)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps T (default 50)")
    parser.add_argument("--solver", default="taa",
                        help="taa (default), fp, picard, jacobi, aa, sequential, ...")
    parser.add_argument("--window", type=int, default=None, help="positions per iteration (default T)")
    default_tol = attrs.fields(RMS).tol1.default  # quoted from the code, never retyped
    parser.add_argument("--tol", type=float, default=None,
                        help=f"rms stopping tolerance (default: the rms rule's default, {default_tol:g})")
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
                        help="seconds (> 0) a collective may wait for a lost rank before failing "
                             "(default 600)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared or busy CPU, multi-threaded model "
                             "calls can be many times slower)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="solve this many times and report the median wall time (default 1)")
    parser.add_argument("--out", type=Path, default=None,
                        help="save the samples; the suffix picks the format: .pt (a dict: 'samples' and "
                             "the run's settings), .safetensors ('samples', settings as metadata), .png (an "
                             "image grid, image models only); a folder gets samples-<model>-<sampler><T>-"
                             "<solver>-seed<seed>.pt. Checked before sampling, written atomically")


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
    try:
        ref = models.load_reference(name)
    except Exception as error:  # the digits UNet needs its weights file and the models extra
        if name != "digits":
            raise
        say(f"fpsolve sample: the digits model could not be loaded ({type(error).__name__}: {error}); "
            "using the gmm reference model instead.")
        return models.load_reference("gmm")
    if ref.unet is not None and device.type != "cpu":
        # the digits denoiser runs the UNet where the UNet lives: rebuild it on this rank's GPU
        ref = attrs.evolve(ref, denoiser=digits.digits_denoiser(ref.unet.to(device)))
    return ref


def _sampler(name: str, steps: int, ref: Any) -> Any:
    """The sequential sampler ``--sampler name`` over ``steps`` steps for the reference ``ref``."""

    if name == "auto":
        return ref.sampler(steps)
    flow = ref.prediction == "velocity"
    fits = flow_samplers() if flow else vp_samplers()
    if name not in fits:
        raise InvalidOptionError(
            f"--sampler {name} does not fit --model {ref.name}, a {ref.prediction} model; use --sampler "
            f"auto or one of {', '.join(fits)}."
        )
    cls = get_registry().lookup("sampler", name).cls  # the registry is the one name -> class map
    if flow:
        return cls(sigmas=ref.flow_sigmas(steps), num_train_timesteps=ref.num_train_timesteps)
    return cls(alphas_cumprod=ref.alphas_cumprod, timesteps=models.spaced_timesteps(steps))


def _system(args: argparse.Namespace, ref: Any, device: torch.device) -> Any:
    sampler = _sampler(args.sampler, args.steps, ref)
    # noise is drawn on the CPU from the seed, so every rank (and a single process) has the same
    return TriangularSystem(sampler=sampler, denoiser=ref.denoiser, shape=ref.shape, batch=args.samples,
                            generator=torch.Generator().manual_seed(args.seed),
                            dtype=getattr(torch, args.dtype), device=device)


# -- the command ---------------------------------------------------------------------------------


def _check_options(args: argparse.Namespace) -> None:
    """Refuse option values that would be ignored or fail late (before any model loads)."""
    import math

    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise InvalidOptionError(f"--timeout must be a number of seconds > 0; got {args.timeout:g}.")
    for name in ("threads", "repeats", "samples", "steps"):
        if getattr(args, name) < 1:
            raise InvalidOptionError(f"--{name} must be >= 1; got {getattr(args, name)}.")


def resolve_out(args: argparse.Namespace, model: str) -> Path | None:
    """The file ``--out`` names: a folder (existing, or written with a trailing slash) gets
    :func:`default_file_name`; the suffix must be one of :data:`OUT_FORMATS`. The folder is
    created and checked writable here, before sampling."""
    if args.out is None:
        return None
    out = Path(args.out)
    if out.is_dir() or str(args.out).endswith(("/", os.sep)):
        out = out / default_file_name(args, model)
    if out.suffix not in OUT_FORMATS:
        raise InvalidOptionError(
            f"--out {args.out}: unknown suffix {out.suffix or '(none)'!r}; use one of "
            f"{', '.join(OUT_FORMATS)}, or a folder.")
    check_output_dir(out.parent, f"--out {args.out}")
    return out


def _settings(args: argparse.Namespace, model: str, width: int, world: int, shard: str,
              solution: Any, wall_time: float) -> dict[str, Any]:
    return {"model": model, "sampler": args.sampler, "steps": args.steps, "solver": args.solver,
            "window": width, "tol": args.tol, "seed": args.seed, "world_size": world, "shard": shard,
            "iterations": solution.iterations, "model_evals": solution.model_evals,
            "status": solution.status.name, "wall_time": wall_time}


def save_samples(out: Path, samples: torch.Tensor, settings: dict[str, Any], to_images: Any) -> Path:
    """Write ``samples`` to ``out`` in the format of its suffix (:data:`OUT_FORMATS`), atomically."""
    samples = samples.detach().cpu()
    with atomic_write(out) as temporary:
        if out.suffix == ".pt":
            torch.save({"samples": samples, **settings}, temporary)
        elif out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({"samples": samples.contiguous()}, str(temporary),
                      metadata={key: str(value) for key, value in settings.items()})
        else:
            save_digit_grid(to_images(samples), temporary, nrow=min(8, samples.shape[0]), scale=6)
    return out


def run(args: argparse.Namespace) -> int:
    """Sample, print a summary on rank 0 and save ``--out`` on rank 0."""
    import statistics

    import torch.distributed as dist

    launch = _launch_environment()
    local_rank = int(launch["LOCAL_RANK"]) if launch else 0
    rank = int(launch["RANK"]) if launch else 0
    created = False
    previous_threads = torch.get_num_threads()
    try:
        _check_options(args)
        out = resolve_out(args, args.model) if rank == 0 else None  # before any model loads
        torch.set_num_threads(args.threads)
        device = _device(args, local_rank)
        created = _init_group(args, device, launch) if launch else False
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1

        def say(text: str) -> None:
            if rank == 0:
                print(text, flush=True)

        ref = _load_model(args.model, device, say)
        if out is not None and ref.name != args.model and args.out.is_dir():
            out = resolve_out(args, ref.name)  # the fallback model names the file

        to_images = image_converter(ref.to_images, ref.shape)
        if out is not None and out.suffix == ".png" and to_images is None:
            raise InvalidOptionError(
                f"--out {out}: the {ref.name} model's samples are not images; use .pt or .safetensors.")
        system = _system(args, ref, device)
        options: dict[str, Any] = dict(window=args.window, tol=args.tol, max_iters=args.max_iters)
        width = Controller(window=args.window).window_for(args.steps)  # the one clip (and check)
        chosen = plan(args.samples, width, world, shard=args.shard)
        times = []
        for _ in range(args.repeats):
            if distributed:
                solution = solve_distributed(system, args.solver, shard=chosen.mode, **options)
            else:
                solution = api.solve(system, args.solver, **options)
            times.append(solution.wall_time)
        wall_time = statistics.median(times)
        per_iteration = wall_time / max(solution.iterations, 1)
        timing = f"median of {args.repeats} runs" if args.repeats > 1 else "1 run; --repeats N for a median"
        say(f"model {ref.name}, {system.sampler.name}-{args.steps}, solver {args.solver}, window {width}, "
            f"{args.samples} samples, seed {args.seed}, {world} process(es) on {device.type}"
            + (f", {chosen.mode.rstrip('s')} sharding ({chosen.reason})" if world > 1 else ""))
        say(f"  {solution.iterations} iterations, {solution.model_evals} model evaluations, "
            f"{wall_time:.3f} s ({1e3 * per_iteration:.2f} ms per iteration; {timing}), "
            f"{solution.status.name.lower()}")
        if out is not None:
            settings = _settings(args, ref.name, width, world, chosen.mode, solution, wall_time)
            save_samples(out, solution.sample, settings, to_images)
            say(f"  saved {tuple(solution.sample.shape)} samples to {out}")
        return 0
    except InvalidOptionError as error:
        print(f"fpsolve sample (rank {rank}): {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        return 2
    except (FpsolveError, OSError) as error:
        print(f"fpsolve sample (rank {rank}): {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        return 1
    finally:
        torch.set_num_threads(previous_threads)  # in-process callers (tests) keep their setting
        if created:
            dist.destroy_process_group()
