"""The digits model itself: the UNet's architecture, the training schedule, the denoiser.

:func:`build_digits_unet` makes the diffusers ``UNet2DModel`` of :data:`DEFAULT_UNET_CONFIG`;
:func:`digits_denoiser` wraps one as the ``denoiser(x, t)`` a :class:`~fpsolve.TriangularSystem`
calls. The epsilon model was trained on :func:`digits_alphas_cumprod` (DDPM's linear betas), the
flow model on the flow-matching levels that :func:`flow_sigmas` spaces for a run of T steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from fpsolve.errors import ShapeError
from fpsolve.schedules import flow_sigmas as training_flow_sigmas
from fpsolve.schedules import linear_alphas_cumprod

if TYPE_CHECKING:  # pragma: no cover - only for annotations
    from diffusers import UNet2DModel

__all__ = [
    "DIGITS_SHAPE",
    "NUM_TRAIN_TIMESTEPS",
    "BETA_START",
    "BETA_END",
    "DEFAULT_UNET_CONFIG",
    "digits_alphas_cumprod",
    "build_digits_unet",
    "digits_denoiser",
    "flow_sigmas",
]

#: Shape of one sample (channels, height, width).
DIGITS_SHAPE: tuple[int, int, int] = (1, 16, 16)

#: Number of discrete DDPM training timesteps.
NUM_TRAIN_TIMESTEPS: int = 1000

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


def digits_alphas_cumprod() -> torch.Tensor:
    """Cumulative products of ``1 - beta`` for the schedule the model was trained with.

    Returns:
        A float64 tensor of shape ``[1000]``: ``cumprod(1 - linspace(1e-4, 0.02, 1000))``.
        Computed in float64 so that samplers can form ``sqrt(1 - alpha_bar)`` near ``t = 0``
        without cancellation.
    """
    return linear_alphas_cumprod(NUM_TRAIN_TIMESTEPS, BETA_START, BETA_END)


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


def flow_sigmas(steps: int) -> torch.Tensor:
    """The noise levels of a ``steps``-step flow Euler run on the flow model's training schedule:
    :func:`fpsolve.schedules.flow_sigmas` on its ``NUM_TRAIN_TIMESTEPS`` (1000) training levels,
    the sigmas of diffusers' ``FlowMatchEulerDiscreteScheduler`` (a descending float64
    ``[steps + 1]``)."""
    return training_flow_sigmas(steps, NUM_TRAIN_TIMESTEPS)
