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
  ``DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")``;
* ``flow_unipc``: UniPC multistep predictor-corrector (orders 1-3) on the same schedule, as
  diffusers' ``UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")``
  (Wan's sampler); the corrected states are combinations of all earlier states, up to T lags.

Every step is affine in earlier states, velocities and one noise draw, so the trajectory is a
triangular system like the variance-preserving ones.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch

from ..errors import InvalidOptionError
from ..validators import check_int, integer
from .base import AffineForm, SequentialSampler
from .dpm_solver import dpm_solver_step_orders, dpm_solver_weights

__all__ = ["FlowSampler", "FlowEuler", "StochasticFlowEuler", "FlowDPMSolver", "FlowUniPC",
           "scaled_posterior_variances"]


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
    num_train_timesteps: int = attrs.field(default=1000, converter=integer, validator=check_int(minimum=1))

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


def _unipc_coefficients(order: int, hh: float) -> tuple[float, float, list[float]]:
    """``(h_phi_1, B_h, b)`` of a UniPC "bh2" update with ``hh = -h`` (data prediction)."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    b_h = math.expm1(hh)
    b = []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, b


def _vandermonde_solve(nodes: list[float], rhs: list[float]) -> list[float]:
    """``rho`` with ``sum_j rho_j nodes_j^i = rhs_i`` (UniPC's ``R rho = b``)."""
    matrix = torch.tensor([[node**i for node in nodes] for i in range(len(nodes))], dtype=torch.float64)
    return torch.linalg.solve(matrix, torch.tensor(rhs, dtype=torch.float64)).tolist()


@attrs.define(frozen=True, eq=False, kw_only=True)
class FlowUniPC(FlowSampler):
    """UniPC multistep (predictor-corrector, data prediction) on a flow-matching schedule.

    The sampler of Wan (diffusers' ``UniPCMultistepScheduler(use_flow_sigmas=True,
    prediction_type="flow_prediction")``). With ``alpha = 1 - sigma``, ``lambda = log(alpha /
    sigma)`` and the data prediction ``m_j = s_j - sigma_j v_j`` of state ``j`` (the predictor's
    output, where the model is called), step ``k`` first *corrects* the state it starts from,
    ``c_k = UniC(c_{k-1}, m_k, m_{k-1}, ...)`` (skipped at the first step and at the indices in
    ``disable_corrector``), then *predicts* ``s_{k+1} = UniP(c_k, m_k, m_{k-1}, ...)``. The
    corrected states are never fed to the model, so each ``c_k`` is a fixed linear combination of
    all earlier states and velocities: the step is affine with up to ``T`` lags.

    Orders follow diffusers: warm-up (order ``k + 1`` at step ``k``), and with
    ``lower_order_final`` the order never exceeds the number of steps left. History entries at a
    level of exactly 1 (``lambda = -inf``, pure noise, which diffusers' flow grids never reach)
    are left out of the multistep sums, lowering the order there.

    The update is diffusers' default ``solver_type="bh2"`` (Wan's); ``"bh1"`` divides by zero on a
    flow grid that ends at sigma = 0 (diffusers' own loop returns NaN) and is not offered.

    Args:
        order: 1, 2 or 3 (diffusers' ``solver_order``).
        lower_order_final: see above (default True; a final step to sigma = 0 must be first order).
        disable_corrector: step indices whose corrector is skipped.
    """

    name = "flow_unipc"

    order: int = attrs.field(default=2)
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = attrs.field(default=(), converter=lambda v: tuple(int(i) for i in v))

    @order.validator
    def _check_order(self, attribute: Any, value: int) -> None:
        if value not in (1, 2, 3):
            raise InvalidOptionError(f"flow UniPC order must be 1, 2 or 3; got {value!r}.")

    def step_orders(self) -> list[int]:
        """The order of the predictor of each step (the corrector of step k+1 uses the same)."""
        steps = self.num_steps
        orders = []
        for k in range(steps):
            this = min(self.order, steps - k) if self.lower_order_final else self.order
            orders.append(min(this, min(k, self.order) + 1))
        return orders

    def affine_form(self) -> AffineForm:
        steps = self.num_steps
        sigma = self.sigmas.tolist()
        alpha = [1.0 - s for s in sigma]
        lam = [(math.log(a) - math.log(s)) if s > 0 and a > 0 else (math.inf if s == 0 else -math.inf)
               for a, s in zip(alpha, sigma, strict=True)]
        if sigma[-1] == 0.0 and self.step_orders()[-1] > 1:
            raise InvalidOptionError(
                "a flow UniPC step to sigma = 0 must be first order (its multistep terms divide by "
                "lambda = inf, diffusers' loop returns NaN there); set lower_order_final=True."
            )
        # a linear combination of the unknowns: coefficients of s_0..s_T and of v_0..v_{T-1}
        def state(j: int) -> torch.Tensor:
            combo = torch.zeros(2 * steps + 1, dtype=torch.float64)
            combo[j] = 1.0
            return combo

        def data(j: int) -> torch.Tensor:  # m_j = s_j - sigma_j v_j
            combo = state(j)
            combo[steps + 1 + j] = -sigma[j]
            return combo

        def update(start: torch.Tensor, now: int, nxt: int, history: list[int], order: int,
                   correct_with: int | None) -> torch.Tensor:
            """UniP (``correct_with`` None) or UniC from level ``now`` to ``nxt``; ``history`` is
            the data predictions' state indices, newest (at ``now``) first."""
            # a history entry at sigma = 1 (lambda = -inf) carries no data: leave it out
            usable = [j for j in history[:order] if not math.isinf(lam[j]) or j == history[0]]
            order = len(usable)
            h = lam[nxt] - lam[now]
            hh = -h
            h_phi_1, b_h, b = _unipc_coefficients(max(order, 1), hh)
            m0 = data(usable[0])
            result = (sigma[nxt] / sigma[now]) * start - alpha[nxt] * h_phi_1 * m0
            rks = [(lam[j] - lam[now]) / h for j in usable[1:order]]
            differences = [(data(j) - m0) / rk for j, rk in zip(usable[1:order], rks, strict=True)]
            if correct_with is None:
                if not differences:
                    return result
                rhos = [0.5] if order == 2 else _vandermonde_solve(rks, b[:order - 1])
                residual = sum((rho * d for rho, d in zip(rhos, differences, strict=True)),
                               torch.zeros_like(result))
                return result - alpha[nxt] * b_h * residual
            rhos = [0.5] if order == 1 else _vandermonde_solve(rks + [1.0], b[:order])
            residual = sum((rho * d for rho, d in zip(rhos[:-1], differences, strict=True)),
                           torch.zeros_like(result))
            residual = residual + rhos[-1] * (data(correct_with) - m0)
            return result - alpha[nxt] * b_h * residual

        rows = torch.zeros(steps + 1, 2 * steps + 1, dtype=torch.float64)  # s_{k+1} as a combination
        orders = self.step_orders()
        corrected: torch.Tensor | None = None  # c_{k-1}
        for k in range(steps):
            start = state(k)
            if k > 0 and (k - 1) not in self.disable_corrector and corrected is not None:
                history = list(range(k - 1, -1, -1))  # m_{k-1}, m_{k-2}, ... (before m_k is stored)
                start = update(corrected, k - 1, k, history, orders[k - 1], correct_with=k)
            corrected = start
            rows[k + 1] = update(start, k, k + 1, list(range(k, -1, -1)), orders[k], correct_with=None)
        return _rows_to_form(rows, steps)

    def coarsened(self, num_steps: int) -> SequentialSampler:
        """The same solver on ``num_steps + 1`` of this sampler's levels (no corrector skips)."""
        return attrs.evolve(self, sigmas=self._coarse_sigmas(num_steps), disable_corrector=())


def _rows_to_form(rows: torch.Tensor, steps: int) -> AffineForm:
    """An affine form from each state ``s_i`` written as a combination ``rows[i]`` of the states
    ``s_0..s_T`` (entries ``0..T``) and the outputs ``v_0..v_{T-1}`` (entries ``T+1..2T``)."""
    states, outputs = rows[:, :steps + 1], rows[:, steps + 1:]
    lags = 1
    for i in range(1, steps + 1):
        if (states[i, i:] != 0).any() or (outputs[i, i:] != 0).any():
            raise InvalidOptionError("internal: a flow UniPC step reads a state or output it precedes.")
        used = ((states[i, :i] != 0) | (outputs[i, :i] != 0)).nonzero()
        if used.numel():
            lags = max(lags, i - int(used[0]))
    state = torch.zeros(steps + 1, lags, dtype=torch.float64)
    output = torch.zeros(steps + 1, lags, dtype=torch.float64)
    for i in range(1, steps + 1):
        for lag in range(1, min(lags, i) + 1):
            state[i, lag - 1] = states[i, i - lag]
            output[i, lag - 1] = outputs[i, i - lag]
    return AffineForm(state=state, output=output, noise=torch.zeros(steps + 1, dtype=torch.float64))
