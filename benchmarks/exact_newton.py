"""Exact Newton on the triangular system (issue 14, round 4): what a perfect Jacobian model buys.

Every iteration evaluates eps at all states of the current iterate (one batched call, as the
parallel solvers do), then takes the exact Newton step of the first-order equations: the
correction ``delta`` solves, row by row from ``x_T`` down,

    delta_i = r1_i + sum_l (A[i, l] delta_{i-l} + B[i, l] J_{i-l} delta_{i-l}),

with ``J_j delta_j`` the model's true Jacobian-vector product at the iterate's state ``j``
(a central finite difference of the float64 network, h = 1e-4 relative). That scan is
sequential (T JVPs per iteration), so this is a diagnostic, not a solver: its iterations to
<= 1 px are what Newton's method itself (DEER's full-Jacobian Newton) needs from the same start,
the number a quasi-Newton solver approaches as its model of J becomes exact; ``newton``'s rounds
minus it are what a better Jacobian model could gain. Modes: ``exact``; ``prior`` (J = 1/sigma,
newton's prior alone); ``secant`` (newton's 50/50 blend of secant and prior, a simplified
``newton`` with window T and no row acceptance); ``secantK`` (``secant`` for K iterations, then
``exact``: how much an exact Jacobian near convergence alone would buy); ``rowsA-B`` (the exact
J only at the states from A % to B % of T: where it matters); ``lastdirA`` (from A % of T on, J
exact along the previous correction only: a JVP a parallel solver could batch into its round);
``lowrankP-A`` (from A % of T on, ``I / sigma`` plus a rank-P part from randomised probes);
``nysP-A`` (from A % of T on, ``J_i = (I - P) / sigma_i`` with one passed-through subspace ``P``
measured by P JVPs at the state nearest sigma 0.1 and shared by those states). The
network and the
sequential reference are float64, so these are not the float32 runs of iterations_study.py.

Run: ``python benchmarks/exact_newton.py --cells ddim-25,ddim-100 --seed 11 --modes exact,secant3``
(one JSON line per cell and mode: ``first_ok`` the first iteration at <= 1 px, ``px`` the error
after each iteration, ``newton_it`` the default solver's rounds on the same float64 model).
"""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import torch

import fpsolve
from fpsolve.bench.matrix import parse_sampler
from fpsolve.models import digits
from fpsolve.models.reference import ReferenceModel
from fpsolve.solvers.newton import prior_slopes


def float64_model(name: str) -> ReferenceModel:
    """The digits UNet (a held-out one, or the flow UNet) with its network in float64, so finite-difference
    JVPs are accurate; the sequential reference below uses the same float64 network."""
    from pathlib import Path

    if name == "digits-flow":  # the shipped rectified-flow UNet, velocity prediction
        import attrs

        from fpsolve.models import load_reference
        ref = load_reference(name)
        unet = copy.deepcopy(ref.unet).double()
        return attrs.evolve(ref, denoiser=digits.digits_denoiser(unet), unet=unet)
    heldout = Path(__file__).parent / "heldout"
    weights = {"digits": None, "heldout": heldout, "heldout2": heldout / "heldout2"}[name]
    unet = digits.load_digits_unet(weights_dir=weights) if weights else digits.load_digits_unet()
    unet = copy.deepcopy(unet).double()
    return ReferenceModel(name, digits.digits_denoiser(unet), digits.digits_alphas_cumprod(),
                          tuple(digits.DIGITS_SHAPE), digits.digits_to_images, unet)


def px(ref: ReferenceModel, a: torch.Tensor, b: torch.Tensor) -> float:
    ia = ref.to_images(a.reshape(-1, *ref.shape)).astype(np.int64)
    ib = ref.to_images(b.reshape(-1, *ref.shape)).astype(np.int64)
    return float(np.abs(ia - ib).max())


def jvp(system: fpsolve.TriangularSystem, state: torch.Tensor, position: int,
        direction: torch.Tensor) -> torch.Tensor:
    """``J_position(state) @ direction`` per sample, ``[N, D]``, by a central difference."""
    scale = direction.norm(dim=-1, keepdim=True)
    unit = direction / scale.clamp_min(1e-300)
    h = 1e-4 * state.norm(dim=-1, keepdim=True).clamp_min(1.0)
    both = torch.stack([state + h * unit, state - h * unit])  # [2, N, D]
    out = system.evaluate(both, [position, position])
    return (out[0] - out[1]) / (2 * h) * scale


def jvp_batch(system: fpsolve.TriangularSystem, state: torch.Tensor, position: int,
              directions: torch.Tensor) -> torch.Tensor:
    """``J_position(state) @ directions[..., k]`` for unit-scale directions ``[N, D, p]`` -> ``[N, D, p]``
    (central differences, all 2p evaluations in one call)."""
    h = 1e-4 * state.norm(dim=-1, keepdim=True).clamp_min(1.0)[..., None]  # [N, 1, 1]
    plus = (state[..., None] + h * directions).permute(2, 0, 1)  # [p, N, D]
    minus = (state[..., None] - h * directions).permute(2, 0, 1)
    count = directions.shape[-1]
    out = system.evaluate(torch.cat([plus, minus]), [position] * (2 * count))
    return ((out[:count] - out[count:]) / (2 * h.squeeze(-1))).permute(1, 2, 0)


def low_rank_part(system: fpsolve.TriangularSystem, state: torch.Tensor, position: int, rank: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, B)`` with ``J - I / sigma ~ B Q^T`` at ``state``: ``Q`` ``[N, D, rank]`` an orthonormal
    basis of the range of ``A = J - I / sigma`` (a randomised range finder, ``rank`` probes) and
    ``B = A Q`` (``rank`` more JVPs). Exact when ``A`` is symmetric of rank <= ``rank``
    (Tweedie: ``A = -(alpha / sigma^2) Cov[x0 | x]`` for the ideal denoiser)."""
    inv_sigma = prior_slopes(system, 1e12)[position]
    omega = torch.randn(*state.shape, rank, generator=generator, dtype=state.dtype)
    sketch = jvp_batch(system, state, position, omega) - inv_sigma * omega
    basis, _ = torch.linalg.qr(sketch)
    image = jvp_batch(system, state, position, basis) - inv_sigma * basis
    return basis, image


def tangent_projection(system: fpsolve.TriangularSystem, x: torch.Tensor, probes: int,
                       generator: torch.Generator,
                       probe_sigma: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V, lambda)`` with ``I - sigma_p J_p ~ V diag(lambda) V^T`` at the state ``p`` of ``x``
    whose sigma is nearest ``probe_sigma``: a single-pass Nystrom estimate from ``probes`` exact
    JVPs along random directions, eigenvalues clipped to [0, 1] (the passed-through subspace)."""
    sigma = system.sigmas
    position = int((sigma[:-1] - probe_sigma).abs().argmin())
    state = x[position]
    omega = torch.randn(*state.shape, probes, generator=generator, dtype=state.dtype)
    omega = omega / omega.norm(dim=1, keepdim=True)
    y = omega - float(sigma[position]) * jvp_batch(system, state, position, omega)  # [N, D, p]
    return nystrom_eigen(omega, y)


def nystrom_eigen(omega: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V, lambda)`` with ``P ~ V diag(lambda) V^T`` from ``y = P omega`` (both ``[N, D, p]``, one
    symmetric PSD ``P`` per sample): the single-pass Nystrom approximation
    ``(P omega)(omega^T P omega)^+ (P omega)^T``, eigenvalues clipped to [0, 1]. Exact when ``P`` has
    rank at most ``p`` and ``omega`` spans its range. The core is symmetrised because ``y`` comes
    from JVPs of a Jacobian that is only nearly symmetric; directions whose core eigenvalue is below
    1e-6 of the largest are dropped (the pseudo-inverse), not inverted into noise."""
    core = omega.transpose(1, 2) @ y
    evals, evecs = torch.linalg.eigh(0.5 * (core + core.transpose(1, 2)))
    keep = evals > 1e-6 * evals[:, -1:].clamp_min(1e-30)
    factor = (y @ evecs) * torch.where(keep, evals.clamp_min(1e-30).rsqrt(), 0.0)[:, None, :]
    v, sv, _ = torch.linalg.svd(factor, full_matrices=False)
    return v, sv.pow(2).clamp(0, 1)


def newton_step(system: fpsolve.TriangularSystem, x: torch.Tensor, mode: str,
                memory: dict) -> torch.Tensor:
    """One Newton iteration from trajectory ``x`` ``[T+1, N, D]``; ``mode`` ``exact`` (true JVPs),
    ``prior`` (J = 1/sigma I) or ``secant`` (newton's blend: (secant + 1/sigma) / 2, the default
    solver with window T); ``memory`` keeps the previous evaluation for the secants."""
    steps = system.num_steps
    outputs = system.evaluate(x[:-1], list(range(steps)))  # eps at every state but x_0
    prior = prior_slopes(system, 50.0)
    slopes = prior[:, None].expand(-1, x.shape[1]).clone()
    if "x" in memory:
        dx, de = x[:-1] - memory["x"], outputs - memory["e"]
        sq = dx.pow(2).sum(-1)
        secant = ((de * dx).sum(-1) / sq.clamp_min(1e-300)).clamp(-50, 50)
        slopes[:-1] = torch.where(sq > 0, 0.5 * secant + 0.5 * slopes[:-1], slopes[:-1])
    memory.update(x=x[:-1].clone(), e=outputs.clone())
    rhs = system.first_order_rhs(x, outputs, 1, steps)
    residual = rhs - x[1:]
    state_coef, output_coef, _ = system.coefficients()
    delta = torch.zeros_like(x)
    jd = torch.zeros_like(x)  # J_j delta_j
    for i in range(1, steps + 1):
        acc = residual[i - 1].clone()
        for lag in range(1, state_coef.shape[1] + 1):
            j = i - lag
            if j < 0:
                break
            acc += state_coef[i, lag - 1] * delta[j] + output_coef[i, lag - 1] * jd[j]
        delta[i] = acc
        if i < steps:
            if mode.startswith("nys"):  # nys<p>-<a>: at states >= a% of T, J ~ (I - P) / sigma_i with
                # P ~ I - sigma J measured by p random JVPs at the state nearest sigma 0.1 and shared
                if 100 * i >= int(mode.split("-")[1]) * steps and delta[i].abs().max() > 0:
                    if "nys" not in memory:
                        memory["nys"] = tangent_projection(system, x, int(mode[3:].split("-")[0]),
                                                           memory.setdefault("generator",
                                                                             torch.Generator().manual_seed(0)))
                    vecs, lams = memory["nys"]
                    coords = torch.einsum("ndr,nd->nr", vecs, delta[i])
                    projected = torch.einsum("ndr,nr->nd", vecs, lams * coords)
                    jd[i] = prior[i] * (delta[i] - projected)
                else:
                    jd[i] = slopes[i, :, None] * delta[i]
            elif mode.startswith("lowrank"):  # lowrank<p>-<a>: at states >= a% of T, J ~ I/sigma + B Q^T
                rank, first = (int(v) for v in mode[7:].split("-"))
                if 100 * i >= first * steps and delta[i].abs().max() > 0:
                    basis, image = low_rank_part(system, x[i], i, rank, memory.setdefault(
                        "generator", torch.Generator().manual_seed(0)))
                    coords = torch.einsum("ndr,nd->nr", basis, delta[i])
                    inv_sigma = prior_slopes(system, 1e12)[i]  # the shift low_rank_part used
                    jd[i] = inv_sigma * delta[i] + torch.einsum("ndr,nr->nd", image, coords)
                else:
                    jd[i] = slopes[i, :, None] * delta[i]
            elif mode.startswith("lastdir"):  # lastdir<a>: at states >= a% of T, J exact along the
                # previous correction (a JVP whose direction is known before the round: parallel)
                slope = slopes[i, :, None]
                jd[i] = slope * delta[i]
                previous = memory.get("delta")
                if 100 * i >= int(mode[7:]) * steps and previous is not None and previous[i].abs().max() > 0:
                    u = previous[i]
                    ju = jvp(system, x[i], i, u)
                    coef = (u * delta[i]).sum(-1, keepdim=True) / u.pow(2).sum(-1, keepdim=True)
                    jd[i] = jd[i] + (ju - slope * u) * coef
            elif mode.startswith("rows"):  # rows<a>-<b>: exact J at states a*T/100 <= i < b*T/100
                lo_pct, hi_pct = (int(v) for v in mode[4:].split("-"))
                inside = lo_pct * steps <= 100 * i < hi_pct * steps
                jd[i] = (jvp(system, x[i], i, delta[i]) if inside and delta[i].abs().max() > 0
                         else slopes[i, :, None] * delta[i])
            elif mode == "exact":
                jd[i] = jvp(system, x[i], i, delta[i]) if delta[i].abs().max() > 0 else 0.0
            elif mode == "secant":
                jd[i] = slopes[i, :, None] * delta[i]
            else:
                jd[i] = prior[i] * delta[i]
    memory["delta"] = delta
    memory.pop("nys", None)  # measured afresh at the next iterate
    return x + delta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--cells", default="ddim-25,ddim-100")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--modes", default="exact,prior",
                        help="comma list of exact, prior, secant, secantK (secant for K iterations, "
                             "then exact), rowsA-B (exact at states A%%..B%% of T, secant elsewhere) or "
                             "lastdirA (at states >= A%% of T, J exact along the previous correction) or "
                             "lowrankP-A (at states >= A%% of T, J ~ I/sigma + rank-P part from probes) or "
                             "nysP-A (at states >= A%% of T, J ~ (I - P)/sigma, P from P probes, one state)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ref = float64_model(args.model)
    for cell in args.cells.split(","):
        system = fpsolve.TriangularSystem(
            sampler=parse_sampler(cell).build(ref), denoiser=ref.denoiser, shape=ref.shape,
            batch=args.samples, generator=torch.Generator().manual_seed(args.seed))
        reference = fpsolve.solve(system, "sequential").sample
        newton = fpsolve.solve(system, "newton")
        for mode in args.modes.split(","):
            x = system.flat_noise[:1].expand_as(system.flat_noise).clone()  # the noise copy
            errors: list[float] = []
            memory: dict = {}
            for k in range(args.iters):
                switch = int(mode[6:]) if mode.startswith("secant") and mode != "secant" else None
                step_mode = mode if switch is None else ("secant" if k < switch else "exact")
                x = newton_step(system, x, step_mode, memory)
                errors.append(px(ref, x[-1], reference))
                if errors[-1] == 0:
                    break
            first = next((k + 1 for k, e in enumerate(errors) if e <= 1), None)
            print(json.dumps(dict(model=args.model, cell=cell, seed=args.seed, mode=mode, first_ok=first,
                                  px=errors, newton_it=newton.iterations,
                                  newton_px=px(ref, newton.sample, reference))), flush=True)


if __name__ == "__main__":
    main()
