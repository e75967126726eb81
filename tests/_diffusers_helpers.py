"""What the diffusers tests share: their set-up (one torch thread, module-wide tiny pipelines,
scheduler swaps) and their parity checks (``pipe()`` against ``sample(pipe)``).

The tiny components themselves are built by :mod:`fpsolve.integrations.diffusers.testing`. A
test module takes a fixture by assignment, which pytest collects like one written in the module::

    _one_thread = one_thread_per_module()
    flux = pipeline_fixture(tiny_flux_pipeline, "flux")
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fpsolve.integrations.diffusers import sample

__all__ = ["EXACT", "PIXEL", "torch_threads", "one_thread_per_module", "pipeline_fixture",
           "scheduler_swapped", "run_both", "images_of", "assert_same_output", "latent_relative_error"]

EXACT = dict(tol=1e-9)  # tolerance -> 0: every state is solved to the float64 floor
PIXEL = 1 / 255  # one level of an 8-bit image in [0, 1]


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


# -- parity with the pipeline's own call -----------------------------------------------------------

def run_both(pipe, seed=0, global_seed=None, solver="taa", generator_list=None, **kwargs):
    """(pipeline output, fpsolve output, solution); ``global_seed`` seeds torch's global RNG first."""
    def generator():
        if generator_list is not None:
            return [torch.Generator().manual_seed(s) for s in generator_list]
        return torch.Generator().manual_seed(seed)

    solver_keys = ("tol", "stopping", "window", "order", "history", "dtype", "max_iters")
    options = {key: kwargs.pop(key) for key in solver_keys if key in kwargs}
    if global_seed is not None:
        torch.manual_seed(global_seed)
    with torch.no_grad():
        reference = pipe(generator=generator(), **kwargs)
    if global_seed is not None:
        torch.manual_seed(global_seed)
    out, solution = sample(pipe, solver=solver, generator=generator(), **options, **kwargs)
    return reference, out, solution


def images_of(output) -> np.ndarray:
    """The images or video frames of a pipeline output (dataclass or tuple) as float64, PIL on [0, 1]."""
    value = output[0]
    if isinstance(value, list):  # PIL: a list of images, or (video) a list of lists of frames
        value = np.stack([np.stack([np.asarray(f) for f in v]) if isinstance(v, list) else np.asarray(v)
                          for v in value]) / 255.0
    if isinstance(value, torch.Tensor):
        value = value.cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def assert_same_output(reference, out, limit: float) -> float:
    """Same type, same fields, every field but the images (or frames) equal, and the images within
    ``limit`` (max abs); returns the images' error."""
    assert type(out) is type(reference)
    if dataclasses.is_dataclass(reference):
        fields = [f.name for f in dataclasses.fields(reference)]
        assert [f.name for f in dataclasses.fields(out)] == fields
        for name in fields[1:]:  # the first field is the output compared below (images, frames)
            assert getattr(out, name) == getattr(reference, name)
    else:
        assert len(out) == len(reference)
    assert type(out[0]) is type(reference[0])
    a, b = images_of(out), images_of(reference)
    assert a.shape == b.shape
    error = float(np.abs(a - b).max())
    assert error <= limit, f"max abs difference {error:.2e}"
    return error


def latent_relative_error(reference, out) -> float:
    """Max abs difference of the latents over their max abs value."""
    a, b = (torch.as_tensor(images_of(o)) for o in (out, reference))
    assert a.shape == b.shape
    return float((a - b).abs().max() / b.abs().max())
