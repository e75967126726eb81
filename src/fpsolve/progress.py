"""A progress bar observer for long solves (tqdm when installed, a plain line otherwise)."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["ProgressBar"]


class ProgressBar:
    """Shows the anchor's progress through the T states, the iteration and the residual.

    Use as an observer: ``fpsolve.solve(system, observers=[ProgressBar()])`` or ``progress=True``.
    """

    def __init__(self, description: str = "fpsolve", stream: Any = None):
        self.description = description
        self.stream = stream if stream is not None else sys.stderr
        self._bar: Any = None

    def __call__(self, info: Any) -> None:
        if self._bar is None:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # tqdm is optional: fall back to a carriage-return line
                self._bar = _PlainBar(self.stream, info.num_steps, self.description)
            else:
                self._bar = tqdm(total=info.num_steps, desc=self.description, unit="state",
                                 file=self.stream, leave=True)
        self._bar.update(info.anchor - self._bar.n)
        self._bar.set_postfix(iteration=info.iteration, residual=f"{float(info.residual_rms.max()):.1e}")
        if info.anchor >= info.num_steps:
            self.close()

    def close(self) -> None:
        """Finish the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class _PlainBar:
    def __init__(self, stream: Any, total: int, description: str):
        self.stream, self.total, self.description, self.n, self.postfix = stream, total, description, 0, ""

    def update(self, amount: int) -> None:
        self.n += amount
        self.stream.write(f"\r{self.description}: {self.n}/{self.total} states {self.postfix}")
        self.stream.flush()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
