"""Test helpers for the diffusers integration: reference loops, a smooth model, tiny pipelines.

Everything here is built locally from small configs (no downloads). Importing this module
imports diffusers and transformers; the integration itself never imports it.

* :class:`GaussianDenoiser`: a cheap model with the behaviour of a trained one (it predicts the
  posterior mean for Gaussian data, plus a small nonlinear term), for any prediction type;
* :func:`reference_loop`: diffusers' own sequential loop for a scheduler and a model;
* ``tiny_*``: tiny UNet2DModel / DiT / Stable Diffusion / SDXL / Flux / Stable Diffusion 3 /
  Wan / PixArt-Sigma / Sana pipelines (and their text encoders) with seeded random weights, the
  progress bar off.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

__all__ = ["GaussianDenoiser", "reference_loop", "tiny_unet2d", "tiny_unet_pipeline", "tiny_dit_pipeline",
           "tiny_sd_pipeline", "tiny_clip_tokenizer", "tiny_vae", "psnr", "tiny_t5_tokenizer",
           "tiny_t5_encoder", "tiny_clip", "tiny_kl_vae", "tiny_flux_pipeline", "tiny_sd3_pipeline",
           "tiny_sdxl_pipeline", "tiny_wan_transformer", "tiny_wan_pipeline", "wan_unipc",
           "tiny_pixart_pipeline", "tiny_gemma", "tiny_sana_pipeline"]


@attrs.define(frozen=True, eq=False)
class GaussianDenoiser:
    """``model(x, t)`` for data ``N(0, data_std^2)`` on a variance-preserving schedule, plus a twist.

    For ``x = a x0 + s eps`` the posterior means are ``eps = s x / (a^2 c^2 + s^2)`` and
    ``x0 = a c^2 x / (a^2 c^2 + s^2)``; ``nonlinear * tanh(W x + t / 1000)`` makes the model
    nonlinear and non-autonomous. ``abar`` at fractional ``t`` is interpolated linearly.

    Args:
        alphas_cumprod: the training schedule.
        size: the number of elements of one sample.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        data_std: ``c``, the data's standard deviation.
        nonlinear: the size of the nonlinear term; seed: the seed of its weights.
    """

    alphas_cumprod: torch.Tensor = attrs.field(repr=False)
    size: int
    prediction_type: str = "epsilon"
    data_std: float = 0.5
    nonlinear: float = 0.05
    seed: int = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The prediction at ``x`` ``[B, ...]``, timesteps ``t`` ``[B]`` (or a scalar)."""
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        steps = torch.as_tensor(t, dtype=torch.float64).to(x.device).expand(x.shape[0])
        abar_table = self.alphas_cumprod.to(device=x.device, dtype=torch.float64)
        low = steps.floor().long().clamp(0, abar_table.numel() - 1)
        high = (low + 1).clamp(max=abar_table.numel() - 1)
        frac = steps - low
        abar = ((1 - frac) * abar_table[low] + frac * abar_table[high])[:, None]
        a, s, c2 = abar.sqrt(), (1 - abar).clamp_min(0).sqrt(), self.data_std**2
        denominator = a**2 * c2 + s**2
        generator = torch.Generator().manual_seed(self.seed)
        weight = torch.randn(self.size, self.size, generator=generator, dtype=torch.float64) / self.size**0.5
        twist = self.nonlinear * torch.tanh(flat @ weight.to(x.device) + steps[:, None] / 1000)
        eps = s * flat / denominator + twist
        x0 = a * c2 * flat / denominator - twist
        if self.prediction_type == "epsilon":
            out = eps
        elif self.prediction_type == "sample":
            out = x0
        elif self.prediction_type == "v_prediction":
            out = a * eps - s * x0
        else:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}")
        return out.to(x.dtype).reshape(x.shape)


def reference_loop(scheduler: Any, model: Any, shape: Sequence[int], generator: torch.Generator | None,
                   step_kwargs: Mapping[str, Any] | None = None, scale_input: bool = True,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """diffusers' sequential loop on a deep copy of ``scheduler``: the final sample ``[*shape]``.

    Initial noise ``randn_tensor(shape) * init_noise_sigma`` (flow schedulers have none: the noise
    is used as drawn, as a flow pipeline does), then per timestep ``scale_model_input`` (if
    ``scale_input``), the model, and ``step`` with ``generator``.
    """
    from diffusers.utils.torch_utils import randn_tensor

    scheduler = copy.deepcopy(scheduler)
    noise_sigma = getattr(scheduler, "init_noise_sigma", 1.0)
    x = randn_tensor(tuple(shape), generator=generator, dtype=dtype) * noise_sigma
    extra = dict(step_kwargs or {})
    if "generator" in inspect.signature(scheduler.step).parameters:
        extra["generator"] = generator
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t) if scale_input else x
            output = model(model_input, t.expand(x.shape[0]))
            x = scheduler.step(output, t, x, return_dict=False, **extra)[0]
    return x


def psnr(images: Any, reference: Any) -> float:
    """PSNR in dB of [0, 1] images against a reference (inf when identical)."""
    values, target = (torch.as_tensor(x, dtype=torch.float64) for x in (images, reference))
    mse = float((values - target).pow(2).mean())
    return float("inf") if mse == 0 else -10 * math.log10(mse)


def tiny_unet2d(seed: int = 0, channels: int = 1, size: int = 8, output_scale: float = 0.2):
    """A tiny random ``UNet2DModel``; ``output_scale`` shrinks its output layer.

    A random UNet is a chaotic denoiser (its sampling loop amplifies rounding by orders of
    magnitude); a small output layer keeps the loop as tame as a trained model's.
    """
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet: Any = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                            block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                            down_block_types=("DownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.eval()
    with torch.no_grad():
        unet.conv_out.weight.mul_(output_scale)
        unet.conv_out.bias.mul_(output_scale)
    return unet


def tiny_unet_pipeline(kind: str, scheduler: Any, seed: int = 0, **unet_options: Any):
    """A ``DDPMPipeline`` (``kind="ddpm"``) or ``DDIMPipeline`` (``"ddim"``) with a tiny UNet."""
    from diffusers import DDIMPipeline, DDPMPipeline

    cls = {"ddpm": DDPMPipeline, "ddim": DDIMPipeline}[kind]
    pipe: Any = cls(unet=tiny_unet2d(seed, **unet_options), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_vae(seed: int = 0, latent_channels: int = 4, blocks: int = 2):
    """A tiny random ``AutoencoderKL`` (``2**(blocks-1)`` downsampling)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    widths = (8, 16, 16)[:blocks]
    vae: Any = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=widths, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=latent_channels,
                         norm_num_groups=4, sample_size=16)
    return vae.eval()


def tiny_dit_pipeline(scheduler: Any, seed: int = 0, learned_sigma: bool = True, output_scale: float = 0.2):
    """A ``DiTPipeline`` with a tiny DiT (4 latent channels, 8x8, patch 2) and a tiny VAE."""
    from diffusers import DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer: Any = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8 if learned_sigma else 4,
        num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=4)
    transformer.eval()
    with torch.no_grad():
        transformer.proj_out_2.weight.mul_(output_scale)
        transformer.proj_out_2.bias.mul_(output_scale)
    pipe: Any = DiTPipeline(transformer=transformer, vae=tiny_vae(seed + 1, blocks=1), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_clip_tokenizer(directory: Path, max_length: int = 16):
    """A ``CLIPTokenizer`` over single letters and digits, loaded from files written to ``directory``.

    The vocabulary holds every lowercase letter and digit, alone and as a word end (``"a</w>"``),
    and the two special tokens; there are no merges, so each word is spelled out letter by letter,
    which is enough to turn prompts into distinct token ids.
    """
    from transformers import CLIPTokenizer

    characters = "abcdefghijklmnopqrstuvwxyz0123456789"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(characters) + [c + "</w>" for c in characters]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=max_length)


def tiny_sd_pipeline(scheduler: Any, directory: Path, seed: int = 0, output_scale: float = 0.2):
    """A ``StableDiffusionPipeline`` from tiny random components (no safety checker).

    UNet 8x8 latents with cross-attention (dim 16), a 2-block VAE (16x16 images), a 2-layer CLIP
    text encoder and the character tokenizer of :func:`tiny_clip_tokenizer`.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer(directory)
    torch.manual_seed(seed)
    unet: Any = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    unet.eval()
    with torch.no_grad():
        unet.conv_out.weight.mul_(output_scale)
        unet.conv_out.bias.mul_(output_scale)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(config).eval()
    pipe: Any = StableDiffusionPipeline(
        vae=tiny_vae(seed + 2), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- flow-matching pipelines (Flux, Stable Diffusion 3) and their text encoders -------------------

def tiny_t5_tokenizer(directory: Path):
    """A ``T5TokenizerFast`` over letters and digits (a unigram vocabulary written to ``directory``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]  # a lazy alias in transformers 5

    characters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in characters] + [("\u2581" + c, -2.5) for c in characters]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0)
    fast.save_pretrained(str(directory))
    return T5TokenizerFast.from_pretrained(str(directory))


def tiny_t5_encoder(tokenizer: Any, seed: int, width: int = 16):
    """A one-layer random ``T5EncoderModel`` of width ``width`` for ``tokenizer``'s vocabulary."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    return T5EncoderModel(config).eval()


def tiny_clip(directory: Path, seed: int, projection: bool = False, width: int = 16):
    """``(tokenizer, CLIP text encoder)``; with ``projection`` the encoder has a text projection."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer(directory)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=32,
                            num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, hidden_act="gelu", projection_dim=width)
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return tokenizer, model.eval()


def tiny_kl_vae(seed: int, latent_channels: int, blocks: int = 1, **config: Any):
    """A tiny random ``AutoencoderKL`` of width 8 (``2**(blocks-1)`` downsampling); ``config``:
    further options (``shift_factor``, ``scaling_factor``, ``use_quant_conv``, ...)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae: Any = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8,) * blocks, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=16, **config)
    return vae.eval()


def tiny_flux_pipeline(directory: Path, guidance_embeds: bool = True) -> Any:
    """A ``FluxPipeline`` from tiny random components, tokenizers written under ``directory``.

    One double and one single transformer block (width 16) on 1-channel latents packed into
    4-channel tokens, a 1-block VAE (no downsampling) with Flux's shift and scaling, CLIP and T5
    text encoders, and a ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting.
    """
    import diffusers

    tokenizer, text_encoder = tiny_clip(directory / "clip", seed=1)
    tokenizer_2 = tiny_t5_tokenizer(directory / "t5")
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
        guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                                          max_shift=1.15)
    pipe: Any = diffusers.FluxPipeline(
        scheduler=scheduler, vae=tiny_kl_vae(3, 1, use_quant_conv=False, use_post_quant_conv=False,
                                             shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=tiny_t5_encoder(tokenizer_2, seed=2),
        tokenizer_2=tokenizer_2, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(directory: Path) -> Any:
    """A ``StableDiffusion3Pipeline`` from tiny random components, tokenizers written under ``directory``.

    A 2-layer MMDiT (patch 2, 4 latent channels), a 2-block VAE with a shift and scaling, two
    CLIP encoders with projections, a T5 encoder, and ``FlowMatchEulerDiscreteScheduler(shift=3)``.
    """
    import diffusers

    tokenizer, text_encoder = tiny_clip(directory / "clip-l", seed=1, projection=True)
    tokenizer_2, text_encoder_2 = tiny_clip(directory / "clip-g", seed=2, projection=True)
    tokenizer_3 = tiny_t5_tokenizer(directory / "t5")
    torch.manual_seed(0)
    # joint attention takes the two CLIP widths side by side (16 + 16), padded to T5's (32)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=8)
    pipe: Any = diffusers.StableDiffusion3Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer.eval(),
        vae=tiny_kl_vae(3, 4, blocks=2, shift_factor=0.06, scaling_factor=1.5), text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=tiny_t5_encoder(tokenizer_3, seed=3, width=32), tokenizer_3=tokenizer_3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _quiet(pipe: Any) -> Any:
    """``pipe`` with its progress bar off (tests run many short loops)."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- SDXL, Wan, PixArt-Sigma, Sana ---------------------------------------------------------------

def tiny_sdxl_pipeline(directory: Path, seed: int = 0, output_scale: float = 0.2) -> Any:
    """A ``StableDiffusionXLPipeline`` from tiny random components: 8x8 latents, 16x16 images.

    Two CLIP encoders (the second with a projection for the pooled embedding), a UNet with
    ``text_time`` added conditioning whose output layer is scaled by ``output_scale``, a 2-block
    VAE, ``EulerDiscreteScheduler(prediction_type="v_prediction")`` and no watermark.
    """
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    directory = Path(directory)
    tokenizer = tiny_clip_tokenizer(directory / "one")
    tokenizer_2 = tiny_clip_tokenizer(directory / "two")

    def clip_config(**extra: Any) -> Any:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=2,
                              max_position_embeddings=tokenizer.model_max_length,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, hidden_act="gelu", **extra)

    torch.manual_seed(seed)
    # cross attention sees both encoders' hidden states side by side (16 + 16); the added
    # embedding takes 6 time ids x 4 plus the pooled projection (8)
    unet: Any = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=32,
        transformer_layers_per_block=(1, 1),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    unet.eval()
    with torch.no_grad():  # a small output layer keeps the random UNet's loop tame (as a trained one)
        unet.conv_out.weight.mul_(output_scale)
        unet.conv_out.bias.mul_(output_scale)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(clip_config()).eval()
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(projection_dim=8)).eval()
    return _quiet(diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(seed + 3), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(prediction_type="v_prediction"),
        add_watermarker=False))


def tiny_wan_transformer(seed: int) -> Any:
    """A one-layer random ``WanTransformer3DModel`` (patch ``(1, 2, 2)``, width 16, 4 channels)."""
    import diffusers

    torch.manual_seed(seed)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
    return transformer.eval()


def wan_unipc() -> Any:
    """The scheduler Wan ships with: UniPC on flow sigmas, ``flow_shift=3``."""
    import diffusers

    return diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                             flow_shift=3.0)


def tiny_wan_pipeline(directory: Path, scheduler: Any, two_experts: bool = False,
                      expand_timesteps: bool = False) -> Any:
    """A ``WanPipeline`` (text-to-video) from tiny random components, the tokenizer under ``directory``.

    A T5 encoder, :func:`tiny_wan_transformer`, a tiny ``AutoencoderKLWan`` with latent statistics;
    ``two_experts``: Wan 2.2's second transformer after ``boundary_ratio=0.6``;
    ``expand_timesteps``: Wan 2.2 TI2V's per-token timesteps.
    """
    import diffusers

    tokenizer = tiny_t5_tokenizer(Path(directory) / "t5")
    torch.manual_seed(3)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True],
                                     latents_mean=[0.1, -0.2, 0.0, 0.3],
                                     latents_std=[1.5, 0.8, 1.0, 2.0]).eval()
    text_encoder = tiny_t5_encoder(tokenizer, seed=2)
    transformer = tiny_wan_transformer(0)
    transformer_2 = tiny_wan_transformer(1) if two_experts else None
    return _quiet(diffusers.WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler,
        transformer_2=transformer_2, boundary_ratio=0.6 if two_experts else None,
        expand_timesteps=expand_timesteps))


def tiny_pixart_pipeline(directory: Path, sample_size: int = 8, vae_blocks: int = 2) -> Any:
    """A ``PixArtSigmaPipeline`` from tiny random components, the tokenizer under ``directory``.

    A T5 encoder, a one-layer ``PixArtTransformer2DModel`` with learned sigma (8 output channels
    for 4 latent ones), a ``vae_blocks``-block VAE and ``DPMSolverMultistepScheduler``.
    """
    import diffusers

    tokenizer = tiny_t5_tokenizer(Path(directory) / "t5")
    torch.manual_seed(0)
    transformer = diffusers.PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=16, in_channels=4, cross_attention_dim=16, out_channels=8, norm_num_groups=4)
    return _quiet(diffusers.PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=tiny_t5_encoder(tokenizer, seed=2), transformer=transformer.eval(),
        vae=tiny_kl_vae(3, 4, blocks=vae_blocks), scheduler=diffusers.DPMSolverMultistepScheduler()))


def tiny_gemma(directory: Path, seed: int) -> tuple[Any, Any]:
    """``(GemmaTokenizerFast over letters, digits and the instruction's punctuation, Gemma2Model)``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (  # type: ignore[attr-defined]  # GemmaTokenizerFast: a lazy alias in transformers 5
        Gemma2Config,
        Gemma2Model,
        GemmaTokenizerFast,
    )

    characters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.:'-"
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *characters])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = GemmaTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                              pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(directory))
    fast = GemmaTokenizerFast.from_pretrained(str(directory))
    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=len(fast), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=4,
                          max_position_embeddings=2048, pad_token_id=fast.pad_token_id,
                          bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    return fast, Gemma2Model(config).eval()


def tiny_sana_pipeline(directory: Path) -> Any:
    """A ``SanaPipeline`` from tiny random components, the tokenizer under ``directory``.

    :func:`tiny_gemma`, a one-layer ``SanaTransformer2DModel`` (patch 1, 4 channels), a 2-block
    ``AutoencoderDC`` (32 px images, 16x16 latents) and ``FlowMatchEulerDiscreteScheduler(shift=3)``.
    """
    import diffusers

    tokenizer, text_encoder = tiny_gemma(Path(directory) / "gemma", seed=2)
    torch.manual_seed(0)
    transformer = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=32, patch_size=1)
    torch.manual_seed(3)
    vae = diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "ResBlock"),
        decoder_block_types=("ResBlock", "ResBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()), upsample_block_type="interpolate",
        downsample_block_type="conv", scaling_factor=0.41)
    return _quiet(diffusers.SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer.eval(), vae=vae.eval(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)))
