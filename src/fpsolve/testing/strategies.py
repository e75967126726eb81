"""Hypothesis strategies for random triangular problems: schedules, samplers, denoisers, systems.

Every strategy takes keyword-only arguments that bound its sizes, so a plugin author can draw
small problems for fast property tests::

    from hypothesis import given
    from fpsolve.testing import strategies as fst

    @given(fst.systems(max_steps=10))
    def test_my_solver_matches_sequential(system): ...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import attrs
import torch
from hypothesis import strategies as st

from ..registry import get_registry
from ..samplers import FlowSampler, SequentialSampler, VPSampler
from ..schedules import linear_alphas_cumprod
from ..system import TriangularSystem

__all__ = ["SmoothDenoiser", "SmoothVelocity", "schedules", "timestep_lists", "flow_sigma_lists",
           "registered_kinds", "samplers", "denoisers", "velocity_models", "systems"]


def _random_layer(seed: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The test models' fixed random layer, float64 on the CPU: ``W`` ``[dim, dim]`` (scaled by
    ``1/sqrt(dim)``) and ``b`` ``[dim]``, drawn in that order from a generator seeded ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim**0.5
    shift = torch.randn(dim, generator=generator, dtype=torch.float64)
    return weight, shift


@attrs.define(frozen=True, eq=False)
class SmoothDenoiser:
    """A random smooth nonlinear eps-model: ``tanh(x W + b(t)) * sqrt(1 - abar) * gain + c x``.

    Deterministic in ``seed``; works in the input's dtype and device.
    """

    seed: int
    dim: int
    alphas_cumprod: torch.Tensor = attrs.field(repr=False)
    gain: float = 1.0
    linear: float = 0.2

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        weight, shift = (value.to(x.device, x.dtype) for value in _random_layer(self.seed, self.dim))
        flat = x.reshape(x.shape[0], -1)
        abar = self.alphas_cumprod.to(x.device)[t.long()].to(x.dtype)[:, None]
        phase = shift[None] * abar  # a time-dependent bias keeps the model non-autonomous
        out = torch.tanh(flat @ weight + phase) * (1 - abar).sqrt() * self.gain + self.linear * flat
        return out.reshape(x.shape)


@attrs.define(frozen=True, eq=False)
class SmoothVelocity:
    """A flow-matching velocity model with continuous time: the exact posterior velocity of
    Gaussian data plus a smooth nonlinear twist.

    The state at noise level ``sigma = t / num_train_timesteps`` is ``(1 - sigma) x0 + sigma eps``
    with ``x0 ~ N(0, data_std^2)``; the model returns ``E[eps - x0 | x] + twist``, where
    ``E[eps - x0 | x] = (sigma - (1 - sigma) c^2) x / ((1 - sigma)^2 c^2 + sigma^2)`` and
    ``twist = nonlinear * tanh(x W + sigma b)``. Deterministic in ``seed``; ``t`` may be any float
    tensor ``[B]`` (or integers); works in the input's dtype and device.
    """

    seed: int
    dim: int
    num_train_timesteps: int = 1000
    data_std: float = 0.5
    nonlinear: float = 0.2

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        weight, shift = _random_layer(self.seed, self.dim)
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        sigma = torch.as_tensor(t).to(device=x.device, dtype=torch.float64).expand(x.shape[0])
        sigma = (sigma / self.num_train_timesteps).clamp(0, 1)[:, None]
        c2 = self.data_std**2
        mean_velocity = (sigma - (1 - sigma) * c2) * flat / ((1 - sigma) ** 2 * c2 + sigma**2)
        twist = self.nonlinear * torch.tanh(flat @ weight.to(x.device) + sigma * shift.to(x.device))
        return (mean_velocity + twist).to(x.dtype).reshape(x.shape)


@st.composite
def schedules(draw: st.DrawFn, *, num_train_steps: int = 1000) -> torch.Tensor:
    """alphas_cumprod of a linear-beta schedule with a random end beta."""
    beta_end = draw(st.floats(0.01, 0.03))
    return linear_alphas_cumprod(num_train_steps, 1e-4, beta_end)


@st.composite
def timestep_lists(draw: st.DrawFn, *, num_train_steps: int = 1000, min_steps: int = 1,
                   max_steps: int = 12) -> list[int]:
    """Strictly decreasing timesteps (any spacing, not always ending at 0)."""
    chosen = draw(st.sets(st.integers(0, num_train_steps - 1), min_size=min_steps, max_size=max_steps))
    return sorted(chosen, reverse=True)


def registered_kinds() -> list[str]:
    """Names of every registered sampler the strategies can build (variance-preserving and flow
    samplers), sorted: the default ``kinds`` of :func:`samplers` and :func:`systems`."""
    return sorted(entry.name for entry in get_registry().primary("sampler")
                  if issubclass(entry.cls, (VPSampler, FlowSampler)))


@st.composite
def flow_sigma_lists(draw: st.DrawFn, *, min_steps: int = 1, max_steps: int = 12) -> torch.Tensor:
    """``[T+1]`` strictly decreasing flow levels on a 1/1000 grid in (0, 1], then a final level
    (0, or half the smallest one)."""
    levels = draw(st.sets(st.integers(1, 1000), min_size=min_steps, max_size=max_steps))
    grid = [k / 1000 for k in sorted(levels, reverse=True)]
    final = draw(st.sampled_from([0.0, grid[-1] / 2]))
    return torch.tensor(grid + [final], dtype=torch.float64)


def _option_draws(draw: st.DrawFn, cls: type) -> dict[str, object]:
    """Random values of the structure-changing options a sampler class takes."""
    fields = {f.name for f in attrs.fields(cls) if f.init} if attrs.has(cls) else set()
    options: dict[str, object] = {}
    if "eta" in fields:
        options["eta"] = draw(st.sampled_from([0.0, 1.0, 0.5]))
    if "order" in fields:
        options["order"] = draw(st.integers(1, 3))
    if "lower_order_final" in fields:
        options["lower_order_final"] = draw(st.booleans())
    return options


@st.composite
def samplers(draw: st.DrawFn, *, kinds: Sequence[str] | None = None,
             min_steps: int = 1, max_steps: int = 12) -> SequentialSampler:
    """A registered sampler on a random schedule: a random linear-beta schedule and timestep
    list (and final abar) for a variance-preserving one, a random level grid for a flow one.

    Args:
        kinds: registry names to draw from; ``None``: every registered sampler the strategies
            can build (:func:`registered_kinds`), so a new sampler joins the properties by
            registering.
    """
    kind = draw(st.sampled_from(list(kinds) if kinds is not None else registered_kinds()))
    entry = get_registry().lookup("sampler", kind)
    options = {**_option_draws(draw, entry.cls), **dict(entry.preset)}
    if issubclass(entry.cls, FlowSampler):
        sigmas = draw(flow_sigma_lists(min_steps=min_steps, max_steps=max_steps))
        flow_class = cast(type[FlowSampler], entry.cls)
        sampler = flow_class(sigmas=sigmas, num_train_timesteps=1000, **options)
        # A multistep step onto sigma = 0 divides by lambda = inf: such samplers refuse it (as
        # diffusers' loops return NaN there) and ask for lower_order_final=True; draw valid ones.
        step_orders = getattr(sampler, "step_orders", None)
        if (options.get("lower_order_final") is False and float(sigmas[-1]) == 0.0
                and step_orders is not None and step_orders()[-1] > 1):
            options["lower_order_final"] = True
            sampler = flow_class(sigmas=sigmas, num_train_timesteps=1000, **options)
        return sampler
    abar = draw(schedules())
    steps = draw(timestep_lists(min_steps=min_steps, max_steps=max_steps))
    final = draw(st.sampled_from([1.0, float(abar[0])]))
    vp_class = cast(type[VPSampler], entry.cls)
    return vp_class(alphas_cumprod=abar, timesteps=steps, final_alpha_cumprod=final, **options)


@st.composite
def denoisers(draw: st.DrawFn, *, dim: int, alphas_cumprod: torch.Tensor) -> SmoothDenoiser:
    """A :class:`SmoothDenoiser` for states of ``dim`` elements."""
    return SmoothDenoiser(draw(st.integers(0, 2**31 - 1)), dim, alphas_cumprod,
                          gain=draw(st.floats(0.2, 1.5)), linear=draw(st.floats(-0.3, 0.3)))


@st.composite
def velocity_models(draw: st.DrawFn, *, dim: int, num_train_timesteps: int = 1000) -> SmoothVelocity:
    """A :class:`SmoothVelocity` for states of ``dim`` elements."""
    return SmoothVelocity(draw(st.integers(0, 2**31 - 1)), dim, num_train_timesteps=num_train_timesteps,
                          data_std=draw(st.floats(0.2, 1.0)), nonlinear=draw(st.floats(0.0, 0.4)))


@st.composite
def systems(draw: st.DrawFn, *, kinds: Sequence[str] | None = None, min_steps: int = 1,
            max_steps: int = 12, max_dim: int = 6, max_batch: int = 3) -> TriangularSystem:
    """A float64 CPU :class:`TriangularSystem` with a random sampler (see :func:`samplers`), a
    model returning what the sampler declares, a random shape and batch."""
    sampler = draw(samplers(kinds=kinds, min_steps=min_steps, max_steps=max_steps))
    dim = draw(st.integers(1, max_dim))
    batch = draw(st.sampled_from([None] + list(range(1, max_batch + 1))))
    denoiser: SmoothDenoiser | SmoothVelocity
    if sampler.prediction == "velocity":
        train_steps = cast(FlowSampler, sampler).num_train_timesteps
        denoiser = draw(velocity_models(dim=dim, num_train_timesteps=train_steps))
    else:
        denoiser = draw(denoisers(dim=dim, alphas_cumprod=cast(VPSampler, sampler).alphas_cumprod))
    seed = draw(st.integers(0, 2**31 - 1))
    return TriangularSystem(sampler=sampler, denoiser=denoiser, shape=(dim,), batch=batch,
                            generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
