"""The one place that decides how a solve evaluates its model: :func:`choose`.

The rule, in order: a ``distributed`` solve shards each model call over the ranks
(:class:`~fpsolve.evaluators.ShardedEvaluator`); a solve on a CUDA device splits a call that
does not fit in memory instead of failing (:class:`~fpsolve.evaluators.ChunkedEvaluator`);
anything else makes the one plain call (:class:`~fpsolve.evaluators.PlainEvaluator`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from ..errors import InvalidOptionError
from ..system import Evaluator, TriangularSystem
from .chunked import ChunkedEvaluator
from .plain import PlainEvaluator
from .sharded import sharded_evaluator

__all__ = ["EvaluatorKind", "choose", "kind_for"]

EvaluatorKind = Literal["plain", "chunked", "sharded"]
"""The evaluators :func:`choose` picks from, as :func:`kind_for` names them."""


def _distributes(distributed: Any) -> bool:
    # None and False both mean "one process": solve's documented single-process values.
    return distributed is not None and distributed is not False


def kind_for(device: torch.device | str, distributed: Any = None) -> EvaluatorKind:
    """Which evaluator a solve on ``device`` with ``distributed=...`` gets (see the module's rule).

    Args:
        device: where the system's states live (``system.device``).
        distributed: ``solve``'s argument: ``None``/``False`` (one process), ``True`` (the default
            process group) or a ``torch.distributed.ProcessGroup``.
    """
    if _distributes(distributed):
        return "sharded"
    try:
        device_type = torch.device(device).type
    except (RuntimeError, TypeError, ValueError) as error:
        raise InvalidOptionError(
            f"device must be a torch.device or a device name such as 'cuda:0'; got {device!r} ({error})."
        ) from None
    return "chunked" if device_type == "cuda" else "plain"


def choose(system: TriangularSystem, *, distributed: Any = None) -> Evaluator:
    """The evaluator ``fpsolve.solve`` hands to the driver for ``system``.

    Args:
        system: the system to solve.
        distributed: as for :func:`fpsolve.solve`: ``None``/``False``, ``True`` or a
            ``torch.distributed.ProcessGroup``.

    Raises:
        DistributedError: ``distributed`` asks for a process group that is not initialised.
        InvalidOptionError: ``system`` is not a TriangularSystem, or ``distributed`` is neither
            of the values above.
    """
    if not isinstance(system, TriangularSystem):
        raise InvalidOptionError(
            "choose needs a TriangularSystem (build one with fpsolve.make_system); "
            f"got {type(system).__name__}."
        )
    kind = kind_for(system.device, distributed)
    if kind == "sharded":
        return sharded_evaluator(system, distributed)
    if kind == "chunked":
        return ChunkedEvaluator(system)
    return PlainEvaluator(system)
