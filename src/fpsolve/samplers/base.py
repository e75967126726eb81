"""The sequential sampler in affine form: the recurrence that fpsolve solves in parallel.

A sampler with T steps produces the states ``s_0 = x_T, s_1, ..., s_T = x_0``. Step ``i`` (1..T)
is affine in the earlier states, the model outputs at those states and one injected noise draw:

    s_i = sum_l A[i, l] s_{i-l} + sum_l B[i, l] e_{i-l} + c_i xi_i,     l = 1..K,

where ``e_j = eps(s_j, timesteps[j])`` is the denoiser evaluated at state ``j`` and ``K`` is the
number of earlier states a step looks back at (1 for DDIM/DDPM, up to 3 for DPM-Solver++ 3M).
With the model outputs frozen the recurrence is linear, which is what makes order-k unrolling
exact and lets every order share one solution. The lags are explicit, so a step can only depend
on noisier states: the system is triangular by construction.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch

from ..errors import InvalidOptionError

__all__ = ["AffineForm", "SequentialSampler", "MODEL_OUTPUTS"]

#: What a sampler's model returns, the sampler's ``prediction``: the noise (``"epsilon"``), the
#: flow-matching velocity ``eps - x0`` (``"velocity"``), the clean sample (``"sample"``) or the
#: v-parameterisation ``alpha eps - sigma x0`` (``"v_prediction"``).
MODEL_OUTPUTS = ("epsilon", "velocity", "sample", "v_prediction")


@attrs.define(frozen=True, eq=False)
class AffineForm:
    """Coefficients of a sampler's steps, with lags as the last axis.

    Attributes:
        state: ``[T+1, K]`` float64; ``state[i, l-1]`` multiplies ``s_{i-l}`` in step ``i``.
        output: ``[T+1, K]`` float64; ``output[i, l-1]`` multiplies ``e_{i-l}`` in step ``i``.
        noise: ``[T+1]`` float64; ``noise[i]`` multiplies the noise draw ``xi_i`` of step ``i``.

    Row 0 is all zeros: ``s_0`` is the initial noise, not the result of a step.
    """

    state: torch.Tensor = attrs.field(repr=False)
    output: torch.Tensor = attrs.field(repr=False)
    noise: torch.Tensor = attrs.field(repr=False)

    def __attrs_post_init__(self) -> None:
        state, output, noise = self.state, self.output, self.noise
        if state.dim() != 2 or output.shape != state.shape or noise.shape != state.shape[:1]:
            raise InvalidOptionError(
                "AffineForm needs state [T+1, K], output [T+1, K] and noise [T+1]; got "
                f"{tuple(state.shape)}, {tuple(output.shape)} and {tuple(noise.shape)}."
            )
        rows = torch.arange(state.shape[0]).unsqueeze(1)
        lags = torch.arange(1, state.shape[1] + 1).unsqueeze(0)
        before_start = rows - lags < 0  # a lag that reaches before s_0 cannot have a coefficient
        if (state[before_start] != 0).any() or (output[before_start] != 0).any() or noise[0] != 0:
            raise InvalidOptionError("AffineForm has a coefficient on a state before x_T or a step 0.")
        for name, value in (("state", state), ("output", output), ("noise", noise)):
            if not torch.isfinite(value).all():
                raise InvalidOptionError(f"AffineForm.{name} has non-finite coefficients.")

    @property
    def num_steps(self) -> int:
        """T, the number of sampler steps."""
        return self.state.shape[0] - 1

    @property
    def lags(self) -> int:
        """K, how many earlier states (and outputs) one step reads."""
        return self.state.shape[1]

    def state_matrix(self) -> torch.Tensor:
        """The dense strictly lower-triangular ``[T+1, T+1]`` matrix of state coefficients."""
        size = self.num_steps + 1
        dense = torch.zeros(size, size, dtype=self.state.dtype)
        for lag in range(1, self.lags + 1):
            rows = torch.arange(lag, size)
            dense[rows, rows - lag] = self.state[lag:, lag - 1]
        return dense


class SequentialSampler:
    """Base class of samplers: a T-step recurrence exposed in affine form.

    Subclasses are frozen attrs classes. They set the class attribute ``name`` (the registry name)
    and implement :meth:`affine_form`, :meth:`state_sigmas` and :meth:`step_variances`; they may
    implement :meth:`coarsened` so that the ``coarse`` initializer can use them.

    The denoiser convention is declared by two class attributes, so systems, stopping rules and
    test problems need not guess it from the class: ``prediction`` (what the model returns, one of
    :data:`MODEL_OUTPUTS`; the affine coefficients multiply that output) and ``continuous_time``
    (the model is called with integer timesteps, a long tensor, or with float model times, a
    float tensor in the system's state dtype). Stopping rules read each state's noise level from
    :meth:`state_sigmas` and the scale of each step from :meth:`step_variances`, whatever the
    parameterisation.

    Attributes:
        name: registry name (class attribute).
        aliases: other registry names mapped to option presets (class attribute).
        prediction: what the model returns (class attribute; default ``"epsilon"``).
        continuous_time: whether model times are floats (class attribute; default False).
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[dict[str, dict[str, Any]]] = {}
    prediction: ClassVar[str] = "epsilon"
    continuous_time: ClassVar[bool] = False

    #: The model times ``t_0 > t_1 > ... > t_{T-1}`` at which the denoiser is called (an
    #: attribute of every subclass): integers, or floats where ``continuous_time`` is set (the
    #: flow samplers declare it as a property of type ``tuple[float, ...]``).
    timesteps: tuple[int, ...]

    @property
    def num_steps(self) -> int:
        """T, the number of steps (and of model evaluations of a sequential run)."""
        return len(self.timesteps)

    def affine_form(self) -> AffineForm:
        """The coefficients of every step; see :class:`AffineForm`."""
        raise NotImplementedError

    def state_sigmas(self) -> torch.Tensor:
        """``[T+1]`` float64: the noise standard deviation of each state, in the states' units
        (``sqrt(1 - abar)`` on a variance-preserving schedule, ``sigma`` for flow matching); the
        noise level that stopping rules and the ``coarse`` initializer read."""
        raise NotImplementedError

    def step_variances(self) -> torch.Tensor:
        """``[T+1]`` float64: the DDPM posterior variance of the step that produces each state.

        Entry 0 is unused. This is the scale of the ParaDiGMS stopping rule; samplers that are not
        variance preserving map their levels to a variance-preserving schedule (see
        :func:`fpsolve.samplers.flow.scaled_posterior_variances`).
        """
        raise NotImplementedError

    def coarsened(self, num_steps: int) -> SequentialSampler:
        """A deterministic sampler of the same family on ``num_steps`` of this sampler's timesteps.

        Used by the ``coarse`` initializer. The default refuses, naming the sampler.
        """
        raise NotImplementedError(
            f"sampler {type(self).__name__} does not implement coarsened(); "
            "the 'coarse' initializer cannot be used with it."
        )
