"""Plain sequential sampling of the digits models: the references the shipped assets use.

Both run the system's one sequential loop (:meth:`fpsolve.TriangularSystem.sequential`).
"""

from __future__ import annotations

import torch

from fpsolve.samplers import DDIM, FlowEuler
from fpsolve.schedules import leading_timesteps
from fpsolve.system import TriangularSystem
from fpsolve.validators import as_int

from .model import DIGITS_SHAPE, NUM_TRAIN_TIMESTEPS, digits_alphas_cumprod, digits_denoiser, flow_sigmas

__all__ = ["ddim_sample_digits", "flow_euler_sample_digits"]


def ddim_sample_digits(
    unet: torch.nn.Module, n: int, *, steps: int = 100, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Plain sequential deterministic DDIM (eta = 0), the reference that the shipped assets use.

    Timesteps are evenly spaced, ``t_i = i * (1000 // steps)`` for ``i = steps-1, ..., 0``
    (:func:`fpsolve.schedules.leading_timesteps`), and the
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
    steps = as_int("ddim_sample_digits: steps", steps, minimum=1, maximum=NUM_TRAIN_TIMESTEPS)
    timesteps = leading_timesteps(steps, NUM_TRAIN_TIMESTEPS)
    x_t = torch.randn((n, *DIGITS_SHAPE), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    noise = torch.zeros((steps + 1, n, *DIGITS_SHAPE), dtype=dtype)  # DDIM draws no step noise
    noise[0] = x_t.to(dtype)
    system = TriangularSystem(
        sampler=DDIM(alphas_cumprod=digits_alphas_cumprod(), timesteps=timesteps,
                     final_alpha_cumprod=1.0),
        denoiser=digits_denoiser(unet), shape=DIGITS_SHAPE, batch=n, noise=noise, dtype=dtype,
    )
    return system.unflatten(system.sequential().states)[-1]  # the system's one sequential loop


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
