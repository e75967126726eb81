"""Is the straighter flow trajectory faster to solve? digits-flow (flow Euler) beside digits (DDIM).

Both reference models are the same 1.2M-parameter UNet trained on the same data with the same
recipe; only the objective differs (DDPM epsilon vs rectified-flow velocity). Each model runs its
own sampler on its training schedule (``ref.sampler(T)``: DDIM eta 0 for "digits", flow Euler on
diffusers' ``FlowMatchEulerDiscreteScheduler`` sigmas for "digits-flow") at T = 25, 50, 100, on a
batch of 4 samples from one seed. For each parallel solver (fp with k = T, taa and newton, library
defaults otherwise) two numbers:

* **default tol**: iterations of ``fpsolve.solve(system, solver)`` with the default stopping rule,
  and the max pixel difference of its sample to the sequential one (8-bit images, on [0, 255]);
* **first <= 1 px**: the first iteration n whose iterate is within 1 px of the sequential sample
  when the stopping rule cannot stop the solve (``RMS(1e-10)``, window T), capped at T iterations
  (fp with k = T is exact after T). ``>T`` means it was never within 1 px by the cap.

    python benchmarks/flow_vs_ddim.py              # writes docs/benchmarks/flow.{md,json}
    python benchmarks/flow_vs_ddim.py --steps 10   # a quick look (not written unless --out)
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import attrs
import torch

import fpsolve
from fpsolve.bench.metrics import compare_samples, image_converter
from fpsolve.bench.report import cpu_name
from fpsolve.models import ReferenceModel, load_reference
from fpsolve.stopping import RMS, StoppingRule, StoppingView

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("digits", "digits-flow")
#: label -> (registered solver, options; "T" is replaced by the number of steps)
SOLVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "fp k=T": ("fp", {"order": "T"}),
    "taa": ("taa", {}),
    "newton": ("newton", {}),
}


@attrs.define(eq=False)
class _FirstWithin(StoppingRule):
    """Never accepts a row; stops one iteration after the iterate first came within ``pixels``.

    The view of iteration j holds the iterate the iteration starts from, i.e. the result of j - 1
    iterations (the window spans all T rows, so its last row is the sample).
    """

    reference: torch.Tensor
    to_images: Any
    pixels: float = 1.0
    first: int | None = None

    def converged(self, view: StoppingView) -> None:
        """Compare the current sample with the sequential one (judges no row)."""
        if self.first is None and view.hi == view.system.num_steps:
            sample = view.states[-1].detach().to("cpu").reshape(self.reference.shape)
            if compare_samples(sample, self.reference, self.to_images).max_abs_pixels <= self.pixels:
                self.first = view.iteration - 1
        return None

    def stop(self, iteration: int) -> str | None:
        """Stop once the first iterate within the bound is known."""
        return "within 1 px" if self.first is not None else None


def _options(options: dict[str, Any], steps: int) -> dict[str, Any]:
    return {k: (steps if v == "T" else v) for k, v in options.items()}


def first_within_one_pixel(system: fpsolve.TriangularSystem, solver: str, options: dict[str, Any],
                           reference: torch.Tensor, to_images: Any) -> int | None:
    """First iteration whose sample is within 1 px of ``reference`` with tol -> 0, capped at T."""
    steps = system.num_steps
    rule = _FirstWithin(reference, to_images)
    stopping = RMS(tol1=1e-10, tol2=0.0) & rule
    with warnings.catch_warnings():  # the cap T + 1 is part of the measurement
        warnings.simplefilter("ignore", fpsolve.NotConvergedWarning)
        solution = fpsolve.solve(system, solver, stopping=stopping, max_iters=steps + 1, window=steps,
                                 **options)
    if rule.first is None and solution.iterations <= steps:
        # The solve ended (every row at 1e-10) before a view of its last iterate: judge it here.
        error = compare_samples(solution.sample.detach().to("cpu"), reference, to_images)
        if error.max_abs_pixels <= 1.0:
            return solution.iterations
    return rule.first if rule.first is None or rule.first <= steps else None


def measure(ref: ReferenceModel, steps: int, samples: int, seed: int) -> dict[str, Any]:
    """Every solver's two numbers on one model and step count."""
    sampler = ref.sampler(steps)
    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=ref.denoiser, shape=ref.shape, batch=samples,
                                      generator=torch.Generator().manual_seed(seed))
    to_images = image_converter(ref.to_images, ref.shape)
    sequential = fpsolve.solve(system, "sequential")
    reference = sequential.sample.detach().to("cpu")
    cells: dict[str, Any] = {}
    for label, (name, options) in SOLVERS.items():
        opts = _options(options, steps)
        started = time.perf_counter()
        solution = fpsolve.solve(system, name, **opts)
        wall = time.perf_counter() - started
        error = compare_samples(solution.sample.detach().to("cpu"), reference, to_images)
        first = first_within_one_pixel(system, name, opts, reference, to_images)
        cells[label] = {
            "iterations": solution.iterations,
            "model_evals": solution.model_evals,
            "converged": solution.converged,
            "max_abs_pixels": error.max_abs_pixels,
            "wall_time_s": round(wall, 2),
            "first_within_1px": first,
        }
        print(f"{ref.name} {type(sampler).__name__}-{steps} {label}: {cells[label]}", flush=True)
    return {"model": ref.name, "sampler": f"{type(sampler).__name__}-{steps}", "steps": steps, "cells": cells}


def _first(value: int | None, steps: int) -> str:
    return f">{steps}" if value is None else str(value)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The report page."""
    by_key = {(r["model"], r["steps"]): r for r in rows}
    lines = [
        "# Flow matching vs DDPM on the digits UNet: iterations to reproduce the sequential sample",
        "",
        f"Generated by `{meta['command']}` on {meta['machine']} ({meta['date']}, {meta['seconds']:.0f} s).",
        "",
        "Both models are the shipped 1.2M-parameter digits UNet, trained with the same recipe (data, "
        "architecture, steps, seed); `digits` with the DDPM epsilon objective, `digits-flow` with the "
        "rectified-flow objective. Each runs its own sampler on its training schedule (`ref.sampler(T)`): "
        "DDIM (eta 0) and flow Euler on diffusers' `FlowMatchEulerDiscreteScheduler` sigmas. "
        f"{meta['samples']} samples solved as one batch, seed {meta['seed']}.",
        "",
        "- **default**: iterations of `fpsolve.solve(system, solver)` at the default stopping rule "
        "(RMS 2e-4), with the max pixel difference of its sample to the sequential one on [0, 255] in "
        "brackets.",
        "- **first <= 1 px**: the first iteration whose sample is within 1 px of the sequential one when "
        "the stopping rule cannot stop the solve (RMS 1e-10, window T), capped at T (`>T`: never within "
        "the cap).",
        "",
        "| T | solver | digits DDIM: default | digits DDIM: first <= 1 px "
        "| digits-flow FlowEuler: default | digits-flow FlowEuler: first <= 1 px |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for steps in meta["steps"]:
        for label in SOLVERS:
            cells = []
            for model in MODELS:
                row = by_key.get((model, steps))
                if row is None:
                    cells += ["-", "-"]
                    continue
                cell = row["cells"][label]
                star = "" if cell["converged"] else "*"
                cells += [f"{cell['iterations']}{star} ({cell['max_abs_pixels']:g} px)",
                          _first(cell["first_within_1px"], steps)]
            lines.append(f"| {steps} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "`*`: the solve did not converge (stopped by its iteration cap).", ""]
    lines += ["## Reading", "", meta.get("reading", "").strip(), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=[25, 50, 100])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for flow.md and flow.json (default docs/benchmarks for the full run)")
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS))
    parser.add_argument("--reading", type=Path, default=None, help="markdown file with the 'Reading' section")
    parser.add_argument("--render", type=Path, default=None,
                        help="only re-render flow.md from this flow.json (with --reading), measuring nothing")
    args = parser.parse_args()
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        if args.reading is not None:
            saved["meta"]["reading"] = args.reading.read_text()
        args.render.write_text(json.dumps(saved, indent=1) + "\n")
        (args.render.parent / "flow.md").write_text(markdown(saved["rows"], saved["meta"]))
        print(f"wrote {args.render.parent / 'flow.md'}")
        return
    out = args.out or (ROOT / "docs" / "benchmarks" if args.steps == [25, 50, 100] else None)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = []
    for name in args.models:
        ref = load_reference(name)
        for steps in args.steps:
            rows.append(measure(ref, steps, args.samples, args.seed))
    cpu = cpu_name()
    meta = {
        "command": "python benchmarks/flow_vs_ddim.py" + (" --steps " + ",".join(map(str, args.steps))
                                                          if args.steps != [25, 50, 100] else ""),
        "machine": f"{cpu}, {os.cpu_count()} cores shared with other jobs, {args.threads} torch thread(s), "
                   f"torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "seconds": time.perf_counter() - started,
        "samples": args.samples,
        "seed": args.seed,
        "steps": args.steps,
        "reading": args.reading.read_text() if args.reading else "",
    }
    if out is None:
        print(markdown(rows, meta))
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "flow.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / "flow.md").write_text(markdown(rows, meta))
    print(f"wrote {out / 'flow.md'} and {out / 'flow.json'}")


if __name__ == "__main__":
    main()
