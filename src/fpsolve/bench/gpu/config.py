"""What one run of the GPU benchmark measures (:class:`Settings`) and its wall-clock :class:`Budget`."""

from __future__ import annotations

import time
from pathlib import Path

import attrs
import torch

__all__ = ["TOL", "Settings", "Budget"]

#: The RMS tolerance of every measured solve.
TOL = 1e-3


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

