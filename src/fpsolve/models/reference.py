"""One loader for every shipped reference model: ``load_reference(name)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import numpy as np
import torch

from ..errors import UnknownNameError, UnsupportedError
from .analytic import GaussianMixtureDenoiser

__all__ = ["ReferenceModel", "load_reference", "available_references"]


@attrs.define(frozen=True, eq=False)
class ReferenceModel:
    """A denoiser with everything needed to sample from it and look at the result.

    Attributes:
        name: the reference's name.
        denoiser: ``denoiser(x, t) -> eps`` (x ``[B, *shape]``, integer timesteps ``[B]``); returns
            the input's dtype.
        alphas_cumprod: the training schedule, float64 ``[num_train_steps]``.
        shape: one sample's shape.
        to_images: maps ``x0`` ``[N, *shape]`` in [-1, 1] to uint8 images ``[N, H, W]`` (or
            ``[N, H, W, C]``).
        unet: the diffusers ``UNet2DModel`` behind the denoiser (``None`` for closed-form models).
    """

    name: str
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = attrs.field(repr=False)
    alphas_cumprod: torch.Tensor = attrs.field(repr=False)
    shape: tuple[int, ...]
    to_images: Callable[[torch.Tensor], np.ndarray] = attrs.field(repr=False)
    unet: Any = attrs.field(default=None, repr=False)


def _no_images(x0: torch.Tensor) -> np.ndarray:
    raise UnsupportedError("the 'gmm' reference is a 64-dimensional vector model, not an image model.")


def _load_gmm() -> ReferenceModel:
    model = GaussianMixtureDenoiser.random(dim=64, components=8, std=0.1, seed=0)
    return ReferenceModel("gmm", model, model.alphas_cumprod, (64,), _no_images)


def _load_digits() -> ReferenceModel:
    from . import digits  # needs diffusers + safetensors (the "models" extra)

    unet = digits.load_digits_unet()
    return ReferenceModel("digits", digits.digits_denoiser(unet), digits.digits_alphas_cumprod(),
                          tuple(digits.DIGITS_SHAPE), digits.digits_to_images, unet)


_LOADERS: dict[str, Callable[[], ReferenceModel]] = {"digits": _load_digits, "gmm": _load_gmm}


def available_references() -> list[str]:
    """Names accepted by :func:`load_reference`."""
    return sorted(_LOADERS)


def load_reference(name: str = "digits") -> ReferenceModel:
    """Load a shipped reference model by name (``"digits"``, ``"gmm"``)."""
    try:
        loader = _LOADERS[name]
    except KeyError:
        raise UnknownNameError("reference model", name, _LOADERS) from None
    return loader()
