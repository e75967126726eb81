"""Set-up shared by the diffusers tests: one torch thread, module-wide tiny pipelines, scheduler swaps.

The tiny components themselves are built by :mod:`fpsolve.integrations.diffusers.testing`; this
module holds only the pytest side. A test module takes what it needs by assignment, which pytest
collects like a fixture written in the module::

    _one_thread = one_thread_per_module()
    flux = pipeline_fixture(tiny_flux_pipeline, "flux")
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

__all__ = ["torch_threads", "one_thread_per_module", "pipeline_fixture", "scheduler_swapped"]


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread_per_module() -> Any:
    """An autouse module fixture: the module's tests run torch on one thread.

    Tiny tensors: thread start-up dominates, and the CPUs are shared.
    """
    @pytest.fixture(autouse=True, scope="module")
    def one_thread() -> Iterator[None]:
        with torch_threads(1):
            yield
    return one_thread


def pipeline_fixture(build: Callable[[Path], Any], directory: str) -> Any:
    """A module fixture: ``build(tmp / directory)``, one pipeline shared by the module's tests."""
    @pytest.fixture(scope="module")
    def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Any:
        return build(tmp_path_factory.mktemp(directory))
    return pipeline


@contextlib.contextmanager
def scheduler_swapped(pipe: Any, scheduler: Any) -> Iterator[Any]:
    """``pipe`` with ``scheduler`` inside the block and its own scheduler back after it
    (the pipeline is a module fixture: a failing test must not leave its scheduler to the next)."""
    own = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield pipe
    finally:
        pipe.scheduler = own
