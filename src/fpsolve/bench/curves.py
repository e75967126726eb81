"""Error to the sequential sample against an iteration cap (the paper's quality-vs-steps curve).

The curve's point n is the sample of ``solve(system, solver, stopping=RMS(tiny), max_iters=n)``:
the solver runs n parallel iterations and its ``x_0`` is compared with the sequential sample.
Running that solve for every n = 1..N costs N(N+1)/2 iterations; this module gets the same N
samples from ONE solve with cap N. An observer sees each iteration's updated iterate
(:attr:`fpsolve.IterationInfo.states`, a copy), and a capped solve differs from the uncapped
one only in where it stops, so the iterate after iteration n IS the capped solve's result for
cap n. ``tests/test_bench.py`` checks this equality against literal capped solves.
"""

from __future__ import annotations

import warnings
from typing import Any

import attrs
import torch

from ..api import solve
from ..driver import IterationInfo
from ..errors import InvalidOptionError, NotConvergedWarning
from ..solution import Solution
from ..stopping import RMS
from ..system import TriangularSystem
from .matrix import SolverSpec
from .metrics import ErrorMetrics, ToImages, compare_samples

__all__ = ["CapCurve", "capped_samples", "error_vs_cap"]


class _FinalStateRecorder:
    """An observer: keeps ``x_0`` of the iterate after each iteration."""

    def __init__(self) -> None:
        self.snapshots: list[torch.Tensor] = []

    def __call__(self, info: IterationInfo) -> None:
        states = info.states
        if states is not None:
            self.snapshots.append(states[-1].to("cpu"))


def capped_samples(
    system: TriangularSystem, spec: SolverSpec, max_iters: int, tiny: float = 1e-10
) -> list[torch.Tensor]:
    """``x_0`` ``[N, *shape]`` of ``solve(..., stopping=RMS(tiny), max_iters=n)`` for n = 1..max_iters.

    The solver's own options (``spec.solver_options``) are kept; its stopping rule is replaced.
    """
    if spec.stopping == "sequential":
        raise InvalidOptionError("the sequential solver has no iteration cap to vary.")
    steps = system.num_steps
    cap = max_iters  # not min(., T): an unsafeguarded solver (aa) may need more than T iterations
    recorder = _FinalStateRecorder()
    # window=T explicitly: with a narrower window the iterate after n iterations holds copies
    # below the window, not what the capped solve returns at x_0 once it stops early.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotConvergedWarning)  # the cap is the point here
        final: Solution = solve(
            system, spec.solver, stopping=RMS(tol1=tiny, tol2=0.0), max_iters=cap, window=steps,
            observers=[recorder], **spec.solver_options(steps)
        )
    shape = (system.num_samples, *system.shape)
    # snapshots[n - 1] is the iterate after n iterations; the solve's own result is the iterate
    # after its last iteration, and every larger cap returns it too.
    samples = [snapshot.reshape(shape) for snapshot in recorder.snapshots[:max_iters]]
    last = final.sample.detach().to("cpu").reshape(shape)
    samples += [last] * (max_iters - len(samples))
    return samples


@attrs.define(frozen=True)
class CapCurve:
    """Error to sequential after n = 1..N iterations of one solver on one sampler (seed 0).

    Attributes:
        model, sampler, solver: labels.
        errors: ``errors[n-1]`` is the error after n iterations.
    """

    model: str
    sampler: str
    solver: str
    errors: tuple[ErrorMetrics, ...]

    @property
    def caps(self) -> list[int]:
        """The iteration caps 1..N."""
        return list(range(1, len(self.errors) + 1))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (PSNR ``inf`` becomes ``None``)."""

        def finite(value: float | None) -> float | None:
            return None if value is None or value == float("inf") else value

        return {
            "model": self.model,
            "sampler": self.sampler,
            "solver": self.solver,
            "caps": self.caps,
            "rms": [e.rms for e in self.errors],
            "max_abs_pixels": [e.max_abs_pixels for e in self.errors],
            "psnr_db": [finite(e.psnr_db) for e in self.errors],
        }


def error_vs_cap(
    system: TriangularSystem,
    spec: SolverSpec,
    reference: torch.Tensor,
    to_images: ToImages | None,
    max_iters: int,
    tiny: float = 1e-10,
    model: str = "",
    sampler: str = "",
) -> CapCurve:
    """The :class:`CapCurve` of ``spec`` on ``system`` against the sequential ``reference`` sample."""
    reference = reference.detach().to("cpu")
    errors = tuple(
        compare_samples(x, reference, to_images) for x in capped_samples(system, spec, max_iters, tiny)
    )
    return CapCurve(model, sampler, spec.label, errors)
