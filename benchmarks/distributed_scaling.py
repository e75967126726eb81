"""Distributed scaling: time per iteration on 1 and 2 CPU processes (measured), 8 GPUs (modelled).

Part 1, measured. The digits UNet (``src/fpsolve/models/weights/digits_unet.safetensors``) when it
exists, else the Gaussian-mixture reference ``gmm``; DDIM, TAA (m = 2, k = T), tol 1e-3, N samples.
Three layouts on the same machine: 1 process x 1 thread, 1 process x all threads, 2 gloo
processes x 1 thread (``fpsolve.solve(..., distributed=True)``, window sharding) and, in the
2-process launch, sample sharding too. Per iteration: wall time, the time inside the denoiser
(rank 0), the time of the evaluator (denoiser + the two all_gathers) and the rest (driver and
solver). Median over repeats after one warm-up solve.

Part 2, a model (no GPU was used): the expected wall time per iteration on 1/2/4/8 GPUs of one
node from the H200 CUDA-graph latency curves in ``/work/shared/data`` (see ``speedup_model``
for every assumption), times iteration counts from the ParaTAA notes and from fpsolve's own
runs on the Gaussian-mixture toy (measured here for windows < T), against the CUDA-graph
sequential baseline.

    python benchmarks/distributed_scaling.py               # writes docs/benchmarks/distributed.{json,md}
    python benchmarks/distributed_scaling.py --model-only  # part 2 only (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import fpsolve
from fpsolve.models import load_reference, spaced_timesteps

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FPSOLVE_SHARED_DATA", "/work/shared/data"))
DIGITS_WEIGHTS = ROOT / "src" / "fpsolve" / "models" / "weights" / "digits_unet.safetensors"

# (steps T, window w, samples N) measured on CPU; the digits UNet costs far more per row than gmm.
CPU_CONFIGS = {"gmm": [(100, 100, 8), (100, 25, 8), (100, 100, 64)], "digits": [(50, 50, 4), (50, 10, 4)]}


# -- part 1: CPU measurement -------------------------------------------------------------------


class _Clock:
    """Accumulates the seconds spent inside a wrapped callable."""

    def __init__(self, inner: Any):
        self.inner, self.seconds = inner, 0.0

    def __call__(self, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.inner(*args)
        finally:
            self.seconds += time.perf_counter() - started


def _one_solve(timed: fpsolve.TriangularSystem, denoiser: _Clock, window: int,
               distributed: bool) -> dict[str, Any]:
    """One TAA solve through the driver; ``denoiser`` is ``timed``'s clocked denoiser."""
    from fpsolve.distributed import sharded_evaluator
    from fpsolve.driver import DriverConfig, run
    from fpsolve.registry import resolve
    from fpsolve.stopping import RMS

    denoiser.seconds = 0.0
    evaluate = _Clock(sharded_evaluator(timed) if distributed else timed.evaluate)
    solution = run(timed, resolve("solver", "taa"), RMS(tol1=1e-3, tol2=1e-3),
                   resolve("initializer", "noise_copy"), DriverConfig(window=window), evaluate=evaluate)
    iters = solution.iterations
    return {"iterations": iters, "ms_per_iteration": 1e3 * solution.wall_time / iters,
            "model_ms_per_iteration": 1e3 * denoiser.seconds / iters,
            "evaluate_ms_per_iteration": 1e3 * evaluate.seconds / iters,
            "other_ms_per_iteration": 1e3 * (solution.wall_time - evaluate.seconds) / iters,
            "sample": solution.sample}


def _worker(spec: dict[str, Any]) -> None:
    """One process of a layout: run every config, rank 0 saves the rows."""
    from datetime import timedelta

    import torch.distributed as dist

    from fpsolve.distributed import solve_distributed

    torch.set_num_threads(spec["threads"])
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1:
        dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=300))
    rank = dist.get_rank() if ranks > 1 else 0
    ref = load_reference(spec["model"])
    rows, samples = [], {}
    for steps, window, count in spec["configs"]:
        sampler = fpsolve.samplers.DDIM(alphas_cumprod=ref.alphas_cumprod, timesteps=spaced_timesteps(steps))
        clock = _Clock(ref.denoiser)
        system = fpsolve.TriangularSystem(sampler=sampler, denoiser=clock, shape=ref.shape, batch=count,
                                          generator=torch.Generator().manual_seed(0))
        runs = []
        for _ in range(spec["repeats"] + 1):  # the first solve warms up allocators and caches
            if ranks > 1:
                dist.barrier()
            runs.append(_one_solve(system, clock, window, ranks > 1))
        runs = runs[1:]
        row = {"layout": spec["layout"], "processes": ranks, "threads_per_process": spec["threads"],
               "shard": "window", "steps": steps, "window": window, "samples": count,
               "iterations": runs[0]["iterations"]}
        for key in ("ms_per_iteration", "model_ms_per_iteration", "evaluate_ms_per_iteration",
                    "other_ms_per_iteration"):
            row[key] = round(statistics.median(r[key] for r in runs), 3)
        rows.append(row)
        samples[f"{steps}-{window}-{count}"] = runs[0]["sample"]
        if ranks > 1:  # sample sharding of the same problem, for the planner's trade-off
            times = []
            for _ in range(spec["repeats"] + 1):
                dist.barrier()
                started = time.perf_counter()
                solution = solve_distributed(system, "taa", shard="samples", window=window, tol=1e-3)
                times.append(time.perf_counter() - started)
            seconds = statistics.median(times[1:])
            rows.append({"layout": spec["layout"], "processes": ranks, "threads_per_process": spec["threads"],
                         "shard": "samples", "steps": steps, "window": window, "samples": count,
                         "iterations": solution.iterations,
                         "ms_per_iteration": round(1e3 * seconds / solution.iterations, 3),
                         "solve_ms": round(1e3 * seconds, 1)})
    if rank == 0:
        torch.save({"rows": rows, "samples": samples}, spec["out"])
    if ranks > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(spec: dict[str, Any], processes: int) -> dict[str, Any]:
    """Run one layout as ``processes`` local processes (torchrun's env vars) and load rank 0's rows."""
    port, procs = _free_port(), []
    for rank in range(processes):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(processes), OMP_NUM_THREADS=str(spec["threads"]))
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env))
    for proc in procs:
        if proc.wait(timeout=1800) != 0:
            raise SystemExit(f"layout {spec['layout']}: a worker exited with {proc.returncode}")
    return torch.load(spec["out"])


def measure_cpu(repeats: int) -> dict[str, Any]:
    """Part 1: the three layouts on this machine."""
    model = "digits" if DIGITS_WEIGHTS.is_file() else "gmm"
    cores = os.cpu_count() or 1
    layouts = [("1 process x 1 thread", 1, 1), (f"1 process x {cores} threads", 1, cores),
               (f"{cores} processes x 1 thread (gloo)", cores, 1)]
    rows, samples = [], {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for index, (label, processes, threads) in enumerate(layouts):
            spec = {"layout": label, "threads": threads, "model": model, "configs": CPU_CONFIGS[model],
                    "repeats": repeats, "out": str(Path(tmp) / f"layout{index}.pt")}
            result = _launch(spec, processes)
            rows += result["rows"]
            samples[label] = result["samples"]
            summary = [(r["shard"], r["window"], r["samples"], r["ms_per_iteration"]) for r in result["rows"]]
            print(label, summary, flush=True)
    single, multi = samples[layouts[0][0]], samples[layouts[2][0]]
    identical = {key: bool(torch.equal(single[key], multi[key])) for key in single}
    max_diff = {key: float((single[key] - multi[key]).abs().max()) for key in single}
    return {"model": model, "model_note": "" if model == "digits" else
            "the digits UNet weights were not there when this ran; the gmm reference was measured instead",
            "cpu": platform.processor() or platform.machine(), "cores": cores, "torch": torch.__version__,
            "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "rows": rows, "window_sharded_equals_one_process": identical, "max_abs_difference": max_diff}


# -- part 2: the 8-GPU model -----------------------------------------------------------------------

#: Assumptions of the model, stated once and written to the JSON.
ASSUMPTIONS = {
    "gpu": "one node, 1/2/4/8 x NVIDIA H200 (the card of the latency curves), NVLink between GPUs",
    "latency": "t(b): CUDA-graph latency at model batch b, linear interpolation between measured "
               "batches, linear extrapolation with the last per-sample cost beyond them",
    "cfg": "classifier-free guidance doubles the model batch inside the denoiser: a rank with c rows "
           "runs batch 2c (sd15-unet, dit-xl2-256, guidance 4.0 as in the ParaTAA settings); the small "
           "models are unconditional",
    "all_gather": "per iteration 2 x 25 us latency (status flags + outputs) plus the gathered fp16 "
                  "outputs w x D x 2 bytes x (g-1)/g at 100 GB/s effective (NVLink bus bandwidth is "
                  "several times higher: conservative)",
    "driver": "1.0 ms per parallel iteration of driver + TAA work (eager PyTorch, about 100 small "
              "kernels); 0 for the sequential baseline, whose step is captured in the CUDA graph",
    "baseline": "sequential sampling with CUDA graphs: T x t(c), c = 2 with guidance else 1",
    "iterations": "parallel iterations do not depend on the number of GPUs (window sharding is "
                  "bit-identical to one GPU for a batch-invariant model); windows < T use the "
                  "published count at w = T scaled by fpsolve's gmm ratio I(w) / I(T)",
}
ALPHA_MS, BANDWIDTH_BYTES_PER_MS, DRIVER_MS = 0.025, 100e9 / 1e3, 1.0

#: model -> (state size D, guidance factor c, steps T, iterations at w = T, source of that count)
SCENARIOS = [
    ("sd15-unet", 4 * 64 * 64, 2, 50, 15.5, "ParaTAA reference runs, SD T=50 k=20 m=2: 13-18 (mid)"),
    ("sd15-unet", 4 * 64 * 64, 2, 100, 7, "ParaTAA paper: SD v1.5 DDIM-100 in 7 parallel steps"),
    ("dit-xl2-256", 4 * 32 * 32, 2, 100, 10, "fpsolve gmm toy, TAA m=2 T=100 (proxy; paper: 4-14x fewer)"),
    ("unet-16px-1M", 1 * 16 * 16, 1, 100, 10, "fpsolve gmm toy, TAA m=2 T=100 (proxy)"),
    ("unet-cifar32-36M", 3 * 32 * 32, 1, 100, 10, "fpsolve gmm toy, TAA m=2 T=100 (proxy)"),
    ("dit-s2-256", 4 * 32 * 32, 1, 100, 10, "fpsolve gmm toy, TAA m=2 T=100 (proxy)"),
]
GPUS = (1, 2, 4, 8)


def _latency_curves() -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {}
    for name in ("gpu-batch-scaling-h200-cudagraph.json", "batch_scaling_small_graph.json"):
        for row in json.loads((DATA / name).read_text()):
            curves.setdefault(row["model"], []).append((int(row["batch"]), float(row["ms"])))
    return {model: sorted(points) for model, points in curves.items()}


def latency(curve: list[tuple[int, float]], batch: int) -> float:
    """t(batch) in ms from measured points: linear in between, per-sample slope beyond the last."""
    if batch <= curve[0][0]:
        return curve[0][1]
    for (b0, t0), (b1, t1) in zip(curve, curve[1:], strict=False):
        if batch <= b1:
            return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
    (b0, t0), (b1, t1) = curve[-2], curve[-1]
    return t1 + (t1 - t0) / (b1 - b0) * (batch - b1)


def gmm_window_iterations(steps: int, windows: list[int], seeds: int = 5) -> dict[int, float]:
    """Median TAA iterations on the gmm toy (DDIM, tol 1e-3) for each window: measured, any machine."""
    ref = load_reference("gmm")
    sampler = fpsolve.samplers.DDIM(alphas_cumprod=ref.alphas_cumprod, timesteps=spaced_timesteps(steps))
    counts = {}
    for window in windows:
        runs = []
        for seed in range(seeds):
            system = fpsolve.TriangularSystem(sampler=sampler, denoiser=ref.denoiser, shape=ref.shape,
                                              generator=torch.Generator().manual_seed(seed))
            runs.append(fpsolve.solve(system, "taa", window=window, tol=1e-3).iterations)
        counts[window] = statistics.median(runs)
    return counts


def speedup_model() -> dict[str, Any]:
    """Part 2: predicted ms per iteration and speedup on 1/2/4/8 GPUs, per model and window."""
    curves = _latency_curves()
    ratios: dict[int, dict[int, float]] = {}
    rows = []
    for model, size, cfg, steps, base_iters, source in SCENARIOS:
        if steps not in ratios:
            windows = [steps, steps // 2, steps // 4, steps // 8]
            measured = gmm_window_iterations(steps, windows)
            ratios[steps] = {w: measured[w] / measured[steps] for w in windows}
        baseline = steps * latency(curves[model], cfg)
        for window, ratio in ratios[steps].items():
            iterations = base_iters * ratio
            cells = {}
            for gpus in GPUS:
                compute = latency(curves[model], cfg * math.ceil(window / gpus))
                moved = window * size * 2 * (gpus - 1) / gpus  # fp16 bytes each rank receives
                gather = 0.0 if gpus == 1 else 2 * ALPHA_MS + moved / BANDWIDTH_BYTES_PER_MS
                per_iter = compute + gather + DRIVER_MS
                cells[gpus] = {"ms_per_iteration": round(per_iter, 2), "compute_ms": round(compute, 2),
                               "all_gather_ms": round(gather, 3), "total_ms": round(per_iter * iterations, 1),
                               "speedup": round(baseline / (per_iter * iterations), 2)}
            rows.append({"model": model, "steps": steps, "cfg": cfg == 2, "window": window,
                         "iterations": round(iterations, 1), "iterations_source": source,
                         "iterations_window_ratio": round(ratio, 3), "sequential_ms": round(baseline, 1),
                         "gpus": cells})
    return {"assumptions": ASSUMPTIONS, "gmm_window_ratios": ratios, "rows": rows}


# -- report ----------------------------------------------------------------------------------------


def model_table(model: dict[str, Any]) -> list[str]:
    """The speedup model as Markdown rows."""
    per_iter = " | ".join(f"{g} GPU ms/iter" for g in GPUS)
    speedups = " | ".join(f"{g} GPU speedup" for g in GPUS)
    lines = [f"| model | T | CFG | window | iterations | sequential ms | {per_iter} | {speedups} |",
             "|" + "---|" * (6 + 2 * len(GPUS))]
    for row in model["rows"]:
        cells = {int(g): cell for g, cell in row["gpus"].items()}  # JSON turns the keys into strings
        times = " | ".join(f"{cells[g]['ms_per_iteration']:g}" for g in GPUS)
        gains = " | ".join(f"{cells[g]['speedup']:.2f}x" for g in GPUS)
        cfg = "yes" if row["cfg"] else "no"
        lines.append(f"| {row['model']} | {row['steps']} | {cfg} | {row['window']} | {row['iterations']:g} | "
                     f"{row['sequential_ms']:g} | {times} | {gains} |")
    return lines


def measured_table(measured: dict[str, Any]) -> list[str]:
    """The CPU measurement as Markdown rows."""
    lines = ["| layout | shard | T | window | N | iterations | ms/iter | model ms/iter | evaluate ms/iter "
             "| other ms/iter |", "|" + "---|" * 10]
    for r in measured["rows"]:
        extra = " | ".join(str(r.get(key, "")) for key in
                           ("model_ms_per_iteration", "evaluate_ms_per_iteration", "other_ms_per_iteration"))
        lines.append(f"| {r['layout']} | {r['shard']} | {r['steps']} | {r['window']} | {r['samples']} | "
                     f"{r['iterations']} | {r['ms_per_iteration']:g} | {extra} |")
    return lines


def write_report(measured: dict[str, Any] | None, model: dict[str, Any], seconds: float) -> None:
    """docs/benchmarks/distributed.json (everything) and distributed.md (the tables)."""
    out = ROOT / "docs" / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed.json").write_text(json.dumps({"measured": measured, "model": model}, indent=1) + "\n")
    lines = ["# Distributed scaling", "",
             f"Regenerate: `python benchmarks/distributed_scaling.py` ({seconds:.0f} s).", ""]
    if measured is not None:
        note = f" ({measured['model_note']})" if measured["model_note"] else ""
        load = measured.get("load_average_1min", ["?", "?"])
        same = ", ".join(f"T-w-N {k}: {v}" for k, v in measured["window_sharded_equals_one_process"].items())
        lines += ["## Measured: CPU processes (gloo)", "",
                  f"Machine: {measured['cores']}-core CPU ({measured['cpu']}), no GPU, torch "
                  f"{measured['torch']}, shared with other jobs (1-minute load average "
                  f"{load[0]} before, {load[1]} after). "
                  f"Model: **{measured['model']}**{note}. DDIM, TAA m=2 k=T, tol 1e-3; median per-iteration "
                  "times of the timed solves after a warm-up (model = inside the denoiser on rank 0; "
                  "evaluate = denoiser + the two all_gathers; other = driver and solver).",
                  "", *measured_table(measured), "",
                  f"Window-sharded samples equal the one-process samples bit for bit: {same}.", ""]
    ratios = "; ".join(f"T={t}: " + ", ".join(f"w={w}: {v:.2f}" for w, v in r.items())
                       for t, r in model["gmm_window_ratios"].items())
    sources = "; ".join(sorted({f"{r['model']} T={r['steps']}: {r['iterations_source']}"
                                for r in model["rows"] if r["window"] == r["steps"]}))
    lines += ["## Modelled: 8 GPUs (a model, not a measurement)", "",
              "Predicted wall time per parallel iteration with the window split over g GPUs, "
              "t(c ceil(w/g)) + all_gather + driver, times the iteration count, against the CUDA-graph "
              "sequential baseline T t(c). Assumptions:", "",
              *[f"* **{k}**: {v}" for k, v in model["assumptions"].items()], "",
              f"Iteration inputs: {sources}. Window ratios I(w)/I(T) measured by fpsolve on the gmm toy: "
              f"{ratios}.", "", *model_table(model)]
    (out / "distributed.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed solves per config (after a warm-up)")
    parser.add_argument("--model-only", action="store_true", help="skip the CPU measurement")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    started = time.perf_counter()
    previous = ROOT / "docs" / "benchmarks" / "distributed.json"
    if args.model_only:  # keep the last measurement
        measured = json.loads(previous.read_text())["measured"] if previous.is_file() else None
    else:
        measured = measure_cpu(args.repeats)
    model = speedup_model()
    write_report(measured, model, time.perf_counter() - started)
    print("\n".join(model_table(model)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
