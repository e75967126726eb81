"""Several GPUs and machines: shard a solve over the ranks of a ``torch.distributed`` group.

Two ways to use ``R`` ranks, each holding the whole model:

* **window sharding** (``fpsolve.solve(system, ..., distributed=True)``): every rank holds the
  whole, replicated solver state and runs the same driver loop. Each iteration's ONE batched
  model call (window positions x samples, flattened position-major) is cut into ``R``
  contiguous chunks whose sizes differ by at most one row; rank ``r`` evaluates chunk ``r``;
  the chunks are all-gathered (padded to the largest chunk, then trimmed) and concatenated in
  rank order, so every rank sees the same model outputs and makes the same update. The result
  is the single-process result, bit for bit, whenever the denoiser is *batch-invariant* (a row's
  output does not depend on which other rows share its batch; true of the built-in reference
  models on CPU, not guaranteed by GPU kernels, which pick algorithms by batch size).
* **sample sharding** (:func:`solve_distributed` with ``shard="samples"``): each rank solves a
  contiguous subset of the samples as its own system, with no communication until the results
  are gathered at the end. See :func:`solve_distributed` for exactly what that guarantees.

:func:`plan` chooses between them (``shard="auto"``). Faults never hang the job: a rank whose
chunk raises reports it to every rank (an ok/error flag is exchanged after each evaluation,
before the outputs), and every rank raises :class:`RankFailedError` naming the failing rank
and its exception. A rank that dies outright makes the others' collectives fail (gloo notices
the closed connection) or time out (the ``timeout`` of ``init_process_group``); that becomes a
:class:`DistributedError`. A bitwise checksum of the states each rank evaluates travels with the
flag, so ranks that drift apart (different arguments, threads, hardware) stop with an error
instead of silently returning different answers.
"""

from __future__ import annotations

import math
import time
from typing import Any

import attrs
import torch
import torch.distributed as dist

from .api import make_system, solve
from .control import Controller
from .errors import InvalidOptionError
from .evaluators.sharded import (
    DistributedError,
    RankFailedError,
    RankFailure,
    ShardedEvaluator,
    _all_gather_ints,
    _collective,
    _comm_device,
    _Group,
    _raise_failures,
    _resolve_group,
    chunk_bounds,
    sharded_evaluator,
)
from .solution import Solution
from .system import TriangularSystem
from .validators import as_int

__all__ = [
    "DistributedError",
    "RankFailedError",
    "RankFailure",
    "ShardPlan",
    "ShardedEvaluator",
    "chunk_bounds",
    "plan",
    "sharded_evaluator",
    "solve_distributed",
    "subset_system",
]

#: ``shard="auto"`` picks sample sharding only while its largest per-rank model batch stays
#: within this factor of window sharding's (sample counts that do not divide evenly idle ranks).
AUTO_SLACK = 1.25

@attrs.define(frozen=True)
class ShardPlan:
    """How :func:`solve_distributed` spreads a solve over the ranks (see :func:`plan`).

    Attributes:
        mode: ``"window"`` (split each model call) or ``"samples"`` (each rank its own samples).
        world_size: number of ranks.
        rows_per_rank: the largest per-rank model batch of a full-window iteration.
        sample_ranges: ``(start, stop)`` samples of each rank (``"samples"`` mode), else ``()``.
        reason: why this mode was chosen, in words.
    """

    mode: str
    world_size: int
    rows_per_rank: int
    sample_ranges: tuple[tuple[int, int], ...]
    reason: str


def plan(num_samples: int, window: int, world_size: int, *, shard: str = "auto") -> ShardPlan:
    """Choose window sharding or sample sharding for ``num_samples`` samples and ``window`` positions.

    The rule (``shard="auto"``): with ``N`` samples, window ``w`` and ``R`` ranks, window sharding
    gives each rank at most ``ceil(w N / R)`` model rows per iteration and costs two all_gathers
    per iteration; sample sharding gives at most ``w ceil(N / R)`` rows, needs no communication
    until the end, holds only ``N / R`` samples' state per rank and needs no more iterations
    than the whole batch (the stopping rule waits for the worst sample of a batch). So samples
    are sharded when every rank gets at least one sample (``N >= R``) and
    ``w ceil(N / R) <= AUTO_SLACK * ceil(w N / R)`` (always when ``R`` divides ``N``);
    otherwise the window is sharded. ``R = 1`` always plans ``"window"`` (nothing to split).

    Args:
        num_samples: ``N``, samples solved together.
        window: positions per iteration (the ``window`` option, or ``T`` when that is ``None``).
        world_size: ``R``.
        shard: ``"auto"``, ``"window"`` or ``"samples"`` (forces the mode; ``"samples"`` needs
            ``N >= R``).
    """
    samples = as_int("num_samples", num_samples, minimum=1)
    width = as_int("window", window, minimum=1)
    ranks = as_int("world_size", world_size, minimum=1)
    if shard not in ("auto", "window", "samples"):
        raise InvalidOptionError(f"shard must be 'auto', 'window' or 'samples'; got {shard!r}.")
    window_rows = math.ceil(width * samples / ranks)
    sample_rows = width * math.ceil(samples / ranks)
    if shard == "samples" and samples < ranks:
        raise InvalidOptionError(
            f"shard='samples' needs at least one sample per rank: {samples} samples for {ranks} ranks; "
            "use shard='window' (or 'auto'), or solve more samples."
        )
    if ranks == 1 or shard == "window":
        reason = "one rank: nothing to split" if ranks == 1 else "window sharding requested"
        return ShardPlan("window", ranks, window_rows, (), reason)
    if shard == "samples":
        reason = "sample sharding requested"
    elif samples < ranks:
        return ShardPlan("window", ranks, window_rows, (),
                         f"{samples} samples for {ranks} ranks: some rank would get none")
    elif sample_rows > AUTO_SLACK * window_rows:
        return ShardPlan("window", ranks, window_rows, (),
                         f"{samples} samples do not spread evenly over {ranks} ranks: sample sharding would "
                         f"give a rank {sample_rows} rows per iteration against {window_rows}")
    else:
        reason = (f"{samples} samples spread over {ranks} ranks ({sample_rows} rows per rank per iteration, "
                  f"window sharding {window_rows}) with no per-iteration communication")
    return ShardPlan("samples", ranks, sample_rows, tuple(chunk_bounds(samples, ranks)), reason)


# -- sample sharding -------------------------------------------------------------------------------


def subset_system(system: TriangularSystem, start: int, stop: int) -> TriangularSystem:
    """The system of samples ``start..stop-1`` of ``system``: same sampler, denoiser and noise.

    Solving it is what one rank does under sample sharding; it always has a batch axis.
    """
    samples = system.num_samples
    if not 0 <= start < stop <= samples:
        raise InvalidOptionError(
            f"subset_system needs 0 <= start < stop <= N = {samples}; got {start}, {stop}.")
    steps = system.num_steps + 1
    noise = system.flat_noise[:, start:stop].reshape(steps, stop - start, *system.shape)
    return TriangularSystem(sampler=system.sampler, denoiser=system.denoiser, shape=system.shape,
                            batch=stop - start, noise=noise, dtype=system.dtype, device=system.device,
                            model_dtype=system.model_dtype)


def _solve_samples(system: TriangularSystem, solver: Any, group: _Group, chosen: ShardPlan,
                   options: dict[str, Any]) -> Solution:
    started = time.perf_counter()
    start, stop = chosen.sample_ranges[group.rank]
    error: Exception | None = None
    local: Solution | None = None
    try:
        local = solve(subset_system(system, start, stop), solver, **options)
    except Exception as exc:  # reported to every rank, then re-raised there
        error = exc
    flat_device = system.flat_noise.device
    comm = _comm_device(group, flat_device)
    flags = _all_gather_ints(group, [0 if error is not None else 1], comm, "all_gather (status flags)")
    failed = [r for r, row in enumerate(flags) if row[0] == 0]
    if failed:
        _raise_failures(group, failed, error, lambda failing: "while solving its samples "
                        f"{chosen.sample_ranges[failing][0]}..{chosen.sample_ranges[failing][1] - 1}")
    assert local is not None  # no rank failed, so this one solved
    steps = system.num_steps + 1
    flat = local.trajectory.reshape(steps, stop - start, system.state_size)
    largest = chosen.sample_ranges[0][1] - chosen.sample_ranges[0][0]
    send = torch.zeros(steps, largest, system.state_size, dtype=system.dtype, device=comm)
    send[:, :stop - start] = flat.to(comm)
    received = [torch.empty_like(send) for _ in range(group.size)]
    _collective("all_gather (trajectories)", group, dist.all_gather, received, send)
    summaries: list[Any] = [None] * group.size
    _collective("all_gather_object (statistics)", group, dist.all_gather_object, summaries,
                local.without_states())
    parts = [local if rank == group.rank else
             summary.with_trajectory(buf[:, :b - a].to(flat_device).reshape(steps, b - a, *system.shape))
             for rank, (summary, buf, (a, b)) in enumerate(zip(summaries, received, chosen.sample_ranges,
                                                               strict=True))]
    labels = [f"rank {rank} (samples {bounds})" for rank, bounds in enumerate(chosen.sample_ranges)]
    return Solution.concatenate(parts, wall_time=time.perf_counter() - started, labels=labels)


def solve_distributed(system: TriangularSystem | Any, solver: Any = "taa", *, group: Any = True,
                      shard: str = "auto", **options: Any) -> Solution:
    """Solve over the ranks of ``group`` with window or sample sharding; every rank gets the result.

    Every rank calls it with the same arguments. ``shard="window"`` is exactly
    ``fpsolve.solve(system, solver, distributed=group, **options)``. ``shard="samples"`` has
    rank ``r`` solve samples ``plan(...).sample_ranges[r]`` alone and then all-gathers them.
    ``shard="auto"`` lets :func:`plan` choose.

    What sample sharding guarantees: samples ``a..b-1`` of the result are bit-identical to
    ``fpsolve.solve(subset_system(system, a, b), solver, **options).sample`` computed in a single
    process (same machine, threads and arguments). They are NOT in general identical to solving
    the whole batch at once: the stopping rule judges a window row on the worst sample of the
    batch, so a smaller batch may freeze rows at other iterations; both agree with the
    sequential sample to the tolerance, and exactly for ``solver="sequential"`` with a
    batch-invariant denoiser. The statistics: ``iterations`` is the most any rank needed (the
    wall-clock critical path), ``model_evals`` the sum over ranks, ``status`` the first rank's
    that did not converge, and ``residuals`` per iteration the worst entry over ranks still
    running (anchor: the least advanced rank; evaluations: summed).

    Args:
        system: a :class:`TriangularSystem` (or an object an adapter plugin turns into one).
        solver: as for :func:`fpsolve.solve`.
        group: ``True`` (default process group) or a ``torch.distributed.ProcessGroup``.
        shard: ``"auto"``, ``"window"`` or ``"samples"``; see :func:`plan`.
        **options: any other option of :func:`fpsolve.solve` (``window``, ``tol``, ...).
    """

    if "distributed" in options:
        raise InvalidOptionError(
            "solve_distributed takes group=..., not distributed=...; it always distributes.")
    system = make_system(system)
    resolved = _resolve_group(group)
    window = Controller(window=options.get("window")).window_for(system.num_steps)  # validates it
    chosen = plan(system.num_samples, window, resolved.size, shard=shard)
    if chosen.mode == "window":
        return solve(system, solver, distributed=group, **options)
    return _solve_samples(system, solver, resolved, chosen, options)
