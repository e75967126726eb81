"""Evaluators: how a solve makes each iteration's ONE batched model call.

An evaluator is ``evaluate(states [P, N, D], positions) -> outputs [P, N, D]`` (the
:class:`~fpsolve.system.Evaluator` protocol, defined in the system's layer so the driver can
name it). Three live here, each in its own module, and :func:`choose` picks one per solve:

* :class:`PlainEvaluator` (:mod:`.plain`): the whole batch in one call,
  :meth:`fpsolve.TriangularSystem.evaluate`;
* :class:`ChunkedEvaluator` (:mod:`.chunked`): the batch in chunks that fit in memory, halved
  on out-of-memory and remembered per denoiser (:func:`known_max_batch`,
  :func:`forget_max_batches`); chosen on CUDA devices;
* :class:`ShardedEvaluator` (:mod:`.sharded`, built by :func:`sharded_evaluator`): the batch cut
  across the ranks of a ``torch.distributed`` group; chosen for ``distributed=...``.

The layer sits above the driver (which takes any evaluator) and below the api (which asks
:func:`choose`).
"""

from __future__ import annotations

from ..system import Evaluator
from .choice import EvaluatorKind, choose, kind_for
from .chunked import ChunkedEvaluator, forget_max_batches, known_max_batch
from .plain import PlainEvaluator
from .sharded import (
    DistributedError,
    RankFailedError,
    RankFailure,
    ShardedEvaluator,
    chunk_bounds,
    sharded_evaluator,
)

__all__ = [
    "Evaluator",
    "EvaluatorKind",
    "choose",
    "kind_for",
    "PlainEvaluator",
    "ChunkedEvaluator",
    "known_max_batch",
    "forget_max_batches",
    "ShardedEvaluator",
    "sharded_evaluator",
    "chunk_bounds",
    "DistributedError",
    "RankFailedError",
    "RankFailure",
]
