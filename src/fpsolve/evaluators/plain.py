"""The plain evaluator: the whole window's model batch in ONE denoiser call.

What a solve on the CPU (or any device but CUDA) uses when it is not distributed: exactly
:meth:`fpsolve.TriangularSystem.evaluate`, the system's own validated call, with no chunking and
no communication.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InvalidOptionError
from ..system import TriangularSystem

__all__ = ["PlainEvaluator"]


class PlainEvaluator:
    """The driver's evaluator (``evaluate(states [P, N, D], positions) -> outputs [P, N, D]``) as
    one unsplit call of :meth:`TriangularSystem.evaluate`.

    Args:
        system: the system whose denoiser is called.
    """

    def __init__(self, system: TriangularSystem):
        if not isinstance(system, TriangularSystem):
            raise InvalidOptionError(f"PlainEvaluator needs a TriangularSystem; got {type(system).__name__}.")
        self.system = system

    def __call__(self, states: torch.Tensor, positions: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Evaluate ``states`` ``[P, N, D]`` at ``positions`` in one model call."""
        return self.system.evaluate(states, positions)

    def __repr__(self) -> str:
        return f"PlainEvaluator({self.system!r})"
