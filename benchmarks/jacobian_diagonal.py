"""Round 3 of issue 14: the diagonal of the model's eps Jacobian on the sequential trajectory.

Estimates ``diag(J_j)`` at every state of the sequential DDIM-100 trajectory by Hutchinson
probes (Rademacher ``v``, forward finite-difference JVPs ``(eps(x + h v) - eps(x)) / h``, one
batched model call per probe) and prints, for a few states, the prior ``1 / sigma_j`` of
``newton``, the trace per element ``mean_e diag`` and the spread of the diagonal over the
elements (std / mean). Run::

    python benchmarks/jacobian_diagonal.py --model digits
    python benchmarks/jacobian_diagonal.py --model heldout2

Machine noted in the report: 2-core x86_64 CPU, shared with other jobs, torch 1 thread.
"""

from __future__ import annotations

import argparse
import os

import torch
from iterations_study import _system, load_model

import fpsolve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--cell", default="ddim-100")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--step", type=float, default=1e-3, help="finite-difference step h")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    system = _system(load_model(args.model), args.cell, args.samples, args.seed)
    steps = system.num_steps
    states = fpsolve.solve(system, "sequential").trajectory[:steps]
    states = states.reshape(steps, system.num_samples, system.state_size)
    positions = list(range(steps))
    outputs = system.evaluate(states, positions)
    generator = torch.Generator().manual_seed(0)
    diagonal = torch.zeros_like(states)
    for _ in range(args.probes):
        v = (torch.randint(0, 2, states.shape, generator=generator) * 2 - 1).to(states.dtype)
        diagonal += v * (system.evaluate(states + args.step * v, positions) - outputs) / args.step
    diagonal /= args.probes
    prior = 1 / system.sigmas[:steps]
    trace = diagonal.mean(-1).mean(-1)  # [T]: per element, averaged over the samples
    spread = (diagonal.std(-1) / diagonal.mean(-1).abs()).mean(-1)
    print(f"{args.model} {args.cell} seed {args.seed}, {args.samples} samples, {args.probes} probes")
    for j in sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 10, steps - 5, steps - 2, steps - 1}):
        print(f"state {j:3d}: 1/sigma {float(prior[j]):8.3f}  trace/D {float(trace[j]):8.3f}  "
              f"ratio {float(trace[j] / prior[j]):5.2f}  spread {float(spread[j]):5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
