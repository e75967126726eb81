"""Inversion and gradients through the solve on the shipped digits model (CPU).

Writes ``docs/benchmarks/inversion.{md,json}`` and the figures ``docs/assets/inversion_*.png``:

* inversion of real digits (scikit-learn's, 16x16) with DDIM at T = 50 / 100: rounds and model
  evaluations of DDIM inversion and of exact inversion, parallel (fpsolve ``taa``) against the
  sequential inverse loops, and the reconstruction error (the sampler run forward again);
* a figure: two digits inverted exactly, their noises interpolated (slerp), sampled back;
* noise optimisation: ``x_T`` optimised by Adam so that the sample matches a target digit,
  gradients by autograd through the sequential loop and by fpsolve's adjoint solve (a figure of
  loss against steps, both methods);
* the gradient of one loss at T = 50 / 100: agreement with autograd through the sequential loop,
  wall time and peak memory, each method measured in a fresh subprocess (peak RSS growth after
  the model is loaded, ``resource.getrusage``).

    python benchmarks/inversion_gradients.py            # about 10 minutes on 2 shared cores
    python benchmarks/inversion_gradients.py --quick    # T = 20 only, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fpsolve
from fpsolve.inversion import reconstruction_error
from fpsolve.models import load_reference
from fpsolve.models.digits import digits_to_images, load_digits_dataset, save_digit_grid
from fpsolve.schedules import leading_timesteps

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # rms tolerance of every parallel solve here, in pixel units of [-1, 1]


def differentiable_denoiser(unet):
    """The digits UNet as ``eps(x, t)`` WITHOUT ``torch.no_grad`` (the shipped wrapper has it)."""
    def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x.to(torch.float32), t).sample.to(x.dtype)
    return denoiser


def ddim(reference, steps: int) -> fpsolve.samplers.DDIM:
    """DDIM with the digits model's own spacing (``ddim_sample_digits``): ``t_i = i * (1000 // T)``."""
    return fpsolve.samplers.DDIM(alphas_cumprod=reference.alphas_cumprod, timesteps=leading_timesteps(steps))


def system_for(reference, denoiser, steps: int, noise: torch.Tensor) -> fpsolve.TriangularSystem:
    """A system whose noise is ``x_T`` (``[N, 1, 16, 16]``) followed by zeros (DDIM draws none)."""
    full = torch.cat([noise[None], torch.zeros(steps, *noise.shape, dtype=noise.dtype)])
    return fpsolve.TriangularSystem(sampler=ddim(reference, steps), denoiser=denoiser, shape=(1, 16, 16),
                                    noise=full)


def real_digits(indices: list[int]) -> torch.Tensor:
    return load_digits_dataset()[indices].to(torch.float64)


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation of two noises (keeps the norm a Gaussian sample has)."""
    flat_a, flat_b = a.flatten(), b.flatten()
    cosine = torch.dot(flat_a, flat_b) / (flat_a.norm() * flat_b.norm())
    angle = torch.arccos(cosine.clamp(-1, 1))
    if angle < 1e-6:
        return (1 - weight) * a + weight * b
    return (torch.sin((1 - weight) * angle) * a + torch.sin(weight * angle) * b) / torch.sin(angle)


# -- inversion ------------------------------------------------------------------------------------


def inversion_rows(reference, denoiser, steps: int, x0: torch.Tensor) -> list[dict]:
    system = system_for(reference, denoiser, steps, torch.zeros_like(x0))
    rows = []
    cases = [("DDIM inversion", False, "sequential"), ("DDIM inversion", False, "taa"),
             ("exact inversion", True, "sequential"), ("exact inversion", True, "taa")]
    results = {}
    for label, exact, solver in cases:
        started = time.perf_counter()
        with torch.no_grad():
            solution = fpsolve.invert(system, x0, solver, exact=exact, tol=TOL)
        wall = time.perf_counter() - started
        results[(exact, solver)] = solution.sample
        with torch.no_grad():
            error = reconstruction_error(system, solution.sample, x0)
        rows.append(dict(steps=steps, method=label, solver=solver, rounds=solution.iterations,
                         evaluations=solution.model_evals // x0.shape[0], converged=solution.converged,
                         reconstruction_rms=error, wall_s=wall))
    for row in rows:
        if row["solver"] == "taa":
            exact = row["method"] == "exact inversion"
            row["vs_sequential_max"] = float((results[(exact, "taa")] - results[(exact, "sequential")])
                                             .abs().max())
    return rows


def interpolation_figure(reference, denoiser, path: Path) -> Path:
    steps = 50
    x0 = real_digits([0, 3])  # a 0 and a 3
    system = system_for(reference, denoiser, steps, torch.zeros_like(x0))
    with torch.no_grad():
        noise = fpsolve.invert(system, x0, "taa", exact=True, tol=TOL).sample
        weights = [i / 6 for i in range(7)]
        mixed = torch.stack([slerp(noise[0], noise[1], w) for w in weights])
        back = fpsolve.solve(system_for(reference, denoiser, steps, mixed), "taa", tol=TOL).sample
    # row 1: the two digits, then the interpolation sampled back; the ends reproduce the digits
    grid = torch.cat([x0[:1], back, x0[1:]]).to(torch.float32)
    return save_digit_grid(digits_to_images(grid), path, nrow=9, scale=6)


# -- noise optimisation ---------------------------------------------------------------------------


def sequential_sample(reference, denoiser, steps: int, x_T: torch.Tensor) -> torch.Tensor:
    """Plain DDIM, differentiable by autograd (every step's activations kept for backward)."""
    form = ddim(reference, steps).affine_form()
    timesteps = ddim(reference, steps).timesteps
    x = x_T
    for i in range(1, steps + 1):
        eps = denoiser(x, torch.full((x.shape[0],), timesteps[i - 1]))
        x = form.state[i, 0] * x + form.output[i, 0] * eps
    return x


def optimise_noise(reference, denoiser, steps: int, iterations: int, method: str) -> dict:
    target = real_digits([7])  # make the sample a "7"
    start = torch.randn(1, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    x_T = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([x_T], lr=0.05)
    losses, walls = [], []
    sample, initial = None, None
    for _ in range(iterations + 1):
        started = time.perf_counter()
        optimiser.zero_grad()
        if method == "autograd":
            sample = sequential_sample(reference, denoiser, steps, x_T)
        else:
            sample = fpsolve.solve(system_for(reference, denoiser, steps, x_T), "taa", tol=TOL,
                                   differentiable=True, params=[]).sample
        loss = (sample - target).pow(2).mean()
        if initial is None:
            initial = sample.detach()
        losses.append(loss.item())
        if len(losses) <= iterations:
            loss.backward()
            optimiser.step()
        walls.append(time.perf_counter() - started)
    return dict(method=method, steps=steps, losses=losses, wall_s=sum(walls), initial=initial,
                sample=sample.detach(), target=target)


def optimisation_figure(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw=dict(width_ratios=[2.2, 1]))
    styles = {"autograd": dict(marker="o", linestyle="-"), "fpsolve": dict(marker="x", linestyle="--")}
    labels = {"autograd": "autograd through the sequential loop", "fpsolve": "fpsolve adjoint (taa)"}
    for result in results:
        axes[0].plot(result["losses"], label=f"{labels[result['method']]} ({result['wall_s']:.0f} s)",
                     **styles[result["method"]])
    axes[0].set_xlabel("Adam step")
    axes[0].set_ylabel("MSE of the sample to the target 7")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"optimising x_T through DDIM-{results[0]['steps']} (digits model, CPU)", fontsize=9)
    shown = torch.cat([results[0]["initial"], results[0]["sample"], results[0]["target"]])
    images = digits_to_images(shown.to(torch.float32))
    axes[1].imshow(torch.from_numpy(images).permute(1, 0, 2).reshape(16, -1).numpy(), cmap="gray")
    axes[1].set_title("sample before, after; target", fontsize=9)
    axes[1].axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- gradient cost, one subprocess per method ----------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the peak RSS (Linux: ``5`` to ``/proc/self/clear_refs``); return the current RSS, KiB.

    Loading the model and the dataset peaks higher than a gradient does, so ``ru_maxrss`` alone
    would hide the gradient's own memory."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def _peak_rss() -> int:
    return _status_kib("VmHWM")


def measure_gradient(method: str, steps: int, out: Path) -> None:
    """Run in a subprocess: one forward + backward of a loss, time and peak RSS growth."""
    torch.set_num_threads(1)
    reference = load_reference("digits")
    denoiser = differentiable_denoiser(reference.unet)
    x_T = torch.randn(2, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x_T.requires_grad_(True)
    target = real_digits([1, 2])
    denoiser(torch.zeros(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))  # warm up allocations
    baseline = _reset_peak_rss()
    started = time.perf_counter()
    info: dict = {}
    if method == "autograd":
        sample = sequential_sample(reference, denoiser, steps, x_T)
    else:
        options = dict(part.split("=") for part in method.split()[1:])
        window = int(options["w"]) if "w" in options else None
        tol = float(options.get("tol", TOL))
        solution = fpsolve.solve(system_for(reference, denoiser, steps, x_T), "taa", tol=tol, window=window,
                                 differentiable=True, params=[])
        sample = solution.sample
        info["forward_rounds"] = solution.iterations
    (sample - target).pow(2).mean().backward()
    wall = time.perf_counter() - started
    peak = _peak_rss()
    if method != "autograd":
        record = fpsolve.adjoint.gradient_record(solution)
        info.update(adjoint_rounds=record.adjoint.iterations, vjp_evals=record.vjp_evals // 2)
    torch.save(dict(grad=x_T.grad, wall_s=wall, peak_mib=(peak - baseline) / 1024, **info), out)


def gradient_rows(steps_list: list[int]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for steps in steps_list:
            results = {}
            methods = ["autograd", "fpsolve", "fpsolve w=10"] + (["fpsolve tol=1e-6"] if steps <= 50 else [])
            for method in methods:
                out = Path(folder) / f"{method.replace(' ', '_').replace('=', '')}_{steps}.pt"
                command = [sys.executable, __file__, "--measure", method, str(steps), str(out)]
                subprocess.run(command, check=True)
                results[method] = torch.load(out)
            reference = results["autograd"]["grad"]
            for method, result in results.items():
                error = float((result["grad"] - reference).norm() / reference.norm())
                rows.append(dict(steps=steps, method=method, wall_s=result["wall_s"],
                                 peak_mib=result["peak_mib"], relative_error=error,
                                 forward_rounds=result.get("forward_rounds"),
                                 adjoint_rounds=result.get("adjoint_rounds"),
                                 vjp_evals=result.get("vjp_evals")))
    return rows


# -- report ---------------------------------------------------------------------------------------


def markdown(inversion: list[dict], optimisation: list[dict], gradients: list[dict], seconds: float) -> str:
    lines = [
        "# Inversion and gradients on the digits model",
        "",
        f"Generated by `benchmarks/inversion_gradients.py` on {platform.machine()} CPU "
        f"({platform.processor() or 'unknown'}), 2 cores shared with other jobs, one torch thread, "
        f"in {seconds / 60:.1f} min. Deterministic DDIM with the digits model's spacing, the UNet in "
        f"float32, solver states in float64, rms tolerance {TOL:g} (pixel units of [-1, 1]). "
        "See [Inversion and gradients](../inversion-and-gradients.md).",
        "",
        "## Inversion of real digits (a 0 and a 3, batched)",
        "",
        "Rounds are sequential rounds of model calls (parallel iterations; for the sequential loops, "
        "every call); evaluations are per digit. Reconstruction: RMS between the digit and the "
        "sampler run forward from the recovered noise (worst digit).",
        "",
        "| T | method | solver | rounds | evaluations | reconstruction RMS | max diff to sequential "
        "| wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in inversion:
        diff = f"{row['vs_sequential_max']:.1e}" if "vs_sequential_max" in row else "-"
        flag = "" if row["converged"] else " (not converged)"
        lines.append(f"| {row['steps']} | {row['method']} | {row['solver']} | {row['rounds']}{flag} | "
                     f"{row['evaluations']} | {row['reconstruction_rms']:.1e} | {diff} | "
                     f"{row['wall_s']:.1f} |")
    lines += [
        "",
        f"## Noise optimisation (DDIM-{optimisation[0]['steps']}, Adam, lr 0.05)",
        "",
        "![loss against steps](../assets/inversion_noise_optimisation.png)",
        "",
        "| method | final loss | loss after step 1 | wall s |",
        "|---|---|---|---|",
    ]
    for result in optimisation:
        lines.append(f"| {result['method']} | {result['losses'][-1]:.4f} | {result['losses'][1]:.4f} | "
                     f"{result['wall_s']:.0f} |")
    lines += [
        "",
        "## One gradient: agreement, time and memory",
        "",
        "Loss: MSE of a batch of 2 samples to two digits, gradient with respect to x_T. Each method "
        "runs in a fresh process; peak memory is the growth of the peak RSS after the model is "
        "loaded and warmed up (Linux `VmHWM` after a reset). `fpsolve` uses the window T (one batched "
        f"VJP over every state) and tol {TOL:g} for the forward and the adjoint solve, `fpsolve w=10` a "
        "window of 10 states, `fpsolve tol=1e-6` a tighter tolerance (the float32 UNet is the floor "
        "of the agreement).",
        "",
        "| T | method | relative error to autograd | forward rounds | adjoint rounds | VJPs per sample "
        "| wall s | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in gradients:
        def cell(value):
            return "-" if value is None else str(value)
        lines.append(f"| {row['steps']} | {row['method']} | {row['relative_error']:.1e} | "
                     f"{cell(row['forward_rounds'])} | {cell(row['adjoint_rounds'])} | "
                     f"{cell(row['vjp_evals'])} | {row['wall_s']:.1f} | {row['peak_mib']:.0f} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 20 only, few optimisation steps")
    parser.add_argument("--optimisation-only", action="store_true",
                        help="rerun only the noise optimisation (figure and table) over an existing report")
    parser.add_argument("--measure", nargs=3, metavar=("METHOD", "STEPS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure_gradient(args.measure[0], int(args.measure[1]), Path(args.measure[2]))
        return
    torch.set_num_threads(1)
    started = time.perf_counter()
    reference = load_reference("digits")
    denoiser = differentiable_denoiser(reference.unet)
    steps_list = [20] if args.quick else [50, 100]
    assets = ROOT / "docs" / "assets"
    previous = None
    if args.optimisation_only:
        previous = json.loads((ROOT / "docs" / "benchmarks" / "inversion.json").read_text())
        inversion = previous["inversion"]
    else:
        inversion = []
        for steps in steps_list:
            inversion += inversion_rows(reference, denoiser, steps, real_digits([0, 3]))
            print(json.dumps(inversion[-4:], indent=1), flush=True)
        interpolation_figure(reference, denoiser, assets / "inversion_interpolation.png")
    iterations = 3 if args.quick else 25
    optimisation = [optimise_noise(reference, denoiser, steps_list[0], iterations, method)
                    for method in ("autograd", "fpsolve")]
    optimisation_figure(optimisation, assets / "inversion_noise_optimisation.png")
    print([(r["method"], r["losses"][-1], r["wall_s"]) for r in optimisation], flush=True)
    gradients = previous["gradients"] if previous is not None else gradient_rows(steps_list)
    seconds = time.perf_counter() - started + (previous.get("seconds", 0.0) if previous else 0.0)
    report = markdown(inversion, optimisation, gradients, seconds)
    if not args.quick:
        (ROOT / "docs" / "benchmarks" / "inversion.md").write_text(report)
        data = dict(inversion=inversion, gradients=gradients, seconds=seconds,
                    optimisation=[{k: v for k, v in r.items() if k in ("method", "steps", "losses", "wall_s")}
                                  for r in optimisation])
        (ROOT / "docs" / "benchmarks" / "inversion.json").write_text(json.dumps(data, indent=1))
    print(report)
    assert math.isfinite(seconds)


if __name__ == "__main__":
    main()
