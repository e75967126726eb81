"""The error of a sample to the sequential sample: in model space, and in image space when the
model is an image model (8-bit images from the model's ``to_images``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs
import numpy as np
import torch

from ..errors import ShapeError, UnsupportedError

__all__ = ["ErrorMetrics", "rms_error", "image_errors", "compare_samples", "image_converter"]

ToImages = Callable[[torch.Tensor], np.ndarray]


@attrs.define(frozen=True)
class ErrorMetrics:
    """Error of a batch of samples to the sequential batch.

    Attributes:
        rms: root mean square of the difference over every element of the batch (model space).
        max_abs_pixels: largest absolute difference of the 8-bit images, on [0, 255]
            (``None`` when the model has no images).
        psnr_db: PSNR of the images over the batch, ``10 log10(255^2 / MSE)``; ``inf`` when the
            images are identical (``None`` when the model has no images).
    """

    rms: float
    max_abs_pixels: float | None = None
    psnr_db: float | None = None


def rms_error(sample: torch.Tensor, reference: torch.Tensor) -> float:
    """RMS of ``sample - reference`` over all elements, computed in float64."""
    if sample.shape != reference.shape:
        raise ShapeError(
            f"cannot compare a sample of shape {list(sample.shape)} with {list(reference.shape)}."
        )
    diff = sample.detach().to("cpu", torch.float64) - reference.detach().to("cpu", torch.float64)
    return float(diff.pow(2).mean().sqrt())


def image_errors(images: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """``(max abs difference, PSNR in dB)`` of two uint8 image batches of the same shape."""
    if images.shape != reference.shape:
        raise ShapeError(f"cannot compare images of shape {images.shape} with {reference.shape}.")
    # int64 first: uint8 subtraction would wrap around.
    diff = images.astype(np.int64) - reference.astype(np.int64)
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    psnr = math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
    return float(np.abs(diff).max()), psnr


def image_converter(to_images: ToImages, shape: tuple[int, ...]) -> ToImages | None:
    """``to_images`` if the model produces images, else ``None`` (it raises UnsupportedError)."""
    try:
        to_images(torch.zeros((1, *shape), dtype=torch.float64))
    except UnsupportedError:
        return None
    return to_images


def compare_samples(
    sample: torch.Tensor, reference: torch.Tensor, to_images: ToImages | None = None
) -> ErrorMetrics:
    """All error metrics of ``sample`` to ``reference`` (batches ``[N, *shape]``)."""
    rms = rms_error(sample, reference)
    if to_images is None:
        return ErrorMetrics(rms)
    max_abs, psnr = image_errors(to_images(sample), to_images(reference))
    return ErrorMetrics(rms, max_abs, psnr)
