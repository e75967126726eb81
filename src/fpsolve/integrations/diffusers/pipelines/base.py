"""What every pipeline adapter shares: the prepared call, argument binding, the state dtype and the
batch layout (which pipeline sample and conditioning row each row of a model batch stands for)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import torch

from ....errors import InvalidOptionError, UnsupportedError
from ....system import TriangularSystem
from ....validators import as_int, close_matches
from ..sampler import SchedulerProgram

__all__ = ["PreparedPipeline", "bind_call", "state_dtype", "SAMPLE_ARGUMENTS", "batch_rows", "sample_index",
           "step_indexer"]

#: The keyword arguments of ``sample()`` itself (the solver's side), for did-you-mean hints.
SAMPLE_ARGUMENTS = ("solver", "generator", "dtype", "tol", "order", "history", "ridge", "window", "stopping",
                    "initializer", "max_iters", "observers", "progress", "distributed", "solver_options",
                    "allow_unconverged")

@attrs.define(frozen=True, eq=False)
class PreparedPipeline:
    """A pipeline call, prepared for a parallel solve.

    Attributes:
        system: the triangular system of the call's denoising loop (states are the latents).
        program: the compiled scheduler.
        finish: turns the final latents ``[N, ...]`` into exactly what the pipeline returns
            (decode, post-processing, ``output_type``, ``return_dict``).
    """

    system: TriangularSystem
    program: SchedulerProgram = attrs.field(repr=False)
    finish: Callable[[torch.Tensor], Any] = attrs.field(repr=False)


def bind_call(pipe: Any, options: Mapping[str, Any], extra: Iterable[str] = ()) -> dict[str, Any]:
    """The pipeline's ``__call__`` arguments with their defaults, as the pipeline would see them.

    Args:
        extra: names the pipeline accepts through ``**kwargs`` (e.g. Stable Diffusion's deprecated
            ``callback``); any other name is an error, even where ``__call__`` would swallow it.

    Raises:
        InvalidOptionError: an argument the pipeline does not take (listing the ones it takes).
    """
    signature = inspect.signature(type(pipe).__call__)
    names = [n for n, p in signature.parameters.items()
             if n != "self" and p.kind not in (inspect.Parameter.VAR_KEYWORD,
                                               inspect.Parameter.VAR_POSITIONAL)]
    names += list(extra)
    unknown = sorted(set(options) - set(names))
    if unknown:
        hints = ""
        for name in unknown:
            close = close_matches(name, names + list(SAMPLE_ARGUMENTS))
            if close:
                hints += f" For {name!r}, did you mean {' or '.join(repr(c) for c in close)}?"
        raise InvalidOptionError(
            f"{type(pipe).__name__} does not take argument(s) {', '.join(unknown)}; its arguments are "
            f"{', '.join(names)}, and sample() also takes solver options (tol, order, history, window, "
            f"stopping, initializer, max_iters, progress, ...) and dtype.{hints}"
        )
    bound = signature.bind_partial(pipe, **options)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop("self", None)
    arguments.update(arguments.pop("kwargs", {}) or {})
    _check_common(type(pipe).__name__, arguments)
    return arguments


def _check_common(pipeline: str, arguments: Mapping[str, Any]) -> None:
    """The arguments every pipeline reads before its loop, checked here rather than failing inside
    diffusers with a raw error (``ZeroDivisionError`` for 0 steps)."""
    steps = arguments.get("num_inference_steps")
    if steps is not None:
        as_int(f"{pipeline}(..., num_inference_steps={steps!r}): num_inference_steps", steps, minimum=1,
               hint=" (the number of denoising steps, e.g. 50)")
    generator = arguments.get("generator")
    generators = generator if isinstance(generator, list) else [generator]
    if not all(g is None or isinstance(g, torch.Generator) for g in generators):
        raise InvalidOptionError(
            "generator must be a torch.Generator, a list of them (one per image) or None; "
            f"got {generator!r}. "
            "To seed with an int, pass torch.Generator().manual_seed(seed)."
        )


def state_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The solver state's dtype: ``dtype``, by default float64.

    float64 is the default because a float32 state adds rounding that the pipeline's own loop
    does not have: a step is evaluated as ``A s + B e`` with large cancelling terms where DDIM
    clips x0 at high noise, and the error is amplified along the trajectory (2e-5 against 5e-6
    for float64 on a tiny DDIM pipeline). The model keeps its own dtype either way.
    """
    if dtype is None:
        return torch.float64
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidOptionError(
            f"dtype must be a floating torch.dtype (e.g. torch.float64); got {dtype!r}."
        )
    return dtype


def sample_index(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B]``: the pipeline sample of each row of a system batch (the system's batch is position-major).

    A model batch holds whole positions (``N`` rows each, sample 0 first); the conditioning of
    a row (its prompt, class label, guidance scale...) is picked by ``row % N``.

    Raises:
        UnsupportedError: the batch does not hold whole positions (e.g. an evaluator splitting
            the model batch into chunks that are not multiples of ``N``): the rows' samples
            cannot be told, and guessing would condition rows on the wrong prompts.
    """
    if x.shape[0] % batch:
        raise UnsupportedError(
            f"the pipeline's denoiser got a model batch of {x.shape[0]} rows, not whole positions of "
            f"{batch} samples, so its rows' prompts cannot be told apart; evaluate in chunks of a "
            f"multiple of {batch} rows (e.g. ChunkedEvaluator(system, max_batch=k * {batch}))."
        )
    return torch.arange(x.shape[0], device=x.device) % batch


def batch_rows(sample: torch.Tensor, batch: int, guided: bool) -> torch.Tensor:
    """The rows of the pipeline's own (guidance-doubled) model batch that ``sample`` stands for.

    A pipeline under classifier-free guidance calls its model on ``[x, x]`` with conditioning
    tensors of ``2 N`` rows, the unconditional half first; picking the conditioning by these
    rows reproduces the pipeline's batch row for row (quirks of its layout included).
    """
    return torch.cat([sample, sample + batch]) if guided else sample


def step_indexer(timesteps: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``index(t)``: the loop position ``i`` of each scheduler timestep in ``t`` ``[B]``.

    The system's denoiser passes the scheduler's own timesteps, so each one matches exactly; a
    pipeline whose model call depends on ``i`` (skip-layer guidance windows, a second expert
    after a boundary) reads it from here. Needs distinct timesteps.
    """
    table = timesteps.detach().flatten()
    if table.unique().numel() != table.numel():
        raise UnsupportedError("this pipeline option needs distinct scheduler timesteps; the scheduler "
                               f"repeats some ({table.tolist()}).")

    def index(t: torch.Tensor) -> torch.Tensor:
        hits = t.reshape(-1, 1) == table.to(t.device, t.dtype).reshape(1, -1)
        if not bool(hits.any(dim=1).all()):
            raise UnsupportedError("a model timestep is not one of the scheduler's timesteps.")
        return hits.int().argmax(dim=1)
    return index

