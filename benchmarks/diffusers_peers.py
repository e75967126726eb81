"""fpsolve against diffusers' ParaDiGMS pipeline on one tiny Stable Diffusion pipeline (CPU).

Part 1, the solve: the same tiny random Stable Diffusion pipeline (v-prediction, so that its
latents stay O(1); SD 1.x schedule: scaled_linear, steps_offset 1, set_alpha_to_one False), the
same prompt, seed and step count, sampled by

* diffusers' sequential ``StableDiffusionPipeline`` (DDIMScheduler / DDPMScheduler): the reference;
* diffusers' ``StableDiffusionParadigmsPipeline`` with ``DDIMParallelScheduler`` /
  ``DDPMParallelScheduler`` (``parallel=10``, tolerance 0.1 and 1e-3);
* fpsolve ``fp`` with the ``paradigms`` stopping rule (same window and tolerances);
* the ``paradigms`` solver of the fpsolve-paradigms plugin, when installed (ParaDiGMS' own
  semantics: accepted rows take the update too, the original error ratio);
* fpsolve ``taa`` (default rms rule, tol 1e-3), window 10 and the whole trajectory.

Reported: parallel iterations (rounds of model calls), model evaluations (positions x samples,
guidance counted once), error to the sequential pipeline's images (max abs on [0, 255], PSNR)
and latents, and CPU wall time.

Part 2, the batched steps: ``batch_step_no_noise`` of the parallel schedulers against ``step`` of
the sequential ones on random inputs, over spacings, step counts, ``set_alpha_to_one``,
prediction types, clipping and variance types. Every configuration where they disagree is listed.

    python benchmarks/diffusers_peers.py    # writes docs/benchmarks/diffusers_peers.{json,md}
"""

from __future__ import annotations

import itertools
import json
import platform
import tempfile
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

import fpsolve
from fpsolve.integrations.diffusers import sample
from fpsolve.integrations.diffusers.testing import psnr, tiny_sd_pipeline
from fpsolve.registry import get_registry
from fpsolve.stopping import Paradigms

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
STEPS = 50
SEED = 0
PROMPT = "a photo of a cat"
SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                   prediction_type="v_prediction", clip_sample=False)
SCHEDULERS = {
    "DDIM": (diffusers.DDIMScheduler, diffusers.DDIMParallelScheduler, dict(set_alpha_to_one=False)),
    "DDPM": (diffusers.DDPMScheduler, diffusers.DDPMParallelScheduler, {}),
}
DISAGREE = 1e-5  # max abs difference (latent units) counted as a disagreement
STEP_COUNTS = (10, 30, 50)  # 30 does not divide 1000: a non-uniform "trailing" stride


class CallCounter:
    """Counts UNet calls and the samples they evaluate (guidance halves counted once)."""

    def __init__(self, unet: torch.nn.Module, guided: bool):
        self.calls, self.rows, self.guided = 0, 0, guided
        self.handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1
        self.rows += args[0].shape[0] // (2 if self.guided else 1)

    def close(self) -> None:
        self.handle.remove()


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def images(out) -> np.ndarray:
    return np.asarray(out.images, dtype=np.float64)


def error_row(result_images: np.ndarray, result_latents: torch.Tensor, reference: dict) -> dict:
    return dict(max_abs_255=float(np.abs(result_images - reference["images"]).max() * 255),
                psnr_db=psnr(result_images, reference["images"]),
                latent_max_abs=float((result_latents.double() - reference["latents"]).abs().max()))


def run_sequential(pipe) -> dict:
    with torch.no_grad():
        counter = CallCounter(pipe.unet, guided=True)
        started = time.perf_counter()
        out = pipe(PROMPT, num_inference_steps=STEPS, generator=generator(), output_type="np")
        seconds = time.perf_counter() - started
        counter.close()
        latents = pipe(PROMPT, num_inference_steps=STEPS, generator=generator(), output_type="latent").images
    return dict(images=images(out), latents=latents.double(), iterations=counter.calls,
                model_evals=counter.rows,
                seconds=seconds)


def run_paradigms(components: dict, parallel_cls, config: dict, tolerance: float, reference: dict) -> dict:
    pipe = diffusers.StableDiffusionParadigmsPipeline(**components, scheduler=parallel_cls(**config))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        counter = CallCounter(pipe.unet, guided=True)
        started = time.perf_counter()
        out = pipe(PROMPT, num_inference_steps=STEPS, parallel=10, tolerance=tolerance, generator=generator(),
                   output_type="np")
        seconds = time.perf_counter() - started
        counter.close()
        latents = pipe(PROMPT, num_inference_steps=STEPS, parallel=10, tolerance=tolerance,
                       generator=generator(),
                       output_type="latent").images
    return dict(iterations=counter.calls, model_evals=counter.rows, seconds=seconds,
                **error_row(images(out), latents, reference))


def run_fpsolve(pipe, reference: dict, solver: str, **options) -> dict:
    started = time.perf_counter()
    out, solution = sample(pipe, solver=solver, generator=generator(), prompt=PROMPT,
                           num_inference_steps=STEPS,
                           output_type="np", **options)
    seconds = time.perf_counter() - started
    return dict(iterations=solution.iterations, model_evals=solution.model_evals, seconds=seconds,
                converged=solution.converged, **error_row(images(out), solution.sample, reference))


def solve_comparison() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for family, (sequential_cls, parallel_cls, extra) in SCHEDULERS.items():
            config = dict(SD_SCHEDULE, **extra)
            pipe = tiny_sd_pipeline(sequential_cls(**config), Path(directory) / family)
            components = {name: getattr(pipe, name) for name in ("vae", "text_encoder", "tokenizer", "unet")}
            components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            reference = run_sequential(pipe)
            rows.append(dict(scheduler=family, method="diffusers sequential (reference)",
                             iterations=reference["iterations"], model_evals=reference["model_evals"],
                             seconds=reference["seconds"], max_abs_255=0.0, psnr_db=float("inf"),
                             latent_max_abs=0.0))
            for tolerance in (0.1, 1e-3):
                rows.append(dict(scheduler=family,
                                 method=f"diffusers Paradigms, parallel=10, tolerance={tolerance:g}",
                                 **run_paradigms(components, parallel_cls, config, tolerance, reference)))
            for tolerance in (0.1, 1e-3):
                rows.append(dict(scheduler=family,
                                 method=f"fpsolve fp + paradigms rule, window=10, tol={tolerance:g}",
                                 **run_fpsolve(pipe, reference, "fp", window=10,
                                               stopping=Paradigms(tol=tolerance))))
            if "paradigms" in get_registry().names("solver"):  # the fpsolve-paradigms plugin
                for tolerance in (0.1, 1e-3):
                    method = f"fpsolve paradigms solver (plugin), parallel=10, tolerance={tolerance:g}"
                    options = {"tolerance": tolerance}
                    rows.append(dict(scheduler=family, method=method,
                                     **run_fpsolve(pipe, reference, "paradigms", solver_options=options)))
            for window in (10, None):
                rows.append(dict(scheduler=family, method=f"fpsolve taa (rms 1e-3), window={window or 'T'}",
                                 **run_fpsolve(pipe, reference, "taa", window=window)))
    return rows


# -- part 2: batch_step_no_noise against step ---------------------------------------------------

def _inputs(steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(steps, 2, 4, 8, 8, generator=generator), torch.randn(steps, 2, 4, 8, 8,
                                                                             generator=generator))


def _noise_free_ddpm_step(scheduler, output, t, sample) -> torch.Tensor:
    """DDPMScheduler.step without its noise: replay the draw and subtract std * noise."""
    generator = torch.Generator().manual_seed(1)
    replay = torch.Generator().set_state(generator.get_state())
    stepped = scheduler.step(output, t, sample, generator=generator).prev_sample
    if t > 0:
        noise = randn_tensor(output.shape, generator=replay, dtype=output.dtype)
        stepped = stepped - scheduler._get_variance(t) ** 0.5 * noise
    return stepped


def step_disagreements() -> list[dict]:
    rows = []
    grid = itertools.product(("DDIM", "DDPM"), ("leading", "linspace", "trailing"), STEP_COUNTS,
                             ("epsilon", "v_prediction"), (False, True), (True, False),
                             ("fixed_small", "fixed_large"))
    for family, spacing, steps, prediction, clip, alpha_to_one, variance in grid:
        if family == "DDIM" and variance != "fixed_small":
            continue  # no variance type in DDIM
        if family == "DDPM" and not alpha_to_one:
            continue  # no set_alpha_to_one in DDPM
        sequential_cls, parallel_cls, _ = SCHEDULERS[family]
        config = dict(timestep_spacing=spacing, prediction_type=prediction, clip_sample=clip,
                      steps_offset=1 if spacing == "leading" else 0)
        if family == "DDIM":
            config.update(set_alpha_to_one=alpha_to_one)
        else:
            config.update(variance_type=variance)
        sequential, parallel = sequential_cls(**config), parallel_cls(**config)
        sequential.set_timesteps(steps)
        parallel.set_timesteps(steps)
        samples, outputs = _inputs(steps)
        timesteps = sequential.timesteps
        batched = parallel.batch_step_no_noise(outputs.flatten(0, 1), timesteps.repeat_interleave(2),
                                               samples.flatten(0, 1)).reshape(samples.shape)
        one_by_one = []
        for index, t in enumerate(timesteps):
            if family == "DDIM":
                one_by_one.append(sequential.step(outputs[index], t, samples[index]).prev_sample)
            else:
                one_by_one.append(_noise_free_ddpm_step(sequential, outputs[index], t, samples[index]))
        difference = (batched - torch.stack(one_by_one)).flatten(1).abs().amax(1)
        bad = (difference > DISAGREE).nonzero().flatten().tolist()
        rows.append(dict(scheduler=f"{family}ParallelScheduler", timestep_spacing=spacing, steps=steps,
                         prediction_type=prediction, clip_sample=clip,
                         option=(f"set_alpha_to_one={alpha_to_one}" if family == "DDIM"
                                 else f"variance_type={variance}"),
                         steps_disagreeing=len(bad), first_bad_step=bad[0] if bad else None,
                         last_step_only=bad == [steps - 1], max_abs=float(difference.max())))
    return rows


def _grouped(rows: list[dict]) -> list[dict]:
    """Disagreeing configurations grouped by scheduler, spacing, option and step count."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["steps_disagreeing"]:
            groups.setdefault((row["scheduler"], row["timestep_spacing"], row["option"], row["steps"]),
                              []).append(row)
    summary = []
    for (scheduler, spacing, option, steps), members in groups.items():
        counts = sorted({m["steps_disagreeing"] for m in members})
        span = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        where = "last step only" if all(m["last_step_only"] for m in members) else f"{span} of {steps} steps"
        summary.append(dict(scheduler=scheduler, spacing=spacing, option=option, steps=steps,
                            configs=len(members), where=where, max_abs_low=min(m["max_abs"] for m in members),
                            max_abs_high=max(m["max_abs"] for m in members)))
    return summary


_INTRO = """\
Machine: {machine}; torch {torch}, diffusers {diffusers}. {steps} steps, prompt {prompt!r}, seed {seed},
guidance 7.5, one image. Tiny random components (`fpsolve.integrations.diffusers.testing.tiny_sd_pipeline`),
v-prediction, SD 1.x schedule (scaled_linear, steps_offset 1; DDIM with set_alpha_to_one=False). Errors are
against diffusers' sequential `StableDiffusionPipeline` with the same seed. Evaluations count positions x
samples (the guidance pair once). Generated by `python benchmarks/diffusers_peers.py`.
"""

_STEPS_INTRO = """\
Random samples and model outputs (4x8x8 latents, batch 2); a configuration disagrees when some step differs
by more than {limit:g} (latent units). {checked} configurations checked (spacing x steps {counts} x prediction
epsilon/v x clip_sample x set_alpha_to_one (DDIM) or variance_type fixed_small/fixed_large (DDPM)); {bad}
disagree, grouped below (each group spans the prediction types and clip settings; the full list is in the
JSON). `DDIMParallelScheduler.batch_step_no_noise` also asserts `eta == 0`, so DDIM with eta > 0 cannot run.
"""


def markdown(solve_rows: list[dict], step_rows: list[dict], meta: dict) -> str:
    lines = ["# fpsolve vs diffusers' ParaDiGMS pipeline (tiny Stable Diffusion, CPU)", "",
             _INTRO.format(steps=STEPS, prompt=PROMPT, seed=SEED, **meta),
             "| scheduler | method | iterations | model evals | max abs err (0-255) | PSNR (dB) "
             "| latent max abs err | CPU s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in solve_rows:
        lines.append(f"| {row['scheduler']} | {row['method']} | {row['iterations']} | {row['model_evals']} "
                     f"| {row['max_abs_255']:.3g} | {row['psnr_db']:.1f} | {row['latent_max_abs']:.2e} "
                     f"| {row['seconds']:.2f} |")
    bad = sum(1 for row in step_rows if row["steps_disagreeing"])
    lines += ["", "## Where `batch_step_no_noise` disagrees with the sequential `step`", "",
              _STEPS_INTRO.format(limit=DISAGREE, checked=len(step_rows), counts=STEP_COUNTS, bad=bad),
              "| scheduler | spacing | option | steps | configs | where | max abs diff |",
              "|---|---|---|---:|---:|---|---|"]
    for row in _grouped(step_rows):
        lines.append(f"| {row['scheduler']} | {row['spacing']} | {row['option']} | {row['steps']} "
                     f"| {row['configs']} | {row['where']} "
                     f"| {row['max_abs_low']:.3g} - {row['max_abs_high']:.3g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    torch.set_num_threads(1)
    meta = dict(machine=f"CPU ({platform.processor() or platform.machine()}), 1 torch thread",
                torch=torch.__version__, diffusers=diffusers.__version__, fpsolve=fpsolve.__version__)
    solve_rows = solve_comparison()
    step_rows = step_disagreements()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "diffusers_peers.json").write_text(json.dumps(dict(meta=meta, solve=solve_rows, steps=step_rows),
                                                         indent=2))
    text = markdown(solve_rows, step_rows, meta)
    (OUT / "diffusers_peers.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
