"""Small standard problems for the conformance kit and plugin tests (float64, CPU unless asked).

Every problem is a :class:`~fpsolve.TriangularSystem` with a smooth nonlinear denoiser
(:class:`~fpsolve.testing.strategies.SmoothDenoiser`) on a linear-beta schedule, small enough
that a full parallel solve takes milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..samplers import DDIM, DDPM, DPMSolver, SequentialSampler
from ..system import TriangularSystem
from .strategies import SmoothDenoiser

__all__ = [
    "SAMPLER_KINDS",
    "linear_alphas_cumprod",
    "spaced_timesteps",
    "make_sampler",
    "make_system",
    "available_devices",
]

SAMPLER_KINDS: tuple[str, ...] = ("ddim", "ddpm", "dpm_solver")
"""The standard problem samplers of the conformance kit: one-step deterministic, one-step
stochastic, and multistep (three lags), so a component meets every structure a system can have."""


def linear_alphas_cumprod(num_train_steps: int = 1000) -> torch.Tensor:
    """alphas_cumprod of the DDPM linear-beta schedule (1e-4 to 0.02), float64."""
    betas = torch.linspace(1e-4, 0.02, num_train_steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def spaced_timesteps(steps: int, num_train_steps: int = 1000) -> list[int]:
    """``steps`` evenly spaced descending model timesteps from ``num_train_steps - 1`` to 0."""
    if steps == 1:
        return [num_train_steps - 1]
    return torch.linspace(num_train_steps - 1, 0, steps).round().long().tolist()


_FACTORIES: dict[str, Callable[[torch.Tensor, list[int]], SequentialSampler]] = {
    "ddim": lambda abar, steps: DDIM(alphas_cumprod=abar, timesteps=steps, eta=0.0),
    "ddim_eta1": lambda abar, steps: DDIM(alphas_cumprod=abar, timesteps=steps, eta=1.0),
    "ddpm": lambda abar, steps: DDPM(alphas_cumprod=abar, timesteps=steps),
    "dpm_solver": lambda abar, steps: DPMSolver(alphas_cumprod=abar, timesteps=steps, order=3),
}


def make_sampler(kind: str = "ddim", steps: int = 10) -> SequentialSampler:
    """A built-in sampler (``ddim``, ``ddim_eta1``, ``ddpm``, ``dpm_solver``) on the linear schedule."""
    try:
        factory = _FACTORIES[kind]
    except KeyError:
        raise ValueError(f"unknown problem sampler {kind!r}; choose one of {sorted(_FACTORIES)}.") from None
    return factory(linear_alphas_cumprod(), spaced_timesteps(steps))


def make_system(
    sampler: SequentialSampler | str = "ddim",
    *,
    steps: int = 10,
    shape: Sequence[int] = (4,),
    batch: int | None = 2,
    dtype: torch.dtype = torch.float64,
    device: Any = "cpu",
    seed: int = 0,
) -> TriangularSystem:
    """A small system: ``sampler`` (an instance, or a kind for :func:`make_sampler` with ``steps``).

    The noise is drawn on the CPU from ``seed`` and moved to ``device``, so a problem is the same
    on every device and in every dtype up to rounding.
    """
    if isinstance(sampler, str):
        sampler = make_sampler(sampler, steps)
    size = 1
    for extent in shape:
        size *= int(extent)
    # The toy model needs a schedule to be time dependent; a sampler without one (not
    # variance-preserving) gets the linear schedule, so its timesteps must lie in [0, 1000).
    abar = getattr(sampler, "alphas_cumprod", None)
    if abar is None:
        abar = linear_alphas_cumprod()
    denoiser = SmoothDenoiser(seed + 17, size, abar)
    lead = (sampler.num_steps + 1,) if batch is None else (sampler.num_steps + 1, batch)
    noise = torch.randn(
        lead + tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    return TriangularSystem(
        sampler=sampler,
        denoiser=denoiser,
        shape=tuple(shape),
        batch=batch,
        noise=noise.to(dtype),
        dtype=dtype,
        device=device,
    )


def available_devices() -> list[str]:
    """``["cpu"]``, plus ``"cuda"`` when a GPU is visible."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices
