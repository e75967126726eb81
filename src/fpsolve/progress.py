"""A progress bar observer for long solves (tqdm when installed, a plain line otherwise)."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["ProgressBar", "JobProgress"]


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


class JobProgress:
    """One bar over several solves (a command's whole job), counted in final states.

    ``job.observer("taa run 1/3", num_steps)`` returns an observer for one solve: it relabels the
    bar and advances it as the solve's anchor moves, so the bar reaches ``total`` when every
    solve has finished. tqdm when installed, a plain line otherwise.
    """

    def __init__(self, total: int, description: str = "fpsolve", stream: Any = None):
        self.stream = stream if stream is not None else sys.stderr
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self._bar: Any = _PlainBar(self.stream, total, description)
        else:
            self._bar = tqdm(total=total, desc=description, unit="state", file=self.stream, leave=False)

    def observer(self, label: str, num_steps: int) -> Any:
        """An observer that advances this bar by the solve's progress (at most ``num_steps``)."""
        start = self._bar.n
        if hasattr(self._bar, "set_description_str"):
            self._bar.set_description_str(label)
        else:
            self._bar.description = label

        def advance(info: Any) -> None:
            target = start + min(info.anchor, num_steps)
            if target > self._bar.n:
                self._bar.update(target - self._bar.n)

        return advance

    def close(self) -> None:
        """Remove the bar (tqdm) or end its line (plain)."""
        self._bar.close()
