"""Iteration counts equal those of diffusers' ``StableDiffusionParadigmsPipeline``.

A tiny Stable Diffusion pipeline (random UNet2DConditionModel, AutoencoderKL and CLIPTextModel
from small configs, no download) runs the deprecated ParaDiGMS pipeline with prompt embeddings;
fpsolve solves the same problem (same initial latents and noise, same guided UNet calls) with
``solver="paradigms"``. ParaDiGMS' iterations are counted the way its loop counts them: one per
pass of its ``while`` loop, i.e. one per UNet call, counted with a forward hook.

Only configurations where that pipeline is correct are compared: a uniform timestep stride and
``set_alpha_to_one=True`` for DDIM (its batched step ignores ``final_alpha_cumprod``), no clipping.
"""

from __future__ import annotations

import pytest
import torch
from fpsolve_paradigms import ParadigmsOriginal

import fpsolve

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

LATENT = (4, 4, 4)


@pytest.fixture(scope="module")
def parts():
    """The tiny pipeline's models and two prompt embeddings (positive, negative)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=2,
    ).eval()
    # two VAE levels: a scale factor of 2, so the smallest image the pipeline accepts (8 x 8)
    # has 4 x 4 latents
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    ).eval()
    config = transformers.CLIPTextConfig(
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_hidden_layers=1,
        vocab_size=100,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    text_encoder = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        tokens = torch.randint(2, 100, (2, 8), generator=torch.Generator().manual_seed(1))
        embeddings = text_encoder(tokens)[0]
    return unet, vae, text_encoder, embeddings[:1], embeddings[1:]


def make_scheduler(kind: str):
    common = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    if kind == "ddim":
        return diffusers.DDIMParallelScheduler(set_alpha_to_one=True, **common)
    return diffusers.DDPMParallelScheduler(**common)


def run_pipeline(parts, scheduler, steps, parallel, tolerance, guidance, batch, seed):
    """The ParaDiGMS pipeline: (iterations, UNet batch items, latents)."""
    unet, vae, text_encoder, positive, negative = parts
    pipe = diffusers.StableDiffusionParadigmsPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    calls = []
    hook = unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        latents = pipe(
            prompt_embeds=positive.repeat(batch, 1, 1),
            negative_prompt_embeds=negative.repeat(batch, 1, 1),
            num_inference_steps=steps,
            parallel=parallel,
            tolerance=tolerance,
            guidance_scale=guidance,
            output_type="latent",
            generator=torch.Generator().manual_seed(seed),
            height=8,
            width=8,
        ).images
    finally:
        hook.remove()
    return len(calls), sum(calls), latents


def guided_denoiser(unet, positive, negative, guidance, batch):
    """eps with classifier-free guidance, batched exactly like the pipeline ([uncond; text] per position)."""
    cond = positive.repeat(batch, 1, 1)
    embeddings = torch.cat([negative.repeat(batch, 1, 1), cond]) if guidance > 1 else cond
    copies = 2 if guidance > 1 else 1

    def denoiser(x, t):
        positions = x.shape[0] // batch
        x = x.reshape(positions, batch, *LATENT).repeat(1, copies, 1, 1, 1)
        t = t.reshape(positions, batch).repeat(1, copies)
        hidden = embeddings.repeat(positions, 1, 1)
        out = unet(x.flatten(0, 1), t.flatten(0, 1), encoder_hidden_states=hidden, return_dict=False)[0]
        if guidance > 1:
            out = out.reshape(positions, 2, batch, *LATENT)
            out = out[:, 0] + guidance * (out[:, 1] - out[:, 0])
        return out.reshape(positions * batch, *LATENT)

    return denoiser


def run_fpsolve(parts, scheduler, kind, steps, parallel, tolerance, guidance, batch, seed):
    """The same problem through fpsolve: the pipeline's noise, drawn in its order."""
    unet, _, _, positive, negative = parts
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    draws = [
        torch.randn((batch, *LATENT), generator=generator) for _ in range(steps + 1)
    ]  # x_T, then one per step
    noise = torch.stack(draws)
    abar = scheduler.alphas_cumprod
    timesteps = scheduler.timesteps.tolist()
    if kind == "ddim":
        sampler = fpsolve.samplers.DDIM(
            alphas_cumprod=abar, timesteps=timesteps, eta=0.0, final_alpha_cumprod=1.0
        )
    else:
        sampler = fpsolve.samplers.DDPM(alphas_cumprod=abar, timesteps=timesteps, final_alpha_cumprod=1.0)
    system = fpsolve.TriangularSystem(
        sampler=sampler,
        denoiser=guided_denoiser(unet, positive, negative, guidance, batch),
        shape=LATENT,
        noise=noise,
        dtype=torch.float32,
    )
    return fpsolve.solve(system, solver="paradigms", window=parallel,
                         stopping=ParadigmsOriginal(tol=tolerance))


CASES = {
    # id: (scheduler, steps T, parallel, tolerance, guidance, batch)
    "ddim-T50-p10-tol0.1-cfg3": ("ddim", 50, 10, 0.1, 3.0, 1),
    "ddim-T20-p8-tol0.1-nocfg-batch2": ("ddim", 20, 8, 0.1, 1.0, 2),
    "ddim-T30-p30-tol0.05-cfg2": ("ddim", 30, 30, 0.05, 2.0, 1),
    "ddpm-T25-p6-tol0.2-cfg2": ("ddpm", 25, 6, 0.2, 2.0, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_iterations_match_the_diffusers_pipeline(parts, case):
    kind, steps, parallel, tolerance, guidance, batch = CASES[case]
    iterations, unet_items, latents = run_pipeline(
        parts, make_scheduler(kind), steps, parallel, tolerance, guidance, batch, seed=0
    )
    solution = run_fpsolve(
        parts, make_scheduler(kind), kind, steps, parallel, tolerance, guidance, batch, seed=0
    )
    print(
        f"{case}: ParaDiGMS pipeline {iterations} iterations / {unet_items} UNet items; "
        f"fpsolve paradigms {solution.iterations} iterations"
    )
    assert solution.iterations == iterations
    assert solution.model_evals * (2 if guidance > 1 else 1) == unet_items
    assert iterations < steps  # the comparison is not trivial: ParaDiGMS did save sequential calls
    # same algorithm, float32 rounding apart (summation order differs)
    torch.testing.assert_close(solution.sample, latents.reshape(solution.sample.shape), rtol=0, atol=2e-4)
