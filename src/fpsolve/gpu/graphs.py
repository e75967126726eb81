"""CUDA-graph capture of a denoiser: one graph per batch size, replayed from static buffers.

A diffusion model called on a small batch is launch-bound: on an H200 an SD-1.5 UNet call at
batch 1 costs 32 ms eager and 9.5 ms as a replayed graph (``/work/shared/data``). Capturing the
denoiser once per batch size removes that launch cost for the sequential loop and for every
window a parallel solve uses, so both sides of a speed comparison get the same treatment.

On a CPU (or when CUDA is not available) the wrapper is a transparent pass-through. A model that
cannot be captured (host synchronisation inside ``forward``, data-dependent control flow, ...)
falls back to eager calls with one :class:`CUDAGraphWarning`. Running out of memory during a
capture is not a capture failure: the :class:`torch.OutOfMemoryError` propagates, so that
:class:`~fpsolve.gpu.ChunkedEvaluator` can halve the batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from .._identity import denoiser_cache_key
from ..errors import InvalidOptionError
from ..validators import as_int

__all__ = ["CUDAGraphDenoiser", "CUDAGraphWarning"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CUDAGraphWarning(UserWarning):
    """A denoiser could not be captured as a CUDA graph and runs eagerly instead."""


@attrs.define(eq=False)
class _CapturedCall:
    """One captured denoiser call on static buffers of ``size`` rows.

    ``graph`` is anything with ``replay()`` that recomputes ``output`` from ``x`` and ``t`` in
    place (a :class:`torch.cuda.CUDAGraph` in practice; a fake one in CPU tests).
    """

    graph: Any
    x: torch.Tensor
    t: torch.Tensor
    output: torch.Tensor

    @property
    def size(self) -> int:
        """Rows of the static buffers."""
        return int(self.x.shape[0])

    def run(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Copy the inputs into the static buffers, replay, and return a copy of the output rows."""
        _fill(self.x, x)
        _fill(self.t, t)
        self.graph.replay()
        # A copy, because the next replay (of this or of another graph sharing the memory pool)
        # overwrites the static output while the caller may still hold the result.
        return self.output[: x.shape[0]].clone()


def _fill(static: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` into the first rows of ``static``; pad the rest with copies of row 0.

    Padding rows are real inputs (not zeros or garbage) so that a model never sees values it
    could overflow on; their outputs are discarded.
    """
    rows = value.shape[0]
    static[:rows].copy_(value)
    if rows < static.shape[0]:
        static[rows:].copy_(value[:1].expand_as(static[rows:]))


def _caused_by_oom(error: BaseException) -> bool:
    """Whether ``error`` is, or was raised while handling, an out-of-memory error."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, torch.OutOfMemoryError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class CUDAGraphDenoiser:
    """Wrap ``denoiser(x, t) -> eps`` so that each batch size runs as a replayed CUDA graph.

    The first call with a batch of ``B`` rows warms the model up on a side stream, captures one
    graph on static input buffers ``[B, *shape]`` (and ``[B]`` timesteps) and replays it; later
    calls with ``B`` rows only copy their inputs in and replay. All graphs of one wrapper share
    one memory pool. Use it wherever a denoiser goes, the sequential reference included::

        graphed = CUDAGraphDenoiser(eps_model, shape=(4, 64, 64), dtype=torch.float16, device="cuda")
        system = fpsolve.TriangularSystem(sampler=..., denoiser=graphed, shape=(4, 64, 64),
                                          device="cuda", dtype=torch.float32, model_dtype=torch.float16)
        fpsolve.solve(system, "sequential"); fpsolve.solve(system, "taa")

    Calls whose input does not match ``shape``, ``dtype`` and ``device`` run eagerly (with one
    warning), as does everything on a CPU. The denoiser must not synchronise with the host or
    branch on tensor values inside ``forward``; if capture fails, the wrapper warns once and
    stays eager.

    Args:
        denoiser: the model, ``denoiser(x, t) -> eps``.
        shape: the shape of one sample (without the batch axis).
        dtype: the dtype of ``x`` (the system's ``model_dtype``).
        device: where the model runs; anything but an available CUDA device means pass-through.
        warmup: eager calls on a side stream before each capture (lazy initialisation, cuDNN
            autotuning and allocator warm-up must happen outside the capture).
        batch_multiple: pad each batch up to a multiple of this (1: one graph per exact batch
            size). A parallel solve with window T shrinks its batch every iteration; padding to a
            multiple of, say, 8 bounds the number of graphs at the cost of a few padded rows.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        shape: Sequence[int],
        dtype: torch.dtype,
        device: str | torch.device,
        *,
        warmup: int = 2,
        batch_multiple: int = 1,
    ):
        if not callable(denoiser):
            raise InvalidOptionError("CUDAGraphDenoiser: denoiser must be callable as denoiser(x, t) -> eps.")
        warmup = as_int("CUDAGraphDenoiser: warmup", warmup, minimum=1)
        batch_multiple = as_int("CUDAGraphDenoiser: batch_multiple", batch_multiple, minimum=1)
        if not isinstance(dtype, torch.dtype):
            raise InvalidOptionError(f"CUDAGraphDenoiser: dtype must be a torch.dtype; got {dtype!r}.")
        self.denoiser = denoiser
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self.warmup = warmup
        self.batch_multiple = batch_multiple
        #: Why graphs are off (``None`` while they are on or were never wanted).
        self.disabled_reason: str | None = None
        self._graphs: dict[int, _CapturedCall] = {}
        self._pool: Any = None
        self._warned_mismatch = False
        self._enabled = self.device.type == "cuda" and torch.cuda.is_available()
        if self._enabled and self.device.index is None:
            # Tensors created on "cuda" live on "cuda:N", and torch.device("cuda") != "cuda:N".
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type == "cuda" and not self._enabled:
            warnings.warn(
                "CUDAGraphDenoiser: CUDA is not available; calling the denoiser eagerly.",
                CUDAGraphWarning,
                stacklevel=2,
            )

    # -- introspection -------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether calls are (or will be) replayed as graphs."""
        return self._enabled and self.disabled_reason is None

    @property
    def captured_sizes(self) -> tuple[int, ...]:
        """The batch sizes captured so far, ascending."""
        return tuple(sorted(self._graphs))

    @property
    def cache_key(self) -> str | None:
        """A stable name for on-disk latency caches: the wrapped model's, marked as graphed."""
        inner = denoiser_cache_key(self.denoiser)
        return None if inner is None else f"cudagraph({inner})"

    def reset(self) -> None:
        """Drop every captured graph (frees their memory pool once nothing else holds it)."""
        self._graphs.clear()
        self._pool = None

    # -- the call --------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``eps`` for ``x`` ``[B, *shape]`` at timesteps ``t`` ``[B]``; a graph replay when possible."""
        if not self.enabled or not self._matches(x, t):
            return self.denoiser(x, t)
        size = -(-x.shape[0] // self.batch_multiple) * self.batch_multiple
        call = self._graphs.get(size)
        if call is None:
            call = self._capture_or_none(x, t, size)
            if call is None:
                return self.denoiser(x, t)
            self._graphs[size] = call
        return call.run(x, t)

    def _matches(self, x: torch.Tensor, t: torch.Tensor) -> bool:
        ok = (
            isinstance(x, torch.Tensor)
            and isinstance(t, torch.Tensor)
            and tuple(x.shape[1:]) == self.shape
            and x.dtype == self.dtype
            and x.device == self.device
            and t.device == self.device
            and t.dim() == 1
            and t.shape[0] == x.shape[0]
        )
        if not ok and not self._warned_mismatch:
            self._warned_mismatch = True
            got = (
                f"x {list(x.shape)} {x.dtype} on {x.device}"
                if isinstance(x, torch.Tensor)
                else type(x).__name__
            )
            warnings.warn(
                f"CUDAGraphDenoiser: captured for x [B, {', '.join(map(str, self.shape))}] "
                f"{self.dtype} on {self.device} with t [B]; got {got}: calling eagerly.",
                CUDAGraphWarning,
                stacklevel=3,
            )
        return ok

    def _capture_or_none(self, x: torch.Tensor, t: torch.Tensor, size: int) -> _CapturedCall | None:
        try:
            return self._capture(x, t, size)
        except Exception as error:
            if _caused_by_oom(error):
                raise  # not a capture problem: let the caller split the batch
            self.disabled_reason = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"CUDAGraphDenoiser: capture failed at batch {size} ({self.disabled_reason}); "
                "calling the denoiser eagerly from now on.",
                CUDAGraphWarning,
                stacklevel=3,
            )
            return None

    def _capture(self, x: torch.Tensor, t: torch.Tensor, size: int) -> _CapturedCall:
        """Warm up on a side stream, then capture one call on static buffers of ``size`` rows."""
        static_x = torch.empty((size, *self.shape), dtype=self.dtype, device=self.device)
        static_t = torch.empty((size,), dtype=t.dtype, device=self.device)
        _fill(static_x, x)
        _fill(static_t, t)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(self.warmup):
                self.denoiser(static_x, static_t)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self._pool):
            output = self.denoiser(static_x, static_t)
        if not isinstance(output, torch.Tensor) or tuple(output.shape) != tuple(static_x.shape):
            got = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise TypeError(
                f"the captured call returned {got}, expected a tensor of shape {list(static_x.shape)}"
            )
        return _CapturedCall(graph, static_x, static_t, output)
