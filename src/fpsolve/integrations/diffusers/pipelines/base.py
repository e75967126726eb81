"""What every pipeline adapter shares: the prepared call, argument binding and refusals."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import torch

from ....errors import InvalidOptionError, UnsupportedError
from ....system import TriangularSystem
from ....validators import close_matches, is_integer
from ..sampler import SchedulerProgram

__all__ = ["PreparedPipeline", "bind_call", "refuse_arguments", "state_dtype", "SAMPLE_ARGUMENTS",
           "batch_rows", "sample_index", "prompt_batch_size", "step_indexer",
           "Refusals", "refuse_all", "CALLBACK_WHY", "IP_ADAPTER_WHY", "lora_scale", "step_options",
           "default_size", "binned_size", "guidance_scale_embedding", "masked_prompt_embeds",
           "UnetLoopInputs", "unet_loop_inputs"]

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
    if steps is not None and not (is_integer(steps) and steps >= 1):
        raise InvalidOptionError(
            f"{pipeline}(..., num_inference_steps={steps!r}): num_inference_steps must be an int >= 1 "
            "(the number of denoising steps, e.g. 50)."
        )
    generator = arguments.get("generator")
    generators = generator if isinstance(generator, list) else [generator]
    if not all(g is None or isinstance(g, torch.Generator) for g in generators):
        raise InvalidOptionError(
            "generator must be a torch.Generator, a list of them (one per image) or None; "
            f"got {generator!r}. "
            "To seed with an int, pass torch.Generator().manual_seed(seed)."
        )


#: Call options an adapter refuses: ``((names, why), ...)``, read by the support table too.
Refusals = tuple[tuple[tuple[str, ...], str], ...]

CALLBACK_WHY = "per-step callbacks need the sequential loop"
IP_ADAPTER_WHY = "IP-Adapter conditioning is not wired into the parallel denoiser"


def refuse_all(pipe: Any, arguments: Mapping[str, Any], refusals: Refusals) -> None:
    """Raise :class:`UnsupportedError` for the first refused option the call sets."""
    for names, why in refusals:
        refuse_arguments(pipe, arguments, names, why)


def refuse_arguments(pipe: Any, arguments: Mapping[str, Any], names: Iterable[str], why: str) -> None:
    """Raise for any of ``names`` that the call sets (not ``None``)."""
    for name in names:
        if arguments.get(name) is not None:
            raise UnsupportedError(f"{type(pipe).__name__}(..., {name}=...) is not supported by fpsolve: "
                                   f"{why}; leave {name} unset.")


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


def prompt_batch_size(prompt: Any, prompt_embeds: torch.Tensor | None) -> int:
    """Prompts in a call, as pipelines count them: one string, a list, or ``prompt_embeds`` rows."""
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    if prompt_embeds is None:
        raise InvalidOptionError("give prompt= or prompt_embeds=.")
    return prompt_embeds.shape[0]


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


def lora_scale(attention_kwargs: Mapping[str, Any] | None) -> float | None:
    """The LoRA scale a pipeline reads from its attention kwargs (``"scale"``), ``None`` without them."""
    return attention_kwargs.get("scale", None) if attention_kwargs is not None else None


def step_options(pipe: Any, args: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """``(step kwargs, generator)``: the pipeline's ``prepare_extra_step_kwargs`` (``eta``, the
    generator), the generator taken out (the system draws the step noise from it)."""
    step_kwargs = pipe.prepare_extra_step_kwargs(args["generator"], args["eta"])
    return step_kwargs, step_kwargs.pop("generator", None)


def default_size(pipe: Any, args: Mapping[str, Any]) -> tuple[int, int]:
    """``(height, width)``: the call's, else ``default_sample_size * vae_scale_factor`` (as the pipeline)."""
    default = pipe.default_sample_size * pipe.vae_scale_factor
    return args["height"] or default, args["width"] or default


def binned_size(pipe: Any, height: int, width: int, module: Any, bins: Mapping[int, str]) -> tuple[int, int]:
    """The pipeline's aspect-ratio bin of ``(height, width)`` (``use_resolution_binning``).

    Args:
        module: the pipeline's module, which holds its ratio tables.
        bins: the transformer's sample size -> the name of the table in ``module``.

    Raises:
        ValueError: the pipeline's own error for a sample size without a table.
    """
    name = bins.get(pipe.transformer.config.sample_size)
    if name is None:
        raise ValueError("Invalid sample size")
    return pipe.image_processor.classify_height_width_bin(height, width, ratios=getattr(module, name))


def guidance_scale_embedding(pipe: Any, guidance_scale: float, samples: int, device: torch.device,
                             dtype: torch.dtype) -> torch.Tensor | None:
    """A guidance-distilled UNet's ``timestep_cond`` (``time_cond_proj_dim`` set), else ``None``."""
    if pipe.unet.config.time_cond_proj_dim is None:
        return None
    scale = torch.tensor(guidance_scale - 1).repeat(samples)
    return pipe.get_guidance_scale_embedding(
        scale, embedding_dim=pipe.unet.config.time_cond_proj_dim).to(device=device, dtype=dtype)


def masked_prompt_embeds(pipe: Any, args: Mapping[str, Any], guided: bool, device: torch.device,
                         **extra: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeds, mask)`` from ``encode_prompt`` of a pipeline with attention masks (PixArt, Sana).

    Under guidance both hold the pipeline's doubled batch, ``[negative, positive]``. ``extra``:
    further ``encode_prompt`` arguments of the pipeline (Sana's ``complex_human_instruction``).
    """
    embeds, mask, negative, negative_mask = pipe.encode_prompt(
        args["prompt"], guided, negative_prompt=args["negative_prompt"],
        num_images_per_prompt=args["num_images_per_prompt"], device=device,
        prompt_embeds=args["prompt_embeds"], negative_prompt_embeds=args["negative_prompt_embeds"],
        prompt_attention_mask=args["prompt_attention_mask"],
        negative_prompt_attention_mask=args["negative_prompt_attention_mask"],
        clean_caption=args["clean_caption"], max_sequence_length=args["max_sequence_length"], **extra)
    if guided:
        embeds, mask = torch.cat([negative, embeds], dim=0), torch.cat([negative_mask, mask], dim=0)
    return embeds, mask


@attrs.define(frozen=True, eq=False)
class UnetLoopInputs:
    """What the UNet text-to-image pipelines (Stable Diffusion, SDXL) prepare for their loop.

    Attributes:
        samples: the images of the call (prompts times ``num_images_per_prompt``).
        latents: the initial latents, ``prepare_latents``' draw.
        step_kwargs: the scheduler's extra step arguments (``eta``), without the generator.
        generator: the generator the steps draw their noise from.
        timestep_cond: a guidance-distilled UNet's guidance embedding, else ``None``.
    """

    samples: int
    latents: torch.Tensor
    step_kwargs: dict[str, Any]
    generator: Any
    timestep_cond: torch.Tensor | None


def unet_loop_inputs(pipe: Any, args: Mapping[str, Any], height: int, width: int, dtype: torch.dtype,
                     device: torch.device) -> UnetLoopInputs:
    """The UNet pipelines' set-up after ``retrieve_timesteps``, in their order; ``dtype``: the
    prompt embeddings' (the latents are drawn in it)."""
    samples = prompt_batch_size(args["prompt"], args["prompt_embeds"]) * args["num_images_per_prompt"]
    latents = pipe.prepare_latents(samples, pipe.unet.config.in_channels, height, width, dtype, device,
                                   args["generator"], args["latents"])
    step_kwargs, generator = step_options(pipe, args)
    timestep_cond = guidance_scale_embedding(pipe, args["guidance_scale"], samples, device, latents.dtype)
    return UnetLoopInputs(samples, latents, step_kwargs, generator, timestep_cond)
