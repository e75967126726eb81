"""Window sharding: one batched model call cut across the ranks of a ``torch.distributed`` group.

The evaluator behind ``fpsolve.solve(system, ..., distributed=True)`` (chosen by
:func:`fpsolve.evaluators.choose`), with the process-group plumbing and the errors it raises.
:mod:`fpsolve.distributed`, above the api, re-exports it beside sample sharding, which reuses
the plumbing. See :mod:`fpsolve.distributed` for the guarantees.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
import torch.distributed as dist

from ..errors import FpsolveError, InvalidOptionError, UnsupportedError
from ..system import TriangularSystem

__all__ = ["DistributedError", "RankFailedError", "RankFailure", "ShardedEvaluator", "chunk_bounds",
           "sharded_evaluator"]

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
