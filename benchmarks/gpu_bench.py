"""GPU wall clock: fpsolve's parallel solve against the tuned sequential loop (issue 6).

One script, one call on a lent H100/H200 (about 5-7 minutes; ``--budget-s`` skips what does not
fit and keeps what was measured):

    python benchmarks/gpu_bench.py                      # CUDA if present; writes $OUT or docs/benchmarks
    python benchmarks/gpu_bench.py --tiny --device cpu  # tiny configs, < 1 minute, for tests

Models (DDIM, eta 0; model inputs fp16 on CUDA, solver state fp32):

* ``digits``: the trained digits UNet (``fpsolve.models.load_reference("digits")``), T = 100:
  real iteration counts. Without its weights, a random UNet of the same architecture, and every
  iteration count it gives is labelled as not from a trained model.
* ``sd15``: a random-weight UNet2DConditionModel in the SD 1.x configuration, 4x64x64 latents,
  classifier-free guidance (two rows per sample), T = 50.
* ``dit``: a random-weight DiTTransformer2DModel (diffusers default = DiT-XL/2, 4x32x32), class
  guidance, T = 100.

For each model: the latency ``t(B)`` of one denoiser call, eager and CUDA-graph; the sequential
loop (``fpsolve.solve(..., "sequential")``, eager and graph, and a hand-written graph loop with no
host synchronisation: the honest baseline); TAA at fixed windows and at ``window="auto"``. Per
configuration: median wall time over ``--runs`` runs after a warm-up (CUDA events around the
solve), iterations, peak memory, and the share of the wall time spent outside denoiser calls (each
call timed with its own CUDA events). Random-weight models do not converge like trained ones, so
for them the script measures the cost of an iteration at each window (a few forced iterations)
and reports ``iterations measured on the digits model at the same T and window`` x ``that cost``,
labelled as an estimate. A sync audit (``torch.cuda.set_sync_debug_mode``) counts host
synchronisations per iteration.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

import fpsolve
from fpsolve.gpu import (
    CUDAGraphDenoiser,
    DeviceTimer,
    IterationModel,
    LatencyTable,
    TimedDenoiser,
    forget_latencies,
    forget_observations,
    measure_latency,
    plan_window,
    remember_latency,
)
from fpsolve.models import spaced_timesteps
from fpsolve.stopping import RMS

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-3


# -- configuration ----------------------------------------------------------------------------------


@attrs.define(frozen=True)
class Settings:
    """What one run of the script measures."""

    device: torch.device
    tiny: bool
    runs: int
    models: tuple[str, ...]
    samples: int
    budget_s: float
    out: Path

    @property
    def modes(self) -> tuple[str, ...]:
        """Eager and CUDA graphs on CUDA; on a CPU the graph wrapper is a pass-through, so eager only."""
        return ("eager", "cudagraph") if self.device.type == "cuda" else ("eager",)

    @property
    def warmup(self) -> int:
        """Untimed runs before the timed ones (none in --tiny: it checks the plumbing, not speed)."""
        return 0 if self.tiny else 1


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


class Budget:
    """Wall-clock budget of the whole script: later configurations are skipped, not half-run."""

    def __init__(self, seconds: float):
        self.seconds, self.started = seconds, time.perf_counter()

    @property
    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.perf_counter() - self.started

    def left(self) -> bool:
        """Whether there is time for another configuration."""
        return self.elapsed < self.seconds


# -- models ---------------------------------------------------------------------------------------


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
    from fpsolve.models import digits

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
        fpsolve.models.linear_alphas_cumprod(),
        steps,
        dtype,
        False,
        f"DiTTransformer2DModel {'(tiny)' if settings.tiny else 'default config (DiT-XL/2)'}, "
        "random weights, class guidance 4 (2 rows per sample)",
    )


def model_dtype(settings: Settings) -> torch.dtype:
    """fp16 model inputs on CUDA; fp32 on a CPU (where half-precision convolutions are slow)."""
    return torch.float16 if settings.device.type == "cuda" else torch.float32


# -- measuring ---------------------------------------------------------------------------------------


def make_system(
    spec: ModelSpec, denoiser: Any, settings: Settings, steps: int | None = None
) -> fpsolve.TriangularSystem:
    """The sampling problem of ``spec`` with ``denoiser`` (same noise every time)."""
    steps = steps or spec.steps
    sampler = fpsolve.samplers.DDIM(alphas_cumprod=spec.alphas_cumprod, timesteps=spaced_timesteps(steps))
    return fpsolve.TriangularSystem(
        sampler=sampler,
        denoiser=denoiser,
        shape=spec.shape,
        batch=settings.samples if settings.samples > 1 else None,
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float32,
        device=settings.device,
        model_dtype=spec.model_dtype,
    )


def tight_sequential(system: fpsolve.TriangularSystem) -> torch.Tensor:
    """The sequential sampler as a bare loop: no validation, no per-step host synchronisation."""
    states = torch.empty_like(system.flat_noise)
    states[0] = system.flat_noise[0]
    outputs = torch.zeros(
        system.num_steps, system.num_samples, system.state_size, dtype=system.dtype, device=system.device
    )
    with torch.no_grad():
        for row in range(1, system.num_steps + 1):
            x, t = system.model_inputs(states[row - 1 : row], [row - 1])
            outputs[row - 1] = system.denoiser(x, t).reshape(system.num_samples, system.state_size)
            states[row] = system.first_order_rhs(states, outputs, row, row)[0]
    return system.unflatten(states)


def peak_reset(device: torch.device) -> None:
    """Start a peak-memory measurement."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated memory since :func:`peak_reset`, GiB (None off CUDA)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def timed(
    run: Callable[[], Any], timer: TimedDenoiser, settings: Settings, warmup: int | None = None
) -> dict[str, Any]:
    """Median wall time of ``run`` over ``settings.runs`` runs after ``warmup`` runs (default
    ``settings.warmup``), with the time spent inside denoiser calls, and peak memory."""
    result = None
    for _ in range(settings.warmup if warmup is None else warmup):
        result = run()
    walls, inside = [], []
    peak_reset(settings.device)
    for _ in range(settings.runs):
        timer.reset()
        with DeviceTimer(settings.device) as clock:
            result = run()
        walls.append(clock.seconds)
        inside.append(timer.seconds)
    median = statistics.median(walls)
    model = statistics.median(inside)
    return {
        "median_s": median,
        "min_s": min(walls),
        "max_s": max(walls),
        "runs": len(walls),
        "model_s": model,
        "outside_share": max(0.0, 1 - model / median),
        "calls": timer.calls,
        "peak_gib": peak_gib(settings.device),
        "result": result,
    }


def count_syncs(run: Callable[[], Any], device: torch.device) -> dict[str, Any] | None:
    """Host synchronisations during ``run`` (CUDA sync debug mode), with their top source lines."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return {"syncs": len(syncs), "top": where.most_common(6), "result": result}


def windows_for(steps: int, tiny: bool = False) -> list[int]:
    """Fixed windows to compare: T, T/2, T/4, T/8 and 4 (at least 2); --tiny: T and 2."""
    chosen = (steps, 2) if tiny else (steps, steps // 2, steps // 4, steps // 8, 4)
    return sorted({w for w in chosen if 2 <= w <= steps})


def latency_rows(
    spec: ModelSpec, denoisers: dict[str, Any], settings: Settings, tables: dict[str, LatencyTable]
) -> list[dict[str, Any]]:
    """``t(B)`` of each mode's denoiser at the batch sizes the windows (and auto's grid) use; the
    tables are stored in ``tables`` by mode."""
    rows = []
    grid = [1, *windows_for(spec.steps, settings.tiny)]
    w = 2
    while w < spec.steps and not settings.tiny:  # window="auto" measures powers of two: cover them
        grid.append(w)
        w *= 2
    sizes = sorted({settings.samples * w for w in grid})
    timesteps = spaced_timesteps(spec.steps)
    repeats, warmup = (1, 1) if settings.tiny else (7, 2)
    for mode in settings.modes:
        table = measure_latency(
            denoisers[mode],
            shape=spec.shape,
            dtype=spec.model_dtype,
            device=settings.device,
            batches=sizes,
            timesteps=timesteps,
            repeats=repeats,
            warmup=warmup,
        )
        tables[mode] = table
        for batch, seconds in table.seconds.items():
            rows.append({"model": spec.name, "mode": mode, "batch": batch, "ms": round(seconds * 1e3, 4)})
        if table.max_batch is not None:
            rows.append(
                {
                    "model": spec.name,
                    "mode": mode,
                    "batch": None,
                    "ms": None,
                    "note": f"out of memory above batch {table.max_batch}",
                }
            )
    return rows


def row(
    spec: ModelSpec,
    method: str,
    mode: str,
    window: int | None,
    stats: dict[str, Any],
    *,
    iterations: float,
    iterations_source: str,
    samples: int,
    estimated: bool = False,
    note: str = "",
) -> dict[str, Any]:
    """One line of the report."""
    out = {
        "model": spec.name,
        "method": method,
        "mode": mode,
        "window": window,
        "samples": samples,
        "iterations": iterations,
        "iterations_source": iterations_source,
        "estimated": estimated,
        "note": note,
    }
    out.update({k: v for k, v in stats.items() if k != "result"})
    if iterations:
        out["per_iteration_s"] = (
            stats["median_s"] / iterations if not estimated else stats.get("per_iteration_s")
        )
    return out


class ModelBench:
    """All measurements of one model."""

    def __init__(
        self,
        spec: ModelSpec,
        settings: Settings,
        budget: Budget,
        digits_iterations: Callable[[int, int], tuple[int, str]],
    ):
        self.spec, self.settings, self.budget = spec, settings, budget
        self.digits_iterations = digits_iterations
        self.eager = TimedDenoiser(spec.denoiser, settings.device)
        self.graph_model = CUDAGraphDenoiser(spec.denoiser, spec.shape, spec.model_dtype, settings.device)
        self.graph = TimedDenoiser(self.graph_model, settings.device)
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.tables: dict[str, LatencyTable] = {}

    def measure_latency(self) -> list[dict[str, Any]]:
        """Latency tables of both modes, handed to window="auto" so it does not measure again."""
        spec = self.spec
        rows = latency_rows(
            spec, {"eager": spec.denoiser, "cudagraph": self.graph_model}, self.settings, self.tables
        )
        for mode, timer in (("eager", self.eager), ("cudagraph", self.graph)):
            if mode in self.tables:  # the timing wrapper adds microseconds: same curve
                remember_latency(timer, spec.shape, spec.model_dtype, self.settings.device, self.tables[mode])
        return rows

    def system(self, graphs: bool) -> fpsolve.TriangularSystem:
        """The model's problem with the eager or the graph denoiser (timed)."""
        return make_system(self.spec, self.graph if graphs else self.eager, self.settings)

    def go(self, label: str) -> bool:
        """Whether to run configuration ``label`` (False, and noted, when the budget is spent)."""
        if self.budget.left():
            print(f"[{self.budget.elapsed:6.1f}s] {self.spec.name}: {label}", flush=True)
            return True
        self.skipped.append(label)
        return False

    def sequential(self) -> dict[str, float]:
        """Sequential loops; returns their median wall times by label."""
        spec, steps, baselines = self.spec, self.spec.steps, {}
        for mode in self.settings.modes:
            graphs = mode == "cudagraph"
            system, timer = self.system(graphs), (self.graph if graphs else self.eager)
            reference = None
            if self.go(f"sequential solve ({mode})"):
                stats = timed(lambda s=system: fpsolve.solve(s, "sequential"), timer, self.settings)
                self.rows.append(
                    row(
                        spec,
                        "sequential (fpsolve.solve)",
                        mode,
                        None,
                        stats,
                        samples=self.settings.samples,
                        iterations=steps,
                        iterations_source="T",
                    )
                )
                baselines[f"solve-{mode}"] = stats["median_s"]
                reference = stats["result"].sample
                if not stats["result"].converged:
                    self.rows[-1]["note"] = f"INVALID: {stats['result'].message}"
            if self.go(f"sequential tight loop ({mode})"):
                stats = timed(lambda s=system: tight_sequential(s), timer, self.settings)
                note = ""
                if reference is not None:
                    same = torch.equal(stats["result"][-1], reference)
                    note = "same sample as fpsolve.solve" if same else "DIFFERENT sample from fpsolve.solve"
                self.rows.append(
                    row(
                        spec,
                        "sequential (tight loop, no host sync)",
                        mode,
                        None,
                        stats,
                        samples=self.settings.samples,
                        iterations=steps,
                        iterations_source="T",
                        note=note,
                    )
                )
                baselines[f"tight-{mode}"] = stats["median_s"]
        return baselines

    def forced_iteration_cost(self, window: int, graphs: bool, iterations: int = 3) -> dict[str, Any]:
        """Wall time of the first ``iterations`` TAA iterations at ``window`` (tolerance unreachable)."""
        system, timer = self.system(graphs), (self.graph if graphs else self.eager)
        rule = RMS(tol1=1e-30, tol2=0.0)  # unreachable: the cap ends the solve (status MAX_ITERS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fpsolve.NotConvergedWarning)
            stats = timed(
                lambda: fpsolve.solve(system, "taa", window=window, stopping=rule, max_iters=iterations),
                timer, self.settings,
            )
        stats["per_iteration_s"] = stats["median_s"] / iterations
        solution = stats["result"]
        if solution.status is not fpsolve.Status.MAX_ITERS or solution.iterations != iterations:
            # e.g. NONFINITE: a random fp16 model overflowed, and the time is not that of `iterations`
            stats["note"] = f"INVALID cost: {solution.status.name} after {solution.iterations} iterations"
        return stats

    def parallel_measured(self) -> None:
        """TAA with real convergence (the trained model): fixed windows and auto."""
        spec = self.spec
        for mode in self.settings.modes:
            graphs = mode == "cudagraph"
            system, timer = self.system(graphs), (self.graph if graphs else self.eager)
            for window in [*windows_for(spec.steps, self.settings.tiny), "auto"]:
                if not self.go(f"taa window={window} ({mode})"):
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a sequential fallback is reported in the row
                    stats = timed(
                        lambda s=system, w=window: fpsolve.solve(s, "taa", window=w, tol=TOL),
                        timer,
                        self.settings,
                        warmup=None if window != "auto" or self.settings.tiny else 2,
                    )
                solution = stats["result"]
                note = "" if solution.converged else solution.message
                if window == "auto":
                    plan = solution.plan
                    note = (
                        f"auto chose {'sequential' if plan.use_sequential else f'window {plan.window}'}: "
                        f"{plan.reason}"
                    )
                self.rows.append(
                    row(
                        spec,
                        f"taa window={window}",
                        mode,
                        solution.window,
                        stats,
                        samples=self.settings.samples,
                        iterations=solution.iterations,
                        iterations_source="measured" if spec.trained else "measured, untrained model",
                        note=note,
                    )
                )

    def parallel_estimated(self) -> None:
        """Random weights: cost per iteration measured, iterations from the digits model."""
        spec, steps = self.spec, self.spec.steps
        costs: dict[tuple[str, int], float] = {}
        for mode in self.settings.modes:
            graphs = mode == "cudagraph"
            for window in windows_for(steps, self.settings.tiny):
                if not self.go(f"cost per iteration, window={window} ({mode})"):
                    continue
                stats = self.forced_iteration_cost(window, graphs)
                costs[(mode, window)] = stats["per_iteration_s"]
                iterations, source = self.digits_iterations(steps, window)
                estimate = dict(stats, median_s=iterations * stats["per_iteration_s"], min_s=None, max_s=None)
                self.rows.append(
                    row(
                        spec,
                        f"taa window={window} (estimate)",
                        mode,
                        window,
                        estimate,
                        samples=self.settings.samples,
                        iterations=iterations,
                        iterations_source=source,
                        estimated=True,
                        note="wall = iterations x measured cost of an iteration at this window",
                    )
                )
        self.auto_estimated(costs)

    def auto_estimated(self, costs: dict[tuple[str, int], float]) -> None:
        """The planner on the measured graph latency and the digits iteration counts."""
        spec, steps = self.spec, self.spec.steps
        mode = self.settings.modes[-1]
        if mode not in self.tables or not self.go(f"window=auto plan ({mode})"):
            return
        windows = windows_for(steps, self.settings.tiny)
        observed = [(w, self.digits_iterations(steps, w)[0]) for w in windows]
        table = self.tables[mode]
        overheads = [
            costs[(mode, w)] - table.seconds.get(self.settings.samples * w, 0.0)
            for w in windows
            if (mode, w) in costs
        ]
        plan = plan_window(
            table.seconds,
            steps,
            self.settings.samples,
            IterationModel.observed(steps, observed),
            iteration_overhead=max(0.0, statistics.median(overheads)) if overheads else 0.0,
        )
        if plan.use_sequential:
            note, wall = f"auto chose sequential: {plan.reason}", None
        else:
            cost = (
                costs.get((mode, plan.window))
                or self.forced_iteration_cost(plan.window, mode == "cudagraph")["per_iteration_s"]
            )
            wall = self.digits_iterations(steps, plan.window)[0] * cost
            note = f"auto chose window {plan.window}: {plan.reason}"
        self.rows.append(
            {
                "model": spec.name,
                "method": "taa window=auto (estimate)",
                "mode": mode,
                "window": None if plan.use_sequential else plan.window,
                "samples": self.settings.samples,
                "median_s": wall,
                "iterations": plan.iterations,
                "estimated": True,
                "iterations_source": "digits model at the same T",
                "note": note,
                "predicted_s": plan.predicted_seconds,
            }
        )

    def sync_audit(self) -> list[dict[str, Any]]:
        """Host synchronisations per iteration of a TAA solve and of the sequential solve (graphs)."""
        out = []
        if self.settings.device.type != "cuda" or not self.go("sync audit"):
            return out
        system = self.system(True)
        # At most 5 TAA iterations: a random-weight model may need many, and 5 show the pattern.
        for label, run in (
            (
                "taa window=T",
                lambda: fpsolve.solve(system, "taa", window=self.spec.steps, tol=TOL, max_iters=5),
            ),
            ("sequential (fpsolve.solve)", lambda: fpsolve.solve(system, "sequential")),
            ("sequential (tight loop)", lambda: tight_sequential(system)),
        ):
            run()  # captures any new graph sizes first: a capture's own synchronisations do not count
            audit = count_syncs(run, self.settings.device)
            result = audit.pop("result")
            iterations = getattr(result, "iterations", self.spec.steps)
            out.append(
                {
                    "model": self.spec.name,
                    "run": label,
                    "iterations": iterations,
                    "syncs": audit["syncs"],
                    "syncs_per_iteration": round(audit["syncs"] / iterations, 2),
                    "top": audit["top"],
                }
            )
        return out


# -- report --------------------------------------------------------------------------------------------


def fmt(value: Any, scale: float = 1.0, digits: int = 3) -> str:
    """A number for the markdown table ('-' when absent)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        value *= scale
        return f"{value:.0f}" if abs(value) >= 10**digits else f"{value:.{digits}g}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown page."""
    meta = report["meta"]
    lines = [
        "# GPU wall clock: fpsolve against the tuned sequential loop",
        "",
        f"Measured on {meta['device']} ({meta['torch']}, diffusers {meta['diffusers']}), {meta['date']}, "
        f"{meta['seconds']:.0f} s. Command: `{meta['command']}`.",
        "",
        "Wall time: median over the runs after a warm-up (CUDA events around the whole solve). "
        "`outside` is the share of the wall time spent outside denoiser calls (each call timed with "
        "its own events). Speedups are against the sequential tight loop (no host synchronisation "
        "per step; with CUDA graphs where measured), the honest baseline. Rows whose method says "
        "(estimate) are random-weight models: iterations measured on the digits model at the same T "
        "and window x the measured cost of one iteration at that window (the first 3 iterations "
        "of a solve that cannot converge), so they are labelled estimates, not measured wall times.",
        "",
    ]
    for name, model in report["models"].items():
        lines += [
            f"## {name}",
            "",
            model["note"],
            "",
            "| method | mode | window | iterations | wall ms | ms / iteration | outside | peak GiB | "
            "speedup | note |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        base = model["baselines"].get("tight-cudagraph") or model["baselines"].get("tight-eager")
        for r in model["rows"]:
            speed = base / r["median_s"] if base and r.get("median_s") else None
            cells = [
                r["method"],
                r["mode"],
                fmt(r["window"]),
                f"{fmt(r.get('iterations'))} ({r.get('iterations_source', '')})",
                fmt(r.get("median_s"), 1e3),
                fmt(r.get("per_iteration_s"), 1e3),
                f"{fmt(r.get('outside_share'), 100, 2)}%",
                fmt(r.get("peak_gib")),
                f"{fmt(speed)}x",
                r.get("note", ""),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if model["skipped"]:
            lines += ["", "Skipped (budget): " + "; ".join(model["skipped"])]
        lines.append("")
    if report["latency"]:
        lines += ["## Latency of one denoiser call", "", "| model | mode | batch | ms |", "|---|---|---|---|"]
        lines += [
            f"| {r['model']} | {r['mode']} | {fmt(r['batch'])} | {fmt(r['ms'])} |" for r in report["latency"]
        ]
        lines.append("")
    if report["syncs"]:
        lines += [
            "## Host synchronisations",
            "",
            "| model | run | iterations | syncs | per iteration | top sources |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['run']} | {r['iterations']} | {r['syncs']} | {r['syncs_per_iteration']} | "
            f"{', '.join(f'{k} x{v}' for k, v in r['top'])} |"
            for r in report["syncs"]
        ]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path) -> None:
    """Write gpu.json and gpu.md (after every model, so a timeout keeps what was measured)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu.md").write_text(markdown(report))


# -- main -------------------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> Settings:
    """Command-line settings."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models and few steps (CPU tests, < 1 minute)"
    )
    parser.add_argument(
        "--runs", type=int, default=None, help="timed runs per configuration (default 5; tiny 1)"
    )
    parser.add_argument(
        "--models", default="digits,sd15,dit", help="comma-separated subset of digits,sd15,dit"
    )
    parser.add_argument("--samples", type=int, default=1, help="samples per solve (default 1)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="skip configurations once this many seconds have passed (default 420)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default $OUT if set, else docs/benchmarks)"
    )
    args = parser.parse_args(argv)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    models = tuple(m for m in args.models.split(",") if m)
    unknown = set(models) - {"digits", "sd15", "dit"}
    if unknown:
        parser.error(f"unknown models: {sorted(unknown)}")
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "docs" / "benchmarks")
    runs = args.runs or (1 if args.tiny else 5)
    return Settings(device, args.tiny, runs, models, args.samples, args.budget_s, out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write the report; returns it."""
    settings = parse(argv)
    threads = torch.get_num_threads()
    if settings.tiny and settings.device.type == "cpu":
        # Tiny models gain nothing from more threads, and on a busy machine spinning threads
        # oversubscribe the cores (measured here: 20x slower with 2 threads than with 1).
        torch.set_num_threads(1)
    try:
        return run(settings, argv)
    finally:
        torch.set_num_threads(threads)


def run(settings: Settings, argv: list[str] | None) -> dict[str, Any]:
    """The measurements of :func:`main`."""
    budget = Budget(settings.budget_s)
    import diffusers

    report: dict[str, Any] = {
        "meta": {
            "device": torch.cuda.get_device_name(settings.device)
            if settings.device.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()})",
            "torch": f"torch {torch.__version__}"
            + (f", CUDA {torch.version.cuda}" if torch.version.cuda else ""),
            "diffusers": diffusers.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": "python benchmarks/gpu_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "tiny": settings.tiny,
            "runs": settings.runs,
            "samples": settings.samples,
            "tol": TOL,
            "seconds": 0.0,
        },
        "models": {},
        "latency": [],
        "syncs": [],
    }
    forget_latencies()
    forget_observations()
    digits_cache: dict[tuple[int, int], tuple[int, str]] = {}
    digits_spec: ModelSpec | None = None

    def digits_iterations(steps: int, window: int) -> tuple[int, str]:
        """TAA iterations of the digits model at T = steps and this window (measured once)."""
        nonlocal digits_spec
        if (steps, window) not in digits_cache:
            digits_spec = digits_spec or build_digits(settings, steps)
            system = make_system(digits_spec, digits_spec.denoiser, settings, steps)
            solution = fpsolve.solve(system, "taa", window=window, tol=TOL)
            source = "digits model" if digits_spec.trained else "digits model, UNTRAINED"
            digits_cache[(steps, window)] = (solution.iterations, f"{source}, T={steps}")
        return digits_cache[(steps, window)]

    builders = {
        "digits": lambda: build_digits(settings, 6 if settings.tiny else 100),
        "sd15": lambda: build_sd15(settings),
        "dit": lambda: build_dit(settings),
    }
    for name in settings.models:
        if not budget.left():
            report["models"][name] = {
                "note": "skipped: budget spent",
                "rows": [],
                "baselines": {},
                "skipped": [name],
            }
            continue
        spec = builders[name]()
        bench = ModelBench(spec, settings, budget, digits_iterations)
        if bench.go("latency"):
            report["latency"] += bench.measure_latency()
        baselines = bench.sequential()
        if spec.trained or name == "digits":
            bench.parallel_measured()
        else:
            bench.parallel_estimated()
        report["syncs"] += bench.sync_audit()
        report["models"][name] = {
            "note": spec.note,
            "steps": spec.steps,
            "rows": bench.rows,
            "baselines": baselines,
            "skipped": bench.skipped,
            "graph_sizes": list(bench.graph_model.captured_sizes),
            "graph_disabled": bench.graph_model.disabled_reason,
        }
        report["meta"]["seconds"] = budget.elapsed
        write(report, settings.out)
        del bench, spec
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    report["meta"]["seconds"] = budget.elapsed
    write(report, settings.out)
    print((settings.out / "gpu.md").read_text())
    return report


if __name__ == "__main__":
    main()
