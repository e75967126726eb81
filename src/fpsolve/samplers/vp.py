"""Variance-preserving samplers: DDIM, DDPM and the shared schedule handling.

All of them are defined by a training schedule ``alphas_cumprod`` (abar), a descending list of
model timesteps, and the abar of the final state (``final_alpha_cumprod``: 1.0, or abar[0] for
diffusers' ``set_alpha_to_one=False``). State ``j < T`` sits at ``abar[timesteps[j]]``; the last
state ``T`` at ``final_alpha_cumprod``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch

from ..errors import InvalidOptionError
from ..validators import check_flag, check_real, is_integer, is_real, real
from .base import AffineForm, SequentialSampler

__all__ = ["VPSampler", "DDIM", "DDPM"]


def _as_alphas_cumprod(value: Any) -> torch.Tensor:
    if isinstance(value, (str, bytes)):
        raise InvalidOptionError(
            f"alphas_cumprod must be a 1-D tensor (the training schedule); got {value!r}.")
    try:
        tensor = torch.as_tensor(value).detach()
    except (TypeError, ValueError, RuntimeError) as error:
        raise InvalidOptionError(
            f"alphas_cumprod must be a 1-D tensor of numbers (the training schedule); got {value!r} "
            f"({error})."
        ) from None
    if tensor.dtype == torch.bool or not (tensor.is_floating_point() or not tensor.is_complex()):
        raise InvalidOptionError(f"alphas_cumprod must hold real numbers; got dtype {tensor.dtype}.")
    tensor = tensor.to(device="cpu", dtype=torch.float64)
    if tensor.dim() != 1 or tensor.numel() == 0:
        raise InvalidOptionError(
            f"alphas_cumprod must be a non-empty 1-D tensor (the training schedule); got shape "
            f"{tuple(tensor.shape)}."
        )
    if not torch.isfinite(tensor).all() or (tensor <= 0).any() or (tensor > 1).any():
        raise InvalidOptionError("alphas_cumprod must lie in (0, 1]; got values outside that range.")
    rises = (tensor[1:] > tensor[:-1]).nonzero().flatten()
    if rises.numel():
        at = int(rises[0])
        raise InvalidOptionError(
            "alphas_cumprod must be non-increasing in the training timestep "
            "(abar_t = prod_{s<=t} (1 - beta_s): "
            f"timestep 0 is the cleanest); it rises from {tensor[at].item():.6g} at t={at} to "
            f"{tensor[at + 1].item():.6g} at t={at + 1}. Is the schedule flipped (pass it clean-first)?"
        )
    return tensor


def _as_timesteps(value: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    if is_integer(value) or isinstance(value, (str, bytes)):
        raise InvalidOptionError(
            f"timesteps must be a sequence of model timesteps, noisiest first (e.g. [999, 666, 333, 0]); got "
            f"{value!r}. For T evenly spaced steps use fpsolve.models.spaced_timesteps(T)."
        )
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":
        tensor = torch.as_tensor(value)
        if tensor.dim() != 1:
            raise InvalidOptionError(
                f"timesteps must be 1-D (one model timestep per step); got shape {list(tensor.shape)}.")
        if tensor.dtype == torch.bool:
            raise InvalidOptionError("timesteps must be integers (model timesteps); got booleans.")
        if tensor.is_floating_point() and not torch.equal(tensor, tensor.round()):
            raise InvalidOptionError("timesteps must be integers (model timesteps); got fractional values "
                                     f"{tensor[tensor != tensor.round()][:3].tolist()}.")
        value = tensor.long().tolist()
    try:
        items = list(value)
    except TypeError:
        raise InvalidOptionError(
            f"timesteps must be a sequence of model timesteps, noisiest first; got {value!r}.") from None
    steps = []
    for item in items:
        if is_integer(item):
            steps.append(int(item))
        elif is_real(item) and float(item).is_integer():
            steps.append(int(item))  # 999.0 is the timestep 999
        else:
            nested = isinstance(item, (list, tuple))
            kind = "nested sequences (timesteps must be 1-D)" if nested else repr(item)
            raise InvalidOptionError(
                f"timesteps must be integers (model timesteps), noisiest first; got {kind} in {value!r}."
            )
    if not steps:
        raise InvalidOptionError("timesteps must contain at least one timestep.")
    return tuple(steps)


def _check_unit_interval(name: str):
    def check(instance: Any, attribute: Any, value: float) -> None:
        if not (is_real(value) and 0.0 < value <= 1.0):
            raise InvalidOptionError(f"{name} must lie in (0, 1]; got {value!r}.")

    return check


@attrs.define(frozen=True, eq=False, kw_only=True)
class VPSampler(SequentialSampler):
    """Base of samplers on a variance-preserving schedule.

    Args:
        alphas_cumprod: the training schedule abar, 1-D (converted to float64 on the CPU).
        timesteps: strictly decreasing model timesteps, each in ``[0, len(alphas_cumprod))``.
        final_alpha_cumprod: abar of the final state ``x_0`` (1.0, or ``alphas_cumprod[0]``).
    """

    alphas_cumprod: torch.Tensor = attrs.field(converter=_as_alphas_cumprod, repr=False)
    timesteps: tuple[int, ...] = attrs.field(converter=_as_timesteps)
    final_alpha_cumprod: float = attrs.field(default=1.0, converter=real,
                                             validator=_check_unit_interval("final_alpha_cumprod"))

    @timesteps.validator
    def _check_timesteps(self, attribute: Any, steps: tuple[int, ...]) -> None:
        size = self.alphas_cumprod.numel()
        bad = [t for t in steps if not 0 <= t < size]
        if bad:
            raise InvalidOptionError(
                f"timesteps must lie in [0, {size - 1}] (the length of alphas_cumprod); got {bad[:5]}."
            )
        for index, (now, nxt) in enumerate(zip(steps, steps[1:], strict=False)):
            if nxt >= now:
                raise InvalidOptionError(
                    "timesteps must be strictly decreasing (noisiest first); "
                    f"got {now} then {nxt} at positions {index} and {index + 1}."
                )
        clean = [t for t in steps if self.alphas_cumprod[t] >= 1.0]
        if clean:
            raise InvalidOptionError(
                f"alphas_cumprod is 1.0 (no noise) at the timestep(s) {clean[:5]} the sampler steps from: a "
                "state without noise cannot be denoised (its noise level sigma = 0 divides the step). "
                "Drop those timesteps, or use a schedule whose abar is below 1 at every timestep "
                "(the final state's abar is final_alpha_cumprod)."
            )
        abar = self.alphas_cumprod[torch.tensor(steps)]
        if is_real(self.final_alpha_cumprod) and self.final_alpha_cumprod < float(abar[-1]):
            raise InvalidOptionError(
                f"final_alpha_cumprod = {self.final_alpha_cumprod!r} is below abar = "
                f"{abar[-1].item():.6g} of the "
                f"last timestep {steps[-1]}: the last step would add noise. Use 1.0 or alphas_cumprod[0]."
            )

    def state_alphas_cumprod(self) -> torch.Tensor:
        """``[T+1]`` float64: abar of every state, ``x_T`` first and ``final_alpha_cumprod`` last."""
        steps = torch.tensor(self.timesteps, dtype=torch.long)
        final = torch.tensor([self.final_alpha_cumprod], dtype=torch.float64)
        return torch.cat([self.alphas_cumprod[steps], final])

    def state_sigmas(self) -> torch.Tensor:
        """``[T+1]``: ``sqrt(1 - abar)`` of every state."""
        return (1 - self.state_alphas_cumprod()).clamp_min(0).sqrt()

    def step_variances(self) -> torch.Tensor:
        """``[T+1]``: DDPM posterior variance ``(1-abar')/(1-abar) (1 - abar/abar')`` per step."""
        abar = self.state_alphas_cumprod()
        variances = torch.zeros_like(abar)
        now, nxt = abar[:-1], abar[1:]
        variances[1:] = ((1 - nxt) / (1 - now)) * (1 - now / nxt)
        return variances.clamp_min(0)

    def _coarse_timesteps(self, num_steps: int) -> tuple[int, ...]:
        if not 1 <= num_steps <= self.num_steps:
            raise InvalidOptionError(
                f"num_steps for a coarse sampler must lie in [1, {self.num_steps}]; got {num_steps}."
            )
        picks = torch.linspace(0, self.num_steps - 1, num_steps).round().long().unique()
        return tuple(self.timesteps[i] for i in picks.tolist())

    def coarsened(self, num_steps: int) -> SequentialSampler:
        """DDIM (eta 0) on ``num_steps`` of this sampler's timesteps, evenly spread."""
        return DDIM(alphas_cumprod=self.alphas_cumprod, timesteps=self._coarse_timesteps(num_steps),
                    eta=0.0, final_alpha_cumprod=self.final_alpha_cumprod)


@attrs.define(frozen=True, eq=False, kw_only=True)
class DDIM(VPSampler):
    """DDIM with parameter ``eta`` (0: the deterministic ODE sampler; 1: DDPM-like ancestral noise).

    Step from abar (current state) to abar' (next state), with sigma the DDPM posterior std:
    ``s' = a s + b eps + c xi`` where ``a = sqrt(abar'/abar)``, ``c = eta * sigma``,
    ``b = sqrt(max(1 - abar' - c^2, 0)) - sqrt(1 - abar) a``.

    Args:
        eta: noise scale, ``>= 0``.
        noise_final_step: inject noise on the last step too (diffusers' DDIMScheduler does when
            ``eta > 0`` and ``final_alpha_cumprod < 1``); by default the last step is noise-free.
    """

    name = "ddim"

    eta: float = attrs.field(default=0.0, converter=real, validator=check_real(minimum=0.0))
    noise_final_step: bool = attrs.field(default=False, validator=check_flag("noise_final_step"))

    def affine_form(self) -> AffineForm:
        abar = self.state_alphas_cumprod()
        now, nxt = abar[:-1], abar[1:]
        sigma = ((1 - nxt) / (1 - now)).sqrt() * (1 - now / nxt).clamp_min(0).sqrt()
        c = self.eta * sigma
        if not self.noise_final_step:
            c[-1] = 0.0
        a = (nxt / now).sqrt()
        b = (1 - nxt - c**2).clamp_min(0).sqrt() - (1 - now).sqrt() * a
        zero = torch.zeros(1, dtype=torch.float64)
        return AffineForm(state=torch.cat([zero, a]).unsqueeze(1), output=torch.cat([zero, b]).unsqueeze(1),
                          noise=torch.cat([zero, c]))


@attrs.define(frozen=True, eq=False, kw_only=True)
class DDPM(VPSampler):
    """Ancestral DDPM sampling with the posterior variance ("fixed small"), any timestep stride.

    For a step from abar to abar' the effective ``beta = 1 - abar/abar'``; the posterior mean is
    ``coef_x0 * x0_hat + coef_x * s`` with ``x0_hat = (s - sqrt(1-abar) eps) / sqrt(abar)``, and
    the noise std is the square root of the posterior variance. No noise on the last step.
    """

    name = "ddpm"

    def affine_form(self) -> AffineForm:
        abar = self.state_alphas_cumprod()
        now, nxt = abar[:-1], abar[1:]
        beta = 1 - now / nxt
        coef_x0 = nxt.sqrt() * beta / (1 - now)
        coef_x = (1 - beta).sqrt() * (1 - nxt) / (1 - now)
        variance = ((1 - nxt) / (1 - now)) * beta
        c = variance.clamp_min(0).sqrt()
        c[-1] = 0.0
        a = coef_x0 / now.sqrt() + coef_x
        b = -coef_x0 * (1 - now).sqrt() / now.sqrt()
        zero = torch.zeros(1, dtype=torch.float64)
        return AffineForm(state=torch.cat([zero, a]).unsqueeze(1), output=torch.cat([zero, b]).unsqueeze(1),
                          noise=torch.cat([zero, c]))
