"""Reference denoisers that need no download.

* :class:`GaussianMixtureDenoiser`, :func:`EmpiricalDenoiser`: closed-form exact eps-predictors;
* ``load_reference("digits")``: a small UNet trained by this project on scikit-learn's 8x8 digits
  (shipped as safetensors; needs the ``models`` extra: diffusers, safetensors);
* ``load_reference("digits-flow")``: the same UNet trained with the rectified-flow objective
  (velocity prediction; ``ref.sampler(T)`` is flow Euler on diffusers' flow-matching sigmas);
* ``load_reference("gmm")``: the Gaussian-mixture toy of the ParaTAA notes (D = 64).
"""

from __future__ import annotations

from .analytic import EmpiricalDenoiser, GaussianMixtureDenoiser, linear_alphas_cumprod, spaced_timesteps
from .reference import ReferenceModel, available_references, load_reference, reference_prediction

__all__ = [
    "GaussianMixtureDenoiser",
    "EmpiricalDenoiser",
    "linear_alphas_cumprod",
    "spaced_timesteps",
    "ReferenceModel",
    "load_reference",
    "available_references",
    "reference_prediction",
]
