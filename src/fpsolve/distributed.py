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
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
import torch.distributed as dist

from .driver import DriverConfig
from .errors import FpsolveError, InvalidOptionError, UnsupportedError
from .solution import ResidualTrace, Solution, Status
from .system import TriangularSystem

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

_INIT_HINT = (
    "call torch.distributed.init_process_group(backend='nccl' on GPUs or 'gloo' on CPUs, ...) on "
    "every rank first (torchrun sets the environment variables it reads), or pass distributed=None "
    "for a single-process solve"
)


class DistributedError(FpsolveError, RuntimeError):
    """A distributed solve cannot go on: no process group, ranks that disagree, a lost peer."""


@attrs.define(frozen=True)
class RankFailure:
    """What went wrong on one rank.

    Attributes:
        rank: the failing rank (in the process group used).
        type_name: the exception's class, qualified by module (``builtins.ValueError``).
        message: ``str(exception)``.
        where: ``file:line in function`` of the innermost frame that raised.
        traceback: the full formatted traceback, as text (it cannot travel as an object).
    """

    rank: int
    type_name: str
    message: str
    where: str
    traceback: str = attrs.field(repr=False)

    @classmethod
    def from_exception(cls, rank: int, error: BaseException) -> RankFailure:
        """Summarise ``error`` raised on ``rank``."""
        kind = type(error)
        name = kind.__qualname__
        if kind.__module__ != "builtins":
            name = f"{kind.__module__}.{name}"
        frames = traceback.extract_tb(error.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else "?"
        text = "".join(traceback.format_exception(kind, error, error.__traceback__))
        return cls(rank, name, str(error), where, text)


class RankFailedError(DistributedError):
    """One or more ranks raised; every rank of the group raises this same error.

    Attributes:
        failures: ``{rank: RankFailure}`` of every rank that raised, lowest rank first. On a
            failing rank the original exception is also chained as ``__cause__``.
    """

    def __init__(self, message: str, failures: dict[int, RankFailure]):
        super().__init__(message)
        self.failures = failures


# -- process group -------------------------------------------------------------------------------


@attrs.define(frozen=True)
class _Group:
    """A resolved process group: the handle torch wants (``None`` = default), rank, size."""

    handle: Any
    rank: int
    size: int
    backend: str


def _resolve_group(group: Any) -> _Group:
    """``True`` -> the default process group; a ``ProcessGroup`` -> itself; errors name the fix."""
    if not dist.is_available():
        raise UnsupportedError("this torch build has no torch.distributed; install a build that has it "
                               "or pass distributed=None.")
    if group is True:
        handle = None
    elif isinstance(group, dist.ProcessGroup):
        handle = group
    else:
        raise InvalidOptionError(
            f"distributed must be True (the default process group), a torch.distributed.ProcessGroup, "
            f"or None/False (single process); got {group!r}."
        )
    if not dist.is_initialized():
        raise DistributedError(f"distributed solving needs an initialised torch.distributed: {_INIT_HINT}.")
    rank = dist.get_rank(handle)
    if rank < 0:
        raise DistributedError("this process is not a member of the ProcessGroup given as distributed=...; "
                               "call solve only on the group's members, with the same arguments on each.")
    return _Group(handle, rank, dist.get_world_size(handle), str(dist.get_backend(handle)).lower())


def _comm_device(group: _Group, data_device: torch.device) -> torch.device:
    """Where tensors must live for the group's backend: gloo wants CPU, nccl wants CUDA."""
    supported: list[str] = []
    for part in group.backend.split(","):
        device_type, _, name = part.rpartition(":")
        if device_type:  # a combined backend such as "cpu:gloo,cuda:nccl"
            supported.append(device_type)
        elif name == "nccl":
            supported.append("cuda")
        elif name in ("gloo", "mpi"):
            supported.append("cpu")
        else:  # an unknown backend: trust the data's device
            supported.append(data_device.type)
    if data_device.type in supported:
        return data_device
    if supported[0] == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(supported[0])


def _collective(what: str, group: _Group, call: Any, *args: Any) -> Any:
    """Run one collective; a failure (lost peer, timeout) becomes a DistributedError that says so."""
    try:
        return call(*args, group=group.handle)
    except FpsolveError:
        raise
    except Exception as error:  # torch raises RuntimeError / DistBackendError subclasses here
        raise DistributedError(
            f"rank {group.rank} of {group.size}: the collective {what} failed: another rank probably "
            "exited, was killed or stopped responding (collectives wait at most the timeout given to "
            "torch.distributed.init_process_group(timeout=...); torchrun stops the remaining ranks "
            f"when one exits). Underlying error: {type(error).__name__}: {error}"
        ) from error


def _all_gather_ints(group: _Group, values: Sequence[int], device: torch.device,
                     what: str) -> list[list[int]]:
    """Every rank's small list of int64 values (same length on every rank)."""
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(group.size)]
    _collective(what, group, dist.all_gather, gathered, mine)
    return [row.tolist() for row in gathered]


def _raise_failures(group: _Group, failed: list[int], error: BaseException | None,
                    context: Callable[[int], str]) -> None:
    """Collect the failing ranks' reports (every rank takes part) and raise on every rank."""
    report = RankFailure.from_exception(group.rank, error) if error is not None else None
    reports: list[Any] = [None] * group.size
    _collective("all_gather_object (error reports)", group, dist.all_gather_object, reports, report)
    failures = {r: reports[r] for r in failed if reports[r] is not None}
    first = failures[min(failures)]
    others = "".join(f"; rank {r} also failed: {f.type_name}: {f.message}"
                     for r, f in failures.items() if r != first.rank)
    message = (f"rank {first.rank} of {group.size} failed {context(first.rank)}: "
               f"{first.type_name}: {first.message} (raised at {first.where}){others}. Every rank stops "
               f"with this error; the full traceback is in .failures[{first.rank}].traceback.")
    raise RankFailedError(message, failures) from error


# -- chunking and checksums ------------------------------------------------------------------------


def chunk_bounds(total: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(total)`` into ``parts`` contiguous ``(start, stop)`` chunks, sizes differing by <= 1.

    The first ``total % parts`` chunks get the extra row, so chunk 0 is always a largest one.
    Chunks may be empty when ``total < parts``.
    """
    if total < 0 or parts < 1:
        raise InvalidOptionError(f"chunk_bounds needs total >= 0 and parts >= 1; got {total}, {parts}.")
    base, extra = divmod(total, parts)
    bounds, start = [], 0
    for part in range(parts):
        stop = start + base + (1 if part < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _bit_checksum(tensor: torch.Tensor) -> int:
    """A cheap checksum of the exact bits: the integer sum of 32/16/8-bit words.

    Integer addition is exact and order-independent, so equal tensors give equal sums on any
    device and thread count, and a one-ulp difference changes it.
    """
    flat = tensor.detach().contiguous().reshape(-1)
    size = flat.element_size()
    words = {1: torch.uint8, 2: torch.int16}.get(size, torch.int32)
    return int(flat.view(words).to(torch.int64).sum())


def _positions_checksum(positions: Sequence[int]) -> int:
    return sum((index + 1) * int(p) for index, p in enumerate(positions))


# -- window sharding -------------------------------------------------------------------------------


class ShardedEvaluator:
    """The driver's ``evaluate(states, positions)``, with the model batch split over the ranks.

    Build it with :func:`sharded_evaluator`. One call makes one denoiser call per rank on its
    chunk, one tiny all_gather (ok flag, batch size, checksums) and one all_gather of the outputs.

    Attributes:
        rank, world_size: this process in the group used.
        calls: evaluations made so far (the driver's iteration or sequential step).
    """

    def __init__(self, system: TriangularSystem, group: _Group, check_consistency: bool = True):
        self.system = system
        self._group = group
        self.check_consistency = check_consistency
        self.calls = 0

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        return self._group.rank

    @property
    def world_size(self) -> int:
        """Number of ranks in the group."""
        return self._group.size

    def __call__(self, states: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """Evaluate ``states`` ``[P, N, D]`` at ``positions`` across the ranks; returns ``[P, N, D]``."""
        system, group = self.system, self._group
        self.calls += 1
        x, t = system.model_inputs(states, positions)
        rows = x.shape[0]
        bounds = chunk_bounds(rows, group.size)
        start, stop = bounds[group.rank]
        error: Exception | None = None
        local = x[:0]
        try:
            if stop > start:  # a model may refuse an empty batch: ranks without rows skip the call
                local = system.denoise(x[start:stop], t[start:stop])
        except Exception as exc:  # reported to every rank below, then re-raised there
            error = exc
        comm = _comm_device(group, x.device)
        checksum = _bit_checksum(states) if self.check_consistency else 0
        header = [0 if error is not None else 1, rows, _positions_checksum(positions), checksum]
        headers = _all_gather_ints(group, header, comm, "all_gather (status flags)")
        failed = [r for r, row in enumerate(headers) if row[0] == 0]
        if failed:
            def context(failing: int) -> str:
                first, last = bounds[failing][0], bounds[failing][1] - 1
                return (f"in its chunk of the batched model call at evaluation {self.calls} "
                        f"(model rows {first}..{last} of {rows}, positions {list(positions)})")

            _raise_failures(group, failed, error, context)
        self._check_agreement(headers, positions)
        return self._gather(local, bounds, comm, states.shape)

    def _check_agreement(self, headers: list[list[int]], positions: Sequence[int]) -> None:
        mine = headers[self._group.rank]
        for other, row in enumerate(headers):
            if row[1:3] != mine[1:3]:
                raise DistributedError(
                    f"rank {self._group.rank} evaluates {mine[1]} model rows at positions {list(positions)} "
                    f"at evaluation {self.calls}, rank {other} something else ({row[1]} rows): every rank "
                    "must call solve with the same system, solver and options."
                )
            if self.check_consistency and row[3] != mine[3]:
                raise DistributedError(
                    f"ranks {self._group.rank} and {other} hold different states at evaluation {self.calls} "
                    "(bitwise checksums differ): the replicated solver state drifted. Give every rank the "
                    "same arguments, the same torch and thread count (torch.set_num_threads) and the same "
                    "kind of device, and keep observers from changing the state."
                )

    def _gather(self, local: torch.Tensor, bounds: list[tuple[int, int]], comm: torch.device,
                shape: torch.Size) -> torch.Tensor:
        system, group = self.system, self._group
        dtype = system.input_dtype  # denoise() guarantees the output has the input's dtype
        row_bytes = system.state_size * torch.empty((), dtype=dtype).element_size()
        largest = bounds[0][1] - bounds[0][0]
        # Raw bytes travel: every backend all-gathers uint8, whatever the model dtype (bf16, fp8).
        send = torch.empty(largest * row_bytes, dtype=torch.uint8, device=comm)
        mine = local.contiguous().reshape(-1).view(torch.uint8)
        send[:mine.numel()] = mine.to(comm)
        received = [torch.empty_like(send) for _ in range(group.size)]
        _collective("all_gather (model outputs)", group, dist.all_gather, received, send)
        parts = [buf[:(stop - start) * row_bytes]
                 for buf, (start, stop) in zip(received, bounds, strict=True)]
        flat = torch.cat(parts).view(dtype).to(system.device)
        return flat.reshape(shape[0], system.num_samples, system.state_size).to(system.dtype)


def sharded_evaluator(system: TriangularSystem, group: Any = True, *,
                      check_consistency: bool = True) -> ShardedEvaluator:
    """The driver's evaluator with each model call split over the ranks of ``group``.

    Args:
        system: the system every rank solves (same noise, sampler and denoiser on every rank).
        group: ``True`` for the default process group, or a ``torch.distributed.ProcessGroup``.
        check_consistency: exchange a bitwise checksum of the evaluated states with the ok flag,
            so ranks that drift apart raise instead of returning different answers.

    Raises:
        DistributedError: torch.distributed is not initialised (the message names the fix).
        InvalidOptionError: ``group`` is neither ``True`` nor a ``ProcessGroup``.
    """
    if not isinstance(system, TriangularSystem):
        raise InvalidOptionError(f"sharded_evaluator needs a TriangularSystem; got {type(system).__name__}.")
    return ShardedEvaluator(system, _resolve_group(group), check_consistency=check_consistency)


# -- the planner -----------------------------------------------------------------------------------


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


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOptionError(f"{name} must be an int >= 1; got {value!r}.")
    return value


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
    samples = _positive_int("num_samples", num_samples)
    width = _positive_int("window", window)
    ranks = _positive_int("world_size", world_size)
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


def _merge_traces(traces: list[ResidualTrace], steps: int) -> ResidualTrace:
    """One trace for the sample-sharded solve: per iteration, the worst rank still running."""
    length = max(len(trace) for trace in traces)
    rows, anchors, windows, evaluations = [], [], [], []
    for i in range(length):
        running = [trace for trace in traces if i < len(trace)]
        stacked = torch.stack([trace.first_order[i] for trace in running])
        worst = torch.where(stacked.isnan(), -math.inf, stacked).max(0).values
        rows.append(torch.where(worst == -math.inf, math.nan, worst))
        anchors.append(min(trace.anchors[i] for trace in running))
        windows.append((min(t.windows[i][0] for t in running), max(t.windows[i][1] for t in running)))
        evaluations.append(sum(trace.evaluations[i] for trace in running))
    matrix = torch.stack(rows) if rows else torch.empty(0, steps + 1, dtype=torch.float64)
    return ResidualTrace(matrix, tuple(anchors), tuple(windows), tuple(evaluations))


def _solve_samples(system: TriangularSystem, solver: Any, group: _Group, chosen: ShardPlan,
                   options: dict[str, Any]) -> Solution:
    from .api import solve

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
    parts = [buf[:, :b - a] for buf, (a, b) in zip(received, chosen.sample_ranges, strict=True)]
    trajectory = system.unflatten(torch.cat(parts, dim=1).to(flat_device))
    converged = local.converged_samples
    if converged is None:  # a Solution from a solver loop that does not say: all or nothing
        converged = torch.full((stop - start,), local.converged, dtype=torch.bool)
    summary = (local.iterations, local.model_evals, local.status.name, local.message, local.residuals,
               converged.cpu())
    summaries: list[Any] = [None] * group.size
    _collective("all_gather_object (statistics)", group, dist.all_gather_object, summaries, summary)
    status, message = Status.CONVERGED, local.message
    for rank, (_, _, name, text, _, _) in enumerate(summaries):
        if Status[name] is not Status.CONVERGED:
            status, message = Status[name], f"rank {rank} (samples {chosen.sample_ranges[rank]}): {text}"
            break
    return Solution(sample=trajectory[-1], trajectory=trajectory,
                    iterations=max(s[0] for s in summaries), model_evals=sum(s[1] for s in summaries),
                    status=status, message=message,
                    residuals=_merge_traces([s[4] for s in summaries], system.num_steps),
                    wall_time=time.perf_counter() - started, solver=local.solver, order=local.order,
                    converged_samples=torch.cat([s[5] for s in summaries]))


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
    from .api import make_system, solve

    if "distributed" in options:
        raise InvalidOptionError(
            "solve_distributed takes group=..., not distributed=...; it always distributes.")
    system = make_system(system)
    resolved = _resolve_group(group)
    window = DriverConfig(window=options.get("window")).window or system.num_steps  # validates it
    chosen = plan(system.num_samples, min(window, system.num_steps), resolved.size, shard=shard)
    if chosen.mode == "window":
        return solve(system, solver, distributed=group, **options)
    return _solve_samples(system, solver, resolved, chosen, options)
