"""The GPU benchmark's models: the digits UNet, an SD 1.x UNet and a DiT, with guidance.

Each builder returns a :class:`ModelSpec`: the denoiser (classifier-free or class guidance
included: two rows per sample), its schedule, the number of steps and whether its iteration
counts are those of a trained model. Random-weight models are seeded, so every run builds the
same network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch

from ...models import digits, linear_alphas_cumprod, spaced_timesteps
from ...samplers import DDIM
from ...system import TriangularSystem
from .config import Settings

__all__ = [
    "ModelSpec",
    "GuidedUNet",
    "GuidedDiT",
    "scaled_linear_alphas_cumprod",
    "build_digits",
    "build_sd15",
    "build_dit",
    "model_dtype",
    "make_system",
]


@attrs.define(frozen=True, eq=False)
class ModelSpec:
    """A denoiser with its sampling problem.

    Attributes:
        name: label in the report.
        denoiser: ``eps(x [B, *shape], t [B])`` in ``model_dtype`` (guidance included).
        shape: one sample's shape.
        alphas_cumprod: the training schedule.
        steps: T.
        model_dtype: the dtype of the denoiser's input.
        trained: whether iteration counts of this model are those of a trained model.
        note: what the model is, in words.
    """

    name: str
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    shape: tuple[int, ...]
    alphas_cumprod: torch.Tensor
    steps: int
    model_dtype: torch.dtype
    trained: bool
    note: str



def scaled_linear_alphas_cumprod() -> torch.Tensor:
    """SD 1.x training schedule: betas linear in sqrt from 0.00085 to 0.012 over 1000 steps."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


class GuidedUNet:
    """SD-style classifier-free guidance around a UNet2DConditionModel: one call of 2B rows."""

    def __init__(
        self, unet: Any, context_dim: int, guidance: float, device: torch.device, dtype: torch.dtype
    ):
        generator = torch.Generator().manual_seed(0)
        self.unet, self.guidance = unet, guidance
        self.cond = torch.randn(1, 77, context_dim, generator=generator).to(device, dtype)
        self.uncond = torch.randn(1, 77, context_dim, generator=generator).to(device, dtype)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        context = torch.cat([self.uncond.expand(rows, -1, -1), self.cond.expand(rows, -1, -1)])
        out = self.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=context).sample
        uncond, cond = out.chunk(2)
        return uncond + self.guidance * (cond - uncond)


class GuidedDiT:
    """Class-conditional DiT with guidance: label 207 against the null class, one call of 2B rows."""

    def __init__(self, dit: Any, guidance: float, channels: int):
        self.dit, self.guidance, self.channels = dit, guidance, channels
        self.null = dit.config.num_embeds_ada_norm  # the extra "no class" embedding row

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        labels = torch.cat(
            [
                torch.full((rows,), self.null, device=x.device, dtype=torch.long),
                torch.full((rows,), 207, device=x.device, dtype=torch.long),
            ]
        )
        out = self.dit(torch.cat([x, x]), timestep=torch.cat([t, t]), class_labels=labels).sample
        uncond, cond = out[:, : self.channels].chunk(2)
        return uncond + self.guidance * (cond - uncond)


def build_digits(settings: Settings, steps: int) -> ModelSpec:
    """The trained digits UNet, or a random one of the same architecture (labelled)."""
    dtype = model_dtype(settings)
    trained, note = False, "digits UNet, random weights (same architecture; the trained weights are missing)"
    if not settings.tiny:
        try:
            unet = digits.load_digits_unet()
            trained, note = True, "digits UNet, trained weights (fpsolve.models.load_reference('digits'))"
        except (FileNotFoundError, ImportError):
            unet = None
    else:
        unet, note = None, "digits UNet, random weights (--tiny)"
    if unet is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            unet = digits.build_digits_unet()
    unet = unet.to(settings.device, dtype).eval().requires_grad_(False)
    return ModelSpec(
        "digits",
        digits.digits_denoiser(unet),
        tuple(digits.DIGITS_SHAPE),
        digits.digits_alphas_cumprod(),
        steps,
        dtype,
        trained,
        note,
    )


def build_sd15(settings: Settings) -> ModelSpec:
    """Random-weight SD 1.x UNet (860M) at 64x64 latents with guidance; tiny: a small UNet."""
    from diffusers import UNet2DConditionModel

    dtype = model_dtype(settings)
    config: dict[str, Any]
    if settings.tiny:
        config, side, steps = (
            dict(
                sample_size=8,
                block_out_channels=(32, 64),
                cross_attention_dim=32,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                layers_per_block=1,
                norm_num_groups=8,
                attention_head_dim=8,
            ),
            8,
            4,
        )
    else:
        config, side, steps = dict(sample_size=64, cross_attention_dim=768), 64, 50
    with torch.random.fork_rng(devices=[]), torch.device(settings.device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**config).to(dtype).eval().requires_grad_(False)
    denoiser = GuidedUNet(unet, config["cross_attention_dim"], 4.0, settings.device, dtype)
    return ModelSpec(
        "sd15",
        denoiser,
        (4, side, side),
        scaled_linear_alphas_cumprod(),
        steps,
        dtype,
        False,
        f"UNet2DConditionModel SD 1.x config{' (tiny)' if settings.tiny else ''}, random weights, "
        "guidance 4 (2 rows per sample)",
    )


def build_dit(settings: Settings) -> ModelSpec:
    """Random-weight DiT-XL/2 (diffusers default config) with guidance; tiny: a 2-layer DiT."""
    from diffusers import DiTTransformer2DModel

    dtype = model_dtype(settings)
    if settings.tiny:
        config, side, steps = (
            dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, sample_size=8),
            8,
            4,
        )
    else:
        config, side, steps = dict(), 32, 100
    with torch.random.fork_rng(devices=[]), torch.device(settings.device):
        torch.manual_seed(0)
        dit = DiTTransformer2DModel(**config).to(dtype).eval().requires_grad_(False)
    return ModelSpec(
        "dit",
        GuidedDiT(dit, 4.0, 4),
        (4, side, side),
        linear_alphas_cumprod(),
        steps,
        dtype,
        False,
        f"DiTTransformer2DModel {'(tiny)' if settings.tiny else 'default config (DiT-XL/2)'}, "
        "random weights, class guidance 4 (2 rows per sample)",
    )


def model_dtype(settings: Settings) -> torch.dtype:
    """fp16 model inputs on CUDA; fp32 on a CPU (where half-precision convolutions are slow)."""
    return torch.float16 if settings.device.type == "cuda" else torch.float32


def make_system(
    spec: ModelSpec, denoiser: Any, settings: Settings, steps: int | None = None
) -> TriangularSystem:
    """The sampling problem of ``spec`` with ``denoiser`` (same noise every time)."""
    steps = steps or spec.steps
    sampler = DDIM(alphas_cumprod=spec.alphas_cumprod, timesteps=spaced_timesteps(steps))
    return TriangularSystem(
        sampler=sampler,
        denoiser=denoiser,
        shape=spec.shape,
        batch=settings.samples if settings.samples > 1 else None,
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float32,
        device=settings.device,
        model_dtype=spec.model_dtype,
    )

