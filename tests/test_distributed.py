"""Distributed solving over torch.distributed (gloo, CPU): bit-identity, sample sharding, faults, CLI.

Starting a process costs seconds (importing torch), so the multi-process checks run few
launches: the workers of one launch go through a whole list of cases and save what they saw;
the tests then compare. Workers are this module run as ``python -m tests.test_distributed``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fpsolve
from fpsolve.distributed import (
    AUTO_SLACK,
    DistributedError,
    RankFailedError,
    chunk_bounds,
    plan,
    sharded_evaluator,
    solve_distributed,
    subset_system,
)
from fpsolve.errors import InvalidOptionError
from tests.conftest import make_sampler, make_system

ROOT = Path(__file__).resolve().parents[1]
STEPS, WINDOW = 20, 7  # the window is a multiple of neither 2 nor 3 ranks
CASES = [(kind, solver) for kind in ("ddim", "ddpm", "dpm_solver") for solver in ("fp", "taa")]
SAMPLE_SHARDED = 4  # samples of the sample-sharding case: 2+2 on two ranks, 2+1+1 on three
CLI_ARGS = ["sample", "--model", "gmm", "--steps", "12", "--samples", "3", "--window", "5", "--tol", "1e-6",
            "--timeout", "30", "--out", "samples.pt"]
LAUNCH_TIMEOUT = 100  # seconds; a hang fails the test instead of blocking the suite


def _case_system(kind: str, batch: int | None = None):
    return make_system(make_sampler(kind, STEPS), dim=8, batch=batch, seed=3)


# -- in-process checks (no process group or a one-rank group) --------------------------------------


@pytest.mark.parametrize("total", [0, 1, 5, 7, 14, 21])
@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_chunk_bounds_are_contiguous_and_balanced(total, parts):
    bounds = chunk_bounds(total, parts)
    sizes = [stop - start for start, stop in bounds]
    assert len(bounds) == parts and bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    assert max(sizes) - min(sizes) <= 1 and sizes[0] == max(sizes)


def test_plan_rule():
    assert plan(8, 100, 1).mode == "window"  # one rank: nothing to split
    assert plan(1, 100, 4).mode == "window"  # fewer samples than ranks
    even = plan(8, 10, 4)
    assert even.mode == "samples" and even.sample_ranges == ((0, 2), (2, 4), (4, 6), (6, 8))
    assert even.rows_per_rank == 20
    uneven = plan(5, 10, 4)  # 2 samples on one rank: 20 rows against ceil(50 / 4) = 13
    assert uneven.mode == "window" and 20 > AUTO_SLACK * 13
    assert plan(17, 10, 4).mode == "samples"  # 50 rows against 43: within the slack
    assert plan(9, 10, 4).mode == "window"  # 30 rows against 23: beyond it
    assert plan(8, 10, 4, shard="window").mode == "window"
    assert plan(5, 10, 4, shard="samples").mode == "samples"
    with pytest.raises(InvalidOptionError, match="at least one sample per rank"):
        plan(2, 10, 4, shard="samples")
    with pytest.raises(InvalidOptionError, match="shard must be"):
        plan(2, 10, 4, shard="rows")


def test_not_initialised_names_the_fix(ddim_system):
    assert not torch.distributed.is_initialized()
    with pytest.raises(DistributedError, match=r"init_process_group"):
        fpsolve.solve(ddim_system, "taa", distributed=True)
    with pytest.raises(InvalidOptionError, match="ProcessGroup"):
        sharded_evaluator(ddim_system, "nccl")


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo,cuda:nccl", "mpi"])
def test_cpu_tensors_stay_on_the_cpu_for_cpu_backends(backend):
    from fpsolve.evaluators.sharded import _comm_device, _Group

    assert _comm_device(_Group(None, 0, 2, backend), torch.device("cpu")) == torch.device("cpu")


def test_subset_system_keeps_the_noise():
    system = _case_system("ddpm", batch=4)
    part = subset_system(system, 1, 3)
    assert part.num_samples == 2 and torch.equal(part.flat_noise, system.flat_noise[:, 1:3])
    with pytest.raises(InvalidOptionError, match="start < stop"):
        subset_system(system, 3, 3)


def _free_ports(count: int = 1) -> list[int]:
    """``count`` distinct free TCP ports (all held open while choosing, so they differ)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def test_one_rank_group_matches_single_process():
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_ports()[0]}", rank=0, world_size=1)
    try:
        system = _case_system("ddim", batch=2)
        alone = fpsolve.solve(system, "taa", window=WINDOW, tol=1e-6)
        shared = fpsolve.solve(system, "taa", window=WINDOW, tol=1e-6, distributed=True)
        group = dist.new_group([0])
        planned = solve_distributed(system, "taa", group=group, window=WINDOW, tol=1e-6)
        assert torch.equal(alone.trajectory, shared.trajectory) and alone.iterations == shared.iterations
        assert torch.equal(alone.sample, planned.sample)
    finally:
        dist.destroy_process_group()


# -- multi-process launches ------------------------------------------------------------------------


def _launch(command: list[str], ranks: int,
            cwds: list[Path]) -> tuple[list[subprocess.CompletedProcess], float]:
    """Start ``ranks`` processes the way torchrun would (env vars), wait, return them and the wall time.

    ``MASTER_PORT`` serves the CLI's own process group; ``WORKER_PORT`` the worker's.
    """
    (port, worker_port), started = _free_ports(2), time.perf_counter()
    procs = []
    for rank in range(ranks):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORKER_PORT=str(worker_port),
                   RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        procs.append(subprocess.Popen(command, cwd=cwds[rank], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, LAUNCH_TIMEOUT - (time.perf_counter() - started)))
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:  # only our own children, by handle
            if proc.poll() is None:
                proc.kill()
    return results, time.perf_counter() - started


@pytest.fixture(scope="module", params=[2, 3], ids=lambda r: f"{r}ranks")
def launched(request, tmp_path_factory):
    """Run the worker cases on 2 and 3 gloo ranks; return (ranks, results, faults, processes, folder)."""
    ranks = request.param
    out = tmp_path_factory.mktemp(f"dist{ranks}")
    procs, _ = _launch([sys.executable, "-m", "tests.test_distributed", str(out)], ranks, [ROOT] * ranks)

    def load(name: str) -> list:
        return [torch.load(out / f"{name}{r}.pt") if (out / f"{name}{r}.pt").exists() else None
                for r in range(ranks)]

    return ranks, load("rank"), load("fault"), procs, out


def _results(launched):
    ranks, results, _, procs, _ = launched
    for rank, res in enumerate(results):
        assert res is not None, f"rank {rank} saved nothing:\n{procs[rank].stderr[-3000:]}"
    return ranks, results


def test_window_sharding_is_bit_identical(launched):
    ranks, results = _results(launched)
    for name in [f"{kind}-{solver}" for kind, solver in CASES] + ["sequential-1", "sequential-3"]:
        reference = results[0][name]["reference"]
        for rank in range(ranks):
            got = results[rank][name]
            assert torch.equal(got["trajectory"], reference), f"{name}: rank {rank} differs from one process"
            assert got["iterations"] == got["reference_iterations"], name
            assert got["model_evals"] == got["reference_model_evals"], name


def test_a_denoiser_writing_into_its_input_changes_nothing_when_sharded(launched):
    ranks, results = _results(launched)
    for rank in range(ranks):
        assert torch.equal(results[rank]["mutating"]["dirty"], results[rank]["mutating"]["clean"])


def test_sample_sharding_equals_solving_each_subset(launched):
    ranks, results = _results(launched)
    bounds = chunk_bounds(SAMPLE_SHARDED, ranks)
    for name in ("samples-taa", "samples-sequential"):
        first = results[0][name]
        for rank in range(ranks):  # every rank returns the same, whole solution
            assert torch.equal(results[rank][name]["sample"], first["sample"])
        for (start, stop), subset in zip(bounds, first["subsets"], strict=True):
            assert torch.equal(first["sample"][start:stop], subset)
    # the sequential solve does not depend on the batch: sharded equals whole, bit for bit
    assert torch.equal(results[0]["samples-sequential"]["sample"], results[0]["samples-sequential"]["whole"])
    for name in ("samples-taa", "samples-sequential"):  # one verdict per sample, gathered from every rank
        assert results[0][name]["converged_samples"].tolist() == [True] * SAMPLE_SHARDED


def test_failing_rank_stops_every_rank_with_its_name(launched):
    ranks, _, faults, procs, _ = launched
    for rank in range(ranks):
        fault = faults[rank]
        assert fault is not None, f"rank {rank} saved no fault report:\n{procs[rank].stderr[-3000:]}"
        assert fault["type"] == "RankFailedError"
        assert f"rank 1 of {ranks} failed" in fault["message"]
        assert "ValueError: boom on purpose" in fault["message"]
        assert fault["failed_ranks"] == [1] and "at evaluation 3" in fault["message"]
        start, stop = chunk_bounds(SAMPLE_SHARDED, ranks)[1]
        assert f"rank 1 of {ranks} failed while solving its samples {start}..{stop - 1}: ValueError" \
            in fault["samples_message"]
        assert fault["seconds"] < 10.0  # an error, not a collective timeout (30 s)
    assert faults[1]["cause"] == "ValueError"


def test_drifting_ranks_raise_instead_of_disagreeing(launched):
    ranks, _, faults, _, _ = launched
    for rank in range(ranks):
        assert "hold different states at evaluation 1" in faults[rank]["drift_message"]


@pytest.mark.parametrize("launched", [3], indirect=True, ids=["3ranks"])
def test_killed_rank_fails_the_others_quickly(launched):
    ranks, _, _, procs, _ = launched
    assert ranks == 3  # the crash case runs in the three-rank launch
    assert procs[2].returncode == 7, procs[2].stderr[-3000:]
    for rank in (0, 1):
        assert procs[rank].returncode == 0, procs[rank].stderr[-3000:]
        assert "crash: DistributedError" in procs[rank].stdout, procs[rank].stdout
        seconds = float(procs[rank].stdout.split("crash seconds ")[1].split()[0])
        assert seconds < 25.0  # gloo sees the closed connection long before the 30 s timeout


@pytest.mark.parametrize("launched", [2], indirect=True, ids=["2ranks"])
def test_sample_cli_writes_only_on_rank_zero(launched):
    ranks, _, _, procs, out = launched
    assert ranks == 2  # the CLI runs in the two-rank launch
    runs = [torch.load(out / f"cli{r}.pt") if (out / f"cli{r}.pt").exists() else None for r in range(2)]
    assert None not in runs, [p.stderr[-3000:] for p in procs]
    assert [run["code"] for run in runs] == [0, 0], [run["stderr"] for run in runs]
    # each rank ran in its own folder with the same relative --out: only rank 0's folder has it
    assert (out / "cli0" / "samples.pt").exists() and not (out / "cli1" / "samples.pt").exists()
    assert "2 process(es)" in runs[0]["stdout"] and runs[1]["stdout"] == ""
    saved = torch.load(out / "cli0" / "samples.pt")
    ref = fpsolve.models.load_reference("gmm")
    sampler = fpsolve.samplers.DDIM(alphas_cumprod=ref.alphas_cumprod,
                                    timesteps=fpsolve.models.spaced_timesteps(12))
    system = fpsolve.TriangularSystem(sampler=sampler, denoiser=ref.denoiser, shape=ref.shape, batch=3,
                                      generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1): same reductions, same bits
    try:
        alone = fpsolve.solve(system, "taa", window=5, tol=1e-6)
    finally:
        torch.set_num_threads(threads)
    assert saved["world_size"] == 2 and saved["iterations"] == alone.iterations
    assert torch.equal(saved["samples"], alone.sample)


HANG_TIMEOUT, HANG_SLEEP = 3.0, 6.0  # seconds: the group timeout, and how long rank 1 hangs


def test_a_hanging_rank_ends_every_rank_with_a_distributed_error(tmp_path):
    """Rank 1 hangs in its model call for longer than the group timeout: rank 0 must raise
    DistributedError within the timeout plus a few seconds, rank 1 must raise it as soon as it
    wakes, and both processes must exit cleanly (no SIGABRT, no 'terminate called')."""
    procs, _ = _launch([sys.executable, "-m", "tests.test_distributed", str(tmp_path), "hang"], 2, [ROOT] * 2)
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
        assert "terminate called" not in proc.stderr and "Aborted" not in proc.stderr, proc.stderr[-3000:]
        assert "hang: DistributedError" in proc.stdout, (proc.stdout, proc.stderr[-3000:])
    seconds = float(procs[0].stdout.split("hang seconds ")[1].split()[0])
    assert seconds < HANG_TIMEOUT + 5.0, seconds  # the timeout, not the hang, ends rank 0's wait


def _hang_worker() -> int:
    from datetime import timedelta

    dist = torch.distributed
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['WORKER_PORT']}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=HANG_TIMEOUT))
    system = _case_system("ddim")

    def hanging(x, t, calls=[]):  # noqa: B006 - the call counter
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            time.sleep(HANG_SLEEP)
        return system.denoiser(x, t)

    stuck = fpsolve.TriangularSystem(sampler=system.sampler, denoiser=hanging, shape=system.shape,
                                     noise=system.flat_noise.reshape(STEPS + 1, 8))
    started = time.perf_counter()
    try:
        fpsolve.solve(stuck, "taa", window=WINDOW, tol=1e-6, distributed=True)
    except DistributedError as error:
        print(f"hang: {type(error).__name__}: {error}\nhang seconds {time.perf_counter() - started:.2f}",
              flush=True)
    dist.destroy_process_group()
    return 0


# -- the worker (one process of a launch) ----------------------------------------------------------


class _Faulty:
    """A denoiser that raises (or kills its process) on one rank at one call."""

    def __init__(self, denoiser, rank: int, at_call: int, kill: bool = False):
        self.denoiser, self.rank, self.at_call, self.kill, self.calls = denoiser, rank, at_call, kill, 0

    def __call__(self, x, t):
        self.calls += 1
        if torch.distributed.get_rank() == self.rank and self.calls == self.at_call:
            if self.kill:
                os._exit(7)  # a crash: no exception, no report, the connection just closes
            raise ValueError("boom on purpose")
        return self.denoiser(x, t)


def _record(solution, reference) -> dict:
    return {"trajectory": solution.trajectory, "iterations": solution.iterations,
            "model_evals": solution.model_evals, "reference": reference.trajectory,
            "reference_iterations": reference.iterations, "reference_model_evals": reference.model_evals}


def _run_cli(out: Path, rank: int) -> None:
    """``fpsolve sample`` as torchrun would start it: it builds its process group from the env vars."""
    import contextlib
    import io

    folder = out / f"cli{rank}"
    folder.mkdir()
    stdout, stderr = io.StringIO(), io.StringIO()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = fpsolve.cli.main(CLI_ARGS)
    finally:
        os.chdir(ROOT)
    torch.save({"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()},
               out / f"cli{rank}.pt")


def _worker(out: Path) -> int:
    from datetime import timedelta

    import fpsolve.cli

    dist = torch.distributed
    torch.set_num_threads(1)
    rank, ranks = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if ranks == 2:  # the CLI creates and destroys its own group on MASTER_PORT
        _run_cli(out, rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['WORKER_PORT']}", rank=rank,
                            world_size=ranks, timeout=timedelta(seconds=30))
    saved: dict = {}
    for kind, solver in CASES:
        system = _case_system(kind)  # one sample: the model batch is the window, 7 rows or fewer
        options = dict(window=WINDOW, tol=1e-6)
        saved[f"{kind}-{solver}"] = _record(fpsolve.solve(system, solver, distributed=True, **options),
                                            fpsolve.solve(system, solver, **options))
    for batch in (None, 3):  # 1 row over 2-3 ranks (empty chunks), 3 rows
        system = _case_system("ddpm", batch=batch)
        saved[f"sequential-{batch or 1}"] = _record(fpsolve.solve(system, "sequential", distributed=True),
                                                    fpsolve.solve(system, "sequential"))
    system = _case_system("ddim", batch=SAMPLE_SHARDED)
    for solver in ("taa", "sequential"):
        options = {} if solver == "sequential" else dict(window=WINDOW, tol=1e-6)  # sequential takes neither
        sharded = solve_distributed(system, solver, shard="samples", **options)
        subsets = [fpsolve.solve(subset_system(system, a, b), solver, **options).sample
                   for a, b in chunk_bounds(SAMPLE_SHARDED, ranks)]
        saved[f"samples-{solver}"] = {"sample": sharded.sample, "subsets": subsets,
                                      "whole": fpsolve.solve(system, solver).sample,
                                      "converged_samples": sharded.converged_samples}
    clean = _case_system("ddim", batch=2)

    def mutating(x, t):  # writes into its input: the sharded evaluator must hand it a copy
        out = clean.denoiser(x, t)
        x.mul_(0.5)
        return out

    dirty = fpsolve.TriangularSystem(sampler=clean.sampler, denoiser=mutating, shape=clean.shape,
                                     noise=clean.flat_noise.reshape(STEPS + 1, 2, 8))
    options = dict(window=WINDOW, tol=1e-6, distributed=True)
    saved["mutating"] = {"dirty": fpsolve.solve(dirty, "taa", **options).trajectory,
                         "clean": fpsolve.solve(clean, "taa", **options).trajectory}
    torch.save(saved, out / f"rank{rank}.pt")

    system = _case_system("ddim")
    faulty = fpsolve.TriangularSystem(sampler=system.sampler, denoiser=_Faulty(system.denoiser, 1, 3),
                                      shape=system.shape, noise=system.flat_noise.reshape(STEPS + 1, 8))
    started = time.perf_counter()
    report: dict = {}
    try:
        fpsolve.solve(faulty, "taa", window=WINDOW, tol=1e-6, distributed=True)
    except RankFailedError as error:
        report = {"type": type(error).__name__, "message": str(error), "failed_ranks": sorted(error.failures),
                  "cause": type(error.__cause__).__name__ if error.__cause__ else None,
                  "seconds": time.perf_counter() - started}
    batch = _case_system("ddim", batch=SAMPLE_SHARDED)
    faulty = fpsolve.TriangularSystem(sampler=batch.sampler, denoiser=_Faulty(batch.denoiser, 1, 3),
                                      shape=batch.shape,
                                      noise=batch.flat_noise.reshape(STEPS + 1, SAMPLE_SHARDED, 8))
    try:
        solve_distributed(faulty, "taa", shard="samples", window=WINDOW, tol=1e-6)
    except RankFailedError as error:
        report["samples_message"] = str(error)
    drifted = _case_system("ddim") if rank == 0 else make_system(make_sampler("ddim", STEPS), dim=8, seed=4)
    try:  # rank 0 holds other noise: the checksum exchanged with the ok flag must catch it
        fpsolve.solve(drifted, "fp", window=WINDOW, distributed=True)
    except DistributedError as error:
        report["drift_message"] = str(error)
    torch.save(report, out / f"fault{rank}.pt")

    if ranks == 3:  # last: rank 2 dies mid-solve; the others must fail fast, not hang
        dying = fpsolve.TriangularSystem(sampler=system.sampler, shape=system.shape,
                                         denoiser=_Faulty(system.denoiser, 2, 3, kill=True),
                                         noise=system.flat_noise.reshape(STEPS + 1, 8))
        started = time.perf_counter()
        try:
            fpsolve.solve(dying, "taa", window=WINDOW, tol=1e-6, distributed=True)
        except DistributedError as error:
            seconds = time.perf_counter() - started
            print(f"crash: {type(error).__name__}: {error}\ncrash seconds {seconds:.2f}", flush=True)
        os._exit(0)  # the group lost a member: tearing it down could wait on the dead peer
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(_hang_worker() if sys.argv[2:] == ["hang"] else _worker(Path(sys.argv[1])))
