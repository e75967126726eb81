"""Drawing the noise of a scheduler's loop up front, in the order the loop draws it.

A pipeline draws its initial latents first and then, step by step, whatever ``scheduler.step``
draws (DDPM for t > 0, DDIM for eta > 0, ancestral and SDE samplers every step, ...). Model calls
draw nothing, so drawing everything before solving gives bit-identical noise. Draws go through
diffusers' own ``randn_tensor`` with the loop's arguments, so a list of generators (one per
sample) and CPU generators for GPU tensors behave exactly as in the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["draw_step_noise", "stack_noise"]


def draw_step_noise(draws: Sequence[str | None], shape: Sequence[int], generator: Any,
                    device: torch.device | str, model_dtype: torch.dtype) -> list[torch.Tensor | None]:
    """One tensor per step that draws (``None`` elsewhere), as ``scheduler.step`` would draw it.

    Args:
        draws: the probe's per-step draw dtypes (``"model"`` or a dtype name).
        shape: the model output's shape in the loop (the batch the scheduler steps).
        generator: what the loop passes to ``step``: a generator, a list of them, or ``None``
            (torch's global generator, e.g. DiT's loop).
        model_dtype: the model output's dtype in the loop.
    """
    from diffusers.utils.torch_utils import randn_tensor

    noise: list[torch.Tensor | None] = []
    for label in draws:
        if label is None:
            noise.append(None)
            continue
        dtype = model_dtype if label == "model" else getattr(torch, label)
        device = torch.device(device)
        noise.append(randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype))
    return noise


def stack_noise(initial: torch.Tensor, steps: Sequence[torch.Tensor | None], batch: int) -> torch.Tensor:
    """fpsolve's noise tensor ``[T+1, N, *shape]``: ``x_T`` then each step's noise (zeros if none).

    Only the first ``batch`` samples of a step's draw are kept (DiT steps a doubled batch under
    guidance and keeps the first half).
    """
    dtype = torch.promote_types(initial.dtype, torch.float32)  # never round a float32 draw to half
    rows = [initial.to(dtype)]
    for draw in steps:
        rows.append(torch.zeros_like(rows[0]) if draw is None else draw[:batch].to(rows[0]))
    return torch.stack(rows)
