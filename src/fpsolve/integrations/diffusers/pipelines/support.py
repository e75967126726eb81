"""The adapter registry: which pipelines are supported, with what, and the docs table made from it.

Every supported pipeline class has one :class:`PipelineSupport` row: its adapter, the model
family it drives (noise-prediction pipelines step the variance-preserving / exploding
schedulers; flow-matching pipelines step the flow schedulers), what the adapter reproduces,
the schedulers its tests run it with, and the call options it refuses by name (the adapter's
own ``REFUSED``). :func:`support_rows` and :func:`support_markdown` turn the registry into the
table in ``docs/pipelines.md`` (a test checks that the page shows exactly this table).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from ..schedulers import SPECS
from . import dit, flux, pixart, sana, stable_diffusion, stable_diffusion_3, stable_diffusion_xl, unet2d, wan
from .base import PreparedPipeline
from .refusals import Refusals

__all__ = ["PipelineSupport", "SUPPORT", "support_rows", "support_markdown", "schedulers_for"]

#: ``prepare(pipe, call, dtype) -> PreparedPipeline``.
Adapter = Callable[[Any, Mapping[str, Any], torch.dtype], PreparedPipeline]

FAMILIES = ("noise", "flow")


@attrs.define(frozen=True)
class PipelineSupport:
    """One supported pipeline class.

    Attributes:
        pipeline: the diffusers class name.
        prepare: the adapter.
        family: ``"noise"`` (eps / v / x0 models on variance-preserving or exploding schedules) or
            ``"flow"`` (velocity models on flow-matching schedules).
        reproduced: what of the pipeline's call the adapter reproduces (one line for the table).
        tested: the scheduler classes the tests run the pipeline with (parity with ``pipe()``).
        refused: the call options refused by name, with the reason.
    """

    pipeline: str
    prepare: Adapter = attrs.field(repr=False)
    family: str = attrs.field(validator=attrs.validators.in_(FAMILIES))
    reproduced: str
    tested: tuple[str, ...]
    refused: Refusals = ()


#: Supported pipelines by class name.
SUPPORT: dict[str, PipelineSupport] = {row.pipeline: row for row in (
    PipelineSupport("DDPMPipeline", unet2d.prepare_ddpm, "noise", "unconditional UNet, step noise",
                    ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler")),
    PipelineSupport("DDIMPipeline", unet2d.prepare_ddim, "noise", "unconditional UNet, eta, clipped output",
                    ("DDIMScheduler",)),
    PipelineSupport("DiTPipeline", dit.prepare_dit, "noise", "class labels, CFG, learned sigma",
                    ("DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "DDPMScheduler")),
    PipelineSupport("StableDiffusionPipeline", stable_diffusion.prepare_stable_diffusion, "noise",
                    "prompt / prompt_embeds, CFG, guidance_rescale, eta, custom timesteps / sigmas",
                    ("DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                     "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                     "UniPCMultistepScheduler", "PNDMScheduler"),
                    stable_diffusion.REFUSED),
    PipelineSupport("StableDiffusionXLPipeline", stable_diffusion_xl.prepare_stable_diffusion_xl, "noise",
                    "two text encoders, pooled embeddings, add_time_ids (negative ones too), CFG, "
                    "guidance_rescale, eta",
                    ("EulerDiscreteScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
                     "EulerAncestralDiscreteScheduler"),
                    stable_diffusion_xl.REFUSED),
    PipelineSupport("PixArtSigmaPipeline", pixart.prepare_pixart_sigma, "noise",
                    "T5 embeddings and masks, CFG, learned sigma, resolution binning, step noise",
                    ("DPMSolverMultistepScheduler", "DDPMScheduler"), pixart.REFUSED),
    PipelineSupport("FluxPipeline", flux.prepare_flux, "flow",
                    "packed latents and image ids, guidance embedding, pooled projections, true CFG, "
                    "dynamic-shift mu, stochastic sampling",
                    ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler"), flux.REFUSED),
    PipelineSupport("StableDiffusion3Pipeline", stable_diffusion_3.prepare_stable_diffusion_3, "flow",
                    "three text encoders, CFG, skip-layer guidance, mu",
                    ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"),
                    stable_diffusion_3.REFUSED),
    PipelineSupport("SanaPipeline", sana.prepare_sana, "flow",
                    "Gemma embeddings behind the complex human instruction, masks, CFG",
                    ("FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler"), sana.REFUSED),
    PipelineSupport("WanPipeline", wan.prepare_wan, "flow",
                    "text-to-video, num_frames, CFG, two experts (boundary_ratio), expand_timesteps",
                    ("UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"), wan.REFUSED),
)}


def schedulers_for(family: str) -> list[str]:
    """The supported schedulers a pipeline of ``family`` can step, from the scheduler table.

    Flow pipelines take the flow-matching schedulers and those with flow sigmas (marked
    ``"(use_flow_sigmas)"``: ``use_flow_sigmas=True, prediction_type="flow_prediction"``);
    noise pipelines take every other supported scheduler.
    """
    names = []
    for spec in sorted(SPECS.values(), key=lambda s: s.name):
        predictions = next((r.supported for r in spec.rules if r.option == "prediction_type"), ())
        if family == "flow":
            if spec.levels == "flow_sigma":
                names.append(spec.name)
            elif "flow_prediction" in predictions:
                names.append(f"{spec.name} (use_flow_sigmas)")
        elif spec.levels != "flow_sigma":
            names.append(spec.name)
    return names


def support_rows() -> list[dict[str, str]]:
    """One row per supported pipeline (sorted by family, then name), as the docs table shows it."""
    rows = []
    for row in sorted(SUPPORT.values(), key=lambda r: (FAMILIES.index(r.family), r.pipeline)):
        refused = [name for names, _ in row.refused for name in names]
        rows.append({
            "pipeline": row.pipeline,
            "family": row.family,
            "reproduced": row.reproduced,
            "tested with": ", ".join(row.tested),
            "refused options": ", ".join(refused) or "-",
        })
    return rows


def support_markdown() -> str:
    """The Markdown table of :func:`support_rows`, followed by the scheduler families."""
    columns = ["pipeline", "family", "reproduced", "tested with", "refused options"]
    lines = ["| " + " | ".join(c.capitalize() for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in support_rows():
        cells = [f"`{row['pipeline']}`"] + [row[c] for c in columns[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for family in FAMILIES:
        lines.append(f"- **{family}** pipelines step: {', '.join(schedulers_for(family))}.")
    return "\n".join(lines) + "\n"
