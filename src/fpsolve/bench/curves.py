"""Error to the sequential sample against an iteration cap (the paper's quality-vs-steps curve).

The curve's point n is the sample of ``solve(system, solver, stopping=MaxIters(n) & RMS(tiny))``:
the solver runs n parallel iterations and its ``x_0`` is compared with the sequential sample.
Running that solve for every n = 1..N costs N(N+1)/2 iterations; this module gets the same N
samples from ONE solve with cap N. A stopping rule sees each iteration's starting iterate
(:class:`~fpsolve.stopping.StoppingView` ``.states``, which with the window spanning all T
positions always holds ``x_0``), and a capped solve differs from the uncapped one only in where
it stops, so the iterate that iteration n+1 starts from IS the capped solve's result for cap n.
``tests/test_bench.py`` checks this equality against literal capped solves.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from ..api import solve
from ..errors import InvalidOptionError
from ..solution import Solution
from ..stopping import RMS, MaxIters, StoppingRule, StoppingView
from ..system import TriangularSystem
from .matrix import SolverSpec
from .metrics import ErrorMetrics, ToImages, compare_samples

__all__ = ["CapCurve", "capped_samples", "error_vs_cap"]


@attrs.define(frozen=True, eq=False)
class _FinalStateRecorder(StoppingRule):
    """Judges no row and never stops; keeps ``x_0`` of the iterate each iteration starts from."""

    steps: int
    snapshots: list[torch.Tensor] = attrs.field(factory=list, repr=False)

    def converged(self, view: StoppingView) -> None:
        """Record ``x_0`` (the last window row); the window must reach the last state."""
        if view.hi != self.steps:
            raise InvalidOptionError("iteration-cap curves need the window to span all T positions.")
        self.snapshots.append(view.states[-1].detach().to("cpu").clone())
        return None


def capped_samples(
    system: TriangularSystem, spec: SolverSpec, max_iters: int, tiny: float = 1e-10
) -> list[torch.Tensor]:
    """``x_0`` ``[N, *shape]`` of ``solve(..., stopping=MaxIters(n) & RMS(tiny))`` for n = 1..max_iters.

    The solver's own options (``spec.solver_options``) are kept; its stopping rule is replaced.
    """
    if spec.stopping == "sequential":
        raise InvalidOptionError("the sequential solver has no iteration cap to vary.")
    steps = system.num_steps
    cap = max_iters  # not min(., T): an unsafeguarded solver (aa) may need more than T iterations
    recorder = _FinalStateRecorder(steps)
    rule = MaxIters(cap) & RMS(tol1=tiny, tol2=0.0) & recorder
    # window=T explicitly: the recorder reads x_0, which only a window reaching the last state holds.
    final: Solution = solve(
        system, spec.solver, stopping=rule, max_iters=cap, window=steps, **spec.solver_options(steps)
    )
    shape = (system.num_samples, *system.shape)
    # snapshots[n] is the iterate after n iterations (n = 0: the initial guess); the solve's own
    # result is the iterate after its last iteration, and every larger cap returns it too.
    done = len(recorder.snapshots)
    samples = [recorder.snapshots[n].reshape(shape) for n in range(1, min(done, max_iters + 1))]
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
