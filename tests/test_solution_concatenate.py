"""``Solution.concatenate``: the one constructor of a batch's Solution from groups of samples solved
apart (what sample sharding returns), and the helpers that carry a Solution between processes."""

from __future__ import annotations

import math
import pickle
import warnings

import attrs
import pytest
import torch

import fpsolve
from fpsolve.distributed import subset_system
from fpsolve.solution import ResidualTrace, Solution, Status
from tests.conftest import make_sampler, make_system

BOUNDS = [(0, 2), (2, 3), (3, 5)]


def _parts(max_iters: int | None = None):
    system = make_system(make_sampler("ddim", 12), dim=6, batch=5, seed=1)
    if max_iters is None:
        options = dict(window=5, tol=1e-6)
    else:  # capped before convergence on purpose: the unconverged warning is expected
        options = dict(window=5, tol=1e-12, max_iters=max_iters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fpsolve.NotConvergedWarning)
        return system, [fpsolve.solve(subset_system(system, a, b), "taa", **options) for a, b in BOUNDS]


def test_the_parts_are_joined_on_the_sample_axis_and_their_statistics_merged():
    system, parts = _parts()
    whole = Solution.concatenate(parts, wall_time=1.5)
    assert torch.equal(whole.trajectory, torch.cat([p.trajectory for p in parts], dim=1))
    assert torch.equal(whole.sample, whole.trajectory[-1])
    assert whole.trajectory.shape == (13, 5, 6)
    assert whole.iterations == max(p.iterations for p in parts)
    assert whole.model_evals == sum(p.model_evals for p in parts)
    assert whole.status is Status.CONVERGED and whole.message == parts[0].message
    assert whole.converged_samples.tolist() == [True] * 5
    assert whole.wall_time == 1.5 and whole.solver is parts[0].solver and whole.order == parts[0].order
    # the merged trace: per iteration the worst group still running, the least advanced anchor
    longest = max(len(p.residuals) for p in parts)
    assert len(whole.residuals) == longest
    for i in range(longest):
        running = [p.residuals for p in parts if i < len(p.residuals)]
        rows = torch.stack([trace.first_order[i] for trace in running])
        worst = torch.where(rows.isnan(), -math.inf, rows).max(0).values
        assert torch.equal(whole.residuals.first_order[i].isnan(), worst == -math.inf)
        finite = worst > -math.inf
        assert torch.equal(whole.residuals.first_order[i][finite], worst[finite])
        assert whole.residuals.anchors[i] == min(trace.anchors[i] for trace in running)
        assert whole.residuals.evaluations[i] == sum(trace.evaluations[i] for trace in running)


def test_the_first_unconverged_part_names_the_status():
    _, parts = _parts(max_iters=1)
    assert all(p.status is Status.MAX_ITERS for p in parts)
    whole = Solution.concatenate(parts, wall_time=0.0, labels=["a", "b", "c"])
    assert whole.status is Status.MAX_ITERS and whole.message == f"a: {parts[0].message}"
    assert whole.converged_samples.tolist() == [False] * 5
    mixed = Solution.concatenate([_parts()[1][0], parts[1]], wall_time=0.0, labels=["a", "b"])
    assert mixed.status is Status.MAX_ITERS and mixed.message.startswith("b: ")
    assert mixed.converged_samples.tolist() == [True, True, False]


def test_a_part_without_verdicts_counts_all_or_nothing():
    _, parts = _parts()
    bare = Solution.concatenate([parts[0], parts[1].without_states().with_trajectory(parts[1].trajectory)],
                                wall_time=0.0)
    assert bare.converged_samples.tolist() == [True] * 3
    unsaid = attrs.evolve(parts[1], converged_samples=None, status=Status.STOPPED)
    assert Solution.concatenate([parts[0], unsaid], wall_time=0.0).converged_samples.tolist() == [
        True, True, False]


def test_statistics_travel_without_states_solver_or_plan():
    _, parts = _parts()
    light = parts[0].without_states()
    assert light.trajectory.numel() == 0 and light.sample.numel() == 0
    assert light.solver is None and light.plan is None
    assert light.iterations == parts[0].iterations and light.residuals is parts[0].residuals
    back = pickle.loads(pickle.dumps(light)).with_trajectory(parts[0].trajectory)
    assert torch.equal(back.sample, parts[0].sample) and back.status is parts[0].status


def test_bad_calls_are_refused():
    with pytest.raises(ValueError, match="at least one part"):
        Solution.concatenate([], wall_time=0.0)
    _, parts = _parts()
    with pytest.raises(ValueError, match="2 labels for 3 parts"):
        Solution.concatenate(parts, wall_time=0.0, labels=["a", "b"])
    with pytest.raises(ValueError, match="at least one trace"):
        ResidualTrace.merge([])
