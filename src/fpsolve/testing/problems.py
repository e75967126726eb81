"""Small standard problems for the conformance kit and plugin tests (float64, CPU unless asked).

Every problem is a :class:`~fpsolve.TriangularSystem` with a smooth nonlinear model whose output
is what the sampler declares (``sampler.prediction``): an eps-model
(:class:`~fpsolve.testing.strategies.SmoothDenoiser`) on a linear-beta schedule for
variance-preserving samplers, a velocity model with continuous time
(:class:`~fpsolve.testing.strategies.SmoothVelocity`) on a shifted flow grid for flow-matching
samplers. Small enough that a full parallel solve takes milliseconds.

Any registered sampler gets a problem from its name (:func:`problem_sampler`), so test matrices
can be generated from the registry (:func:`sampler_variants`) instead of listing samplers by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch

from ..errors import InvalidOptionError
from ..registry import get_registry
from ..samplers import FlowSampler, SequentialSampler, VPSampler
from ..schedules import linear_alphas_cumprod, shifted_flow_sigmas, spaced_timesteps
from ..system import Denoiser, TriangularSystem
from .strategies import SmoothDenoiser, SmoothVelocity

__all__ = [
    "SAMPLER_KINDS",
    "OPTION_VARIANTS",
    "linear_alphas_cumprod",
    "spaced_timesteps",
    "shifted_flow_sigmas",
    "problem_sampler",
    "problem_denoiser",
    "sampler_variants",
    "make_sampler",
    "make_system",
    "available_devices",
]

SAMPLER_KINDS: tuple[str, ...] = ("ddim", "ddpm", "dpm_solver")
"""The standard problem samplers of the conformance kit: one-step deterministic, one-step
stochastic, and multistep (three lags), so a component meets every structure a system can have."""

OPTION_VARIANTS: dict[str, tuple[Any, ...]] = {"eta": (0.0, 1.0), "order": (2, 3)}
"""Sampler options whose values change a system's structure (noise, lags): a sampler with such an
option gets one test variant per value in :func:`sampler_variants`; other samplers get one."""


#: The standard problem samplers by kind: (registered sampler name, options). Settings only: the
#: class comes from the registry (:func:`problem_sampler`), the one name -> class map.
_PROBLEM_KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("ddim", {"eta": 0.0}),
    "ddim_eta1": ("ddim", {"eta": 1.0}),
    "ddpm": ("ddpm", {}),
    "dpm_solver": ("dpm_solver", {"order": 3}),
}


def problem_sampler(sampler: str | type[SequentialSampler], steps: int = 10,
                    **options: Any) -> SequentialSampler:
    """Any registered sampler (a name, an alias or a class) on its family's standard schedule.

    Variance-preserving samplers (:class:`~fpsolve.samplers.VPSampler` subclasses) get the
    linear-beta schedule and ``steps`` evenly spaced timesteps; flow-matching samplers
    (:class:`~fpsolve.samplers.FlowSampler` subclasses) get :func:`shifted_flow_sigmas`.
    ``options`` are passed on (after an alias's preset).

    Raises:
        InvalidOptionError: a sampler of another family (build its problem by hand).
    """
    preset: dict[str, Any] = {}
    if isinstance(sampler, str):
        entry = get_registry().lookup("sampler", sampler)
        cls, preset = entry.cls, dict(entry.preset)
    else:
        cls = sampler
    arguments = {**preset, **options}
    if issubclass(cls, FlowSampler):
        return cls(sigmas=shifted_flow_sigmas(steps), num_train_timesteps=1000, **arguments)
    if issubclass(cls, VPSampler):
        return cls(alphas_cumprod=linear_alphas_cumprod(), timesteps=spaced_timesteps(steps), **arguments)
    raise InvalidOptionError(
        f"sampler {cls.__name__} is neither a VPSampler nor a FlowSampler, so fpsolve's test problems "
        "have no standard schedule for it; build it yourself and pass the instance to make_system()."
    )


def problem_denoiser(sampler: SequentialSampler, size: int, seed: int = 0) -> Denoiser:
    """A smooth nonlinear model returning what ``sampler.prediction`` names, for states of
    ``size`` elements: :class:`SmoothVelocity` for ``"velocity"``, else :class:`SmoothDenoiser`
    on the sampler's schedule (the linear one for a sampler without ``alphas_cumprod``, whose
    timesteps must then lie in ``[0, 1000)``)."""
    if sampler.prediction == "velocity":
        train_steps = int(getattr(sampler, "num_train_timesteps", 1000))
        return SmoothVelocity(seed, size, num_train_timesteps=train_steps)
    abar = getattr(sampler, "alphas_cumprod", None)
    return SmoothDenoiser(seed, size, linear_alphas_cumprod() if abar is None else abar)


def sampler_variants(names: Sequence[str] | None = None) -> dict[str, tuple[str, dict[str, Any]]]:
    """Test variants of every registered sampler: ``{id: (name, options)}``.

    One variant per value of each option in :data:`OPTION_VARIANTS` the sampler takes (``ddim``
    with ``eta`` 0 and 1, ``dpm_solver`` of order 2 and 3, ...), else one with its defaults.
    Samplers :func:`problem_sampler` cannot build are left out; ``names`` restricts the set.
    """
    variants: dict[str, tuple[str, dict[str, Any]]] = {}
    for entry in sorted(get_registry().primary("sampler"), key=lambda e: e.name):
        if names is not None and entry.name not in names:
            continue
        if not issubclass(entry.cls, (VPSampler, FlowSampler)):
            continue
        fields = {f.name for f in attrs.fields(entry.cls) if f.init} if attrs.has(entry.cls) else set()
        varied = [option for option in OPTION_VARIANTS if option in fields]
        if not varied:
            variants[entry.name] = (entry.name, {})
        for option in varied:
            for value in OPTION_VARIANTS[option]:
                variants[f"{entry.name}-{option}{value}"] = (entry.name, {option: value})
    return variants


def make_sampler(kind: str = "ddim", steps: int = 10) -> SequentialSampler:
    """A standard problem sampler: ``ddim``, ``ddim_eta1``, ``ddpm``, ``dpm_solver`` (order 3) on
    the linear schedule, or any other registered sampler name via :func:`problem_sampler`."""
    name, options = _PROBLEM_KINDS.get(kind, (kind, {}))
    return problem_sampler(name, steps, **options)  # an unknown name lists the valid ones


def make_system(
    sampler: SequentialSampler | str = "ddim",
    *,
    steps: int = 10,
    shape: Sequence[int] = (4,),
    batch: int | None = 2,
    dtype: torch.dtype = torch.float64,
    device: Any = "cpu",
    seed: int = 0,
) -> TriangularSystem:
    """A small system: ``sampler`` (an instance, or a kind for :func:`make_sampler` with ``steps``).

    The noise is drawn on the CPU from ``seed`` and moved to ``device``, so a problem is the same
    on every device and in every dtype up to rounding.
    """
    if isinstance(sampler, str):
        sampler = make_sampler(sampler, steps)
    size = 1
    for extent in shape:
        size *= int(extent)
    # The toy model returns what the sampler declares (eps or velocity); an eps sampler without
    # a schedule of its own gets the linear one, so its timesteps must lie in [0, 1000).
    denoiser = problem_denoiser(sampler, size, seed + 17)
    lead = (sampler.num_steps + 1,) if batch is None else (sampler.num_steps + 1, batch)
    noise = torch.randn(
        lead + tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    return TriangularSystem(
        sampler=sampler,
        denoiser=denoiser,
        shape=tuple(shape),
        batch=batch,
        noise=noise.to(dtype),
        dtype=dtype,
        device=device,
    )


def available_devices() -> list[str]:
    """``["cpu"]``, plus ``"cuda"`` when a GPU is visible."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices
