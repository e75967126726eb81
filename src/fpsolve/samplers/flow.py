"""Flow-matching samplers (rectified flow: Flux, SD3, Wan, ...), written in affine form.

A flow-matching model is trained on states ``x_sigma = (1 - sigma) x0 + sigma eps`` and returns
the velocity ``v(x, t) ~ eps - x0`` at model time ``t = sigma * num_train_timesteps`` (a float).
The sampler integrates ``dx/dsigma = v`` from ``sigma_0`` (usually 1, pure noise) down to the
final level ``sigma_T`` (usually 0) on a descending grid ``sigmas`` ``[T+1]``:

* ``flow_euler``: ``s_i = s_{i-1} + (sigma_i - sigma_{i-1}) v_{i-1}``, one lag;
* ``flow_euler_stochastic``: diffusers' ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``:
  the predicted data ``x0 = s_{i-1} - sigma_{i-1} v_{i-1}`` is re-noised with a fresh draw,
  ``s_i = (1 - sigma_i) x0 + sigma_i xi_i``: affine in the state, the velocity and the noise;
* ``flow_dpm_solver``: DPM-Solver++ multistep (orders 1-3) on the flow schedule
  ``alpha = 1 - sigma``, data prediction ``m_j = s_j - sigma_j v_j``, as diffusers'
  ``DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")``.

Every step is affine in earlier states, velocities and one noise draw, so the trajectory is a
triangular system like the variance-preserving ones.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch

from ..errors import InvalidOptionError
from .base import AffineForm, SequentialSampler
from .dpm_solver import dpm_solver_step_orders, dpm_solver_weights

__all__ = ["FlowSampler", "FlowEuler", "StochasticFlowEuler", "FlowDPMSolver", "scaled_posterior_variances"]


def scaled_posterior_variances(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``[T+1]``: the DDPM posterior variance of the step into each state, in the states' units.

    States ``alpha x0 + sigma eps`` (any parameterisation: variance preserving, exploding, flow)
    are mapped to a variance-preserving schedule ``abar = alpha^2 / (alpha^2 + sigma^2)``; the
    variance is scaled back by the state's squared scale ``alpha^2 + sigma^2``. Entry 0 is 0.
    """
    scale2 = alpha**2 + sigma**2
    abar = alpha**2 / scale2
    now, nxt = abar[:-1], abar[1:]
    variances = torch.zeros_like(abar)
    ratio = torch.where(1 - now > 0, (1 - nxt) / (1 - now).clamp_min(1e-300), torch.zeros_like(now))
    variances[1:] = ratio * (1 - now / nxt) * scale2[1:]
    return variances.clamp_min(0).nan_to_num(0.0)


def _as_sigmas(value: Any) -> torch.Tensor:
    tensor = torch.as_tensor(value).detach().to(device="cpu", dtype=torch.float64)
    if tensor.dim() != 1 or tensor.numel() < 2:
        raise InvalidOptionError(
            "sigmas must be a 1-D tensor [T+1] of noise levels (T >= 1 steps, the final level last); "
            f"got shape {tuple(tensor.shape)}."
        )
    if not torch.isfinite(tensor).all() or (tensor < 0).any() or (tensor > 1).any():
        raise InvalidOptionError("sigmas must be flow-matching noise levels in [0, 1]; got values outside.")
    steps = tensor[1:] - tensor[:-1]
    if (steps >= 0).any():
        index = int((steps >= 0).nonzero()[0])
        raise InvalidOptionError(
            "sigmas must be strictly decreasing (noisiest first, the final level last); got "
            f"{float(tensor[index]):.6g} then {float(tensor[index + 1]):.6g} at positions {index} and "
            f"{index + 1}."
        )
    return tensor


def _check_train_timesteps(instance: Any, attribute: Any, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOptionError(f"num_train_timesteps must be an int >= 1; got {value!r}.")


@attrs.define(frozen=True, eq=False, kw_only=True)
class FlowSampler(SequentialSampler):
    """Base of flow-matching samplers: a descending grid of noise levels and a velocity model.

    Args:
        sigmas: ``[T+1]`` strictly decreasing noise levels in ``[0, 1]``; ``sigmas[i]`` is the
            level of state ``i`` (``sigmas[0]`` that of the initial noise, ``sigmas[-1]`` the
            final level, usually 0). Converted to float64 on the CPU.
        num_train_timesteps: the model is called at ``t = sigmas[i] * num_train_timesteps``.
    """

    prediction = "velocity"
    continuous_time = True

    sigmas: torch.Tensor = attrs.field(converter=_as_sigmas, repr=False)
    num_train_timesteps: int = attrs.field(default=1000, validator=_check_train_timesteps)

    @property
    def timesteps(self) -> tuple[float, ...]:  # type: ignore[override]  # continuous model time
        """The model times ``sigmas[i] * num_train_timesteps`` of the states ``0..T-1`` (floats)."""
        return tuple(float(s) * self.num_train_timesteps for s in self.sigmas[:-1].tolist())

    def state_sigmas(self) -> torch.Tensor:
        """``[T+1]``: the noise level ``sigma`` of every state (the noise std in the states' units)."""
        return self.sigmas.clone()

    def step_variances(self) -> torch.Tensor:
        """``[T+1]``: the DDPM posterior variance of each step on the schedule ``alpha = 1 - sigma``."""
        return scaled_posterior_variances(1 - self.sigmas, self.sigmas)

    def _coarse_sigmas(self, num_steps: int) -> torch.Tensor:
        if not 1 <= num_steps <= self.num_steps:
            raise InvalidOptionError(
                f"num_steps for a coarse sampler must lie in [1, {self.num_steps}]; got {num_steps}."
            )
        picks = torch.linspace(0, self.num_steps, num_steps + 1).round().long().unique()
        return self.sigmas[picks]

    def coarsened(self, num_steps: int) -> SequentialSampler:
        """Flow Euler on ``num_steps + 1`` of this sampler's levels, evenly spread (ends kept)."""
        return FlowEuler(sigmas=self._coarse_sigmas(num_steps), num_train_timesteps=self.num_train_timesteps)


def _zero_row() -> torch.Tensor:
    return torch.zeros(1, dtype=torch.float64)


@attrs.define(frozen=True, eq=False, kw_only=True)
class FlowEuler(FlowSampler):
    """Flow-matching Euler: ``s_i = s_{i-1} + (sigma_i - sigma_{i-1}) v(s_{i-1}, t_{i-1})``.

    The deterministic sampler of Flux, SD3 and Wan (diffusers' ``FlowMatchEulerDiscreteScheduler``).
    ``FlowEuler(sigmas=..., num_train_timesteps=1000)``: see :class:`FlowSampler`.
    """

    name = "flow_euler"
    aliases = {"rectified_flow": {}}

    def affine_form(self) -> AffineForm:
        now, nxt = self.sigmas[:-1], self.sigmas[1:]
        zero = _zero_row()
        state = torch.ones(self.num_steps + 1, dtype=torch.float64)
        state[0] = 0.0
        return AffineForm(state=state.unsqueeze(1), output=torch.cat([zero, nxt - now]).unsqueeze(1),
                          noise=torch.zeros(self.num_steps + 1, dtype=torch.float64))


@attrs.define(frozen=True, eq=False, kw_only=True)
class StochasticFlowEuler(FlowSampler):
    """Stochastic flow Euler: ``s_i = (1 - sigma_i) (s_{i-1} - sigma_{i-1} v_{i-1}) + sigma_i xi_i``.

    The predicted data is re-noised to the next level with a fresh standard normal draw ``xi_i``
    (diffusers' ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``); a final level of 0
    takes no noise.
    """

    name = "flow_euler_stochastic"

    def affine_form(self) -> AffineForm:
        now, nxt = self.sigmas[:-1], self.sigmas[1:]
        zero = _zero_row()
        return AffineForm(state=torch.cat([zero, 1 - nxt]).unsqueeze(1),
                          output=torch.cat([zero, -(1 - nxt) * now]).unsqueeze(1),
                          noise=torch.cat([zero, nxt]))


@attrs.define(frozen=True, eq=False, kw_only=True)
class FlowDPMSolver(FlowSampler):
    """DPM-Solver++ multistep on a flow-matching schedule (velocity model), orders 1-3.

    With ``alpha = 1 - sigma``, ``lambda = log(alpha / sigma)`` and the data prediction
    ``m_j = s_j - sigma_j v_j``, each step is the DPM-Solver++ update of
    :mod:`fpsolve.samplers.dpm_solver`; orders are lowered at the start, on the last steps when
    ``lower_order_final`` is set and there are fewer than 15, and on a final step to sigma = 0
    (diffusers' rule). A first level of exactly 1 (pure noise, ``lambda = -inf``) is handled as
    the limit: a first-order step there reads only the data prediction.

    Args:
        order: 1, 2 or 3 ("2M", "3M").
        lower_order_final: see above (diffusers' default: True).
    """

    name = "flow_dpm_solver"
    aliases = {"flow_dpm_solver++": {}}

    order: int = attrs.field(default=2)
    lower_order_final: bool = True

    @order.validator
    def _check_order(self, attribute: Any, value: int) -> None:
        if value not in (1, 2, 3):
            raise InvalidOptionError(f"flow DPM-Solver++ order must be 1, 2 or 3; got {value!r}.")

    def step_orders(self) -> list[int]:
        """The order each step uses."""
        return dpm_solver_step_orders(self.num_steps, self.order, self.lower_order_final,
                                      float(self.sigmas[-1]) == 0.0)

    def affine_form(self) -> AffineForm:
        sigma = self.sigmas.tolist()
        alpha = [1.0 - s for s in sigma]
        lam = [(math.log(a) - math.log(s)) if s > 0 and a > 0 else (math.inf if s == 0 else -math.inf)
               for a, s in zip(alpha, sigma, strict=True)]
        size = self.num_steps + 1
        state = torch.zeros(size, 3, dtype=torch.float64)
        output = torch.zeros(size, 3, dtype=torch.float64)
        for i, order in enumerate(self.step_orders(), start=1):
            # an earlier state at sigma = 1 carries no data: the step reads it only to first order
            usable = next((k for k in range(1, order) if math.isinf(lam[i - 1 - k])), order)
            order = min(order, usable)
            history = [lam[i]] + [lam[i - 1 - lag] for lag in range(order)]
            ratio, weights = dpm_solver_weights(order, history, alpha[i], sigma[i], sigma[i - 1])
            state[i, 0] += ratio
            for lag, weight in enumerate(weights, start=1):
                j = i - lag  # m_j = s_j - sigma_j v_j
                state[i, lag - 1] += weight
                output[i, lag - 1] -= weight * sigma[j]
        return AffineForm(state=state, output=output, noise=torch.zeros(size, dtype=torch.float64))

    def coarsened(self, num_steps: int) -> SequentialSampler:
        """The same solver on ``num_steps + 1`` of this sampler's levels."""
        return attrs.evolve(self, sigmas=self._coarse_sigmas(num_steps))
