"""Training the digits UNet: seeded end to end, so anyone can rebuild the shipped weights.

:func:`train_digits` is what ``fpsolve train-reference`` runs (:mod:`fpsolve.cli.train_reference`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fpsolve.errors import InvalidOptionError
from fpsolve.validators import as_int, as_real

from .loading import FILE_NAMES, OBJECTIVES, load_digits_dataset
from .model import (
    BETA_END,
    BETA_START,
    DEFAULT_UNET_CONFIG,
    DIGITS_SHAPE,
    NUM_TRAIN_TIMESTEPS,
    build_digits_unet,
    digits_alphas_cumprod,
)

__all__ = [
    "DEFAULT_STEPS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_LR",
    "DEFAULT_EMA_DECAY",
    "WARMUP_STEPS",
    "FINAL_LOSS_WINDOW",
    "train_digits",
]

# Training defaults. On one idle AVX2 core (AMD EPYC) a batch-32 step takes about 0.26-0.45 s, so
# the default run takes about 13-25 minutes (the shipped epsilon run took 34 minutes and the flow
# run 29 minutes (1756 s), each on one thread while other jobs shared the machine's two cores).
DEFAULT_STEPS = 3000
DEFAULT_BATCH_SIZE = 32
DEFAULT_LR = 2e-3
DEFAULT_EMA_DECAY = 0.998
WARMUP_STEPS = 100
FINAL_LOSS_WINDOW = 200


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless stream of index batches: reshuffle every epoch, carry the tail into the next."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while pending.numel() < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to zero: a short run still ends at a low learning rate."""
    warmup = min(WARMUP_STEPS, max(steps // 10, 1))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_digits(
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    threads: int = 1,
    progress: bool = True,
    ema_decay: float = DEFAULT_EMA_DECAY,
    curve_dir: str | Path | None = None,
    unet_config: dict[str, Any] | None = None,
    objective: str = "eps",
) -> dict[str, Any]:
    """Train the digits UNet with the DDPM epsilon-prediction or the rectified-flow loss; save it.

    ``objective="eps"``: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` at an integer
    ``t ~ U{0..999}``, target ``noise``. ``objective="flow"`` (rectified flow): ``sigma ~ U[0, 1)``,
    ``x_t = (1 - sigma) x0 + sigma noise``, target the velocity ``dx_t/dsigma = noise - x0``, model
    time ``t = sigma * 1000`` as a float; this is the convention of diffusers'
    ``FlowMatchEulerDiscreteScheduler``, so the flow model runs in a diffusers pipeline with it.

    Every source of randomness is seeded from ``seed``: the weight initialisation (through a
    forked global RNG, so the caller's RNG state is untouched) and one :class:`torch.Generator`
    that draws the data order, timesteps and noise. With ``threads=1`` two runs give bit-identical
    weights; with more threads floating-point reductions may be reordered.

    The saved weights are an exponential moving average (EMA) of the training weights, the usual
    choice for diffusion models. (In a pilot run it sampled as cleanly as the last iterate, since
    the cosine schedule already ends at a learning rate near zero; it is kept as a cheap safeguard.)

    Args:
        out_dir: folder for ``digits_unet.safetensors`` and ``digits_unet.json`` (created if
            missing; existing files are overwritten).
        seed: seed for initialisation, data order, timesteps and noise.
        steps: optimiser steps.
        batch_size: images per step.
        lr: peak AdamW learning rate (linear warm-up, then cosine decay to zero).
        threads: torch intra-op threads during training; restored afterwards. The default of one
            leaves other cores free.
        progress: show a tqdm bar with the running loss.
        ema_decay: decay of the weight EMA that is saved.
        curve_dir: folder for the loss curve ``digits_loss.json`` and ``digits_loss.png``;
            defaults to ``out_dir``. The PNG is skipped if matplotlib is not installed.
        unet_config: :class:`diffusers.UNet2DModel` keyword arguments; defaults to
            :data:`DEFAULT_UNET_CONFIG`. It is saved in the JSON, so :func:`load_digits_unet` can
            rebuild any architecture; it must keep the ``DIGITS_SHAPE`` input and output.
        objective: ``"eps"`` or ``"flow"`` (see above); it selects the file names too
            (:data:`FILE_NAMES`: ``digits_unet.*`` or ``digits_flow_unet.*``).

    Returns:
        The metadata written to ``digits_unet.json`` (UNet config, training config, final loss,
        wall time, threads, versions), plus ``"paths"``: the files written.

    Raises:
        InvalidOptionError: for a non-positive ``steps``, ``batch_size``, ``lr`` or ``threads``, or
            an ``ema_decay`` outside ``[0, 1)``, or an unknown ``objective``.
    """
    import diffusers
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    steps = as_int("train_digits: steps", steps, minimum=1)
    batch_size = as_int("train_digits: batch_size", batch_size, minimum=1)
    threads = as_int("train_digits: threads", threads, minimum=1)
    lr = as_real("train_digits: lr", lr, minimum=0.0, strict=True)
    ema_decay = as_real("train_digits: ema_decay", ema_decay, minimum=0.0, maximum=1.0, strict_maximum=True)
    if objective not in OBJECTIVES:
        raise InvalidOptionError(
            f"train_digits: objective must be one of {', '.join(map(repr, OBJECTIVES))}, got {objective!r}."
        )
    weights_name, config_name, loss_json_name, loss_png_name = FILE_NAMES[objective]

    unet_config = dict(DEFAULT_UNET_CONFIG if unet_config is None else unet_config)
    out_dir = Path(out_dir)
    curve_dir = out_dir if curve_dir is None else Path(curve_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curve_dir.mkdir(parents=True, exist_ok=True)

    data = load_digits_dataset()
    alphas_cumprod = digits_alphas_cumprod()
    # Per-timestep coefficients of q(x_t | x_0), computed in float64 then cast once.
    sqrt_ab = alphas_cumprod.sqrt().float()
    sqrt_1mab = (1.0 - alphas_cumprod).sqrt().float()

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    losses: list[float] = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = build_digits_unet(unet_config)
        unet.train()
        ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        params = {k: p for k, p in unet.named_parameters()}
        n_params = sum(p.numel() for p in params.values())

        optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps))
        gen = torch.Generator().manual_seed(seed)
        batches = _batches(data.shape[0], batch_size, gen)

        start = time.perf_counter()
        desc = "train digits" if objective == "eps" else "train digits-flow"
        bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
        running: float | None = None
        for step in bar:
            x0 = data[next(batches)]
            if objective == "eps":
                t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch_size,), generator=gen)
                noise = torch.randn(x0.shape, generator=gen)
                xt = sqrt_ab[t].view(-1, 1, 1, 1) * x0 + sqrt_1mab[t].view(-1, 1, 1, 1) * noise
                target = noise
            else:
                sigma = torch.rand((batch_size,), generator=gen)
                noise = torch.randn(x0.shape, generator=gen)
                s = sigma.view(-1, 1, 1, 1)
                xt = (1.0 - s) * x0 + s * noise
                t = sigma * NUM_TRAIN_TIMESTEPS  # float model time, as diffusers' flow schedulers pass
                target = noise - x0

            loss = torch.nn.functional.mse_loss(unet(xt, t).sample, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Clipping at norm 1 is a cheap guard for the fairly high peak learning rate.
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            scheduler.step()

            # EMA with a warm-up, so the average is not dominated by the random initialisation.
            decay = min(ema_decay, (1.0 + step) / (10.0 + step))
            with torch.no_grad():
                for k, p in params.items():
                    ema[k].lerp_(p.detach(), 1.0 - decay)

            step_loss = float(loss.detach().item())
            losses.append(step_loss)
            running = step_loss if running is None else 0.98 * running + 0.02 * step_loss
            if progress and (step % 10 == 0 or step == steps - 1):
                bar.set_postfix(loss=f"{running:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        bar.close()
        wall_time = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous_threads)

    weights_path = out_dir / weights_name
    # Non-parameter buffers (if any) are copied from the model as they are.
    state = {
        k: (ema[k] if k in params else v).detach().float().contiguous() for k, v in unet.state_dict().items()
    }
    save_file(state, str(weights_path), metadata={"format": "pt"})
    # safetensors creates the file owner-only (0600); shipped package data must be world-readable.
    weights_path.chmod(0o644)

    final_loss = float(np.mean(losses[-FINAL_LOSS_WINDOW:]))
    schedule: dict[str, Any]
    if objective == "eps":
        schedule = {
            "beta_schedule": "linear",
            "beta_start": BETA_START,
            "beta_end": BETA_END,
            "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
            "prediction_type": "epsilon",
        }
    else:
        schedule = {
            "type": "rectified_flow",
            "interpolation": "x_t = (1 - sigma) * x0 + sigma * noise",
            "sigma_sampling": "uniform [0, 1)",
            "model_time": "t = sigma * num_train_timesteps (float)",
            "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
            "prediction_type": "flow_prediction",
            "target": "noise - x0",
        }
    meta: dict[str, Any] = {
        "objective": objective,
        "unet": unet_config,
        "parameter_count": n_params,
        "shape": list(DIGITS_SHAPE),
        "schedule": schedule,
        "data": {
            "source": "sklearn.datasets.load_digits",
            "num_images": int(data.shape[0]),
            "upsampling": "bilinear 8x8 -> 16x16, align_corners=False",
            "scaling": "x / 16 * 2 - 1",
            "augmentation": "none",
        },
        "training": {
            "seed": seed,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "lr_schedule": f"linear warm-up {min(WARMUP_STEPS, max(steps // 10, 1))} steps, cosine to 0",
            "optimizer": "AdamW(weight_decay=0)",
            "grad_clip_norm": 1.0,
            "ema_decay": ema_decay,
            "weights": "ema",
        },
        "final_loss": final_loss,
        "final_loss_window": min(FINAL_LOSS_WINDOW, len(losses)),
        "wall_time_s": round(wall_time, 2),
        "threads": int(threads),
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
    }
    config_path = out_dir / config_name
    config_path.write_text(json.dumps(meta, indent=2) + "\n")

    curve_json = curve_dir / loss_json_name
    curve_json.write_text(
        json.dumps({"final_loss": final_loss, "loss": [round(v, 6) for v in losses]}, separators=(",", ":"))
        + "\n"
    )
    paths = [weights_path, config_path, curve_json]
    curve_png = _plot_loss(losses, curve_dir / loss_png_name, objective)
    if curve_png is not None:
        paths.append(curve_png)
    return {**meta, "paths": [str(p) for p in paths]}


def _plot_loss(losses: list[float], path: Path, objective: str = "eps") -> Path | None:
    """Loss per step (faint) and its 100-step moving average, on a log scale; None without matplotlib."""
    try:
        # The object-oriented Figure needs no pyplot, so the caller's matplotlib backend is untouched.
        from matplotlib.figure import Figure
    except ImportError:
        return None
    values = np.asarray(losses, dtype=np.float64)
    window = max(1, min(100, len(values) // 5))
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    fig = Figure(figsize=(6, 3.5), dpi=120)
    ax = fig.add_subplot()
    ax.plot(np.arange(len(values)), values, color="tab:blue", alpha=0.25, lw=0.6, label="per step")
    ax.plot(np.arange(window - 1, len(values)), smooth, color="tab:blue", lw=1.5, label=f"{window}-step mean")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("epsilon MSE" if objective == "eps" else "velocity MSE")
    ax.set_title("digits UNet training loss" if objective == "eps" else "digits-flow UNet training loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path
