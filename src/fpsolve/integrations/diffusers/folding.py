"""Folding ``clip_sample`` / ``thresholding`` into the model output, so every step stays affine.

Clipping acts on the predicted x0, which depends only on the current sample and model output.
fpsolve probes the scheduler with clipping switched off and gives it, instead of the raw model
output ``m``, an *effective* output ``m' = m + w_i (clip(x0) - x0)`` computed inside the system's
denoiser. With ``x0 = p_i s + q_i m`` the scheduler's conversion at step ``i``:

* a step that reads only x0 (DDPM, DPM-Solver, UniPC, DEIS, DDIM with
  ``use_clipped_model_output``): ``w_i = 1 / q_i``, the output that implies the clipped x0;
* DDIM's default, which uses the clipped x0 with the *unclipped* eps:
  ``w_i = alpha'_i / B_i``, where ``alpha'_i`` is the step's x0 coefficient and ``B_i`` its
  coefficient of ``m``, so the clean step moves by exactly ``alpha'_i (clip(x0) - x0)``.

Where nothing is clipped, ``m' = m`` bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from ...errors import UnsupportedError
from .probe import ProbedSchedule
from .schedulers import SchedulerSpec

__all__ = ["OutputFold", "make_fold", "unfolded_copy"]


@attrs.define(frozen=True, eq=False)
class OutputFold:
    """The effective model output of each step, given the sample the step reads.

    Attributes:
        x0_state, x0_output: ``[T]``: ``x0 = x0_state[i] * sample + x0_output[i] * output``.
        weight: ``[T]``: ``output' = output + weight[i] * (clip(x0) - x0)``.
        clip_range: clamp x0 to ``[-clip_range, clip_range]`` (``None``: use ``threshold``).
        threshold: the scheduler's dynamic thresholding of an x0 batch (``None``: clamp).
    """

    x0_state: torch.Tensor = attrs.field(repr=False)
    x0_output: torch.Tensor = attrs.field(repr=False)
    weight: torch.Tensor = attrs.field(repr=False)
    clip_range: float | None = None
    threshold: Callable[[torch.Tensor], torch.Tensor] | None = attrs.field(default=None, repr=False)
    _cast: dict[tuple[torch.device, torch.dtype], torch.Tensor] = attrs.field(
        init=False, factory=dict, repr=False)

    def _coefficients(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``[3, T]`` (x0_state, x0_output, weight) on ``device`` in ``dtype``, converted once."""
        key = (device, dtype)
        if key not in self._cast:
            self._cast[key] = torch.stack([self.x0_state, self.x0_output, self.weight]).to(device, dtype)
        return self._cast[key]

    def __call__(self, sample: torch.Tensor, output: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``output'`` for a batch: ``sample``/``output`` ``[B, ...]`` at step indices ``index`` ``[B]``."""
        view = (-1,) + (1,) * (sample.dim() - 1)
        per_step = self._coefficients(sample.device, output.dtype)[:, index]
        x0_state, x0_output, weight = (values.reshape(view) for values in per_step)
        x0 = x0_state * sample.to(output.dtype) + x0_output * output
        if self.threshold is not None:
            clipped = self.threshold(x0)
        else:
            limit = float(self.clip_range or 0.0)  # set whenever threshold is not (make_fold)
            clipped = x0.clamp(-limit, limit)
        return output + weight * (clipped - x0)


def _conversion(prediction: str, alpha: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(p, q, r, u)``: ``x0 = p s + q m`` and ``eps = r s + u m`` for a prediction type."""
    if prediction == "epsilon":
        return 1 / alpha, -sigma / alpha, torch.zeros_like(alpha), torch.ones_like(alpha)
    if prediction == "v_prediction":
        return alpha, -sigma, sigma, alpha
    if prediction == "sample":
        return torch.zeros_like(alpha), torch.ones_like(alpha), 1 / sigma, -alpha / sigma
    if prediction == "flow_prediction":  # x = alpha x0 + sigma eps with alpha = 1 - sigma, v = eps - x0
        return torch.ones_like(alpha), -sigma, torch.ones_like(alpha), alpha
    raise UnsupportedError(f"clipping with prediction_type={prediction!r} cannot be folded; "
                           "supported: 'epsilon', 'v_prediction', 'sample', 'flow_prediction'.")


def unfolded_copy(scheduler: Any) -> Any:
    """A deep copy of ``scheduler`` with clipping and thresholding switched off (for probing)."""
    clean = copy.deepcopy(scheduler)
    off = {key: False for key in ("clip_sample", "thresholding") if clean.config.get(key)}
    if off:
        clean.register_to_config(**off)
    return clean


def make_fold(scheduler: Any, spec: SchedulerSpec, probed: ProbedSchedule, alpha: torch.Tensor,
              sigma: torch.Tensor, step_kwargs: Mapping[str, Any]) -> OutputFold | None:
    """The fold for ``scheduler``'s clipping options, or ``None`` when it clips nothing.

    Args:
        alpha, sigma: ``[T+1]`` noise levels of the states (see ``noise_levels``).
        step_kwargs: the loop's ``step`` arguments (DDIM's ``use_clipped_model_output``).
    """
    config = scheduler.config
    thresholding, clip = bool(config.get("thresholding")), bool(config.get("clip_sample"))
    if not (thresholding or clip):
        return None
    if spec.fold == "none":
        option = "thresholding" if thresholding else "clip_sample"
        raise UnsupportedError(
            f"{spec.name} with {option}=True is not supported by fpsolve; supported: {option}=False."
        )
    steps = probed.num_steps
    p, q, r, u = _conversion(config["prediction_type"], alpha[:steps], sigma[:steps])
    if spec.fold == "ddim" and not step_kwargs.get("use_clipped_model_output"):
        state, output = probed.form.state[1:, 0], probed.form.output[1:, 0]
        if probed.input_scaling == "model_and_step":  # coefficients of the sample the step reads
            state = state / probed.input_scales
        x0_coefficient = (state * u - output * r) / (p * u - q * r)  # from A = a' p + d r, B = a' q + d u
        weight = x0_coefficient / output
    else:
        weight = 1 / q
    if not torch.isfinite(weight).all():
        raise UnsupportedError(f"{spec.name}: clipping cannot be folded at a step whose model-output "
                               "coefficient is zero; use clip_sample=False.")
    threshold = scheduler._threshold_sample if thresholding else None
    return OutputFold(x0_state=p, x0_output=q, weight=weight,
                      clip_range=None if thresholding else float(config.get("clip_sample_range", 1.0)),
                      threshold=threshold)
