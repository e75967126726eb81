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

Modules, one job each: :mod:`~fpsolve.models.digits.model` (architecture, schedule, denoiser),
:mod:`~fpsolve.models.digits.loading` (shipped weights, dataset),
:mod:`~fpsolve.models.digits.training`, :mod:`~fpsolve.models.digits.sampling` (the sequential
references) and :mod:`~fpsolve.models.digits.images`; every public name is importable from
``fpsolve.models.digits``. The ``fpsolve train-reference`` command is
:mod:`fpsolve.cli.train_reference`.

This package needs the ``models`` extra (diffusers, safetensors, scikit-learn, tqdm); those imports
happen inside the functions, so importing the package itself is cheap and never fails.
"""

from __future__ import annotations

from .images import digits_to_images, save_digit_grid
from .loading import (
    CONFIG_NAME,
    FILE_NAMES,
    LOSS_JSON_NAME,
    LOSS_PNG_NAME,
    OBJECTIVES,
    WEIGHTS_DIR,
    WEIGHTS_NAME,
    load_digits_dataset,
    load_digits_unet,
)
from .model import (
    BETA_END,
    BETA_START,
    DEFAULT_UNET_CONFIG,
    DIGITS_SHAPE,
    NUM_TRAIN_TIMESTEPS,
    build_digits_unet,
    digits_alphas_cumprod,
    digits_denoiser,
    flow_sigmas,
)
from .sampling import ddim_sample_digits, flow_euler_sample_digits
from .training import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EMA_DECAY,
    DEFAULT_LR,
    DEFAULT_STEPS,
    FINAL_LOSS_WINDOW,
    WARMUP_STEPS,
    train_digits,
)

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
    "FILE_NAMES",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "LOSS_JSON_NAME",
    "LOSS_PNG_NAME",
    "BETA_START",
    "BETA_END",
    "DEFAULT_STEPS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_LR",
    "DEFAULT_EMA_DECAY",
    "WARMUP_STEPS",
    "FINAL_LOSS_WINDOW",
]
