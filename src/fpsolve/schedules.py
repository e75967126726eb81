"""Noise schedules and timestep grids: the one home of the formulas every model and test shares.

* :func:`linear_alphas_cumprod`: ``alpha_bar`` of the DDPM linear-beta schedule,
  ``cumprod(1 - linspace(beta_start, beta_end, n))`` in float64 (the digits model's training
  schedule, the Gaussian-mixture reference's, and the test problems');
* :func:`spaced_timesteps`: ``T`` model timesteps evenly spaced from ``n - 1`` down to 0
  (diffusers' ``timestep_spacing="linspace"``);
* :func:`leading_timesteps`: ``T`` model timesteps ``i * (n // T)`` for ``i = T-1, ..., 0``
  (diffusers' ``timestep_spacing="leading"`` with ``steps_offset=0``; the digits model's DDIM);
* :func:`flow_sigmas`: the flow-matching levels of diffusers' ``FlowMatchEulerDiscreteScheduler``
  (``shift=1``): ``T`` levels evenly spaced from 1 to ``1/n``, then 0 (the digits flow model's);
* :func:`shifted_flow_sigmas`: flow-matching noise levels on an even grid, time-shifted as SD3 does.

Pure math on the CPU; the samplers take what these return (``DDIM(alphas_cumprod=...,
timesteps=...)``, ``FlowEuler(sigmas=...)``).
"""

from __future__ import annotations

import torch

from .errors import InvalidOptionError
from .validators import as_int, as_real

__all__ = ["linear_alphas_cumprod", "spaced_timesteps", "leading_timesteps", "flow_sigmas",
           "shifted_flow_sigmas"]


def linear_alphas_cumprod(num_train_steps: int = 1000, beta_start: float = 1e-4,
                          beta_end: float = 0.02) -> torch.Tensor:
    """``alpha_bar`` of the linear-beta DDPM schedule: ``cumprod(1 - linspace(b0, b1, n))``.

    Args:
        num_train_steps: ``n``, the training timesteps (the length of the result).
        beta_start, beta_end: the first and last beta (default 1e-4 and 0.02, DDPM's).

    Returns:
        A float64 tensor ``[num_train_steps]``, decreasing from ``1 - beta_start``.
    """
    steps = as_int("num_train_steps", num_train_steps, minimum=1)
    start = as_real("beta_start", beta_start, minimum=0.0, strict=True)
    end = as_real("beta_end", beta_end, minimum=0.0, strict=True)
    if not start <= end < 1:
        raise InvalidOptionError(
            f"the betas must satisfy 0 < beta_start <= beta_end < 1; got beta_start={beta_start!r}, "
            f"beta_end={beta_end!r}."
        )
    betas = torch.linspace(start, end, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def spaced_timesteps(num_steps: int, num_train_steps: int = 1000) -> list[int]:
    """``num_steps`` descending model timesteps from ``num_train_steps - 1`` to 0, evenly spaced
    (rounded to the nearest integer; one step is ``[num_train_steps - 1]``)."""
    train = as_int("num_train_steps", num_train_steps, minimum=1)
    steps = as_int("num_steps", num_steps, minimum=1)
    if steps > train:
        raise InvalidOptionError(f"num_steps must lie in 1..{train}; got {num_steps!r}.")
    # float32, torch's default, as every copy of this formula computed it: the rounding of the
    # grid (and so which timesteps a solve uses) must not depend on torch.set_default_dtype
    return torch.linspace(train - 1, 0, steps, dtype=torch.float32).round().long().tolist()


def _steps_in_range(name: str, num_steps: int, num_train_steps: int) -> tuple[int, int]:
    """``(num_steps, num_train_steps)`` as ints, refused unless ``1 <= num_steps <= num_train_steps``."""
    train = as_int("num_train_steps", num_train_steps, minimum=1)
    return as_int(name, num_steps, minimum=1, maximum=train), train


def leading_timesteps(num_steps: int, num_train_steps: int = 1000) -> list[int]:
    """``num_steps`` descending model timesteps ``i * (num_train_steps // num_steps)`` for
    ``i = num_steps - 1, ..., 0``: diffusers' ``timestep_spacing="leading"`` (``steps_offset=0``),
    the grid the digits model's DDIM reference runs on (so the last timestep is 0, the first at
    most ``num_train_steps - num_train_steps // num_steps``)."""
    steps, train = _steps_in_range("num_steps", num_steps, num_train_steps)
    return (torch.arange(steps) * (train // steps)).flip(0).tolist()


def flow_sigmas(steps: int, num_train_steps: int = 1000) -> torch.Tensor:
    """The noise levels of a ``steps``-step flow Euler run on a flow model's training schedule.

    Exactly the sigmas of diffusers' ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=n)``
    with its default config (``shift=1``) after ``set_timesteps(steps)``: ``steps`` levels evenly
    spaced from 1 down to ``1/n`` (the smallest training level), then the final level 0.

    Returns:
        A descending float64 tensor ``[steps + 1]``.
    """
    count, train = _steps_in_range("steps", steps, num_train_steps)
    levels = torch.linspace(1.0, 1.0 / train, count, dtype=torch.float64)
    return torch.cat([levels, torch.zeros(1, dtype=torch.float64)])


def shifted_flow_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """``[steps + 1]`` flow-matching levels from 1 to 0, time-shifted as SD3 does
    (``shift * s / (1 + (shift - 1) s)`` of an even grid ``s``), float64."""
    count = as_int("steps", steps, minimum=1)
    factor = as_real("shift", shift, minimum=0.0, strict=True)
    even = torch.linspace(1.0, 0.0, count + 1, dtype=torch.float64)
    return factor * even / (1 + (factor - 1) * even)
