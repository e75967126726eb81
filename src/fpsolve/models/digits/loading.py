"""Loading the digits: the shipped weights (safetensors beside a JSON config) and the dataset.

The weights live in the package folder ``fpsolve/models/weights`` (:data:`WEIGHTS_DIR`, package
data of the wheel): ``digits_unet.*`` for the epsilon model, ``digits_flow_unet.*`` for the
rectified-flow model (:data:`FILE_NAMES`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fpsolve.errors import InvalidOptionError

from .model import DIGITS_SHAPE

if TYPE_CHECKING:  # pragma: no cover - only for annotations
    from diffusers import UNet2DModel

__all__ = [
    "WEIGHTS_DIR",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "LOSS_JSON_NAME",
    "LOSS_PNG_NAME",
    "OBJECTIVES",
    "FILE_NAMES",
    "load_digits_dataset",
    "load_digits_unet",
]

#: Folder holding the shipped ``digits_unet.safetensors`` and ``digits_unet.json``.
WEIGHTS_DIR: Path = Path(__file__).resolve().parents[1] / "weights"  # fpsolve/models/weights

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
