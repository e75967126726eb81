"""One loader for every shipped reference model: ``load_reference(name)``.

A :class:`ReferenceModel` carries what sampling it needs: the denoiser, what that denoiser
predicts (``"epsilon"`` or ``"velocity"``), the training schedule, the sample shape, a converter to
images, and :meth:`ReferenceModel.sampler`: the model's own sampler for a number of steps (DDIM
for the epsilon models, flow Euler for the rectified-flow model).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import torch

from .. import samplers
from ..errors import InvalidOptionError, UnknownNameError, UnsupportedError
from ..validators import as_int
from . import digits
from .analytic import GaussianMixtureDenoiser, spaced_timesteps

if TYPE_CHECKING:  # pragma: no cover - only for annotations
    from ..samplers.base import SequentialSampler

__all__ = ["ReferenceModel", "PREDICTIONS", "load_reference", "available_references", "reference_prediction"]

#: What a reference's denoiser returns: the noise (DDPM epsilon) or the flow velocity
#: ``dx/dsigma = noise - x0`` of a rectified-flow model.
PREDICTIONS: tuple[str, ...] = ("epsilon", "velocity")


def _check_prediction(instance: Any, attribute: Any, value: str) -> None:
    if value not in PREDICTIONS:
        raise InvalidOptionError(
            f"ReferenceModel prediction must be one of {', '.join(map(repr, PREDICTIONS))}; got {value!r}."
        )


@attrs.define(frozen=True, eq=False)
class ReferenceModel:
    """A denoiser with everything needed to sample from it and look at the result.

    Attributes:
        name: the reference's name.
        denoiser: ``denoiser(x, t)`` (x ``[B, *shape]``, ``t`` ``[B]``); returns the input's dtype.
            For ``prediction="epsilon"`` it returns the noise at integer timesteps; for
            ``"velocity"`` the flow velocity ``noise - x0`` at float model times
            ``t = sigma * num_train_timesteps``.
        alphas_cumprod: the training schedule of an epsilon model, float64 ``[num_train_steps]``;
            a flow model has none (``None`` at construction; reading it raises
            :class:`~fpsolve.errors.UnsupportedError`).
        shape: one sample's shape.
        to_images: maps ``x0`` ``[N, *shape]`` in [-1, 1] to uint8 images ``[N, H, W]`` (or
            ``[N, H, W, C]``).
        unet: the diffusers ``UNet2DModel`` behind the denoiser (``None`` for closed-form models).
        prediction: ``"epsilon"`` or ``"velocity"`` (see :data:`PREDICTIONS`).
        flow_sigmas: for a flow model, ``flow_sigmas(num_steps)``: the descending ``[T+1]`` noise
            levels of a ``T``-step run on its training schedule (last level 0).
        num_train_timesteps: model time of ``sigma = 1`` for a flow model (``t = sigma * this``).
    """

    name: str
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = attrs.field(repr=False)
    _alphas_cumprod: torch.Tensor | None = attrs.field(repr=False)
    shape: tuple[int, ...]
    to_images: Callable[[torch.Tensor], np.ndarray] = attrs.field(repr=False)
    unet: Any = attrs.field(default=None, repr=False)
    prediction: str = attrs.field(default="epsilon", validator=_check_prediction)
    flow_sigmas: Callable[[int], torch.Tensor] | None = attrs.field(default=None, repr=False)
    num_train_timesteps: int = 1000

    def __attrs_post_init__(self) -> None:
        if self.prediction == "epsilon" and self._alphas_cumprod is None:
            raise InvalidOptionError(f"reference {self.name!r}: an epsilon model needs its alphas_cumprod.")
        if self.prediction == "velocity" and self.flow_sigmas is None:
            raise InvalidOptionError(f"reference {self.name!r}: a velocity (flow) model needs flow_sigmas.")

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The training schedule abar (epsilon models only)."""
        if self._alphas_cumprod is None:
            raise UnsupportedError(
                f"the {self.name!r} reference is a rectified-flow (velocity) model: it has no "
                "alphas_cumprod. Use ref.sampler(num_steps), or ref.flow_sigmas(num_steps) with "
                "fpsolve.samplers.FlowEuler."
            )
        return self._alphas_cumprod

    def sampler(self, num_steps: int) -> SequentialSampler:
        """The model's matching deterministic sampler with ``num_steps`` steps on its training schedule.

        Epsilon models: DDIM (eta 0) on ``num_steps`` timesteps evenly spaced from the last
        training timestep to 0 (:func:`~fpsolve.models.spaced_timesteps`), ending at
        ``alpha_bar = 1``. Flow models: ``FlowEuler(sigmas=flow_sigmas(num_steps))`` (for the
        digits-flow model, the sigmas of diffusers' ``FlowMatchEulerDiscreteScheduler``).

        Raises:
            InvalidOptionError: for a ``num_steps`` outside ``1..num_train_steps``.
        """
        num_steps = as_int("num_steps", num_steps)

        if self.prediction == "velocity":
            assert self.flow_sigmas is not None  # checked at construction
            if not 1 <= num_steps <= self.num_train_timesteps:
                raise InvalidOptionError(
                    f"num_steps must lie in 1..{self.num_train_timesteps}; got {num_steps}."
                )
            return samplers.FlowEuler(sigmas=self.flow_sigmas(num_steps),
                                      num_train_timesteps=self.num_train_timesteps)
        abar = self.alphas_cumprod
        steps = spaced_timesteps(num_steps, abar.numel())
        return samplers.DDIM(alphas_cumprod=abar, timesteps=steps, eta=0.0)


def _no_images(x0: torch.Tensor) -> np.ndarray:
    raise UnsupportedError("the 'gmm' reference is a 64-dimensional vector model, not an image model.")


def _load_gmm() -> ReferenceModel:
    model = GaussianMixtureDenoiser.random(dim=64, components=8, std=0.1, seed=0)
    return ReferenceModel("gmm", model, model.alphas_cumprod, (64,), _no_images)


def _load_digits() -> ReferenceModel:
    unet = digits.load_digits_unet()
    return ReferenceModel("digits", digits.digits_denoiser(unet), digits.digits_alphas_cumprod(),
                          tuple(digits.DIGITS_SHAPE), digits.digits_to_images, unet)


def _load_digits_flow() -> ReferenceModel:
    unet = digits.load_digits_unet(objective="flow")
    return ReferenceModel("digits-flow", digits.digits_denoiser(unet), None, tuple(digits.DIGITS_SHAPE),
                          digits.digits_to_images, unet, prediction="velocity",
                          flow_sigmas=digits.flow_sigmas, num_train_timesteps=digits.NUM_TRAIN_TIMESTEPS)


#: name -> (loader, prediction): the prediction is known without loading (the benchmark plans
#: which samplers fit which model before any weights are read).
_LOADERS: dict[str, tuple[Callable[[], ReferenceModel], str]] = {
    "digits": (_load_digits, "epsilon"),
    "digits-flow": (_load_digits_flow, "velocity"),
    "gmm": (_load_gmm, "epsilon"),
}


def available_references() -> list[str]:
    """Names accepted by :func:`load_reference`."""
    return sorted(_LOADERS)


def reference_prediction(name: str) -> str:
    """What the named reference's denoiser returns (``"epsilon"`` or ``"velocity"``), without loading it."""
    try:
        return _LOADERS[name][1]
    except KeyError:
        raise UnknownNameError("reference model", name, _LOADERS) from None


def load_reference(name: str = "digits") -> ReferenceModel:
    """Load a shipped reference model by name (``"digits"``, ``"digits-flow"``, ``"gmm"``)."""
    try:
        loader = _LOADERS[name][0]
    except KeyError:
        raise UnknownNameError("reference model", name, _LOADERS) from None
    return loader()
