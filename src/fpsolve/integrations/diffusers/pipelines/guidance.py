"""Classifier-free guidance as the pipelines run it: the doubled batch, the mix, learned sigma.

Most pipelines call their model once on ``[x, x]`` with conditioning tensors of ``2 N`` rows
(the unconditional half first), split the output and mix the halves; some then rescale the mix
(``guidance_rescale``) or add a further term (SD3's skip-layer guidance), and DiT-like
transformers with learned sigma drop their extra channels. :func:`doubled_batch_model` is that
loop body once, with what differs between pipelines (the model call, whether the batch is
doubled, the learned-sigma channels, the step after the mix) as its parameters. Pipelines that
call the model separately on the negative conditioning (Flux's true CFG, Wan) mix with
:func:`guide` alone. Every expression keeps the pipelines' operation order, so results are
bit-identical to their loops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import batch_rows, sample_index

__all__ = ["BatchCall", "Refine", "guide", "doubled_batch_model", "rescaled"]

#: ``call(model_input, timestep, rows) -> prediction``: the pipeline's model on its own batch
#: (doubled under guidance), ``rows`` the rows of the pipeline's conditioning tensors it stands for.
BatchCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: ``refine(guided, cond, x, t, sample) -> prediction``: a pipeline's step after the guidance mix,
#: given the mix, the conditional half, the system's batch and each row's pipeline sample.
Refine = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """``uncond + scale (cond - uncond)``, the pipelines' guidance mix in their operation order."""
    return uncond + scale * (cond - uncond)


def doubled_batch_model(call: BatchCall, *, batch: int, guided: bool, guidance_scale: float,
                        learned_sigma: bool = False,
                        refine: Refine | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``model(x, t)`` for the system: the pipeline's guided model call on each row of ``x``.

    Args:
        call: the pipeline's model call on its batch (see :data:`BatchCall`).
        batch: ``N``, the samples of the pipeline call (a row's sample is ``row % N``).
        guided: whether the pipeline doubles its batch for classifier-free guidance.
        guidance_scale: the mix's scale (read only when ``guided``).
        learned_sigma: the model predicts ``[eps, sigma]`` channels; the sigma half is dropped
            (after guidance, as the pipelines do).
        refine: a step after the mix (guidance rescale, skip-layer guidance), only when ``guided``.
    """
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sample = sample_index(x, batch)
        rows = batch_rows(sample, batch, guided)
        model_input, timestep = (torch.cat([x, x]), torch.cat([t, t])) if guided else (x, t)
        noise_pred = call(model_input, timestep, rows)
        if guided:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = guide(noise_pred_uncond, noise_pred_text, guidance_scale)
            if refine is not None:
                noise_pred = refine(noise_pred, noise_pred_text, x, t, sample)
        if learned_sigma:
            noise_pred = noise_pred.chunk(2, dim=1)[0]
        return noise_pred
    return model


def rescaled(guidance_rescale: float) -> Refine | None:
    """The Stable Diffusion pipelines' ``rescale_noise_cfg`` step, or ``None`` when the rescale is 0.

    SDXL's ``rescale_noise_cfg`` is a "Copied from" copy of Stable Diffusion's (same source).
    """
    if not guidance_rescale > 0.0:
        return None
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    def refine(guided: torch.Tensor, cond: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
               sample: torch.Tensor) -> torch.Tensor:
        return rescale_noise_cfg(guided, cond, guidance_rescale=guidance_rescale)
    return refine
