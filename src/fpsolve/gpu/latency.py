"""Measure ``t(B)``, the wall time of one denoiser call on ``B`` rows, on the user's device.

The window planner needs the latency curve of *this* model on *this* card: the best window of a
parallel solve depends on where the card saturates (flat curve: large windows are free; linear
curve: nothing beats sequential). :func:`latency_table` measures a few batch sizes once and
caches the result per (denoiser object, input shape, dtype, device) for the process, and
optionally in a JSON file (``FPSOLVE_LATENCY_CACHE=/path/latency.json``) for models that have a
stable :func:`denoiser_cache_key`.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from .._identity import PerDenoiser, denoiser_cache_key, input_key
from ..errors import InvalidOptionError
from ..validators import as_int, as_real
from .timing import DeviceTimer

__all__ = [
    "LatencyTable",
    "measure_latency",
    "latency_table",
    "denoiser_cache_key",
    "remember_latency",
    "forget_latencies",
    "CACHE_ENV",
    "latency_points",
]

#: Environment variable naming a JSON file that keeps measured latencies between processes.
CACHE_ENV = "FPSOLVE_LATENCY_CACHE"

_TABLES = PerDenoiser()


def latency_points(value: Any) -> dict[int, float]:
    """``{batch: seconds}`` checked and sorted by batch: every batch an int >= 1 (a decimal string
    too, as :meth:`LatencyTable.to_json` writes the keys), every time a finite number > 0 of
    seconds, and at least one point."""
    points: dict[int, float] = {}
    for batch, seconds in dict(value).items():
        key = int(batch) if isinstance(batch, str) and batch.strip().isdigit() else batch
        rows = as_int("a latency point's batch", key, minimum=1)
        points[rows] = as_real(f"the seconds of the latency point at batch {rows}", seconds, minimum=0.0,
                               strict=True)
    if not points:
        raise InvalidOptionError("a latency table needs at least one (batch, seconds) point.")
    return dict(sorted(points.items()))


@attrs.define(frozen=True)
class LatencyTable:
    """Measured seconds per denoiser call, by model batch size (rows).

    Attributes:
        seconds: ``{batch: seconds}``, ascending batch.
        max_batch: the largest batch known to fit in memory when a larger one ran out, else
            ``None``.
        device: the device name it was measured on (e.g. ``"NVIDIA H200"`` or ``"cpu"``).
    """

    seconds: dict[int, float] = attrs.field(converter=latency_points)
    max_batch: int | None = None
    device: str = ""

    def merged(self, other: LatencyTable) -> LatencyTable:
        """This table with ``other``'s points added (``other`` wins on a shared batch size)."""
        limits = [v for v in (self.max_batch, other.max_batch) if v is not None]
        return LatencyTable(
            {**self.seconds, **other.seconds}, min(limits) if limits else None, other.device or self.device
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "seconds": {str(b): s for b, s in self.seconds.items()},
            "max_batch": self.max_batch,
            "device": self.device,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatencyTable:
        """Inverse of :meth:`to_json`."""
        return cls(data["seconds"], data.get("max_batch"), data.get("device", ""))


def device_name(device: str | torch.device) -> str:
    """A human-readable name of the device (the GPU model for CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def measure_latency(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    shape: Sequence[int],
    dtype: torch.dtype,
    device: str | torch.device,
    batches: Iterable[int],
    timesteps: Sequence[int],
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
) -> LatencyTable:
    """Median seconds of ``denoiser(x, t)`` for each batch size, on random inputs.

    Batch sizes are measured in ascending order; the first one that runs out of memory ends the
    measurement and sets :attr:`LatencyTable.max_batch` to the largest that fitted.

    Args:
        denoiser: the model, ``denoiser(x [B, *shape], t [B]) -> eps``.
        shape, dtype, device: the input signature (the system's ``shape``, ``input_dtype``,
            ``device``).
        batches: model batch sizes (rows) to measure.
        timesteps: valid model timesteps; inputs cycle through them.
        repeats: timed calls per size (the median is kept).
        warmup: untimed calls per size first (lazy initialisation, autotuning, graph capture).
        seed: seed of the random inputs (random, never zeros: zeros can run faster).
    """
    device = torch.device(device)
    sizes = sorted({as_int("a batch size in batches", b, minimum=1) for b in batches})
    if not sizes:
        raise InvalidOptionError("batches must list at least one batch size (an int >= 1); got none.")
    repeats = as_int("repeats", repeats, minimum=1)
    warmup = as_int("warmup", warmup, minimum=0)
    generator = torch.Generator().manual_seed(seed)
    steps = torch.as_tensor(list(timesteps), dtype=torch.long)
    seconds: dict[int, float] = {}
    max_batch = None
    for size in sizes:
        x = torch.randn((size, *shape), generator=generator, dtype=torch.float32).to(device, dtype)
        t = steps[torch.arange(size) % steps.numel()].to(device)
        try:
            seconds[size] = _median_call(denoiser, x, t, device, repeats, warmup)
        except torch.OutOfMemoryError:
            max_batch = max(seconds) if seconds else None
            break
    if not seconds:
        raise torch.OutOfMemoryError(
            f"the denoiser ran out of memory at the smallest batch measured ({sizes[0]})."
        )
    return LatencyTable(seconds, max_batch, device_name(device))


def _median_call(
    denoiser: Callable[..., Any],
    x: torch.Tensor,
    t: torch.Tensor,
    device: torch.device,
    repeats: int,
    warmup: int,
) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            denoiser(x, t)
        times = []
        for _ in range(repeats):
            with DeviceTimer(device) as timer:
                denoiser(x, t)
            times.append(timer.seconds)
    return statistics.median(times)


# -- caching ---------------------------------------------------------------------------------------


def remember_latency(
    denoiser: Any,
    shape: Sequence[int],
    dtype: torch.dtype,
    device: str | torch.device,
    table: LatencyTable | dict[int, float],
) -> LatencyTable:
    """Store a latency table for ``denoiser`` in the in-process cache (merged with what is there).

    Useful to plan from numbers measured elsewhere, and in tests.
    """
    if not isinstance(table, LatencyTable):
        table = LatencyTable(table, None, device_name(device))
    slot = _TABLES.slot(denoiser)
    key = input_key(tuple(shape), dtype, device)
    slot[key] = slot[key].merged(table) if key in slot else table
    return slot[key]


def forget_latencies() -> None:
    """Clear the in-process latency cache (the on-disk file is left alone)."""
    _TABLES.clear()


def _disk_key(denoiser: Any, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> str | None:
    name = denoiser_cache_key(denoiser)
    if name is None:
        return None
    return f"{name}|{list(shape)}|{dtype}|{device_name(device)}|torch {torch.__version__}"


def _read_disk(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a missing or damaged cache is only a cache


def _write_disk(path: Path, key: str, table: LatencyTable) -> None:
    data = _read_disk(path)
    data[key] = table.to_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)  # atomic: concurrent readers see the old or the new file, never half of one


def latency_table(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    shape: Sequence[int],
    dtype: torch.dtype,
    device: str | torch.device,
    batches: Iterable[int],
    timesteps: Sequence[int],
    cache_path: str | Path | None = None,
    measure: Callable[..., LatencyTable] = measure_latency,
) -> LatencyTable:
    """The latency table for ``batches``, measuring only sizes outside the cached table's range.

    Looks in the in-process cache, then in the JSON file ``cache_path`` (default: the
    ``FPSOLVE_LATENCY_CACHE`` environment variable; none if unset), then measures the sizes
    the table does not span (sizes inside it are interpolated by the planner; sizes above a
    known ``max_batch`` are skipped) and stores the result in both.
    """
    device = torch.device(device)
    key = input_key(tuple(shape), dtype, device)
    slot = _TABLES.slot(denoiser)
    path = (
        Path(cache_path)
        if cache_path
        else (Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else None)
    )
    disk_key = _disk_key(denoiser, shape, dtype, device) if path is not None else None
    table: LatencyTable | None = slot.get(key)
    if (
        table is None
        and path is not None
        and disk_key is not None
        and disk_key in (stored := _read_disk(path))
    ):
        table = LatencyTable.from_json(stored[disk_key])
    wanted = sorted({as_int("a batch size in batches", b, minimum=1) for b in batches})
    limit = table.max_batch if table is not None and table.max_batch is not None else None
    if table is not None:  # sizes inside the table's range are interpolated, not measured
        low, high = min(table.seconds), max(table.seconds)
        wanted = [b for b in wanted if b < low or b > high]
    missing = [b for b in wanted if limit is None or b <= limit]
    if missing:
        try:
            fresh = measure(
                denoiser, shape=shape, dtype=dtype, device=device, batches=missing, timesteps=timesteps
            )
        except torch.OutOfMemoryError:
            if table is None:
                raise
            # Even the smallest new size does not fit: the largest measured one is the limit.
            fresh = LatencyTable(
                table.seconds,
                max((b for b in table.seconds if b < missing[0]), default=min(table.seconds)),
                table.device,
            )
        table = fresh if table is None else table.merged(fresh)
        if path is not None and disk_key is not None:
            _write_disk(path, disk_key, table)
    assert table is not None
    slot[key] = table
    return table
