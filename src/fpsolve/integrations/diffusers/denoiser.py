"""The system's denoiser for a scheduler's loop: what happens around each model call.

fpsolve's :class:`~fpsolve.TriangularSystem` calls ``denoiser(x, keys)`` on a batch of states at
many steps at once. :class:`ScheduledDenoiser` does, per batch element, what the sequential loop
does around the model: map the key to its step, scale the input as ``scale_model_input`` would,
call the model with the scheduler's own timestep, and fold clipping into the output.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch

from ...errors import DenoiserOutputError
from .sampler import SchedulerProgram

__all__ = ["ModelFn", "ScheduledDenoiser"]

#: ``model(x, t) -> output``: ``x`` ``[B, *shape]`` (already scaled), ``t`` ``[B]`` the scheduler's
#: timesteps (its dtype: int64 or float32); returns the raw output the scheduler's ``step`` takes.
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@attrs.define(frozen=True, eq=False)
class ScheduledDenoiser:
    """``denoiser(x, keys)`` for a :class:`~fpsolve.TriangularSystem` built from a scheduler.

    Args:
        model: the model call, see :data:`ModelFn`.
        program: the compiled scheduler (step lookup, input scales, timesteps, fold).
        model_dtype: the dtype the model takes and returns; ``None``: the input's. The denoiser
            itself keeps the system's dtype, so scaling and folding add no rounding of their own.
    """

    model: ModelFn = attrs.field(repr=False)
    program: SchedulerProgram = attrs.field(repr=False)
    model_dtype: torch.dtype | None = None
    _on_device: dict[torch.device, tuple[torch.Tensor, ...]] = attrs.field(
        init=False, factory=dict, repr=False)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Step lookup, scheduler timesteps and input scales on ``device`` (copied once: a copy
        per call would synchronise a GPU stream)."""
        if device not in self._on_device:
            probed = self.program.probed
            self._on_device[device] = (self.program.lookup.to(device), probed.timesteps.to(device),
                                       probed.input_scales.to(device))
        return self._on_device[device]

    def __call__(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The effective model output at states ``x`` ``[B, *shape]`` of steps ``keys`` ``[B]``."""
        probed = self.program.probed
        lookup, timesteps, scales = self._tables(x.device)
        index = lookup[keys.long()]
        model_dtype = self.model_dtype or x.dtype
        model_input = x
        if probed.input_scaling != "none":
            # float64 product, one rounding: as close as it gets to the loop's x / sqrt(sigma^2 + 1)
            scale = scales[index].reshape((-1,) + (1,) * (x.dim() - 1))
            model_input = (x.to(torch.float64) * scale).to(x.dtype)
        raw = self.model(model_input.to(model_dtype), timesteps[index])
        if not isinstance(raw, torch.Tensor) or raw.shape != x.shape:
            got = f"shape {list(raw.shape)}" if isinstance(raw, torch.Tensor) else type(raw).__name__
            raise DenoiserOutputError(
                f"the model returned {got} for an input of shape {list(x.shape)}; model(x, t) must return "
                "the scheduler's prediction (its prediction_type) as a tensor of the input's shape "
                "[B, *shape]. Check the shape= given to scheduler_system against the model's channels "
                "and size."
            )
        output = raw.to(x.dtype)
        fold = self.program.fold
        if fold is not None:
            step_sample = model_input if probed.input_scaling == "model_and_step" else x
            output = fold(step_sample, output, index)
        return output
