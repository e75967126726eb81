"""Choose the window (and the split of the samples) with the smallest predicted wall time.

The model of a solve's wall time, for ``T`` steps, ``N`` samples, window ``w``, latency curve
``t(B)`` (seconds per denoiser call on ``B`` rows) and predicted iterations ``I(w)``:

* sequential: ``T`` calls of ``N`` rows: ``T * (t(N) + step_overhead)``;
* parallel: ``I(w)`` iterations; the anchor is taken to advance evenly (``T / I`` positions per
  iteration), so iteration ``i`` evaluates ``min(w, T - i T / I)`` positions of ``N`` rows each:
  ``sum_i t(rows_i) + iteration_overhead``;
* split into ``g`` groups of samples solved one after another: the sum over the groups;
* a call larger than ``max_batch`` rows runs in chunks of ``max_batch``
  (:class:`~fpsolve.gpu.ChunkedEvaluator`).

Between measured batch sizes the latency is interpolated linearly; below the smallest it is the
smallest's (a call never gets cheaper than that); above the largest it grows in proportion to the
batch (the card is assumed saturated there: never optimistic).

This module is pure: it measures nothing and can be unit-tested with synthetic curves.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from ..errors import InvalidOptionError
from ..validators import as_int, as_real
from .latency import latency_points

__all__ = ["Plan", "plan_window", "latency_curve", "candidate_windows", "predicted_parallel_seconds"]

Latency = Callable[[int], float] | Mapping[int, float]


@attrs.define(frozen=True)
class Plan:
    """The planner's choice.

    Attributes:
        window: the best parallel window (positions per iteration); also set when
            ``use_sequential`` is True, to show what was considered.
        batch_split: groups the samples are split into, solved one after another (1: all
            together).
        predicted_seconds: predicted wall time of the parallel solve at ``window`` / ``batch_split``.
        sequential_seconds: predicted wall time of the sequential loop.
        use_sequential: True when no window is predicted to beat the sequential loop.
        reason: the decision in words.
        iterations: predicted iterations at ``window``.
    """

    window: int
    batch_split: int
    predicted_seconds: float
    sequential_seconds: float
    use_sequential: bool
    reason: str
    iterations: float = math.nan

    @property
    def speedup(self) -> float:
        """Predicted sequential time over predicted parallel time (> 1: parallel is faster)."""
        return self.sequential_seconds / self.predicted_seconds


class _Interpolated:
    """``t(B)`` from measured points (see the module docstring for the rules)."""

    def __init__(self, points: Mapping[int, float]):
        items = list(latency_points(points).items())
        self.batches = [b for b, _ in items]
        self.seconds = [s for _, s in items]

    def __call__(self, batch: int) -> float:
        batches, seconds = self.batches, self.seconds
        if batch <= batches[0]:
            return seconds[0]
        if batch >= batches[-1]:
            return seconds[-1] * batch / batches[-1]
        right = bisect.bisect_left(batches, batch)
        if batches[right] == batch:
            return seconds[right]
        b0, b1, s0, s1 = batches[right - 1], batches[right], seconds[right - 1], seconds[right]
        return s0 + (s1 - s0) * (batch - b0) / (b1 - b0)


def latency_curve(latency: Any) -> Callable[[int], float]:
    """``t(B)`` from a callable, a ``{batch: seconds}`` mapping or a :class:`~fpsolve.gpu.LatencyTable`."""
    points = getattr(latency, "seconds", latency)
    if isinstance(points, Mapping):
        return _Interpolated(points)
    if callable(latency):
        return latency
    raise InvalidOptionError(
        f"latency must be a callable t(batch) or a {{batch: seconds}} mapping; got {latency!r}."
    )


def candidate_windows(num_steps: int) -> list[int]:
    """Windows the planner compares: a geometric grid (ratio about 1.5) from 2 to T, and T.

    Window 1 is left out: it is the sequential loop with a parallel solver's overhead added.
    """
    if num_steps == 1:
        return [1]
    found, window = {num_steps}, 2
    while window < num_steps:
        found.add(window)
        window = max(window + 1, int(window * 1.5))
    return sorted(found)


def _call_seconds(curve: Callable[[int], float], rows: int, max_batch: int | None) -> float:
    if max_batch is None or rows <= max_batch:
        return curve(rows)
    full, rest = divmod(rows, max_batch)
    return full * curve(max_batch) + (curve(rest) if rest else 0.0)


def predicted_parallel_seconds(
    latency: Latency,
    num_steps: int,
    samples: int,
    window: int,
    iterations: float,
    *,
    max_batch: int | None = None,
    iteration_overhead: float = 0.0,
) -> float:
    """Predicted wall time of one parallel solve of ``samples`` samples (see the module docstring)."""
    curve = latency_curve(latency)
    iterations = min(float(num_steps), max(1.0, float(iterations)))
    count = max(1, round(iterations))
    advance = num_steps / count
    total = 0.0
    for i in range(count):
        positions = max(1, min(window, num_steps - math.floor(i * advance)))
        total += _call_seconds(curve, positions * samples, max_batch) + iteration_overhead
    return total * iterations / count


def _groups(samples: int, split: int) -> list[int]:
    size, extra = divmod(samples, split)
    return [size + 1] * extra + [size] * (split - extra)


def plan_window(
    latency: Latency,
    num_steps: int,
    samples: int,
    predicted_iterations: Callable[[int], float],
    *,
    windows: Iterable[int] | None = None,
    splits: Iterable[int] | None = None,
    max_batch: int | None = None,
    iteration_overhead: float = 0.0,
    step_overhead: float = 0.0,
    min_speedup: float = 1.0,
) -> Plan:
    """The window and sample split with the smallest predicted wall time, or sequential.

    Args:
        latency: ``t(B)``, seconds of one denoiser call on ``B`` rows: a callable or a
            ``{B: seconds}`` mapping (interpolated; see the module docstring).
        num_steps: T.
        samples: N, samples to draw.
        predicted_iterations: ``I(w)``, parallel iterations a solve needs at window ``w`` (see
            :mod:`fpsolve.gpu.iterations` for a prior refined by observed solves).
        windows: windows to compare (default :func:`candidate_windows`; clipped to 1..T).
        splits: sample splits to compare (default 1, 2, 4, ... up to N, and N).
        max_batch: the largest call that fits in memory, in rows (larger calls are chunked).
        iteration_overhead: seconds per parallel iteration outside the model call (solver math,
            the host decision).
        step_overhead: seconds per sequential step outside the model call.
        min_speedup: parallel is chosen only if predicted at least this much faster.

    Returns:
        The :class:`Plan`. Ties go to fewer groups, then the smaller window (less memory).
    """
    num_steps = as_int("num_steps", num_steps, minimum=1)
    samples = as_int("samples", samples, minimum=1)
    if max_batch is not None:
        max_batch = as_int("max_batch", max_batch, minimum=1)
    if not callable(predicted_iterations):
        raise InvalidOptionError("predicted_iterations must be a callable I(window) -> iterations.")
    min_speedup = as_real("min_speedup", min_speedup, minimum=0.0, strict=True)
    curve = latency_curve(latency)
    window_list = sorted({min(max(1, int(w)), num_steps) for w in (windows or candidate_windows(num_steps))})
    if splits is None:
        split_list = sorted({min(2**k, samples) for k in range(samples.bit_length() + 1)})
    else:
        split_list = sorted({as_int("split", s, minimum=1) for s in splits if s <= samples}) or [1]
    sequential = num_steps * (_call_seconds(curve, samples, max_batch) + step_overhead)

    best: tuple[float, int, int, float] | None = None
    for split in split_list:
        groups = _groups(samples, split)
        for window in window_list:
            iterations = float(predicted_iterations(window))
            if not math.isfinite(iterations) or iterations <= 0:
                raise InvalidOptionError(
                    f"predicted_iterations({window}) must be a finite number > 0; got {iterations!r}."
                )
            seconds = sum(
                predicted_parallel_seconds(
                    curve,
                    num_steps,
                    size,
                    window,
                    iterations,
                    max_batch=max_batch,
                    iteration_overhead=iteration_overhead,
                )
                for size in groups
            )
            if best is None or (seconds, split, window) < best[:3]:
                best = (seconds, split, window, iterations)
    assert best is not None
    seconds, split, window, iterations = best
    iterations = min(float(num_steps), max(1.0, iterations))
    use_sequential = not seconds * min_speedup < sequential
    where = f"window {window}" + (f", {split} groups of samples" if split > 1 else "")
    if use_sequential:
        reason = (
            f"no window is predicted to beat sequential sampling: the best, {where}, needs ~{iterations:.0f} "
            f"iterations, {seconds:.3g} s, against {sequential:.3g} s for {num_steps} sequential steps"
        )
    else:
        reason = (
            f"{where}: ~{iterations:.0f} iterations, predicted {seconds:.3g} s against {sequential:.3g} s "
            f"sequential ({sequential / seconds:.2f}x)"
        )
    return Plan(window, split, seconds, sequential, use_sequential, reason, iterations)
