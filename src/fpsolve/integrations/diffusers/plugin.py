"""The fpsolve plugin of the diffusers integration: ``fpsolve_make_system`` for diffusers objects.

Register it with the entry point ``diffusers = "fpsolve.integrations.diffusers.plugin"`` in the
group ``fpsolve``. Loading it is cheap: it imports diffusers only when an object from diffusers
reaches the hook, so ``fpsolve.solve(pipe, ...)`` and ``fpsolve.make_system(scheduler, ...)``
work while installations without diffusers pay nothing.

* a pipeline: ``options`` are the pipeline call's arguments (plus ``generator`` and ``dtype``);
* a scheduler (after ``set_timesteps``): ``options`` are those of ``scheduler_system``
  (``model``, ``shape``, ``batch``, ``generator`` or ``noise``, ...).
"""

from __future__ import annotations

from typing import Any

from ...hookspecs import hookimpl
from .pipelines import is_pipeline, prepare_pipeline
from .system import scheduler_system

__all__ = ["fpsolve_make_system"]


def _from_diffusers(obj: Any) -> bool:
    return type(obj).__module__.startswith("diffusers")


@hookimpl
def fpsolve_make_system(obj: Any, options: dict[str, Any]) -> Any:
    """A :class:`~fpsolve.TriangularSystem` for a diffusers pipeline or scheduler, else ``None``."""
    if not _from_diffusers(obj):
        return None

    if is_pipeline(obj):
        call = dict(options)
        dtype = call.pop("dtype", None)
        return prepare_pipeline(obj, call, dtype).system
    if hasattr(obj, "step") and hasattr(obj, "set_timesteps"):
        return scheduler_system(obj, **options)
    return None
