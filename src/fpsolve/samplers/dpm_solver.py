"""DPM-Solver++ multistep (data prediction, orders 1-3), written in affine form.

With ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``, ``lambda = log(alpha / sigma)`` and the
data prediction ``m_j = (s_j - sigma_j e_j) / alpha_j`` at state ``j``, the step from state
``i-1`` to ``i`` (``h = lambda_i - lambda_{i-1}``) is, for order 1, 2 (midpoint) and 3,

    s_i = (sigma_i / sigma_{i-1}) s_{i-1} + alpha_i (1 - e^{-h}) D0 + ...,

the multistep differences ``D1``, ``D2`` built from ``m_{i-1}``, ``m_{i-2}``, ``m_{i-3}``. Every
``m`` is affine in one state and its model output, so the step is affine in up to three earlier
states and outputs: the system stays triangular, with three lags.

Lower orders are used where the history is short (first steps), and, as diffusers'
``DPMSolverMultistepScheduler`` does, on the last steps when ``lower_order_final`` is set and
there are fewer than 15 steps, and always on a final step that reaches sigma = 0.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch

from ..errors import InvalidOptionError
from ..validators import check_flag, integer, is_integer
from .base import AffineForm, SequentialSampler
from .vp import VPSampler

__all__ = ["DPMSolver", "dpm_solver_step_orders", "dpm_solver_weights"]


def dpm_solver_step_orders(num_steps: int, order: int, lower_order_final: bool,
                           final_sigma_is_zero: bool) -> list[int]:
    """The order used by each of the ``num_steps`` steps (diffusers' rule)."""
    orders = []
    for k in range(num_steps):
        final = k == num_steps - 1 and (final_sigma_is_zero or (lower_order_final and num_steps < 15))
        second = k == num_steps - 2 and lower_order_final and num_steps < 15
        warm = min(k, order)  # earlier steps available as history
        if order == 1 or warm < 1 or final:
            orders.append(1)
        elif order == 2 or warm < 2 or second:
            orders.append(2)
        else:
            orders.append(3)
    return orders


def dpm_solver_weights(order: int, lambdas: list[float], alpha_next: float, sigma_next: float,
                       sigma_now: float) -> tuple[float, list[float]]:
    """Coefficients of one DPM-Solver++ step: ``(state_ratio, [w_1, ..., w_order])``.

    The step is ``s_next = state_ratio * s_now + sum_l w_l m_{now-l+1}``, with ``m`` the data
    predictions at the current and earlier states; ``lambdas`` are ``[lambda_next, lambda_now,
    lambda_prev, ...]`` (as many as the order needs). A next state with sigma = 0 takes the
    limit ``h -> inf`` (only order 1 is defined there).
    """
    if sigma_next == 0.0:
        if order != 1:
            raise InvalidOptionError("a DPM-Solver++ step to sigma = 0 must be first order.")
        return 0.0, [alpha_next]
    h = lambdas[0] - lambdas[1]
    if h == 0.0:  # a zero-length step (e.g. the last timestep already at the final noise level)
        return 1.0, [0.0] * order
    ratio = sigma_next / sigma_now
    phi1 = -alpha_next * math.expm1(-h)  # alpha (1 - e^{-h})
    if order == 1:
        return ratio, [phi1]
    r0 = (lambdas[1] - lambdas[2]) / h
    if order == 2:
        # D1 = (m0 - m1) / r0, weight 0.5 * phi1 (the "midpoint" variant, diffusers' default)
        return ratio, [phi1 + 0.5 * phi1 / r0, -0.5 * phi1 / r0]
    r1 = (lambdas[2] - lambdas[3]) / h
    phi2 = alpha_next * (math.expm1(-h) / h + 1.0)
    phi3 = alpha_next * ((math.expm1(-h) + h) / h**2 - 0.5)
    # D1_0 = (m0 - m1)/r0, D1_1 = (m1 - m2)/r1, D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1),
    # D2 = (D1_0 - D1_1)/(r0+r1), step = ratio s + phi1 m0 + phi2 D1 - phi3 D2.
    d10 = [1 / r0, -1 / r0, 0.0]
    d11 = [0.0, 1 / r1, -1 / r1]
    diff = [x - y for x, y in zip(d10, d11, strict=True)]
    d1 = [x + r0 / (r0 + r1) * y for x, y in zip(d10, diff, strict=True)]
    d2 = [y / (r0 + r1) for y in diff]
    weights = [phi2 * x - phi3 * y for x, y in zip(d1, d2, strict=True)]
    weights[0] += phi1
    return ratio, weights


@attrs.define(frozen=True, eq=False, kw_only=True)
class DPMSolver(VPSampler):
    """DPM-Solver++ multistep in data-prediction form (deterministic), orders 1-3.

    Args:
        order: solver order, 1, 2 or 3 ("2M", "3M").
        lower_order_final: lower the order on the last steps when there are fewer than 15
            (diffusers' default); a final step to sigma = 0 is always first order.
    """

    name = "dpm_solver"
    aliases = {"dpm_solver++": {}, "dpmsolver++": {}}

    order: int = attrs.field(default=2, converter=integer)
    lower_order_final: bool = attrs.field(default=True, validator=check_flag("lower_order_final"))

    @order.validator
    def _check_order(self, attribute: Any, value: int) -> None:
        if not is_integer(value) or value not in (1, 2, 3):
            raise InvalidOptionError(f"DPM-Solver++ order must be 1, 2 or 3; got {value!r}.")

    def step_orders(self) -> list[int]:
        """The order each step uses (lower at the start and, optionally, at the end)."""
        return dpm_solver_step_orders(self.num_steps, self.order, self.lower_order_final,
                                      self.final_alpha_cumprod == 1.0)

    def affine_form(self) -> AffineForm:
        abar = self.state_alphas_cumprod().tolist()
        alpha = [math.sqrt(a) for a in abar]
        sigma = [math.sqrt(max(1 - a, 0.0)) for a in abar]
        lam = [math.log(al) - math.log(si) if si > 0 else math.inf
               for al, si in zip(alpha, sigma, strict=True)]
        size = self.num_steps + 1
        state = torch.zeros(size, 3, dtype=torch.float64)
        output = torch.zeros(size, 3, dtype=torch.float64)
        for i, order in enumerate(self.step_orders(), start=1):
            history = [lam[i]] + [lam[i - 1 - l] for l in range(order)]
            ratio, weights = dpm_solver_weights(order, history, alpha[i], sigma[i], sigma[i - 1])
            state[i, 0] += ratio
            for lag, weight in enumerate(weights, start=1):
                j = i - lag  # m_j = s_j / alpha_j - (sigma_j / alpha_j) e_j
                state[i, lag - 1] += weight / alpha[j]
                output[i, lag - 1] -= weight * sigma[j] / alpha[j]
        return AffineForm(state=state, output=output, noise=torch.zeros(size, dtype=torch.float64))

    def coarsened(self, num_steps: int) -> SequentialSampler:
        """The same solver on ``num_steps`` of this sampler's timesteps."""
        return attrs.evolve(self, timesteps=self._coarse_timesteps(num_steps))
