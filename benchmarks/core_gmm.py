"""Iterations of the core solvers on the Gaussian-mixture toy (issue 2's table).

Exact nonlinear eps in D = 64 (``fpsolve.models.load_reference("gmm")``), linear-beta schedule,
DDIM with eta 0 and 1, T = 25/50/100, window = T, tol 1e-3 (rms rule), median over 5 seeds
(the seed draws x_T and the step noise). Also reports the max abs error to the sequential sample.

    python benchmarks/core_gmm.py        # writes docs/benchmarks/core_gmm.{json,md}
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

import fpsolve
from fpsolve.models import load_reference, spaced_timesteps

SOLVERS = {
    "fp k=1": ("fp", {"order": 1}),
    "fp k=T": ("fp", {}),
    "aa m=2": ("aa", {"history": 2}),
    "taa m=2": ("taa", {"history": 2}),
    "taa m=3": ("taa", {"history": 3}),
    "taa m=5": ("taa", {"history": 5}),
    "taa k=T/5 m=2": ("taa", {"history": 2, "order": "T/5"}),
}
SEEDS = range(5)


def main() -> None:
    ref = load_reference("gmm")
    rows = []
    started = time.perf_counter()
    for steps in (25, 50, 100):
        for eta in (0.0, 1.0):
            sampler = fpsolve.samplers.DDIM(alphas_cumprod=ref.alphas_cumprod,
                                            timesteps=spaced_timesteps(steps), eta=eta)
            cells = {}
            for label, (name, options) in SOLVERS.items():
                options = {k: (steps // 5 if v == "T/5" else v) for k, v in options.items()}
                iterations, errors, converged = [], [], []
                for seed in SEEDS:
                    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=ref.denoiser,
                                                      shape=ref.shape,
                                                      generator=torch.Generator().manual_seed(seed))
                    reference = fpsolve.solve(system, "sequential")
                    solution = fpsolve.solve(system, name, tol=1e-3, window=steps, max_iters=2 * steps,
                                             **options)
                    iterations.append(solution.iterations)
                    errors.append((solution.sample - reference.sample).abs().max().item())
                    converged.append(solution.converged)
                cells[label] = {"median_iterations": statistics.median(iterations),
                                "iterations": iterations, "max_error": max(errors),
                                "all_converged": all(converged)}
            rows.append({"steps": steps, "eta": eta, "cells": cells})
            print(steps, eta, {k: v["median_iterations"] for k, v in cells.items()}, flush=True)
    out = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()} CPU ({platform.processor() or 'unknown'}), torch {torch.__version__}"
    meta = {"machine": machine,
            "seconds": round(time.perf_counter() - started, 1), "tol": 1e-3, "seeds": list(SEEDS)}
    (out / "core_gmm.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    header = "| T, eta | " + " | ".join(SOLVERS) + " |"
    lines = ["# Core solvers on the Gaussian-mixture toy", "",
             "Iterations to tol 1e-3 (rms rule), window = T, median of 5 seeds; in brackets the worst "
             "max abs",
             "error to the sequential sample over the seeds; `*` marks a cell where some seed hit the cap "
             "(2T).",
             f"Regenerate: `python benchmarks/core_gmm.py` ({meta['machine']}, {meta['seconds']} s).", "",
             header, "|" + "---|" * (len(SOLVERS) + 1)]
    for row in rows:
        cells = [f"{c['median_iterations']:g}{'' if c['all_converged'] else '*'} ({c['max_error']:.0e})"
                 for c in row["cells"].values()]
        lines.append(f"| {row['steps']}, {row['eta']:g} | " + " | ".join(cells) + " |")
    def median(row: int, solver: str) -> float:
        return rows[row]["cells"][solver]["median_iterations"]

    taa, fp = median(4, "taa m=2"), median(4, "fp k=T")
    lines += ["", f"At T = 100, eta 0: taa (m=2) needs {taa / fp:.2f}x the iterations of fp k=T "
              f"({taa:g} vs {fp:g}); eta 1: {median(5, 'taa m=2') / median(5, 'fp k=T'):.2f}x."]
    (out / "core_gmm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
