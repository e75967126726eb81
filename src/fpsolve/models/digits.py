"""Two small UNets trained on the scikit-learn 8x8 handwritten digits, shipped for benchmarks.

Each model is a diffusers :class:`~diffusers.UNet2DModel` of 1.24 million parameters, trained on
the 1797 digits of :func:`sklearn.datasets.load_digits`, bilinearly upsampled to 16x16 and scaled
to ``[-1, 1]``: ``digits_unet.*`` with the standard DDPM epsilon-prediction objective,
``digits_flow_unet.*`` (``objective="flow"``) with the rectified-flow objective (velocity
prediction at model time ``t = 1000 sigma``, the convention of diffusers'
``FlowMatchEulerDiscreteScheduler``); same architecture, data, recipe and seed.
It trains on one CPU core in well under an hour and a batch of 16 takes about 0.1 s on one core,
yet it is a real learned denoiser: parallel samplers meet the same kind of non-linearity as on a
large model, which closed-form Gaussian-mixture denoisers do not have.

Typical use::

    from fpsolve.models.digits import load_digits_unet, digits_denoiser, digits_alphas_cumprod

    unet = load_digits_unet()
    eps = digits_denoiser(unet)                 # eps(x, t) with x: [B, 1, 16, 16], t: [B] ints
    alphas_cumprod = digits_alphas_cumprod()    # float64 [1000], linear beta schedule

The shipped weights are produced by :func:`train_digits` (``fpsolve train-reference``, and
``fpsolve train-reference --objective flow``), which is seeded end to end, so anyone can rebuild
them. The flow model: ``load_digits_unet(objective="flow")``, sampled by
:func:`flow_euler_sample_digits` on :func:`flow_sigmas`.

This module needs the ``models`` extra (diffusers, safetensors, scikit-learn, tqdm); those imports
happen inside the functions, so importing the module itself is cheap and never fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fpsolve.errors import InvalidOptionError, ShapeError
from fpsolve.samplers import DDIM, FlowEuler
from fpsolve.schedules import linear_alphas_cumprod
from fpsolve.system import TriangularSystem

if TYPE_CHECKING:  # pragma: no cover - only for annotations
    from diffusers import UNet2DModel

__all__ = [
    "DIGITS_SHAPE",
    "NUM_TRAIN_TIMESTEPS",
    "WEIGHTS_DIR",
    "DEFAULT_UNET_CONFIG",
    "digits_alphas_cumprod",
    "load_digits_dataset",
    "build_digits_unet",
    "train_digits",
    "load_digits_unet",
    "digits_denoiser",
    "digits_to_images",
    "ddim_sample_digits",
    "flow_sigmas",
    "flow_euler_sample_digits",
    "OBJECTIVES",
    "save_digit_grid",
    "add_train_parser",
    "add_arguments",
    "run_train",
    "run",
]

#: Shape of one sample (channels, height, width).
DIGITS_SHAPE: tuple[int, int, int] = (1, 16, 16)

#: Number of discrete DDPM training timesteps.
NUM_TRAIN_TIMESTEPS: int = 1000

#: Folder holding the shipped ``digits_unet.safetensors`` and ``digits_unet.json``.
WEIGHTS_DIR: Path = Path(__file__).parent / "weights"

WEIGHTS_NAME = "digits_unet.safetensors"
CONFIG_NAME = "digits_unet.json"
LOSS_JSON_NAME = "digits_loss.json"
LOSS_PNG_NAME = "digits_loss.png"

#: Training objectives of :func:`train_digits`: DDPM epsilon prediction, or rectified flow
#: (``x_t = (1 - sigma) x0 + sigma noise``, velocity target ``noise - x0``, model time
#: ``t = sigma * 1000``), the convention of diffusers' ``FlowMatchEulerDiscreteScheduler``.
OBJECTIVES: tuple[str, ...] = ("eps", "flow")

#: File names per objective: (weights, config, loss JSON, loss PNG). The flow model ships beside
#: the epsilon model, so both can live in one folder.
FILE_NAMES: dict[str, tuple[str, str, str, str]] = {
    "eps": (WEIGHTS_NAME, CONFIG_NAME, LOSS_JSON_NAME, LOSS_PNG_NAME),
    "flow": ("digits_flow_unet.safetensors", "digits_flow_unet.json", "digits_flow_loss.json",
             "digits_flow_loss.png"),
}

# Linear DDPM schedule of Ho et al. (2020).
BETA_START = 1e-4
BETA_END = 0.02

#: UNet architecture of the shipped model. Three resolutions (16, 8, 4); self-attention only at
#: 8x8 and 4x4, where it is cheap. Narrow channels keep a training step fast on one CPU core.
#: Why ``scale_shift`` (FiLM) time conditioning: the upsampled digits span only a 64-dimensional
#: subspace of the 256 pixels, so in the other 192 directions the ideal output is exactly
#: ``x_t / sqrt(1 - alpha_bar_t)``, a time-dependent *gain*, and DDIM turns small gain errors into
#: salt-and-pepper noise. With additive conditioning (batch 64, lr 1e-3) 58 % of DDIM samples
#: were noisy after a pilot run; with FiLM (and batch 32, lr 2e-3) at the same compute, 9 %; the
#: shipped model (3000 steps) has none in 64.
DEFAULT_UNET_CONFIG: dict[str, Any] = {
    "sample_size": DIGITS_SHAPE[1],
    "in_channels": DIGITS_SHAPE[0],
    "out_channels": DIGITS_SHAPE[0],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": 16,
    "resnet_time_scale_shift": "scale_shift",
}

# Training defaults. On one idle AVX2 core (AMD EPYC) a batch-32 step takes about 0.26-0.45 s, so
# the default run takes about 13-25 minutes (the shipped epsilon run took 34 minutes and the flow
# run 29 minutes (1756 s), each on one thread while other jobs shared the machine's two cores).
DEFAULT_STEPS = 3000
DEFAULT_BATCH_SIZE = 32
DEFAULT_LR = 2e-3
DEFAULT_EMA_DECAY = 0.998
WARMUP_STEPS = 100
FINAL_LOSS_WINDOW = 200


# --------------------------------------------------------------------------------------------- data


def digits_alphas_cumprod() -> torch.Tensor:
    """Cumulative products of ``1 - beta`` for the schedule the model was trained with.

    Returns:
        A float64 tensor of shape ``[1000]``: ``cumprod(1 - linspace(1e-4, 0.02, 1000))``.
        Computed in float64 so that samplers can form ``sqrt(1 - alpha_bar)`` near ``t = 0``
        without cancellation.
    """
    return linear_alphas_cumprod(NUM_TRAIN_TIMESTEPS, BETA_START, BETA_END)


def load_digits_dataset() -> torch.Tensor:
    """The 1797 scikit-learn digits as training images.

    The 8x8 images (intensities 0..16) are upsampled to 16x16 with bilinear interpolation, which
    gives smooth strokes rather than 2x2 blocks, and mapped linearly to ``[-1, 1]`` (background is
    exactly ``-1``). No download is needed: scikit-learn ships the data.

    Returns:
        A float32 tensor of shape ``[1797, 1, 16, 16]`` with values in ``[-1, 1]``.
    """
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images.astype(np.float32)).unsqueeze(1)
    images = torch.nn.functional.interpolate(
        images, size=DIGITS_SHAPE[1:], mode="bilinear", align_corners=False
    )
    # Bilinear interpolation is a convex combination, so the range stays within [0, 16].
    return (images / 16.0 * 2.0 - 1.0).clamp_(-1.0, 1.0).contiguous()


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless stream of index batches: reshuffle every epoch, carry the tail into the next."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while pending.numel() < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


# -------------------------------------------------------------------------------------------- model


def build_digits_unet(config: dict[str, Any] | None = None) -> UNet2DModel:
    """A freshly initialised UNet with the digits architecture.

    Args:
        config: keyword arguments for :class:`diffusers.UNet2DModel`; defaults to
            :data:`DEFAULT_UNET_CONFIG`. Initialisation uses the global torch RNG.

    Returns:
        The untrained model, in float32 on the CPU.
    """
    from diffusers import UNet2DModel

    return UNet2DModel(**dict(DEFAULT_UNET_CONFIG if config is None else config))


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

    for name, value in (("steps", steps), ("batch_size", batch_size), ("threads", threads)):
        if int(value) != value or value < 1:
            raise InvalidOptionError(f"train_digits: {name} must be a positive integer, got {value!r}.")
    if not lr > 0:
        raise InvalidOptionError(f"train_digits: lr must be positive, got {lr!r}.")
    if not 0.0 <= ema_decay < 1.0:
        raise InvalidOptionError(f"train_digits: ema_decay must be in [0, 1), got {ema_decay!r}.")
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


# ------------------------------------------------------------------------------------------ loading


def load_digits_unet(
    device: str | torch.device = "cpu", weights_dir: str | Path | None = None, objective: str = "eps"
) -> UNet2DModel:
    """The trained digits UNet, in eval mode with gradients disabled.

    Args:
        device: where to put the model.
        weights_dir: folder with ``digits_unet.safetensors`` and ``digits_unet.json`` (or the
            ``digits_flow_unet.*`` pair); defaults to the weights shipped inside the package
            (:data:`WEIGHTS_DIR`).
        objective: ``"eps"`` (the DDPM model) or ``"flow"`` (the rectified-flow model).

    Returns:
        A float32 :class:`diffusers.UNet2DModel`; call it as ``unet(x, t).sample``.

    Raises:
        FileNotFoundError: if the weights or config are missing (run ``fpsolve train-reference``).
        InvalidOptionError: for an unknown ``objective``.
    """
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    if objective not in OBJECTIVES:
        raise InvalidOptionError(
            f"load_digits_unet: objective must be one of {', '.join(map(repr, OBJECTIVES))}, "
            f"got {objective!r}."
        )
    weights_name, config_name = FILE_NAMES[objective][:2]
    folder = WEIGHTS_DIR if weights_dir is None else Path(weights_dir)
    config_path, weights_path = folder / config_name, folder / weights_name
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"digits model file {path} is missing; rebuild it with "
                f"`fpsolve train-reference --objective {objective} --out {folder}`."
            )
    config = json.loads(config_path.read_text())["unet"]
    unet = UNet2DModel(**config)
    unet.load_state_dict(load_file(str(weights_path)), strict=True)
    return unet.to(device).eval().requires_grad_(False)


def digits_denoiser(unet: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Wrap a digits UNet as an epsilon-prediction function ``denoiser(x, t)``.

    Args:
        unet: the model, typically from :func:`load_digits_unet`.

    Returns:
        ``denoiser(x, t)`` with ``x`` of shape ``[B, *DIGITS_SHAPE]`` in any floating dtype and ``t``
        a ``[B]`` (or scalar) tensor of integer timesteps in ``[0, 1000)``. It returns the predicted
        noise with the shape, dtype and device of ``x``. The network itself runs in its own dtype
        (float32) on its own device under ``torch.no_grad()``: a float64 sampler gets float64 back,
        though the prediction is only float32-accurate.

    Raises:
        ShapeError: (from the returned function) if ``x`` does not have shape ``[B, 1, 16, 16]`` or
            ``t`` does not hold one timestep per sample.
    """
    reference = next(unet.parameters())
    net_dtype = reference.dtype if reference.dtype.is_floating_point else torch.float32
    net_device = reference.device

    def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != DIGITS_SHAPE:
            raise ShapeError(
                f"digits denoiser: x must have shape [B, {', '.join(map(str, DIGITS_SHAPE))}], "
                f"got {list(x.shape)}."
            )
        t = torch.as_tensor(t, device=net_device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ShapeError(f"digits denoiser: t must have shape [{x.shape[0]}], got {list(t.shape)}.")
        if not t.dtype.is_floating_point:
            t = t.long()
        with torch.no_grad():
            eps = unet(x.to(device=net_device, dtype=net_dtype), t).sample
        return eps.to(device=x.device, dtype=x.dtype)

    return denoiser


def digits_to_images(x0: torch.Tensor) -> np.ndarray:
    """Convert samples in ``[-1, 1]`` to 8-bit grayscale images.

    Args:
        x0: tensor of shape ``[N, 1, H, W]`` or ``[N, H, W]``; values outside ``[-1, 1]`` are
            clamped.

    Returns:
        A ``uint8`` numpy array ``[N, H, W]``, with ``-1`` mapped to 0 and ``1`` to 255.
    """
    x = x0.detach().to("cpu", torch.float64)
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ShapeError(f"digits_to_images: expected one channel, got shape {list(x0.shape)}.")
        x = x[:, 0]
    if x.ndim != 3:
        raise ShapeError(f"digits_to_images: expected [N, 1, H, W] or [N, H, W], got {list(x0.shape)}.")
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).numpy()


# ------------------------------------------------------------------------------- reference sampling


def ddim_sample_digits(
    unet: torch.nn.Module, n: int, *, steps: int = 100, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Plain sequential deterministic DDIM (eta = 0), the reference that the shipped assets use.

    Timesteps are evenly spaced, ``t_i = i * 1000 // steps`` for ``i = steps-1, ..., 0``, and the
    step from ``t = 0`` goes to ``alpha_bar = 1``. No clipping of the predicted ``x_0``.

    Args:
        unet: the digits model.
        n: number of samples.
        steps: number of DDIM steps (network evaluations).
        seed: seed of the starting noise ``x_T ~ N(0, I)`` (a private generator).
        dtype: dtype of the sampling state.

    Returns:
        Samples ``[n, *DIGITS_SHAPE]`` in ``dtype`` on the CPU, roughly in ``[-1, 1]``.
    """
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise InvalidOptionError(
            f"ddim_sample_digits: steps must be in [1, {NUM_TRAIN_TIMESTEPS}], got {steps}."
        )
    timesteps = (torch.arange(steps) * (NUM_TRAIN_TIMESTEPS // steps)).flip(0)
    x_t = torch.randn((n, *DIGITS_SHAPE), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    noise = torch.zeros((steps + 1, n, *DIGITS_SHAPE), dtype=dtype)  # DDIM draws no step noise
    noise[0] = x_t.to(dtype)
    system = TriangularSystem(
        sampler=DDIM(alphas_cumprod=digits_alphas_cumprod(), timesteps=timesteps.tolist(),
                     final_alpha_cumprod=1.0),
        denoiser=digits_denoiser(unet), shape=DIGITS_SHAPE, batch=n, noise=noise, dtype=dtype,
    )
    return system.unflatten(system.sequential().states)[-1]  # the system's one sequential loop


def flow_sigmas(steps: int) -> torch.Tensor:
    """The noise levels of a ``steps``-step flow Euler run on the flow model's training schedule.

    Exactly the sigmas of diffusers' ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)``
    with its default config (``shift=1``) after ``set_timesteps(steps)``: ``steps`` levels evenly
    spaced from 1 down to ``1/1000`` (the smallest training level), then the final level 0.

    Returns:
        A descending float64 tensor ``[steps + 1]``.
    """
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise InvalidOptionError(f"flow_sigmas: steps must be in [1, {NUM_TRAIN_TIMESTEPS}], got {steps}.")
    levels = torch.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, steps, dtype=torch.float64)
    return torch.cat([levels, torch.zeros(1, dtype=torch.float64)])


def flow_euler_sample_digits(
    unet: torch.nn.Module, n: int, *, steps: int = 50, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Plain sequential flow Euler on the flow model, the reference the shipped flow assets use.

    ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, sigma_i * 1000)`` from ``x_0 ~ N(0, I)`` at
    ``sigma = 1`` down to ``sigma = 0``, on :func:`flow_sigmas`.

    Args:
        unet: the digits-flow model (``load_digits_unet(objective="flow")``).
        n: number of samples.
        steps: number of Euler steps (network evaluations).
        seed: seed of the starting noise (a private generator).
        dtype: dtype of the sampling state.

    Returns:
        Samples ``[n, *DIGITS_SHAPE]`` in ``dtype`` on the CPU, roughly in ``[-1, 1]``.
    """
    x_t = torch.randn((n, *DIGITS_SHAPE), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    noise = torch.zeros((steps + 1, n, *DIGITS_SHAPE), dtype=dtype)  # flow Euler draws no step noise
    noise[0] = x_t.to(dtype)
    system = TriangularSystem(
        sampler=FlowEuler(sigmas=flow_sigmas(steps), num_train_timesteps=NUM_TRAIN_TIMESTEPS),
        denoiser=digits_denoiser(unet), shape=DIGITS_SHAPE, batch=n, noise=noise, dtype=dtype,
    )
    return system.unflatten(system.sequential().states)[-1]  # the system's one sequential loop


def save_digit_grid(
    images: np.ndarray | torch.Tensor, path: str | Path, *, nrow: int = 8, scale: int = 4
) -> Path:
    """Save images as one grid PNG, upscaled with nearest-neighbour so the pixels stay visible.

    Args:
        images: ``uint8`` array ``[N, H, W]`` (see :func:`digits_to_images`) or a tensor in
            ``[-1, 1]``, which is converted first.
        path: output PNG path (parent folders are created).
        nrow: images per row.
        scale: integer upscaling factor.

    Returns:
        The path written.
    """
    # matplotlib.image.imsave needs no pyplot, so the caller's matplotlib backend is untouched.
    from matplotlib.image import imsave

    if nrow < 1 or scale < 1:
        raise InvalidOptionError(f"save_digit_grid: nrow and scale must be >= 1, got {nrow} and {scale}.")
    if isinstance(images, torch.Tensor):
        images = digits_to_images(images)
    if images.ndim != 3:
        raise ShapeError(f"save_digit_grid: expected images [N, H, W], got shape {list(images.shape)}.")
    n, h, w = images.shape
    rows = math.ceil(n / nrow)
    pad = 1  # one dark-gray pixel line between tiles
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad), 64, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = (
            images[k]
        )
    grid = np.kron(grid, np.ones((scale, scale), dtype=np.uint8))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, grid, cmap="gray", vmin=0, vmax=255)
    return path


# ---------------------------------------------------------------------------------------------- CLI


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
    """Add the ``train-reference`` options to ``parser`` (the hook that ``fpsolve.cli`` calls).

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


#: Alias of :func:`run_train`, the name ``fpsolve.cli`` dispatches to.
run = run_train
