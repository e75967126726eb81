"""fpsolve.evaluators: one seam for evaluation. The chooser's rule (sharded when distributed,
chunked on CUDA, plain otherwise), each evaluator equal to the system's own call, and the choice
made in one place only."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fpsolve
from fpsolve.errors import InvalidOptionError
from fpsolve.evaluators import (
    ChunkedEvaluator,
    DistributedError,
    Evaluator,
    PlainEvaluator,
    ShardedEvaluator,
    choose,
    kind_for,
)

from .conftest import make_sampler, make_system

SRC = Path(__file__).resolve().parents[1] / "src" / "fpsolve"


@pytest.fixture
def system():
    return make_system(make_sampler(fpsolve.samplers.DDIM, 12), batch=3)


def fake_cuda(system):
    """The same system claiming to live on a CUDA device: what the chooser reads, without a GPU
    (its tensors stay on the CPU, which the chunked evaluator never checks)."""
    object.__setattr__(system, "device", torch.device("cuda", 0))
    return system


def window_of(system, positions):
    return system.flat_noise[positions].clone()


@pytest.mark.parametrize("device, distributed, kind", [
    ("cpu", None, "plain"),
    ("cpu", False, "plain"),
    (torch.device("cpu"), None, "plain"),
    ("meta", None, "plain"),
    ("cuda", None, "chunked"),
    (torch.device("cuda", 1), False, "chunked"),
    ("cpu", True, "sharded"),
    ("cuda:0", True, "sharded"),  # sharding wins over chunking
    ("cpu", object(), "sharded"),  # a ProcessGroup (any non-False value is for sharded_evaluator to check)
])
def test_the_rule(device, distributed, kind):
    assert kind_for(device, distributed) == kind


def test_a_bad_device_names_the_argument():
    with pytest.raises(InvalidOptionError, match="device must be"):
        kind_for("not a device")


def test_plain_on_the_cpu_is_the_systems_own_call(system):
    evaluator = choose(system)
    assert type(evaluator) is PlainEvaluator and isinstance(evaluator, Evaluator)
    positions = [2, 3, 4, 5]
    assert torch.equal(evaluator(window_of(system, positions), positions),
                       system.evaluate(window_of(system, positions), positions))
    assert type(choose(system, distributed=False)) is PlainEvaluator


def test_chunked_on_cuda(system):
    positions = list(range(12))
    expected = system.evaluate(window_of(system, positions), positions)
    evaluator = choose(fake_cuda(system))
    assert type(evaluator) is ChunkedEvaluator and isinstance(evaluator, Evaluator)
    assert evaluator.max_batch is None  # one chunk until memory runs out
    assert torch.equal(evaluator(window_of(system, positions), positions), expected)


def test_sharded_when_distributed_without_a_group_names_the_fix(system):
    assert not dist.is_initialized()
    with pytest.raises(DistributedError, match="init_process_group"):
        choose(system, distributed=True)
    with pytest.raises(DistributedError, match="init_process_group"):
        choose(fake_cuda(system), distributed=True)  # sharding wins over chunking
    with pytest.raises(InvalidOptionError, match="ProcessGroup"):
        choose(system, distributed="nccl")


def test_sharded_over_one_rank_equals_the_plain_call(system, tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(os.fspath(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        evaluator = choose(system, distributed=True)
        assert type(evaluator) is ShardedEvaluator and isinstance(evaluator, Evaluator)
        assert (evaluator.rank, evaluator.world_size) == (0, 1)
        positions = [0, 1, 2, 3, 4, 5, 6]
        assert torch.equal(evaluator(window_of(system, positions), positions),
                           system.evaluate(window_of(system, positions), positions))
    finally:
        dist.destroy_process_group()


def test_choose_refuses_what_is_not_a_system():
    with pytest.raises(InvalidOptionError, match="TriangularSystem"):
        choose("a system")
    with pytest.raises(InvalidOptionError, match="TriangularSystem"):
        PlainEvaluator("a system")


def test_solve_takes_the_choosers_evaluator(system, monkeypatch):
    """solve hands the driver what choose returns, asked with solve's distributed argument."""
    asked = []

    def counting(system, *, distributed=None):
        asked.append(distributed)
        return choose(system, distributed=distributed)

    monkeypatch.setattr(fpsolve.api, "choose_evaluator", counting)
    fpsolve.solve(system, "taa", tol=1e-6)
    fpsolve.solve(system, "sequential", distributed=False)
    assert asked == [None, False]


_BUILDERS = {"PlainEvaluator", "ChunkedEvaluator", "ShardedEvaluator", "sharded_evaluator"}


def test_the_evaluator_is_built_in_one_place():
    """Outside fpsolve/evaluators no module builds an evaluator itself: they ask choose()."""
    builders = {}
    for path in sorted(SRC.rglob("*.py")):
        if "evaluators" in path.relative_to(SRC).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in _BUILDERS:
                    where = str(path.relative_to(SRC))
                    builders.setdefault(where, []).append(f"{name} at line {node.lineno}")
    assert builders == {}
