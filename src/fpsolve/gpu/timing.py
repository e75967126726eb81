"""Device-aware timing: wall time of a region, and time spent inside denoiser calls.

On CUDA, work is asynchronous: a region is timed with CUDA events (read after one synchronise at
the end), so timing adds no host synchronisation inside a solve. On a CPU, ``perf_counter``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from .._identity import denoiser_cache_key

__all__ = ["synchronize", "DeviceTimer", "TimedDenoiser"]


def synchronize(device: str | torch.device) -> None:
    """Wait for all work queued on ``device`` (a no-op off CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Span:
    """One timed interval: CUDA events, or two ``perf_counter`` readings."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)
        self.start_time = self.end_time = 0.0

    def start(self) -> None:
        if self.cuda:
            self.start_event.record()
        else:
            self.start_time = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self.end_event.record()
        else:
            self.end_time = time.perf_counter()

    def seconds(self) -> float:
        """Elapsed seconds (on CUDA, the end event must have completed: synchronise first)."""
        if self.cuda:
            return self.start_event.elapsed_time(self.end_event) / 1e3
        return self.end_time - self.start_time


class DeviceTimer:
    """Times a region on ``device``: ``with DeviceTimer(dev) as timer: ...; timer.seconds``.

    The exit synchronises the device, so ``seconds`` covers all work queued inside the region.
    """

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.seconds = float("nan")
        self._span = _Span(self.device)

    def __enter__(self) -> DeviceTimer:
        synchronize(self.device)  # earlier work must not leak into the region
        self._span.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._span.stop()
        synchronize(self.device)
        self.seconds = self._span.seconds()


class TimedDenoiser:
    """Wraps ``denoiser(x, t)`` and records the time of every call, without synchronising.

    Read :attr:`seconds` (which synchronises once) after the region of interest, and
    :meth:`reset` before the next one. ``calls`` counts calls and ``rows`` the rows evaluated.
    """

    def __init__(
        self, denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: str | torch.device
    ):
        self.denoiser = denoiser
        self.device = torch.device(device)
        self._spans: list[_Span] = []
        self.calls = 0
        self.rows = 0

    @property
    def cache_key(self) -> str | None:
        """The wrapped model's on-disk latency-cache key (timing does not change latency)."""
        return denoiser_cache_key(self.denoiser)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Call the denoiser between two timing marks."""
        span = _Span(self.device)
        span.start()
        out = self.denoiser(x, t)
        span.stop()
        self._spans.append(span)
        self.calls += 1
        self.rows += int(x.shape[0])
        return out

    @property
    def seconds(self) -> float:
        """Total seconds spent inside denoiser calls since the last :meth:`reset`."""
        synchronize(self.device)
        return sum(span.seconds() for span in self._spans)

    def reset(self) -> None:
        """Start counting from zero."""
        self._spans.clear()
        self.calls = 0
        self.rows = 0
