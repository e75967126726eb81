"""Every registered sampler x solver x stopping rule x initializer runs, generated from the registry.

A new plugin joins the matrix by registering; nothing here lists the built-ins by hand, except
the options a component cannot run without (the ``trajectory`` initializer needs a trajectory).
"""

from __future__ import annotations

import pytest
import torch

import fpsolve
from fpsolve.control import runs_sequentially
from fpsolve.registry import get_registry
from fpsolve.testing.checks import solver_controller
from fpsolve.testing.problems import problem_denoiser, problem_sampler

STEPS, DIM, BATCH = 10, 4, 2


def required_options(kind: str, name: str, system: fpsolve.TriangularSystem) -> dict:
    """Options without which a component cannot run (kept minimal on purpose)."""
    if kind == "initializer" and get_registry().lookup(kind, name).cls is fpsolve.initializers.FromTrajectory:
        guess = fpsolve.solve(system, "sequential").trajectory
        return {"trajectory": guess + 0.05 * torch.randn_like(guess)}
    return {}


def build_sampler(name: str):
    """The registered sampler on its family's standard problem (variance-preserving or flow)."""
    return problem_sampler(name, STEPS)


def _names(kind: str, with_aliases: bool = False) -> list[str]:
    registry = get_registry()
    return registry.names(kind) if with_aliases else sorted(e.name for e in registry.primary(kind))


@pytest.mark.parametrize("initializer", _names("initializer"))
# Every combination must run; some (aa without its safeguard) end at their cap by design, which
# solve() reports with a NotConvergedWarning: expected here, so not shown.
@pytest.mark.filterwarnings("ignore::fpsolve.errors.NotConvergedWarning")
@pytest.mark.parametrize("stopping", _names("stopping rule"))
@pytest.mark.parametrize("solver", _names("solver", with_aliases=True))
@pytest.mark.parametrize("sampler", _names("sampler"))
def test_mix(sampler, solver, stopping, initializer):
    built = build_sampler(sampler)
    system = fpsolve.TriangularSystem(sampler=built, denoiser=problem_denoiser(built, DIM, 1),
                                      shape=(DIM,), batch=BATCH, generator=torch.Generator().manual_seed(0))
    reference = fpsolve.solve(system, "sequential")
    init = fpsolve.registry.resolve("initializer", initializer,
                                    required_options("initializer", initializer, system))
    if runs_sequentially(fpsolve.registry.resolve("solver", solver)):
        # The sequential loop refuses a rule, a first guess and a window (it would ignore them).
        with pytest.raises(fpsolve.errors.InvalidOptionError,
                           match="uses no window or stopping or initializer"):
            fpsolve.solve(system, solver, stopping=stopping, initializer=init, window=6)
        solution = fpsolve.solve(system, solver)
    else:
        solution = fpsolve.solve(system, solver, stopping=stopping, initializer=init, window=6)
    assert solution.sample.shape == (BATCH, DIM)
    assert torch.isfinite(solution.trajectory).all()
    assert solution.status is not fpsolve.Status.NONFINITE
    trace = solution.residuals
    warmup = solution.iterations - len(trace)  # sequential rounds an initializer spent (coarse)
    assert warmup >= 0 and solution.model_evals == sum(trace.evaluations) + warmup * BATCH
    if solver_controller(solution.solver).safeguard:
        assert len(trace) <= STEPS
    if solution.converged and stopping == "rms":  # the default rule bounds the error at tol 1e-3
        error = (solution.sample - reference.sample).abs().max().item()
        assert error < 0.1, f"{solver}/{stopping}/{initializer}: error {error:.2e} to sequential"


@pytest.mark.parametrize("initializer", _names("initializer"))
@pytest.mark.filterwarnings("ignore::fpsolve.errors.NotConvergedWarning")
# The sequential loop takes no cap (test_mix checks that it refuses one), so it is left out here.
@pytest.mark.parametrize("solver", [name for name in _names("solver", with_aliases=True)
                                    if not runs_sequentially(fpsolve.registry.resolve("solver", name))])
@pytest.mark.parametrize("sampler", _names("sampler"))
def test_mix_under_the_one_cap(sampler, solver, initializer):
    """The controller's cap (``max_iters=``, which replaced the ``max_iters`` stopping rule of this
    matrix) ends every combination after at most that many parallel iterations, finite, with
    status MAX_ITERS unless it converged first."""
    built = build_sampler(sampler)
    system = fpsolve.TriangularSystem(sampler=built, denoiser=problem_denoiser(built, DIM, 1),
                                      shape=(DIM,), batch=BATCH, generator=torch.Generator().manual_seed(0))
    init = fpsolve.registry.resolve("initializer", initializer,
                                    required_options("initializer", initializer, system))
    cap = 2
    solution = fpsolve.solve(system, solver, initializer=init, window=6, max_iters=cap,
                             stopping=fpsolve.stopping.RMS(tol1=1e-12, tol2=1e-12))
    assert len(solution.residuals) <= cap
    assert solution.status in (fpsolve.Status.MAX_ITERS, fpsolve.Status.CONVERGED)
    if solution.status is fpsolve.Status.MAX_ITERS:
        assert len(solution.residuals) == cap and not solution.converged
    assert torch.isfinite(solution.trajectory).all()
