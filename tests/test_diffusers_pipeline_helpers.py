"""The adapters' shared pieces on stand-in models: the guided batch, the output tail, the decode.

The parity tests run every piece inside real (tiny) pipelines; these state each one's contract
directly, with a model call that records what it is given, so that a change of the batch layout,
the operation order or a flag shows up here by name. float64 throughout: equalities are exact.
"""

from __future__ import annotations

import types

import pytest
import torch

from fpsolve.errors import UnsupportedError
from fpsolve.integrations.diffusers.pipelines.guidance import doubled_batch_model, guide
from fpsolve.integrations.diffusers.pipelines.inputs import lora_scale, named
from fpsolve.integrations.diffusers.pipelines.output import finisher, vae_decode

N = 2  # pipeline samples; a system batch holds whole positions of N rows


def recording_call(channels_out: int | None = None):
    """``(call, seen)``: a model call that returns ``f(input, timestep, rows)`` and records its inputs."""
    seen = []

    def call(model_input, timestep, rows):
        seen.append((model_input, timestep, rows))
        out = model_input * (1 + rows.to(model_input.dtype)).view(-1, 1, 1) + timestep.view(-1, 1, 1) / 7
        return out if channels_out is None else out.repeat(1, channels_out // out.shape[1], 1)
    return call, seen


def batch():
    x = torch.arange(2 * N * 2 * 3, dtype=torch.float64).reshape(2 * N, 2, 3) / 10  # two positions
    t = torch.tensor([900.0, 900.0, 500.0, 500.0], dtype=torch.float64)
    return x, t


def test_unguided_model_calls_once_on_the_rows_samples():
    call, seen = recording_call()
    x, t = batch()
    out = doubled_batch_model(call, batch=N, guided=False, guidance_scale=7.0)(x, t)
    (model_input, timestep, rows), = seen
    assert torch.equal(model_input, x) and torch.equal(timestep, t)
    assert rows.tolist() == [0, 1, 0, 1]  # row % N: the pipeline sample of each row
    assert torch.equal(out, call(x, t, rows))


def test_guided_model_doubles_the_batch_unconditional_half_first_and_mixes():
    call, seen = recording_call()
    x, t = batch()
    out = doubled_batch_model(call, batch=N, guided=True, guidance_scale=7.0)(x, t)
    (model_input, timestep, rows), = seen
    assert torch.equal(model_input, torch.cat([x, x])) and torch.equal(timestep, torch.cat([t, t]))
    # rows of the pipeline's [negative, positive] conditioning: sample i, then N + i
    assert rows.tolist() == [0, 1, 0, 1, 2, 3, 2, 3]
    uncond, cond = call(model_input, timestep, rows).chunk(2)
    assert torch.equal(out, uncond + 7.0 * (cond - uncond))
    assert torch.equal(guide(uncond, cond, 7.0), uncond + 7.0 * (cond - uncond))


def test_refine_runs_after_the_mix_and_only_under_guidance():
    calls = []

    def refine(mixed, cond, x, t, sample):
        calls.append((mixed, cond, x, t, sample))
        return mixed + cond

    call, _ = recording_call()
    x, t = batch()
    unguided = doubled_batch_model(call, batch=N, guided=False, guidance_scale=3.0, refine=refine)(x, t)
    assert calls == [] and torch.equal(unguided, call(x, t, torch.tensor([0, 1, 0, 1])))
    guided = doubled_batch_model(call, batch=N, guided=True, guidance_scale=3.0, refine=refine)(x, t)
    (mixed, cond, seen_x, seen_t, sample), = calls
    assert torch.equal(seen_x, x) and torch.equal(seen_t, t) and sample.tolist() == [0, 1, 0, 1]
    assert torch.equal(guided, mixed + cond)


@pytest.mark.parametrize("guided", [False, True])
def test_learned_sigma_channels_are_dropped_after_guidance(guided):
    call, _ = recording_call(channels_out=4)  # [eps, sigma] channels for 2 latent channels
    x, t = batch()
    with_sigma = doubled_batch_model(call, batch=N, guided=guided, guidance_scale=2.0)(x, t)
    dropped = doubled_batch_model(call, batch=N, guided=guided, guidance_scale=2.0, learned_sigma=True)(x, t)
    assert with_sigma.shape == (2 * N, 4, 3) and dropped.shape == (2 * N, 2, 3)
    assert torch.equal(dropped, with_sigma[:, :2])


def test_a_batch_of_partial_positions_is_refused():
    call, _ = recording_call()
    x, t = batch()
    with pytest.raises(UnsupportedError, match="whole positions"):
        doubled_batch_model(call, batch=N, guided=True, guidance_scale=2.0)(x[:3], t[:3])


class StandInPipeline:
    """What the output tail touches: a VAE with a scaling and a shift factor, and the model hooks."""

    def __init__(self):
        self.freed = 0
        config = types.SimpleNamespace(scaling_factor=2.0, shift_factor=0.5)
        self.vae = types.SimpleNamespace(config=config, dtype=torch.float32,
                                         decode=lambda z, return_dict: (z * 10,))

    def maybe_free_model_hooks(self):
        self.freed += 1


class Output:
    def __init__(self, **fields):
        self.fields = fields


@pytest.mark.parametrize("return_dict", [False, True])
def test_finisher_latent_output_skips_the_decode(return_dict):
    pipe = StandInPipeline()
    finish = finisher(pipe, dict(output_type="latent", return_dict=return_dict), dtype=torch.float32,
                      decode=lambda latents, output_type: pytest.fail("decoded latents"), output_class=Output)
    latents = torch.ones(1, 2, dtype=torch.float64) / 3
    out = finish(latents)
    value = out.fields["images"] if return_dict else out[0]
    assert not return_dict or set(out.fields) == {"images"}
    assert return_dict or (isinstance(out, tuple) and len(out) == 1)
    assert value.dtype == torch.float32 and torch.equal(value, latents.to(torch.float32))
    assert pipe.freed == 1


def test_finisher_decodes_in_the_pipelines_dtype_into_its_output_field():
    pipe = StandInPipeline()
    seen = []

    def decode(latents, output_type):
        seen.append((latents.dtype, output_type))
        return "frames"
    finish = finisher(pipe, dict(output_type="np", return_dict=True), dtype=torch.float32, decode=decode,
                      output_class=Output, field="frames")
    out = finish(torch.zeros(1, 2, dtype=torch.float64))
    assert seen == [(torch.float32, "np")] and out.fields == {"frames": "frames"} and pipe.freed == 1


def test_vae_decode_unscales_then_shifts_then_decodes():
    pipe = StandInPipeline()
    z = torch.tensor([[1.0, -3.0]], dtype=torch.float64)
    assert torch.equal(vae_decode(pipe, z), z / 2.0 * 10)
    assert torch.equal(vae_decode(pipe, z, shift=True), (z / 2.0 + 0.5) * 10)
    cast = vae_decode(pipe, z, cast=True)
    assert cast.dtype == torch.float32 and torch.equal(cast, z.to(torch.float32) / 2.0 * 10)


def test_call_arguments_passed_on_by_name_and_the_lora_scale():
    args = dict(prompt="a", prompt_2=None, clip_skip=2)
    assert named(args, "prompt", "clip_skip") == dict(prompt="a", clip_skip=2)
    with pytest.raises(KeyError):
        named(args, "negative_prompt")
    assert lora_scale(None) is None and lora_scale({}) is None and lora_scale({"scale": 0.5}) == 0.5
