"""Split the one batched model call of an iteration into chunks that fit in memory.

A window of ``w`` positions over ``N`` samples is one denoiser call of ``w * N`` rows. When that
does not fit, :class:`ChunkedEvaluator` evaluates the rows in consecutive chunks and, on
:class:`torch.OutOfMemoryError`, halves the chunk size and retries the failed chunk, remembering
the size for later calls (and later solves of the same denoiser, input shape, dtype and device).
So any configuration whose sequential batch (``N`` rows) fits never fails for lack of memory: at
worst it runs in chunks of ``N`` rows, one position at a time.

Chunks are contiguous row ranges of the position-major model batch, concatenated in order, and
always hold whole positions (a multiple of the ``N`` samples): pipeline denoisers condition row
``r`` of a call on prompt ``r % N`` (classifier-free guidance, per-sample class labels), so a
chunk that started inside a position would give rows the wrong prompts. For a denoiser whose rows
do not influence each other (every diffusion model in inference mode), the result is the
unchunked result; with a deterministic row-wise denoiser it is bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._identity import PerDenoiser, input_key
from ..errors import InvalidOptionError
from ..system import TriangularSystem
from ..validators import as_int

__all__ = ["ChunkedEvaluator", "known_max_batch", "forget_max_batches"]

#: Largest chunk known to fit, per denoiser and input signature (learnt from out-of-memory errors).
_LIMITS = PerDenoiser()


def _signature(system: TriangularSystem) -> tuple[tuple[int, ...], str, str]:
    return input_key(system.shape, system.input_dtype, system.device)


def known_max_batch(system: TriangularSystem) -> int | None:
    """The largest model batch (rows) known to fit for ``system``'s denoiser, or ``None``."""
    return _LIMITS.slot(system.denoiser).get(_signature(system))


def forget_max_batches() -> None:
    """Forget every remembered chunk size (e.g. after freeing GPU memory)."""
    _LIMITS.clear()


class ChunkedEvaluator:
    """The driver's evaluator (``evaluate(states [P, N, D], positions) -> outputs [P, N, D]``) with
    the model batch split into chunks of at most ``max_batch`` rows, halved on out-of-memory.

    ``fpsolve.solve`` uses one automatically on CUDA devices (:func:`fpsolve.evaluators.choose`,
    with ``max_batch=None``: one chunk until memory runs out). Pass one to
    :func:`fpsolve.driver.run` directly as ``evaluate=``.

    Args:
        system: the system whose denoiser is called (through its validated
            :meth:`~fpsolve.TriangularSystem.denoise`).
        max_batch: the largest chunk in rows (``None``: unlimited until an out-of-memory error,
            or the size remembered from an earlier one).
        remember: share the learnt size with later evaluators of the same denoiser and input
            signature (in this process).
    """

    def __init__(self, system: TriangularSystem, max_batch: int | None = None, *, remember: bool = True):
        if not isinstance(system, TriangularSystem):
            raise InvalidOptionError(
                f"ChunkedEvaluator needs a TriangularSystem; got {type(system).__name__}."
            )
        if max_batch is not None:
            max_batch = as_int("max_batch", max_batch, minimum=1, hint=" or None")
        if max_batch is not None and max_batch < system.num_samples:
            raise InvalidOptionError(
                f"max_batch={max_batch} is smaller than one position of the window "
                f"({system.num_samples} rows, one per sample): chunks hold whole positions, because "
                f"pipeline denoisers condition row r on prompt r % N. Pass max_batch >= "
                f"{system.num_samples}, or solve fewer samples at a time."
            )
        self.system = system
        self.remember = remember
        remembered = known_max_batch(system) if remember else None
        limits = [v for v in (max_batch, remembered) if v is not None]
        #: The current chunk size in rows (``None``: unlimited so far).
        self.max_batch: int | None = min(limits) if limits else None
        #: How many times a chunk ran out of memory and was halved.
        self.halvings = 0

    def __call__(self, states: torch.Tensor, positions: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Evaluate like :meth:`TriangularSystem.evaluate`, in chunks."""
        system = self.system
        count, samples = states.shape[0], system.num_samples
        x, t = system.model_inputs(states, positions)
        out = self.denoise(x, t)
        return out.reshape(count, samples, system.state_size).to(system.dtype)

    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser on a model batch ``x`` ``[B, *shape]``, ``t`` ``[B]``, in fitting chunks."""
        rows = x.shape[0]
        unit = self._unit(rows)
        pieces: list[torch.Tensor] = []
        start = 0
        while start < rows:
            size = rows - start if self.max_batch is None else min(self.max_batch, rows - start)
            size = max(unit, size // unit * unit)  # whole positions only
            failed = False
            try:
                pieces.append(self.system.denoise(x[start : start + size], t[start : start + size]))
            except torch.OutOfMemoryError as error:
                if size <= unit:
                    what = "a single row" if unit == 1 else f"a single position ({unit} rows, one per sample)"
                    raise torch.OutOfMemoryError(
                        f"the denoiser ran out of memory on {what} ({error}); no chunk size fits. "
                        "Solve fewer samples at a time or use a smaller model dtype."
                    ) from error
                failed = True
            # Retry outside the except block: the traceback there still holds the failed call's
            # tensors, which must be freed before a smaller chunk can fit.
            if failed:
                self._shrink(size, unit)
                continue
            start += size
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _unit(self, rows: int) -> int:
        """The rows of one position (``N``) when ``rows`` is a position-major batch, else 1."""
        samples = self.system.num_samples
        return samples if rows % samples == 0 else 1

    def _shrink(self, size: int, unit: int = 1) -> None:
        self.max_batch = max(unit, size // 2 // unit * unit)
        self.halvings += 1
        if self.system.device.type == "cuda":
            torch.cuda.empty_cache()  # return the failed attempt's blocks before the retry
        if self.remember:
            slot = _LIMITS.slot(self.system.denoiser)
            key = _signature(self.system)
            slot[key] = min(self.max_batch, slot.get(key, self.max_batch))
