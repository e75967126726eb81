"""A scheduler and a model as a :class:`~fpsolve.TriangularSystem` (no pipeline needed).

The system reproduces this sequential loop (``N`` samples of ``shape``)::

    x = randn_tensor((N, *shape), generator=g, dtype=model_dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)        # with input_scaling="model"
        x = scheduler.step(model(x_in, t), t, x, generator=g, **step_kwargs).prev_sample
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...errors import InvalidOptionError, ShapeError
from ...system import TriangularSystem
from .denoiser import ModelFn, ScheduledDenoiser
from .noise import draw_step_noise, stack_noise
from .sampler import SchedulerProgram, compile_scheduler

__all__ = ["scheduler_system", "loop_system"]


def loop_system(program: SchedulerProgram, model: ModelFn, initial: torch.Tensor, *, generator: Any,
                step_batch: int, model_dtype: torch.dtype, device: torch.device | str,
                dtype: torch.dtype) -> TriangularSystem:
    """The system of a loop that starts at ``initial`` ``[N, ...]`` (already drawn and scaled).

    The step noise is drawn now, after the initial sample, from the generator the loop passes to
    ``step``, for the ``step_batch`` samples the loop steps (2N where a pipeline steps a
    guidance-doubled batch; only the first N are kept).
    """
    batch = initial.shape[0]
    shape = (step_batch, *initial.shape[1:])
    noise = stack_noise(initial, draw_step_noise(program.probed.draws, shape, generator, device, model_dtype),
                        batch)
    return _system(program, model, noise, model_dtype, device, dtype)


def _system(program: SchedulerProgram, model: ModelFn, noise: torch.Tensor, model_dtype: torch.dtype,
            device: torch.device | str, dtype: torch.dtype) -> TriangularSystem:
    # The denoiser works in the state's dtype and casts only the model's own input and output, so
    # input scaling and the clipping fold add no rounding of their own.
    return TriangularSystem(sampler=program.sampler, denoiser=ScheduledDenoiser(model, program, model_dtype),
                            shape=tuple(noise.shape[2:]), batch=noise.shape[1], noise=noise, dtype=dtype,
                            device=device)


def scheduler_system(scheduler: Any, model: ModelFn, *, shape: Sequence[int], batch: int = 1,
                     generator: Any = None, noise: torch.Tensor | None = None,
                     step_kwargs: Mapping[str, Any] | None = None, input_scaling: str = "model",
                     dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                     model_dtype: torch.dtype = torch.float32) -> TriangularSystem:
    """The triangular system of ``scheduler``'s loop driven by ``model``.

    Args:
        scheduler: a supported diffusers scheduler after ``set_timesteps`` (not modified).
        model: ``model(x, t) -> output`` in the scheduler's ``prediction_type``; ``t`` holds the
            scheduler's own timesteps, one per batch element.
        shape: the shape of one sample (without the batch axis).
        batch: N, the number of samples solved together.
        generator: draws ``x_T`` and each step's noise, in the loop's order (a generator, a list
            of N generators, or ``None`` for torch's global one).
        noise: instead of ``generator``: ``[T+1, N, *shape]``, ``noise[0]`` the initial sample
            (already multiplied by ``init_noise_sigma``), ``noise[i]`` the draw of step ``i``.
        step_kwargs: extra arguments the loop passes to ``step`` (``eta``, ``s_churn``, ...).
        input_scaling: see :func:`~fpsolve.integrations.diffusers.compile_scheduler`.
        dtype: the solver state's dtype (float64 by default: see ``pipelines.base.state_dtype``).
        model_dtype: the dtype of the model's input and output, and of the noise draws.
        device: where states live and the model runs.
    """
    if noise is not None and generator is not None:
        raise InvalidOptionError("give either noise= or generator=, not both.")
    program = compile_scheduler(scheduler, step_kwargs, input_scaling)
    if noise is not None:
        expected = (program.sampler.num_steps + 1, batch, *shape)
        if tuple(noise.shape) != expected:
            raise ShapeError(f"noise must have shape [T+1, N, *shape] = {list(expected)} (noise[0] the "
                             f"initial sample, noise[i] the draw of step i); got {list(noise.shape)}.")
        return _system(program, model, noise, model_dtype, device, dtype)
    from diffusers.utils.torch_utils import randn_tensor

    device = torch.device(device)
    initial = randn_tensor((batch, *shape), generator=generator, device=device, dtype=model_dtype)
    return loop_system(program, model, initial * program.init_noise_sigma, generator=generator,
                       step_batch=batch, model_dtype=model_dtype, device=device, dtype=dtype)
