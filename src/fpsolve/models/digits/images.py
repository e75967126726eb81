"""Looking at digits: samples in ``[-1, 1]`` as 8-bit images, and a grid of them as a PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from fpsolve.errors import ShapeError
from fpsolve.validators import as_int

__all__ = ["digits_to_images", "save_digit_grid"]


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

    nrow = as_int("save_digit_grid: nrow", nrow, minimum=1)
    scale = as_int("save_digit_grid: scale", scale, minimum=1)
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
