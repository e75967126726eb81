"""Which diffusers schedulers fpsolve reproduces, with which options, and their noise levels.

The math of a step is measured by :mod:`.probe`, so every option that only changes the numbers
(beta schedules, timestep spacing, steps_offset, set_alpha_to_one, karras sigmas, final sigma
types, solver orders, ...) is reproduced exactly without being listed here. This module lists
what probing cannot settle on its own:

* the schedulers that are supported (each one has a parity test against its own loop);
* option values that are refused because the step is not affine in a way fpsolve can fold
  (a variance learned by the model, flow-matching sigmas, a clipped x0 in a scheduler whose
  clipping is not folded);
* how to read each state's noise level (for stopping rules and for folding clipping into the
  model output): from ``alphas_cumprod`` at the model timestep, or from the ``sigmas`` array of a
  variance-preserving, a variance-exploding or a flow-matching parameterisation (the state is
  ``(1 - sigma) x0 + sigma * noise``: FlowMatch schedulers, and UniPC / DPM-Solver / DEIS with
  ``use_flow_sigmas=True``).
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from ...errors import UnsupportedError
from ...samplers.flow import scaled_posterior_variances

__all__ = ["OptionRule", "SchedulerSpec", "SPECS", "supported_names", "spec_for", "check_options",
           "noise_levels", "step_variances", "state_levels", "check_step_kwargs"]

#: The prediction types every supported scheduler converts affinely.
_PREDICTIONS = ("epsilon", "v_prediction", "sample")
#: ... and those of the schedulers with flow-matching sigmas (UniPC, DPM-Solver, DEIS).
_FLOW_PREDICTIONS = _PREDICTIONS + ("flow_prediction",)


@attrs.define(frozen=True)
class OptionRule:
    """A scheduler config option and the values of it fpsolve supports."""

    option: str
    supported: tuple[Any, ...]


@attrs.define(frozen=True)
class SchedulerSpec:
    """What fpsolve needs to know about one scheduler class beyond probing.

    Attributes:
        name: the diffusers class name.
        levels: how states' noise levels are read: ``"vp_timestep"`` (``alphas_cumprod`` at the
            model timestep), ``"vp_sigma"`` (``sigmas``, variance preserving; flow matching when
            the config has ``use_flow_sigmas=True``), ``"ve_sigma"`` (``sigmas``, variance
            exploding: the state is ``x0 + sigma * noise``) or ``"flow_sigma"`` (``sigmas``, flow
            matching: the state is ``(1 - sigma) x0 + sigma * noise``; with ``invert_sigmas``
            the noise level is ``1 - sigmas``).
        fold: how ``clip_sample`` / ``thresholding`` enter the step: ``"x0"`` (the step reads only
            the clipped x0), ``"ddim"`` (DDIM: clipped x0 and, unless
            ``use_clipped_model_output``, the unclipped eps) or ``"none"`` (no such options).
        rules: option values supported (others are refused).
    """

    name: str
    levels: str
    fold: str
    rules: tuple[OptionRule, ...] = ()


def _spec(name: str, levels: str, fold: str, *rules: tuple[str, tuple[Any, ...]],
          predictions: tuple[str, ...] = _PREDICTIONS) -> SchedulerSpec:
    return SchedulerSpec(name, levels, fold,
                         (OptionRule("prediction_type", predictions),) + tuple(OptionRule(*r) for r in rules))


_DDPM_VARIANCES = ("variance_type", ("fixed_small", "fixed_small_log", "fixed_large"))
#: FlowMatchEulerDiscreteScheduler: every config option only changes the sigmas (shift, dynamic
#: shifting with the pipeline's mu, shift_terminal, karras / exponential / beta sigmas,
#: invert_sigmas) or adds one pre-drawn noise tensor per step (stochastic_sampling), so all are
#: reproduced; the rule below only documents that both time-shift types are.
_TIME_SHIFTS = ("time_shift_type", ("exponential", "linear"))

#: Supported schedulers by class name.
SPECS: dict[str, SchedulerSpec] = {spec.name: spec for spec in (
    _spec("DDIMScheduler", "vp_timestep", "ddim"),
    _spec("DDIMParallelScheduler", "vp_timestep", "ddim"),
    _spec("DDPMScheduler", "vp_timestep", "x0", _DDPM_VARIANCES),
    _spec("DDPMParallelScheduler", "vp_timestep", "x0", _DDPM_VARIANCES),
    _spec("PNDMScheduler", "vp_timestep", "none", predictions=("epsilon", "v_prediction")),
    _spec("DPMSolverMultistepScheduler", "vp_sigma", "x0",
          ("algorithm_type", ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")),
          ("variance_type", (None,)), predictions=_FLOW_PREDICTIONS),
    _spec("DPMSolverSinglestepScheduler", "vp_sigma", "x0",
          ("algorithm_type", ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")),
          ("variance_type", (None,)), predictions=_FLOW_PREDICTIONS),
    _spec("UniPCMultistepScheduler", "vp_sigma", "x0", predictions=_FLOW_PREDICTIONS),
    _spec("DEISMultistepScheduler", "vp_sigma", "x0", predictions=_FLOW_PREDICTIONS),
    _spec("FlowMatchEulerDiscreteScheduler", "flow_sigma", "none", _TIME_SHIFTS),
    _spec("FlowMatchHeunDiscreteScheduler", "flow_sigma", "none"),
    _spec("EulerDiscreteScheduler", "ve_sigma", "none", predictions=_PREDICTIONS + ("original_sample",)),
    _spec("EulerAncestralDiscreteScheduler", "ve_sigma", "none"),
    _spec("HeunDiscreteScheduler", "ve_sigma", "none", ("clip_sample", (False,))),
    _spec("LMSDiscreteScheduler", "ve_sigma", "none"),
)}


def supported_names() -> list[str]:
    """The class names of every supported scheduler, sorted."""
    return sorted(SPECS)


def spec_for(scheduler: Any) -> SchedulerSpec:
    """The spec of ``scheduler``'s class (or of the diffusers class it derives from).

    Raises:
        UnsupportedError: naming the scheduler and the supported ones.
    """
    for cls in type(scheduler).__mro__:
        if cls.__module__.startswith("diffusers") and cls.__name__ in SPECS:
            return SPECS[cls.__name__]
    raise UnsupportedError(
        f"scheduler {type(scheduler).__name__} is not supported by fpsolve's diffusers integration; "
        f"supported schedulers: {', '.join(supported_names())}. Swap one in with "
        "pipe.scheduler = <Scheduler>.from_config(pipe.scheduler.config)."
    )


def check_options(scheduler: Any, spec: SchedulerSpec) -> None:
    """Refuse config values fpsolve cannot reproduce exactly, naming option, value and the fix."""
    config = scheduler.config
    for rule in spec.rules:
        if rule.option in config and config[rule.option] not in rule.supported:
            raise UnsupportedError(
                f"{spec.name} with {rule.option}={config[rule.option]!r} is not supported by fpsolve "
                f"(not reproducible exactly as an affine step); supported values of {rule.option}: "
                f"{', '.join(repr(v) for v in rule.supported)}."
            )
    if config.get("prediction_type") == "flow_prediction" and not config.get("use_flow_sigmas", True):
        # The conversion x0 = sample - sigma * v is only the flow-matching one on flow sigmas; on a
        # variance-preserving schedule the noise levels (stopping rules, clipping fold) would be wrong.
        raise UnsupportedError(
            f"{spec.name} with prediction_type='flow_prediction' and use_flow_sigmas=False is not "
            "supported by fpsolve (the velocity is defined on flow-matching sigmas only); supported "
            "values of use_flow_sigmas with flow_prediction: True."
        )


#: Arguments of ``step`` that no fpsolve state can carry, with the reason.
_UNSUPPORTED_STEP_KWARGS = {
    "per_token_timesteps": "per-token noise levels make each element its own schedule",
}

#: ``step`` arguments supported only at some values, per scheduler: (rule, why the rest are not).
_STEP_RULES: dict[str, tuple[tuple[OptionRule, str], ...]] = {
    "FlowMatchHeunDiscreteScheduler": (
        (OptionRule("s_churn", (0, 0.0)),
         "its second stage restarts from the churned sample of the first, so one step's noise "
         "enters the next step too, which no one-draw-per-step affine form holds"),
    ),
}


def check_step_kwargs(spec: SchedulerSpec, step_kwargs: Any) -> None:
    """Refuse ``step`` arguments fpsolve cannot reproduce, naming them and the supported values."""
    kwargs = dict(step_kwargs or {})
    for name, reason in _UNSUPPORTED_STEP_KWARGS.items():
        if kwargs.get(name) is not None:
            raise UnsupportedError(
                f"{spec.name}.step with {name}=... is not supported by fpsolve ({reason}); "
                f"supported values of {name}: None."
            )
    for rule, reason in _STEP_RULES.get(spec.name, ()):
        if rule.option in kwargs and kwargs[rule.option] not in rule.supported:
            raise UnsupportedError(
                f"{spec.name}.step with {rule.option}={kwargs[rule.option]!r} is not supported by fpsolve "
                f"({reason}); supported values of {rule.option}: "
                f"{', '.join(repr(v) for v in rule.supported)}."
            )


def state_levels(scheduler: Any, spec: SchedulerSpec) -> str:
    """How this configured scheduler's noise levels are read (``spec.levels``, or
    ``"flow_sigma"`` for a multistep scheduler with ``use_flow_sigmas=True``)."""
    if spec.levels == "vp_sigma" and scheduler.config.get("use_flow_sigmas"):
        return "flow_sigma"
    return spec.levels


def _final_alpha_cumprod(scheduler: Any) -> float:
    final = getattr(scheduler, "final_alpha_cumprod", None)
    return 1.0 if final is None else float(final)


def noise_levels(scheduler: Any, spec: SchedulerSpec, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, sigma)``, each ``[T+1]`` float64: signal scale and noise std of every state.

    State ``i < T`` gets the level the scheduler assumes when its step ``i`` reads it (the same
    level it converts the model output with); state ``T`` gets the final level.
    """
    levels = state_levels(scheduler, spec)
    if levels == "vp_timestep":
        abar = scheduler.alphas_cumprod.to(torch.float64)
        steps = scheduler.timesteps.long().cpu()
        values = torch.cat([abar[steps], torch.tensor([_final_alpha_cumprod(scheduler)],
                                                      dtype=torch.float64)])
        return values.sqrt(), (1 - values).clamp_min(0).sqrt()
    sigmas = torch.as_tensor(scheduler.sigmas).detach().to("cpu", torch.float64)
    if sigmas.numel() < num_steps + 1:
        raise UnsupportedError(
            f"{spec.name} has {sigmas.numel()} sigmas for {num_steps} steps; fpsolve needs one per state."
        )
    sigmas = sigmas[:num_steps + 1]
    if levels == "ve_sigma":
        return torch.ones_like(sigmas), sigmas
    if levels == "flow_sigma":
        if scheduler.config.get("invert_sigmas"):  # Mochi: the array holds 1 - noise level
            sigmas = 1 - sigmas
        return 1 - sigmas, sigmas
    alpha = 1 / (sigmas**2 + 1).sqrt()  # the variance-preserving parameterisation of sigma
    return alpha, sigmas * alpha


def step_variances(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``[T+1]``: the DDPM posterior variance of the step into each state, in the states' units.

    The levels are mapped to a variance-preserving schedule (``abar = alpha^2 / (alpha^2 +
    sigma^2)``); the variance is then scaled back by the state's squared scale (the same map as
    the core flow samplers', :func:`fpsolve.samplers.flow.scaled_posterior_variances`).
    """
    return scaled_posterior_variances(alpha, sigma)
