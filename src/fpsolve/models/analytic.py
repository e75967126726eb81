"""Closed-form denoisers: exact eps-predictors of Gaussian mixtures and of finite data sets.

For data ``x0 ~ sum_k pi_k N(mu_k, s_k^2 I)`` and ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``, the
noisy marginal is the mixture ``sum_k pi_k N(sqrt(abar) mu_k, v_k I)`` with
``v_k = abar s_k^2 + 1 - abar``, and the optimal eps-predictor is exactly

    eps(x, t) = sqrt(1 - abar) sum_k r_k(x) (x - sqrt(abar) mu_k) / v_k,

``r_k`` the posterior responsibilities (a softmax). A finite data set is the special case of
delta components (``s_k = 0``, equal weights): the empirical optimal denoiser. Both are real,
nonlinear scores with no training, which makes solver convergence on them meaningful.
"""

from __future__ import annotations

import math

import attrs
import torch

from ..errors import InvalidOptionError, ShapeError
from ..schedules import linear_alphas_cumprod, spaced_timesteps

__all__ = ["GaussianMixtureDenoiser", "EmpiricalDenoiser", "linear_alphas_cumprod", "spaced_timesteps"]


def _as_float64(value: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value).detach().to("cpu", torch.float64)


@attrs.define(frozen=True, eq=False)
class GaussianMixtureDenoiser:
    """Exact eps of an isotropic Gaussian mixture under a variance-preserving schedule.

    Args:
        means: ``[K, D]`` component means.
        stds: ``[K]`` component standard deviations (>= 0; 0 is a point mass).
        weights: ``[K]`` mixture weights (normalised here).
        alphas_cumprod: the schedule abar ``[num_train_steps]``.
        shape: the shape of one sample (``(D,)`` by default).
    """

    means: torch.Tensor = attrs.field(converter=_as_float64, repr=False)
    stds: torch.Tensor = attrs.field(converter=_as_float64, repr=False)
    weights: torch.Tensor = attrs.field(converter=_as_float64, repr=False)
    alphas_cumprod: torch.Tensor = attrs.field(converter=_as_float64, repr=False)
    shape: tuple[int, ...] | None = None

    def __attrs_post_init__(self) -> None:
        if self.means.dim() != 2:
            raise ShapeError(f"means must be [K, D]; got {list(self.means.shape)}.")
        count = self.means.shape[0]
        if self.stds.shape != (count,) or self.weights.shape != (count,):
            raise ShapeError(f"stds and weights must be [K] = [{count}].")
        if (self.stds < 0).any() or (self.weights <= 0).any():
            raise InvalidOptionError("stds must be >= 0 and weights > 0.")
        if self.shape is None:
            object.__setattr__(self, "shape", (self.means.shape[1],))
        elif math.prod(self.shape) != self.means.shape[1]:
            raise ShapeError(f"shape {self.shape} does not hold D = {self.means.shape[1]} elements.")

    @classmethod
    def random(cls, dim: int = 64, components: int = 8, std: float = 0.1, seed: int = 0,
               alphas_cumprod: torch.Tensor | None = None) -> GaussianMixtureDenoiser:
        """A reproducible toy: ``components`` means with N(0, 0.25) coordinates, equal stds ``std``,
        weights uniform in [0.5, 1.5) before normalising; linear-beta schedule by default."""
        generator = torch.Generator().manual_seed(seed)
        means = 0.5 * torch.randn(components, dim, generator=generator, dtype=torch.float64)
        weights = torch.rand(components, generator=generator, dtype=torch.float64) + 0.5
        abar = linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
        return cls(means, torch.full((components,), std, dtype=torch.float64), weights, abar)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps for ``x`` ``[B, *shape]`` at integer timesteps ``t`` ``[B]``; same dtype as ``x``."""
        batch = x.shape[0]
        flat = x.reshape(batch, -1)
        dtype, device = x.dtype, x.device
        abar = self.alphas_cumprod.to(device)[t.long().to(device)].to(dtype)[:, None]  # [B, 1]
        means = self.means.to(device, dtype)  # [K, D]
        variances = abar * self.stds.to(device, dtype)[None, :] ** 2 + (1 - abar)  # [B, K]
        centred = flat[:, None, :] - abar.sqrt()[:, :, None] * means[None]  # [B, K, D]
        squared = centred.pow(2).sum(-1)  # [B, K]
        dim = flat.shape[1]
        logits = (self.weights.to(device, dtype).log()[None] - 0.5 * squared / variances
                  - 0.5 * dim * variances.log())
        responsibility = torch.softmax(logits, dim=1)  # [B, K]
        score_term = torch.einsum("bk,bkd->bd", responsibility / variances, centred)
        eps = (1 - abar).sqrt() * score_term
        return eps.reshape(x.shape)


def EmpiricalDenoiser(data: torch.Tensor, alphas_cumprod: torch.Tensor,
                      shape: tuple[int, ...] | None = None) -> GaussianMixtureDenoiser:
    """The exact optimal eps-predictor of a finite data set ``[M, *shape]`` (point masses).

    Its samples converge to training points: a real nonlinear score with no training.
    """
    data = torch.as_tensor(data).detach().to("cpu", torch.float64)
    count = data.shape[0]
    shape = tuple(data.shape[1:]) if shape is None else shape
    return GaussianMixtureDenoiser(data.reshape(count, -1), torch.zeros(count, dtype=torch.float64),
                                   torch.ones(count, dtype=torch.float64), alphas_cumprod, shape)
