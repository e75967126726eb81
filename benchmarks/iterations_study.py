"""Iterations study (issue 14): rounds and error of one solver configuration on the benchmark cells.

For each cell (DDIM-25/50/100, DDPM-100, DPM++2M-25 by default) it solves one batch of samples
from fixed seeds with the configuration's defaults and reports

* ``it``: parallel iterations (rounds of one batched model call; initializer rounds included),
* ``px``: max pixel difference to the sequential sample on [0, 255] (models without images: the
  max absolute difference times 127.5, the same scale for data in [-1, 1]),
* ``oracle``: the first iteration after which stopping would already have met <= 1 px on this
  run: the x_0 the driver would output if every row were accepted then, ``x_0 + R^k_T`` (read
  inside the stopping rule, before the update), compared with the sequential sample;
* ``evals``: model evaluations per sample, JVP probes counted as model evaluations.

Sequential references are cached under ``/tmp/fpsolve-iterations-study``. Run::

    python benchmarks/iterations_study.py default newton-secant/x0 taa/x0 fp/x0 --samples 2
    python benchmarks/iterations_study.py --list
    python benchmarks/iterations_study.py default/long --model heldout --json runs.jsonl
    python benchmarks/iterations_study.py --replay runs.jsonl   # stopping rules replayed offline

Machine noted in the report: 2-core x86_64 CPU, shared with other jobs, torch 1 thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

import fpsolve
from fpsolve.api import resolve_method, resolve_stopping
from fpsolve.bench.matrix import parse_sampler
from fpsolve.control import Controller
from fpsolve.initializers import Extrapolate, InitialGuess, Initializer
from fpsolve.models import EmpiricalDenoiser, load_reference
from fpsolve.solvers import DiagonalNewton, QuasiNewton
from fpsolve.solvers.newton import prior_slopes, secant_pairs
from fpsolve.stopping import RMS, StoppingRule, StoppingView, X0Change, X0Forecast

# The sibling script holds the Nystrom core both studies use; the scripts are run by path (and the
# tests load them by path), so their folder is put on the import path rather than made a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from exact_newton import nystrom_eigen  # noqa: E402

CACHE = Path("/tmp/fpsolve-iterations-study")
HELDOUT = Path(__file__).parent / "heldout"  # the held-out digits model (benchmarks/heldout/train_heldout.py)
CELLS = ("ddim-25", "ddim-50", "ddim-100", "ddpm-100", "dpm2m-25")

def _x0(atol: float = 1e-2, tol: float = 2e-5) -> Any:
    """The ``x0`` rule as rounds 1-4 measured it (no stall guard: round 5 added it); the study's
    first setting was atol 1e-2 (the default became 1.5e-2)."""
    return lambda steps: X0Change(atol=atol, tol=tol, stall=None)


@attrs.define(frozen=True, eq=False, kw_only=True)
class PooledNewton(QuasiNewton):
    """Experiment (idea 5, a warm start from the neighbouring samples): ``newton`` whose secant
    at each state is fitted to the pairs of every sample of the batch together,
    ``sum_n <de_n, dx_n> / sum_n |dx_n|^2``, then blended with the prior as usual."""

    name = "newton_pooled"

    def step(self, view: Any, state: Any) -> Any:
        first, states, outputs, pairs = secant_pairs(view, state)
        gamma = state.gamma.clone()
        if pairs is not None:
            start, stop, d_states, d_outputs = pairs
            squared = d_states.pow(2).sum(-1).sum(-1, keepdim=True)
            inner = (d_outputs * d_states).sum(-1).sum(-1, keepdim=True)
            secant = (inner / squared.clamp_min(torch.finfo(squared.dtype).tiny)).expand_as(gamma[start:stop])
            slope = secant.clamp(-self.clamp, self.clamp)
            if self.prior_weight and state.prior is not None:
                slope = (1 - self.prior_weight) * slope + self.prior_weight * state.prior[start:stop]
            gamma[start:stop] = torch.where(squared > 0, slope, gamma[start:stop])
        correction = self._correction(view, gamma, state.state_coef, state.output_coef)
        return view.states + correction, attrs.evolve(state, first=first, states=states, outputs=outputs,
                                                      gamma=gamma)


@attrs.define(frozen=True, eq=False, kw_only=True)
class HistorySecantNewton(QuasiNewton):
    """Experiment (round 3, idea 1, the scalar form): ``newton`` whose slope at each state is the
    least-squares secant through the last ``pairs`` difference pairs at that state (a multi-secant
    update of the scalar Jacobian), ``sum_p <de_p, dx_p> / sum_p |dx_p|^2``, blended with the
    prior as usual. ``pairs=1`` is ``newton``."""

    name = "newton_hsecant"
    pairs: int = 2

    def init(self, system: Any) -> Any:
        return (super().init(system), ())

    def step(self, view: Any, state: Any) -> Any:
        newton, memory = state
        first, states, outputs, pairs = secant_pairs(view, newton)
        gamma = newton.gamma.clone()
        if pairs is not None:
            start, stop, d_states, d_outputs = pairs
            memory = ((start, d_outputs.mul(d_states).sum(-1), d_states.pow(2).sum(-1)),) + memory
            memory = memory[: self.pairs]
            inner = torch.zeros_like(gamma[start:stop])
            squared = torch.zeros_like(inner)
            for begin, products, norms in memory:  # older pairs cover rows from `begin` on
                lo = max(begin, start)
                inner[lo - start:] += products[lo - begin: lo - begin + stop - lo]
                squared[lo - start:] += norms[lo - begin: lo - begin + stop - lo]
            secant = inner / squared.clamp_min(torch.finfo(squared.dtype).tiny)
            slope = secant.clamp(-self.clamp, self.clamp)
            if self.prior_weight and newton.prior is not None:
                slope = (1 - self.prior_weight) * slope + self.prior_weight * newton.prior[start:stop]
            gamma[start:stop] = torch.where(squared > 0, slope, gamma[start:stop])
        correction = self._correction(view, gamma, newton.state_coef, newton.output_coef)
        newton = attrs.evolve(newton, first=first, states=states, outputs=outputs, gamma=gamma)
        return view.states + correction, (newton, memory)


#: Model evaluations per solve spent outside the driver (the probes of HutchinsonNewton).
EXTRA_EVALS = [0]


@attrs.define(frozen=True, eq=False, kw_only=True)
class HutchinsonNewton(DiagonalNewton):
    """Experiment (round 3, idea 2): Newton with the diagonal of the model's Jacobian at each
    evaluated state estimated by Hutchinson probes, ``diag(J) ~ mean_p v_p * (J v_p)`` with
    Rademacher ``v_p``, each ``J v_p`` a forward finite difference ``(eps(x + h v) - eps(x)) / h``
    (ONE extra batched model call over the evaluated states per probe; counted in
    :data:`EXTRA_EVALS`). ``scalar``: use the probe's trace estimate ``mean_e diag`` as one slope
    per state instead (the exact counterpart of newton's scalar secant). The slope is blended
    with the prior ``1 / sigma`` with weight ``blend`` (as newton's ``prior_weight``)."""

    name = "newton_hutchinson"
    probes: int = 1
    blend: float = 0.0
    scalar: bool = False
    step_size: float = 1e-3

    def init(self, system: Any) -> Any:
        state = super().init(system)
        prior = prior_slopes(system, self.clamp)[:, None, None]
        return (state, system, prior, torch.Generator().manual_seed(0))

    def step(self, view: Any, state: Any) -> Any:
        newton, system, prior, generator = state
        first, hi = view.lo - 1, view.hi
        x, e = view.trajectory[first:hi], view.outputs[first:hi]
        positions = list(range(first, hi))
        diagonal = torch.zeros_like(x)
        for _ in range(self.probes):
            v = (torch.randint(0, 2, x.shape, generator=generator) * 2 - 1).to(x.dtype)
            jv = (system.evaluate(x + self.step_size * v, positions) - e) / self.step_size
            diagonal += v * jv / self.probes
        EXTRA_EVALS[0] += self.probes * len(positions) * x.shape[1]
        if self.scalar:
            diagonal = diagonal.mean(-1, keepdim=True).expand_as(diagonal)
        slope = diagonal.clamp(-self.clamp, self.clamp)
        slope = (1 - self.blend) * slope + self.blend * prior[first:hi]
        gamma = newton.gamma.clone()
        gamma[first:hi] = slope
        correction = self._scan(view, gamma, newton.state_coef, newton.output_coef)
        return view.states + correction, (attrs.evolve(newton, gamma=gamma), system, prior, generator)


@attrs.define(frozen=True, eq=False, kw_only=True)
class TraceNewton(QuasiNewton):
    """Experiment (round 3, idea 2 against the prior): ``newton`` whose prior slope at each
    evaluated state is the Hutchinson trace estimate ``mean_e v * (J v)`` of the model's Jacobian
    there (one Rademacher probe, forward finite-difference JVP: one extra batched model call over
    the evaluated states, counted in :data:`EXTRA_EVALS`) instead of ``1 / sigma``; blended with
    the secant with ``prior_weight`` as usual. ``once``: probe at the first iteration only."""

    name = "newton_trace"
    once: bool = False
    step_size: float = 1e-3

    def init(self, system: Any) -> Any:
        return (super().init(system), system, torch.Generator().manual_seed(0))

    def step(self, view: Any, state: Any) -> Any:
        newton, system, generator = state
        if not self.once or view.iteration == 1:
            first, hi = view.lo - 1, view.hi
            x, e = view.trajectory[first:hi], view.outputs[first:hi]
            v = (torch.randint(0, 2, x.shape, generator=generator) * 2 - 1).to(x.dtype)
            jv = (system.evaluate(x + self.step_size * v, list(range(first, hi))) - e) / self.step_size
            EXTRA_EVALS[0] += (hi - first) * x.shape[1]
            trace = (v * jv).mean(-1).clamp(-self.clamp, self.clamp)  # [W, N]
            prior = newton.prior.expand_as(newton.gamma).clone()
            prior[first:hi] = trace
            gamma = newton.gamma.clone()
            if newton.states is None:  # no secant anywhere yet: the slope is the probe
                gamma[first:hi] = trace
            newton = attrs.evolve(newton, prior=prior, gamma=gamma)
        proposal, newton = super().step(view, newton)
        return proposal, (newton, system, generator)


def window_operators(view: Any, gamma: torch.Tensor, state_coef: torch.Tensor,
                     output_coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The window's scalar-slope propagator ``P = (I - L_gamma)^-1`` and ``G = P B`` (``B`` the
    output coefficients as a strictly lower ``W x W`` matrix), both ``[N, W, W]``: the pieces of
    the low-rank Broyden corrections' closed form ``delta = P r + G diag(s) w``."""
    lo, hi, width = view.lo, view.hi, view.width
    samples = view.first_order.shape[1]
    lower = view.first_order.new_zeros(samples, width, width)
    bmat = view.first_order.new_zeros(samples, width, width)
    for lag in range(1, state_coef.shape[1] + 1):
        if lag >= width:
            break
        rows = torch.arange(lag, width, device=lower.device)
        out = output_coef[lo + lag:hi + 1, lag - 1, None]
        lower[:, rows, rows - lag] = (state_coef[lo + lag:hi + 1, lag - 1, None]
                                      + out * gamma[lo:hi + 1 - lag]).transpose(0, 1)
        bmat[:, rows, rows - lag] = out.expand(-1, samples).transpose(0, 1)
    eye = torch.eye(width, dtype=lower.dtype, device=lower.device)
    propagator = torch.linalg.solve_triangular(eye - lower, eye.expand_as(lower), upper=False,
                                               unitriangular=True)
    return propagator, propagator @ bmat


def in_basis(basis: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``U U^T v`` per sample: the part of ``vectors`` ``[..., N, D]`` in the span of the columns of
    ``basis`` ``[N, D, r]`` (orthonormal, or zero)."""
    return torch.einsum("ndr,...nr->...nd", basis, torch.einsum("ndr,...nd->...nr", basis, vectors))


def subspace_correction(solver: QuasiNewton, view: Any, basis: torch.Tensor, slopes: torch.Tensor,
                        gamma: torch.Tensor, state_coef: torch.Tensor,
                        output_coef: torch.Tensor) -> torch.Tensor:
    """The window's correction for ``J_j = sum_a slopes[j, n, a] u_a u_a^T + gamma[j, n] (I - U U^T)``
    with ``U = basis[n]`` ``[N, D, r]`` orthonormal columns (zero columns are ignored) shared by
    the states of a sample: the lag coefficients are scalars, so the recurrence separates into one
    scalar scan per basis direction (slope ``slopes[..., a]``) and one on the complement (``gamma``)."""
    residual = view.first_order  # [W, N, D]
    coords = torch.einsum("ndr,wnd->wnr", basis, residual)
    rest = residual - torch.einsum("ndr,wnr->wnd", basis, coords)  # the coordinates are needed below
    correction = solver._correction(attrs.evolve(view, first_order=rest), gamma, state_coef, output_coef)
    for a in range(coords.shape[-1]):
        part = solver._correction(attrs.evolve(view, first_order=coords[..., a:a + 1]), slopes[..., a],
                                  state_coef, output_coef)
        correction = correction + part * basis[None, :, :, a]
    return correction


@attrs.define(frozen=True, eq=False, kw_only=True)
class BroydenNewton(QuasiNewton):
    """Experiment (round 4): ``newton`` with a rank-1 Broyden Jacobian per state instead of the
    scalar ``gamma_j I``: ``J_j = gamma_j I + beta w_j v_j^T`` with ``v_j = dx_j / |dx_j|^2`` and
    ``w_j = de_j - gamma_j dx_j``, so ``J_j dx_j = de_j`` exactly along the last step (the full
    secant vector, not only its Rayleigh quotient) and ``gamma_j`` elsewhere. ``complement``:
    ``"blend"`` (gamma = newton's blended slope) or ``"prior"`` (gamma = 1/sigma). The
    correction solves the window's linear recurrence exactly: ``delta = P r + G diag(s) w`` with
    ``P`` the scalar propagator, ``G = P B``, and ``s_i = v_i . delta_i`` from a W x W triangular
    system (``O(W^2 D)``, as TAA's)."""

    name = "newton_broyden"
    beta: float = 1.0
    complement: str = "blend"
    bound: float = 50.0
    gate: float = float("inf")  # use the rank-1 part only where the step's RMS is at most this
    # probe: measure J along the last step at the CURRENT state by a forward difference (one
    # extra model evaluation per evaluated state, counted in EXTRA_EVALS) instead of the secant
    probe: bool = False
    step_size: float = 1e-2
    # the rank-1 part (and the probes) only at states with sigma below this: exact Newton gains
    # almost everything from the exact J at the last states (exact_newton.py --modes rows95-100)
    late: float = float("inf")

    def init(self, system: Any) -> Any:
        newton = super().init(system)
        zeros = torch.zeros(system.num_steps + 1, system.num_samples, system.state_size,
                            dtype=system.dtype, device=system.device)
        return (newton, zeros, zeros.clone(), system)

    def step(self, view: Any, state: Any) -> Any:
        newton, v, w, system = state
        first, states, outputs, pairs = secant_pairs(view, newton)
        late = None
        if pairs is not None:
            late = system.sigmas[pairs[0]:pairs[1]] < self.late  # [P]
        if pairs is not None and self.probe and bool(late.any()):  # J along the last step, now
            start, stop, d_states, d_outputs = pairs
            rows = late.nonzero().flatten()
            length = d_states[rows].norm(dim=-1, keepdim=True)
            unit = d_states[rows] / length.clamp_min(torch.finfo(length.dtype).tiny)
            current = view.trajectory[start:stop][rows]
            moved = view.outputs[start:stop][rows]
            probed = system.evaluate(current + self.step_size * unit, (rows + start).tolist())
            EXTRA_EVALS[0] += len(rows) * current.shape[1]
            d_outputs = d_outputs.clone()
            d_outputs[rows] = (probed - moved) / self.step_size * length
            pairs = (start, stop, d_states, d_outputs)
        gamma = newton.gamma.clone()
        v, w = v.clone(), w.clone()
        if pairs is not None:
            start, stop, d_states, d_outputs = pairs
            squared = d_states.pow(2).sum(-1)
            tiny = torch.finfo(squared.dtype).tiny
            prior = newton.prior[start:stop]
            slope, moved = self.secant_slopes(d_states, d_outputs, prior)
            local = moved & (squared <= self.gate ** 2 * d_states.shape[-1]) & late[:, None]
            gamma[start:stop] = torch.where(moved, slope, gamma[start:stop])
            base = gamma[start:stop] if self.complement == "blend" else prior.expand_as(slope)
            if self.complement == "prior":
                gamma[start:stop] = torch.where(moved, base, gamma[start:stop])
            rank_one = self.beta * (d_outputs - base[..., None] * d_states)
            # bound the rank-1 part's norm |w| |v| = |w| / |dx| (a secant through nearly equal states)
            norm = rank_one.norm(dim=-1) / squared.sqrt().clamp_min(tiny)
            rank_one = rank_one * (self.bound / norm.clamp_min(self.bound)).unsqueeze(-1)
            v[start:stop] = torch.where(local[..., None], d_states / squared.clamp_min(tiny)[..., None],
                                        torch.where(moved[..., None], 0.0, v[start:stop]))
            w[start:stop] = torch.where(local[..., None], rank_one,
                                        torch.where(moved[..., None], 0.0, w[start:stop]))
        correction = self._broyden(view, gamma, v, w, newton.state_coef, newton.output_coef)
        newton = attrs.evolve(newton, first=first, states=states, outputs=outputs, gamma=gamma)
        return view.states + correction, (newton, v, w, system)

    def _broyden(self, view: Any, gamma: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                 state_coef: torch.Tensor, output_coef: torch.Tensor) -> torch.Tensor:
        lo, hi, width = view.lo, view.hi, view.width
        propagator, gain = window_operators(view, gamma, state_coef, output_coef)
        eye = torch.eye(width, dtype=gain.dtype, device=gain.device)
        base = propagator @ view.first_order.transpose(0, 1)  # [N, W, D]
        vs = v[lo:hi + 1].transpose(0, 1)  # [N, W, D]
        ws = w[lo:hi + 1].transpose(0, 1)
        coupling = gain * torch.einsum("nid,ncd->nic", vs, ws)
        projected = (vs * base).sum(-1, keepdim=True)  # [N, W, 1]
        s = torch.linalg.solve_triangular(eye - coupling, projected, upper=False, unitriangular=True)
        solved = base + torch.einsum("nic,ncd->nid", gain * s.transpose(1, 2), ws)
        return solved.transpose(0, 1)


@attrs.define(frozen=True, eq=False, kw_only=True)
class MultiBroydenNewton(BroydenNewton):
    """Experiment (round 4): ``BroydenNewton`` of rank ``rank``: ``J_j = gamma_j I + W_j V_j^T``
    with the last ``rank`` small steps at state j (``dX_j``, ``dE_j`` as columns),
    ``W_j = dE_j - gamma_j dX_j`` and ``V_j = dX_j (dX_j^T dX_j)^-1``, so ``J_j`` reproduces every
    kept secant pair exactly. A step larger than ``gate`` clears the state's pairs. The closed
    form is the rank-1 one with ``s`` ``[W, rank]`` per sample (a ``W rank`` triangular system)."""

    name = "newton_multibroyden"
    rank: int = 2

    def init(self, system: Any) -> Any:
        newton = QuasiNewton.init(self, system)
        zeros = torch.zeros(system.num_steps + 1, system.num_samples, system.state_size, self.rank,
                            dtype=system.dtype, device=system.device)
        return (newton, zeros, zeros.clone())

    def step(self, view: Any, state: Any) -> Any:
        newton, xs, es = state
        first, states, outputs, pairs = secant_pairs(view, newton)
        gamma = newton.gamma.clone()
        xs, es = xs.clone(), es.clone()
        if pairs is not None:
            start, stop, d_states, d_outputs = pairs
            slope, moved = self.secant_slopes(d_states, d_outputs, newton.prior[start:stop])
            small = d_states.pow(2).sum(-1) <= self.gate ** 2 * d_states.shape[-1]
            local = (moved & small)[..., None, None]
            gamma[start:stop] = torch.where(moved, slope, gamma[start:stop])
            shifted_x = torch.cat([d_states[..., None], xs[start:stop, ..., :-1]], -1)
            shifted_e = torch.cat([d_outputs[..., None], es[start:stop, ..., :-1]], -1)
            keep = moved[..., None, None]
            xs[start:stop] = torch.where(local, shifted_x, torch.where(keep, 0.0, xs[start:stop]))
            es[start:stop] = torch.where(local, shifted_e, torch.where(keep, 0.0, es[start:stop]))
        correction = self._multi(view, gamma, xs, es, newton.state_coef, newton.output_coef)
        newton = attrs.evolve(newton, first=first, states=states, outputs=outputs, gamma=gamma)
        return view.states + correction, (newton, xs, es)

    def _multi(self, view: Any, gamma: torch.Tensor, xs: torch.Tensor, es: torch.Tensor,
               state_coef: torch.Tensor, output_coef: torch.Tensor) -> torch.Tensor:
        lo, hi, width, m = view.lo, view.hi, view.width, self.rank
        samples = view.first_order.shape[1]
        dx, de = xs[lo:hi + 1], es[lo:hi + 1]  # [W, N, D, m]
        w = de - gamma[lo:hi + 1, :, None, None] * dx
        gram = dx.transpose(-1, -2) @ dx  # [W, N, m, m]
        ridge = 1e-10 * gram.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] + 1e-300
        eye_m = torch.eye(m, dtype=gram.dtype, device=gram.device)
        v = dx @ torch.linalg.inv(gram + ridge * eye_m)  # [W, N, D, m]
        # bound each state's low-rank part: |W V^T| <= bound (Frobenius, a cheap upper bound)
        norm = (w.pow(2).sum((-1, -2)) * v.pow(2).sum((-1, -2))).sqrt()
        w = w * (self.bound / norm.clamp_min(self.bound))[..., None, None]
        propagator, gain = window_operators(view, gamma, state_coef, output_coef)
        base = propagator @ view.first_order.transpose(0, 1)  # [N, W, D]
        vs, ws = v.permute(1, 0, 2, 3), w.permute(1, 0, 2, 3)  # [N, W, D, m]
        cross = torch.einsum("nida,ncdb->niacb", vs, ws)  # V_i[:, a] . W_c[:, b]
        coupling = (gain[:, :, None, :, None] * cross).reshape(samples, width * m, width * m)
        projected = torch.einsum("nida,nid->nia", vs, base).reshape(samples, width * m, 1)
        eye_wm = torch.eye(width * m, dtype=gain.dtype, device=gain.device)
        s = torch.linalg.solve_triangular(eye_wm - coupling, projected, upper=False, unitriangular=True)
        s = s.reshape(samples, width, m)
        solved = base + torch.einsum("nic,ncdb,ncb->nid", gain, ws, s)
        return solved.transpose(0, 1)


@attrs.define(frozen=True, eq=False, kw_only=True)
class AitkenNewton(QuasiNewton):
    """Experiment (round 4): ``newton`` whose correction at each state is extrapolated along
    itself where consecutive corrections are nearly parallel. At the last states newton's
    corrections undershoot (the remaining error after a step lies along that step, cosine
    -0.7 to -1.0, and consecutive corrections have cosine 0.75-0.99 there: DDIM-100 digits
    seed 1), the signature of a linear contraction ``c_k = rho c_(k-1)``, whose limit is
    ``x + c_k / (1 - rho)``. Per state and sample ``rho = <c_k, c_(k-1)> / |c_(k-1)|^2`` if the
    cosine is at least ``cosine``, clamped to ``[0, rho_max]``; states with sigma >= ``late``
    are not extrapolated."""

    name = "newton_aitken"
    cosine: float = 0.8
    rho_max: float = 0.5
    late: float = float("inf")

    def init(self, system: Any) -> Any:
        newton = super().init(system)
        return (newton, torch.zeros_like(system.flat_noise), system.sigmas)

    def step(self, view: Any, state: Any) -> Any:
        newton, previous, sigma = state
        proposal, newton = super().step(view, newton)
        correction = proposal - view.states  # [W, N, D]
        rows = slice(view.lo, view.hi + 1)
        last = previous[rows]
        inner = (correction * last).sum(-1)
        norms = correction.norm(dim=-1) * last.norm(dim=-1)
        tiny = torch.finfo(inner.dtype).tiny
        cosine = inner / norms.clamp_min(tiny)
        rho = (inner / last.pow(2).sum(-1).clamp_min(tiny)).clamp(0.0, self.rho_max)
        use = (cosine >= self.cosine) & (sigma[rows] < self.late)[:, None]
        gain = torch.where(use, 1 / (1 - rho), torch.ones_like(rho))
        extrapolated = correction * gain[..., None]
        previous = previous.clone()
        previous[rows] = correction  # the unextrapolated correction: its ratio measures rho
        return view.states + extrapolated, (newton, previous, sigma)


@attrs.define(frozen=True, eq=False, kw_only=True)
class BandNewton(QuasiNewton):
    """Experiment (round 4): ``newton`` with one secant slope per state AND spatial-frequency band.

    The full Jacobian at the last states (benchmarks/exact_newton.py, digits DDIM-100) is far
    from a scalar: at sigma = 0.01, J ~ 0 on about 100 of the 256 directions (the denoiser
    passes the image through) and ~ 1/sigma on the rest; no rank-16/32 correction captures it.
    A convolutional denoiser's Jacobian is close to a convolution, so nearly diagonal in the
    Fourier basis: here ``J_j ~ sum_b gamma_(j,b) P_b`` with ``P_b`` the orthogonal projector on
    the b-th band of radial frequency (equal numbers of frequencies per band), each
    ``gamma_(j,b)`` newton's blended secant of the band's components. The correction is newton's
    scalar scan once per band, exact for that J."""

    name = "newton_band"
    bands: int = 4

    def init(self, system: Any) -> Any:
        newton = super().init(system)
        shape = system.shape
        fy = torch.fft.fftfreq(shape[-2], dtype=torch.float64)[:, None]
        fx = torch.fft.fftfreq(shape[-1], dtype=torch.float64)[None, :]
        radius = (fy ** 2 + fx ** 2).sqrt().flatten()
        order = torch.argsort(radius, stable=True)
        label = torch.empty_like(order)
        label[order] = torch.arange(order.numel()) * self.bands // order.numel()
        # keep +k and -k in one band (|k| is symmetric, but ties at a band edge may split them)
        masks = [(label == b).reshape(shape[-2], shape[-1]) for b in range(self.bands)]
        gamma = newton.gamma[..., None].expand(-1, -1, self.bands).clone()
        return (newton, masks, gamma, tuple(shape))

    def _project(self, vectors: torch.Tensor, mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        lead = vectors.shape[:-1]
        images = vectors.reshape(*lead, *shape)
        spectrum = torch.fft.fft2(images, norm="ortho")
        return torch.fft.ifft2(spectrum * mask, norm="ortho").real.reshape(*lead, -1)

    def step(self, view: Any, state: Any) -> Any:
        newton, masks, gamma, shape = state
        first, states, outputs, pairs = secant_pairs(view, newton)
        gamma = gamma.clone()
        if pairs is not None:
            start, stop, d_states, d_outputs = pairs
            for b, mask in enumerate(masks):
                slope, moved = self.secant_slopes(self._project(d_states, mask, shape),
                                                  self._project(d_outputs, mask, shape),
                                                  newton.prior[start:stop])
                gamma[start:stop, :, b] = torch.where(moved, slope, gamma[start:stop, :, b])
        correction = torch.zeros_like(view.first_order)
        for b, mask in enumerate(masks):
            part = attrs.evolve(view, first_order=self._project(view.first_order, mask, shape))
            correction = correction + self._correction(part, gamma[..., b], newton.state_coef,
                                                       newton.output_coef)
        newton = attrs.evolve(newton, first=first, states=states, outputs=outputs)
        return view.states + correction, (newton, masks, gamma, shape)


@attrs.define(frozen=True, eq=False, kw_only=True)
class SubspaceNewton(QuasiNewton):
    """Experiment (round 4): ``newton`` with a locally Gaussian model of the denoiser's Jacobian.

    Tweedie: for ``x = alpha x0 + sigma n`` the eps model's Jacobian is
    ``J_j = (I - (alpha_j^2 / sigma_j^2) Cov[x0 | x_j]) / sigma_j``; with a Gaussian posterior of
    covariance ``S`` shared by all states of a sample, ``J_j = sigma_j (alpha_j^2 S + sigma_j^2 I)^-1``:
    the same eigenbasis at every state, eigenvalue ``sigma_j / (sigma_j^2 + alpha_j^2 lambda_a)``
    (``lambda = 0``: newton's prior 1 / sigma). Each iteration fits ``S`` of rank ``rank`` to
    the secant pairs of every state of the sample: its range from the top singular vectors of
    ``z_j = sigma_j dx_j - sigma_j^2 de_j`` (``= alpha_j^2 S de_j`` under the model), then each
    ``lambda_a`` by least squares over the pairs projected on ``u_a``. The correction is newton's
    scalar scan once per eigen-direction (its own slope per state) plus once on the complement
    (newton's blended slope of the complement's secants): exact for this J, ``O(W^2 (r + D))``."""

    name = "newton_subspace"
    rank: int = 8
    memory: int = 1  # iterations of secant pairs the fit uses
    # the model only at states with sigma below this (fitted on their pairs only); newton's
    # blended slope in every direction above it (exact Newton gains almost everything from the
    # last 10-20 % of the states: benchmarks/exact_newton.py --modes rows80-100)
    sigma_max: float = float("inf")
    late_complement: str = "blend"  # or "prior": 1/sigma off the subspace at those states

    def init(self, system: Any) -> Any:
        sigma = system.sigmas
        alpha = (1 - sigma.pow(2)).clamp_min(0).sqrt()
        return (super().init(system), sigma, alpha, (), None)

    def step(self, view: Any, state: Any) -> Any:
        newton, sigma, alpha, history, basis = state
        first, states, outputs, pairs = secant_pairs(view, newton)
        gamma = newton.gamma.clone()
        slopes = None
        if pairs is not None:
            history = ((pairs[0], pairs[2], pairs[3]),) + history[: self.memory - 1]
            basis, lambdas = self._fit(history, sigma, alpha)  # [N, D, r], [N, r]
            start, stop, d_states, d_outputs = pairs
            # the complement's secant, blended with the prior as newton's
            slope, moved = self.secant_slopes(d_states - in_basis(basis, d_states),
                                              d_outputs - in_basis(basis, d_outputs),
                                              newton.prior[start:stop])
            gamma[start:stop] = torch.where(moved, slope, gamma[start:stop])
            s2 = sigma.pow(2)[:, None, None]
            slopes = sigma[:, None, None] / (s2 + alpha.pow(2)[:, None, None] * lambdas[None])
            slopes = slopes.clamp(max=self.clamp)
            late = (sigma < self.sigma_max)[:, None]
            slopes = torch.where(late[..., None], slopes, gamma[..., None])
            if self.late_complement == "prior":
                gamma = torch.where(late, newton.prior.expand_as(gamma), gamma)
        if slopes is None:
            correction = self._correction(view, gamma, newton.state_coef, newton.output_coef)
        else:  # one scalar scan per eigen-direction, one on the complement
            correction = subspace_correction(self, view, basis, slopes, gamma, newton.state_coef,
                                             newton.output_coef)
        newton = attrs.evolve(newton, first=first, states=states, outputs=outputs, gamma=gamma)
        return view.states + correction, (newton, sigma, alpha, history, basis)

    def _fit(self, history: Any, sigma: torch.Tensor,
             alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs = torch.cat([d for _, d, _ in history])  # [P, N, D]
        es = torch.cat([e for _, _, e in history])
        rows = torch.cat([torch.arange(b, b + d.shape[0]) for b, d, _ in history])
        late = sigma[rows] < self.sigma_max
        if late.sum() >= 1:
            xs, es, rows = xs[late], es[late], rows[late]
        sg, al = sigma[rows][:, None, None], alpha[rows][:, None, None]
        z = sg * xs - sg.pow(2) * es  # alpha^2 S de under the model
        zt = z.permute(1, 2, 0)  # [N, D, P]
        u, _, _ = torch.linalg.svd(zt, full_matrices=False)
        basis = u[..., : self.rank]  # [N, D, r]
        p = al.pow(2) * torch.einsum("ndr,pnd->pnr", basis, es)
        q = torch.einsum("ndr,pnd->pnr", basis, z)
        lambdas = ((p * q).sum(0) / p.pow(2).sum(0).clamp_min(torch.finfo(p.dtype).tiny)).clamp_min(0)
        return basis, lambdas


@attrs.define(frozen=True, eq=False, kw_only=True)
class TangentNewton(QuasiNewton):
    """Experiment (round 5): ``newton`` with ``J ~ 0`` on the span of the latest changes of the
    predicted x_0 at the low-noise states, and newton's slope on its complement.

    At low noise the denoiser passes x through along the data's tangent directions (``J ~ 0``:
    the predicted x_0 follows x) and holds x_0 fixed along the others (``J = 1 / sigma``); round 4
    measured that structure at the last states and found the whole gap to exact Newton there.
    To first order the change of the predicted x_0 between two iterates is that tangent part of
    the step: ``dx0 = dx - sigma de = (I - sigma J) dx``, which vanishes along the normal
    directions. So the span ``Q`` (per sample, rank at most ``rank``) of the x_0 changes at the
    states with ``sigma < sigma_max`` over the last ``memory`` iterations is a free estimate of
    where the tangent part of the remaining error lies. At those states the model is
    ``J_j = g_j Q Q^T + gamma_j (I - Q Q^T)``: ``g_j`` 0 (``tangent="zero"``) or the secant
    within ``Q`` blended with 0 (``"secant"``), ``gamma_j`` newton's blended slope of the
    complement's secant; every other state keeps newton's slope. ``Q`` is shared by the states of a
    sample and the lag coefficients are scalars, so the correction is exact with two scalar scans:
    the residual's part in ``Q`` and its complement. No extra model evaluation."""

    name = "newton_tangent"
    rank: int = 8
    memory: int = 1
    sigma_max: float = 0.3
    tangent: str = "zero"
    rel_tol: float = 1e-2  # basis directions below this fraction of the top singular value are dropped

    def init(self, system: Any) -> Any:
        return (super().init(system), system.sigmas, ())

    def step(self, view: Any, state: Any) -> Any:
        newton, sigma, history = state
        first, states, outputs, pairs = secant_pairs(view, newton)
        gamma = newton.gamma.clone()
        basis = None
        if pairs is not None:
            start, stop, d_states, d_outputs = pairs
            prior = newton.prior[start:stop]
            slope, moved = self.secant_slopes(d_states, d_outputs, prior)
            gamma[start:stop] = torch.where(moved, slope, gamma[start:stop])
            late = sigma[start:stop] < self.sigma_max
            if bool(late.any()):
                rows = late.nonzero().flatten()
                changes = d_states[rows] - sigma[start:stop][rows, None, None] * d_outputs[rows]
                history = (changes,) + history[: self.memory - 1]
                basis = self._basis(torch.cat(history))  # [N, D, r]
        if basis is None:
            correction = self._correction(view, gamma, newton.state_coef, newton.output_coef)
        else:
            d_in, e_in = in_basis(basis, d_states), in_basis(basis, d_outputs)
            perp, _ = self.secant_slopes(d_states - d_in, d_outputs - e_in, prior)
            if self.tangent == "zero":
                g = torch.zeros_like(perp)
            else:
                g, _ = self.secant_slopes(d_in, e_in, torch.zeros_like(perp))
            mask = late[:, None] & moved
            g_all, perp_all = gamma.clone(), gamma.clone()
            g_all[start:stop] = torch.where(mask, g, gamma[start:stop])
            perp_all[start:stop] = torch.where(mask, perp, gamma[start:stop])
            slopes = g_all[..., None].expand(-1, -1, basis.shape[-1])
            correction = subspace_correction(self, view, basis, slopes, perp_all, newton.state_coef,
                                             newton.output_coef)
        newton = attrs.evolve(newton, first=first, states=states, outputs=outputs, gamma=gamma)
        return view.states + correction, (newton, sigma, history)

    def _basis(self, changes: torch.Tensor) -> torch.Tensor:
        """``[N, D, r]``: the top left singular vectors of the changes ``[P, N, D]`` per sample,
        those below ``rel_tol`` of the largest singular value zeroed."""
        u, s, _ = torch.linalg.svd(changes.permute(1, 2, 0), full_matrices=False)
        keep = s[:, : self.rank] > self.rel_tol * s[:, :1]
        return u[..., : self.rank] * keep[:, None, :]


@attrs.define(frozen=True, eq=False, kw_only=True)
class ProbedTangentNewton(QuasiNewton):
    """Experiment (round 5): ``newton`` with the denoiser's passed-through subspace measured by
    ``probes`` random JVPs at ONE low-noise state per round and shared by all low-noise states.

    At low noise ``J_j ~ (I - P) / sigma_j`` with ``P`` (about) the projection on the data's
    tangent directions at the image, nearly the same for the last states (their predicted x_0 is
    one image). So ``P ~ -sigma_p A_p`` (``A = J - I / sigma``) at one probed state ``p`` (the
    state whose sigma is nearest ``probe_sigma``) serves every state with ``sigma < sigma_max``:
    ``J_j = (I - P) / sigma_j``. ``P`` is a single-pass Nystrom estimate from ``Y = P Omega``
    (forward differences of the model at the CURRENT state along ``probes`` random unit
    directions: they depend only on the iterate, so they can share the round's batched call; they
    are counted in ``evals``), eigenvalues clipped to [0, 1]. The correction is newton's scalar scan
    once per eigen-direction of ``P`` (slope ``(1 - lambda) / sigma_j`` at those states) and once
    on the complement (newton's blended slope of the complement's secants)."""

    name = "newton_probed_tangent"
    probes: int = 16
    probe_sigma: float = 0.1
    sigma_max: float = 0.3
    step_size: float = 0.05
    complement: str = "blend"  # or "prior": 1 / sigma off the subspace at the low-noise states

    def init(self, system: Any) -> Any:
        return (super().init(system), system, torch.Generator().manual_seed(0))

    def step(self, view: Any, state: Any) -> Any:
        newton, system, generator = state
        sigma = system.sigmas
        first, states, outputs, pairs = secant_pairs(view, newton)
        gamma = newton.gamma.clone()
        if pairs is not None:
            start, stop, d_states, d_outputs = pairs
            slope, moved = self.secant_slopes(d_states, d_outputs, newton.prior[start:stop])
            gamma[start:stop] = torch.where(moved, slope, gamma[start:stop])
        probe = int((sigma[:-1] - self.probe_sigma).abs().argmin())
        late = sigma < self.sigma_max  # [T+1]
        if not (view.lo - 1 <= probe <= view.hi - 1):  # the probed state is not evaluated this round
            correction = self._correction(view, gamma, newton.state_coef, newton.output_coef)
        else:
            basis, lambdas = self._tangent(system, view, probe, generator)  # [N, D, r], [N, r]
            if pairs is not None:  # the complement's secant at the late states
                perp, moved = self.secant_slopes(d_states - in_basis(basis, d_states),
                                                 d_outputs - in_basis(basis, d_outputs),
                                                 newton.prior[start:stop])
                rows = late[start:stop, None] & moved
                gamma_perp = gamma.clone()
                gamma_perp[start:stop] = torch.where(rows, perp, gamma[start:stop])
            else:
                gamma_perp = gamma
            if self.complement == "prior":
                gamma_perp = torch.where(late[:, None], newton.prior.expand_as(gamma), gamma_perp)
            inv_sigma = newton.prior  # [T+1, 1], 1 / sigma clamped
            slopes = torch.where(late[:, None, None], (1 - lambdas[None]) * inv_sigma[..., None],
                                 gamma[..., None])  # [T+1, N, r]
            correction = subspace_correction(self, view, basis, slopes, gamma_perp, newton.state_coef,
                                             newton.output_coef)
        newton = attrs.evolve(newton, first=first, states=states, outputs=outputs, gamma=gamma)
        return view.states + correction, (newton, system, generator)

    def _tangent(self, system: Any, view: Any, probe: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``P ~ V diag(lambda) V^T`` at state ``probe`` by single-pass Nystrom from ``probes`` JVPs."""
        x = view.trajectory[probe]  # [N, D]
        samples, size = x.shape
        omega = torch.randn(self.probes, samples, size, generator=generator, dtype=x.dtype)
        omega = omega / omega.norm(dim=-1, keepdim=True)
        out = system.evaluate(x[None] + self.step_size * omega, [probe] * self.probes)
        EXTRA_EVALS[0] += self.probes * samples
        jvps = (out - view.outputs[probe][None]) / self.step_size  # J omega, [p, N, D]
        sig = float(system.sigmas[probe])
        y = (omega - sig * jvps).permute(1, 2, 0)  # P omega = (I - sigma J) omega, [N, D, p]
        return nystrom_eigen(omega.permute(1, 2, 0), y)


@attrs.define(frozen=True, eq=False, kw_only=True)
class GatedPriorNewton(QuasiNewton):
    """Experiment (round 5): ``newton`` that drops the prior (``prior_weight`` -> ``near_weight``)
    at the states whose last step was small (RMS at most ``gate``). The secant through two
    nearby iterates is the Rayleigh quotient of J along the step; near convergence the steps at
    the low-noise states are mostly along the passed-through directions (J ~ 0 there), where the
    prior 1/sigma damps a correction that should carry on to x_0 (each late step's gain is
    ``(1 + sigma_(i+1) / sigma_i) / 2`` under the blend against 1 when x_0 follows x)."""

    name = "newton_gated_prior"
    gate: float = 0.01
    near_weight: float = 0.0

    def secant_slopes(self, d_states: torch.Tensor, d_outputs: torch.Tensor,
                      prior: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        blended, moved = super().secant_slopes(d_states, d_outputs, prior)
        if prior is None:
            return blended, moved
        near = attrs.evolve(self, prior_weight=self.near_weight)
        alone, _ = QuasiNewton.secant_slopes(near, d_states, d_outputs, prior)
        small = d_states.pow(2).mean(-1) <= self.gate ** 2
        return torch.where(small, alone, blended), moved


@attrs.define(frozen=True, eq=False, kw_only=True)
class LatePriorNewton(QuasiNewton):
    """Experiment (round 5): ``newton`` whose prior at the states with ``sigma < sigma_max`` is
    ``scale / sigma`` instead of ``1 / sigma`` (the first round's slope there too). Traced in the
    default solver (digits DDIM-100 seed 1), the secant at the states 90-99 is 0.00-0.2 times
    1/sigma in every round (J ~ 0 along the steps: the passed-through directions), so the prior
    drags the blend to about 0.5 / sigma where the measured slope is about 0."""

    name = "newton_late_prior"
    sigma_max: float = 0.3
    scale: float = 0.0

    def init(self, system: Any) -> Any:
        state = super().init(system)
        late = (system.sigmas < self.sigma_max)[:, None]
        factor = torch.where(late, self.scale, 1.0).to(state.gamma.dtype)
        return attrs.evolve(state, gamma=state.gamma * factor, prior=state.prior * factor)


@attrs.define(frozen=True, eq=False, kw_only=True)
class SpeculativeNewton(QuasiNewton):
    """Experiment (round 6): ``newton`` with speculative candidates at the low-noise states.

    Newton's correction with another slope at the states with ``sigma < sigma_max`` changes only
    those rows (the scan runs towards x_0), so the alternatives differ from newton's proposal on
    the last few rows only. Each round evaluates every candidate there (in a real solver in the
    same batched call as the round's own rows: ``(len(alternatives)) x late rows`` extra
    evaluations per sample, counted in ``evals``) and each sample keeps the candidate whose
    look-ahead is smallest: ``merit="lookahead"``, the max |change| newton's NEXT correction
    (its secants updated with the candidate's evaluations, exactly the next round's step) would
    make to x_0; ``"residual"``: the RMS of the candidate's first-order residuals on the late rows.
    ``alternatives``: late slopes, ``"zero"`` (Picard's frozen outputs, right on the directions the
    denoiser passes through), ``"prior"`` (``1 / sigma``, right where the predicted x_0 is held),
    or a float ``c``: ``c`` times newton's blended slope."""

    name = "newton_speculative"
    sigma_max: float = 0.5
    alternatives: tuple[Any, ...] = ("zero", "prior")
    merit: str = "lookahead"

    def init(self, system: Any) -> Any:
        return (super().init(system), system)

    def step(self, view: Any, state: Any) -> Any:
        newton, system = state
        proposal, updated = QuasiNewton.step(self, view, newton)
        steps = system.num_steps
        late = system.sigmas < self.sigma_max  # [T+1]
        first_late = int(late.nonzero()[0])
        if view.hi < steps or first_late <= view.lo:  # the late block is not all in the window
            return proposal, (updated, system)
        candidates = [proposal, *self.late_candidates(view, updated, late)]
        samples = proposal.shape[1]
        lo = view.lo if self.merit == "lookahead" else first_late
        # the states above the late block are newton's in every candidate: evaluated once
        shared = view.outputs.clone()
        above = list(range(lo - 1, first_late - 1))
        if above:
            trajectory = view.trajectory.clone()
            trajectory[view.lo:view.hi + 1] = proposal
            shared[above] = system.evaluate(trajectory[above], above)
        below = list(range(first_late - 1, steps))
        merits = []
        for index, candidate in enumerate(candidates):
            trajectory = view.trajectory.clone()
            trajectory[view.lo:view.hi + 1] = candidate
            outputs = shared.clone()
            outputs[below] = system.evaluate(trajectory[below], below)
            if index:
                EXTRA_EVALS[0] += len(below) * samples
            first_order = system.first_order_rhs(trajectory, outputs, lo, steps) - trajectory[lo:steps + 1]
            if self.merit == "residual":
                merits.append(first_order.pow(2).mean(dim=(0, 2)))
                continue
            look = attrs.evolve(view, states=trajectory[lo:steps + 1], first_order=first_order,
                                trajectory=trajectory, outputs=outputs)
            _, ahead = QuasiNewton.step(self, look, updated)  # the secants this candidate would give
            correction = self._correction(look, ahead.gamma, ahead.state_coef, ahead.output_coef)
            merits.append(correction[-1].abs().amax(dim=-1))
        best = torch.stack(merits).argmin(dim=0)  # [N]
        chosen = torch.stack(candidates)[best, :, torch.arange(samples)].transpose(0, 1)
        return chosen, (updated, system)

    def late_candidates(self, view: Any, newton: Any, late: torch.Tensor) -> list[torch.Tensor]:
        """Newton's proposal with each alternative slope at the ``late`` states (``[T+1]`` bool)."""
        gamma, candidates = newton.gamma, []
        for alternative in self.alternatives:
            if alternative == "zero":
                slope = torch.zeros_like(gamma)
            elif alternative == "prior":
                slope = newton.prior.expand_as(gamma)
            else:
                slope = float(alternative) * gamma
            candidates.append(view.states + self._correction(
                view, torch.where(late[:, None], slope, gamma), newton.state_coef, newton.output_coef))
        return candidates


#: The seed of the neighbouring batch (round 7): any seed the study's batches do not use.
NEIGHBOUR_SEED = 4242


def frozen_x0_guess(system: Any, x0: torch.Tensor) -> torch.Tensor:
    """``[T+1, N, D]``: every row from ``x_T`` with the predicted x_0 held at ``x0`` (``[N, D]``):
    the library's ``Extrapolate(steps=0, x0=x0)`` (the sampler run with the outputs a denoiser
    predicting ``x0`` would give; eps and flow-velocity samplers)."""
    return Extrapolate(steps=0, x0=x0).initialize(system).trajectory


@attrs.define(frozen=True, eq=False, kw_only=True)
class NeighbourStart(Initializer):
    """Experiment (round 7, idea 5): a first guess from an earlier batch of the same model.

    A neighbouring batch (``seed``, ``pool`` samples, the same sampler) is
    solved sequentially, as a stream of batches would have solved the previous one (its cost is
    not counted: it is the previous batch's output). ``mode``:

    * ``"x0"``: the rows from ``x_T`` with x_0 held at the paired neighbour's sample
      (:func:`frozen_x0_guess`);
    * ``"mean"``: the same towards the mean of the ``pool`` neighbours' samples (the data mean as
      the model draws it; the ``extrapolate`` initializer holds ``x_0 = 0``, and the digits'
      background is -1);
    * ``"trajectory"``: the paired neighbour's whole trajectory, moved by the difference of the
      starting noises as the straight line would move it:
      ``x_i^nb + (s_i / s_T) (x_T - x_T^nb)``;
    * ``"zero"``: towards ``x_0 = 0`` (no neighbour): the ``extrapolate`` initializer's start
      with ``steps=0`` on VP samplers, and its straight-line analogue for flow matching;
    * ``"data"``: towards the mean of the digits training set (the models trained on it only;
      no neighbour is solved), to tell the mean's own value from the neighbours' estimate of it."""

    name = "neighbour"
    mode: str = "x0"
    pool: int = 16
    seed: int = NEIGHBOUR_SEED

    def initialize(self, system: Any) -> InitialGuess:
        samples = system.num_samples
        if self.mode == "zero":
            return InitialGuess(frozen_x0_guess(system, torch.zeros_like(system.flat_noise[0])),
                                valid_upto=system.num_steps)
        if self.mode == "data":
            from fpsolve.models import digits

            mean = digits.load_digits_dataset().mean(dim=0).reshape(1, -1)
            guess = frozen_x0_guess(system, mean.to(system.device, system.dtype).expand(samples, -1))
            return InitialGuess(guess, valid_upto=system.num_steps)
        neighbours = fpsolve.TriangularSystem(
            sampler=system.sampler, denoiser=system.denoiser, shape=system.shape,
            batch=max(samples, self.pool if self.mode == "mean" else samples),
            generator=torch.Generator().manual_seed(self.seed), dtype=system.dtype)
        solved = neighbours.sequential().states.reshape(system.num_steps + 1, neighbours.num_samples, -1)
        solved = solved.to(system.device, system.dtype)[:, :samples] if self.mode != "mean" else solved
        if self.mode == "mean":
            guess = frozen_x0_guess(system, solved[-1].mean(dim=0, keepdim=True).expand(samples, -1))
        elif self.mode == "x0":
            guess = frozen_x0_guess(system, solved[-1])
        else:
            sigmas = system.sampler.state_sigmas().to(system.device, system.dtype)
            shift = (system.flat_noise[0] - solved[0]) / sigmas[0]
            guess = solved + sigmas[:, None, None] * shift
        guess[0] = system.flat_noise[0]
        return InitialGuess(guess, valid_upto=system.num_steps)


class _GrowingWindow(int):
    """The window of :class:`ScheduledWindow`: T as an int, but ``anchor + window`` (which the
    driver computes once per iteration, for the window's last row) follows the schedule.

    Study-only: the driver reads a controller's window once per solve, so a schedule that changes
    it between iterations is measured through this hook rather than a change to the driver; the
    test of it checks the windows the driver actually used (``Solution.residuals.windows``)."""

    schedule: Any
    calls: int

    def __new__(cls, steps: int, schedule: Any) -> _GrowingWindow:
        window = super().__new__(cls, steps)
        window.schedule, window.calls = schedule, 0
        return window

    def __radd__(self, anchor: Any) -> Any:
        self.calls += 1
        return anchor + max(1, min(int(self), int(self.schedule(self.calls, int(self)))))


@attrs.define(frozen=True)
class ScheduledWindow(Controller):
    """Experiment (round 7, idea 5: window schedules): a window that grows from ``first x T``
    rows; ``growth="double"`` doubles it each iteration, ``"linear"`` adds ``first x T`` rows.
    Rows enter the window as the driver fills them: a copy of the lowest state already solved,
    so the rows ahead start from a state that has had some iterations instead of ``x_T``."""

    first: float = 0.25
    growth: str = "double"

    def window_for(self, num_steps: int) -> int:
        start = max(1, round(self.first * num_steps))

        def width(iteration: int, steps: int) -> int:
            if self.growth == "double":
                return start * 2 ** (iteration - 1)
            return start * iteration

        return _GrowingWindow(num_steps, width)


def _forecast(steps: int) -> StoppingRule:
    """The default's rule, ``x0_forecast`` at its defaults (pinned, whatever the preset is; since
    round 5 with its stall guard, which changed no stop of the runs recorded before it)."""
    return X0Forecast()


def _newton(prior: str, weight: float, **extra: Any) -> dict[str, Any]:
    return dict(solver="newton", prior=prior, prior_weight=weight, **extra)


#: name -> keyword arguments of fpsolve.solve (callables are called with the number of steps).
#: Every option is pinned, so a name measures the same thing whatever the library defaults are
#: (except ``default``: ``fpsolve.solve(system)`` as it is now).
CONFIGS: dict[str, dict[str, Any]] = {
    "default": dict(),
    # baselines at the rms rule's default 2e-4 (the defaults before issue 14)
    "fp": dict(solver="fp", stopping=lambda steps: RMS()),
    "taa": dict(solver="taa", stopping=lambda steps: RMS()),
    "newton-secant": _newton("zero", 0.0, stopping=lambda steps: RMS()),  # newton before issue 14
    # idea 1: the x0 rule
    "newton-secant/x0": _newton("zero", 0.0, stopping=_x0()),
    "newton-secant/x0-row2e-4": _newton("zero", 0.0, stopping=_x0(tol=2e-4)),
    "taa/x0": dict(solver="taa", stopping=_x0()),
    "taa-m3/x0": dict(solver="taa", history=3, stopping=_x0()),
    "taa-m5/x0": dict(solver="taa", history=5, stopping=_x0()),
    "taa-m3": dict(solver="taa", history=3, stopping=lambda steps: RMS()),
    # idea 4b: TAA restarts (a sample's history is dropped when its residual norm grows by > r)
    "taa-m3-r1/x0": dict(solver="taa", history=3, restart=1.0, stopping=_x0()),
    # round 5: the stall guard of the x0 rules (TAA m = 3 stalls on the memorising denoiser)
    "taa-m3/x0-guard": dict(solver="taa", history=3, stopping=lambda steps: X0Change(atol=1e-2)),
    "taa-m3/forecast": dict(solver="taa", history=3, stopping=_forecast),
    "taa-m3/forecast-noguard": dict(solver="taa", history=3,
                                    stopping=lambda steps: X0Forecast(stall=None)),
    "default/noguard": dict(stopping=lambda steps: X0Forecast(stall=None)),
    "taa-m3-r2/x0": dict(solver="taa", history=3, restart=2.0, stopping=_x0()),
    "taa-m5-r1/x0": dict(solver="taa", history=5, restart=1.0, stopping=_x0()),
    "taa-m5-r2/x0": dict(solver="taa", history=5, restart=2.0, stopping=_x0()),
    "taa-r1/x0": dict(solver="taa", restart=1.0, stopping=_x0()),
    # idea 1b: the x0_forecast rule with the default newton; "long": the same iterates traced
    # past every rule with atol >= 2e-3 (the x0 rule at atol 2e-3), to replay rules offline
    "default/forecast": dict(stopping=lambda steps: X0Forecast()),
    "default/x0": dict(stopping=_x0(atol=1.5e-2)),
    "default/long": dict(stopping=_x0(atol=2e-3)),
    "default/long-row5e-6": dict(stopping=_x0(atol=2e-3, tol=5e-6)),
    # idea 5: the order of newton's correction (how far down a row's correction reaches)
    "default-k5": dict(order=5),
    "default-k10": dict(order=10),
    "default-k20": dict(order=20),
    "default-pooled": dict(solver=PooledNewton()),
    "default/long-row1e-6": dict(stopping=_x0(atol=2e-3, tol=1e-6)),
    "taa-m5": dict(solver="taa", history=5, stopping=lambda steps: RMS()),
    "fp/x0": dict(solver="fp", stopping=_x0()),
    # idea 2: ParaSolver's start (extrapolate); ex0 = steps 0, ex1 = steps 1
    "newton-secant+ex0": _newton("zero", 0.0, stopping=lambda steps: RMS(), initializer=Extrapolate(steps=0)),
    "newton-secant+ex1": _newton("zero", 0.0, stopping=lambda steps: RMS(), initializer=Extrapolate(steps=1)),
    "default+ex0": dict(initializer=Extrapolate(steps=0)),
    "default+ex1": dict(initializer=Extrapolate(steps=1)),
    # idea 3a: diagonal secant (quasi-DEER)
    "diag/x0": dict(solver="newton_diag", prior="zero", stopping=_x0()),
    "diag-s10/x0": dict(solver="newton_diag", prior="zero", shrink=10.0, stopping=_x0()),
    "diag-s0.1/x0": dict(solver="newton_diag", prior="zero", shrink=0.1, stopping=_x0()),
    "diag-d0.2/x0": dict(solver="newton_diag", prior="zero", damping=0.2, stopping=_x0()),
    "diag-px0/x0": dict(solver="newton_diag", prior="x0", stopping=_x0()),
    # idea 3b: newton's slope prior 1/sigma, blended with weight w; "/x0a": atol 1.5e-2
    "newton-px0-w0/x0": _newton("x0", 0.0, stopping=_x0()),
    "newton-px0-w.3/x0": _newton("x0", 0.3, stopping=_x0()),
    "newton-px0-w.5/x0": _newton("x0", 0.5, stopping=_x0()),
    "newton-px0-w.7/x0": _newton("x0", 0.7, stopping=_x0()),
    "newton-px0-w1/x0": _newton("x0", 1.0, stopping=_x0()),
    "newton-px0-w.5/x0a": _newton("x0", 0.5, stopping=_x0(atol=1.5e-2)),
    "newton-px0-w.7/x0a": _newton("x0", 0.7, stopping=_x0(atol=1.5e-2)),
    "newton-px0-w1/x0a": _newton("x0", 1.0, stopping=_x0(atol=1.5e-2)),
    # round 3, idea 1: multi-secant newton (newton_aa: Anderson mixing of newton's proposals),
    # with the default's rule (x0_forecast) pinned; m iterates = m - 1 extra secant pairs
    "naa-m2": dict(solver="newton_aa", history=2, stopping=_forecast),
    "naa-m3": dict(solver="newton_aa", history=3, stopping=_forecast),
    "naa-m4": dict(solver="newton_aa", history=4, stopping=_forecast),
    "naa-m3-stacked": dict(solver="newton_aa", history=3, mode="stacked",
                           stopping=_forecast),
    "naa-m2-stacked": dict(solver="newton_aa", history=2, mode="stacked",
                           stopping=_forecast),
    "naa-m3-r1e-1": dict(solver="newton_aa", history=3, ridge=0.1, stopping=_forecast),
    "naa-m3-r1e-6": dict(solver="newton_aa", history=3, ridge=1e-6, stopping=_forecast),
    "naa-m3-q1": dict(solver="newton_aa", history=3, max_ratio=1.0, stopping=_forecast),
    "naa-m3-q5": dict(solver="newton_aa", history=3, max_ratio=5.0, stopping=_forecast),
    "naa-m2-fr": dict(solver="newton_aa", history=2, fit="residual", stopping=_forecast),
    "naa-m3-fr": dict(solver="newton_aa", history=3, fit="residual", stopping=_forecast),
    "naa-m3-fr-q1": dict(solver="newton_aa", history=3, fit="residual", max_ratio=1.0,
                         stopping=_forecast),
    "hsecant-2": dict(solver=HistorySecantNewton(pairs=2), stopping=_forecast),
    "hsecant-3": dict(solver=HistorySecantNewton(pairs=3), stopping=_forecast),
    # round 3, idea 2: Hutchinson diagonal of the true Jacobian (p probes, finite-difference JVPs)
    "hutch-p1": dict(solver=HutchinsonNewton(probes=1), stopping=_forecast),
    "hutch-p4": dict(solver=HutchinsonNewton(probes=4), stopping=_forecast),
    "hutch-p1-b.5": dict(solver=HutchinsonNewton(probes=1, blend=0.5), stopping=_forecast),
    "hutch-p4-b.5": dict(solver=HutchinsonNewton(probes=4, blend=0.5), stopping=_forecast),
    "hutch-trace-p1": dict(solver=HutchinsonNewton(probes=1, scalar=True), stopping=_forecast),
    "hutch-trace-p1-b.5": dict(solver=HutchinsonNewton(probes=1, scalar=True, blend=0.5),
                               stopping=_forecast),
    "trace": dict(solver=TraceNewton(), stopping=_forecast),
    "trace-once": dict(solver=TraceNewton(once=True), stopping=_forecast),
    # the measured trace lies below 1/sigma near x_0 (benchmarks/jacobian_diagonal.py): a lower clamp
    "default-clamp20": dict(solver="newton", clamp=20.0, stopping=_forecast),
    "default-clamp10": dict(solver="newton", clamp=10.0, stopping=_forecast),
    "default-clamp200": dict(solver="newton", clamp=200.0, stopping=_forecast),
    "default-clamp1e3": dict(solver="newton", clamp=1e3, stopping=_forecast),
    "naa-m3-w0": dict(solver="newton_aa", history=3, prior_weight=0.0, stopping=_forecast),
    # round 4: rank-1 Broyden Jacobian per state (the full secant vector), default rule pinned
    "broyden": dict(solver=BroydenNewton(), stopping=_forecast),
    "broyden-b.5": dict(solver=BroydenNewton(beta=0.5), stopping=_forecast),
    "broyden-prior": dict(solver=BroydenNewton(complement="prior"), stopping=_forecast),
    "broyden-w0": dict(solver=BroydenNewton(prior_weight=0.0), stopping=_forecast),
    "broyden-g.3": dict(solver=BroydenNewton(gate=0.3), stopping=_forecast),
    "broyden-g.1": dict(solver=BroydenNewton(gate=0.1), stopping=_forecast),
    "broyden-g.03": dict(solver=BroydenNewton(gate=0.03), stopping=_forecast),
    "broyden-g.01": dict(solver=BroydenNewton(gate=0.01), stopping=_forecast),
    "probe": dict(solver=BroydenNewton(probe=True), stopping=_forecast),
    "mb-r1-g.03": dict(solver=MultiBroydenNewton(rank=1, gate=0.03), stopping=_forecast),
    "mb-r2-g.03": dict(solver=MultiBroydenNewton(rank=2, gate=0.03), stopping=_forecast),
    "mb-r3-g.03": dict(solver=MultiBroydenNewton(rank=3, gate=0.03), stopping=_forecast),
    "mb-r2-g.1": dict(solver=MultiBroydenNewton(rank=2, gate=0.1), stopping=_forecast),
    "mb-r2-g.01": dict(solver=MultiBroydenNewton(rank=2, gate=0.01), stopping=_forecast),
    "probe-l.3": dict(solver=BroydenNewton(probe=True, late=0.3), stopping=_forecast),
    "probe-l.15": dict(solver=BroydenNewton(probe=True, late=0.15), stopping=_forecast),
    "broyden-l.3": dict(solver=BroydenNewton(late=0.3), stopping=_forecast),
    "broyden-l.15": dict(solver=BroydenNewton(late=0.15), stopping=_forecast),
    "aitken": dict(solver=AitkenNewton(), stopping=_forecast),
    "aitken-c.9": dict(solver=AitkenNewton(cosine=0.9), stopping=_forecast),
    "aitken-r.7": dict(solver=AitkenNewton(rho_max=0.7), stopping=_forecast),
    "aitken-l.3": dict(solver=AitkenNewton(late=0.3), stopping=_forecast),
    "aitken-l.3-r.7": dict(solver=AitkenNewton(late=0.3, rho_max=0.7), stopping=_forecast),
    # the taa / fp target with the default's rule for both (round 1 compared them with the x0 rule)
    "taa/forecast": dict(solver="taa", stopping=_forecast),
    "fp/forecast": dict(solver="fp", stopping=_forecast),
    "band-1": dict(solver=BandNewton(bands=1), stopping=_forecast),
    "band-2": dict(solver=BandNewton(bands=2), stopping=_forecast),
    "band-4": dict(solver=BandNewton(bands=4), stopping=_forecast),
    "band-8": dict(solver=BandNewton(bands=8), stopping=_forecast),
    "band-16": dict(solver=BandNewton(bands=16), stopping=_forecast),
    "sub-r8-s.5": dict(solver=SubspaceNewton(rank=8, sigma_max=0.5), stopping=_forecast),
    "sub-r16-s.5": dict(solver=SubspaceNewton(rank=16, sigma_max=0.5), stopping=_forecast),
    "sub-r8-s.3": dict(solver=SubspaceNewton(rank=8, sigma_max=0.3), stopping=_forecast),
    "sub-r8-s.5-p": dict(solver=SubspaceNewton(rank=8, sigma_max=0.5, late_complement="prior"),
                         stopping=_forecast),
    "sub-r16-s.5-m2": dict(solver=SubspaceNewton(rank=16, sigma_max=0.5, memory=2), stopping=_forecast),
    "sub-r4": dict(solver=SubspaceNewton(rank=4), stopping=_forecast),
    "sub-r8": dict(solver=SubspaceNewton(rank=8), stopping=_forecast),
    "sub-r16": dict(solver=SubspaceNewton(rank=16), stopping=_forecast),
    "sub-r32": dict(solver=SubspaceNewton(rank=32), stopping=_forecast),
    "sub-r8-m2": dict(solver=SubspaceNewton(rank=8, memory=2), stopping=_forecast),
    "sub-r16-m2": dict(solver=SubspaceNewton(rank=16, memory=2), stopping=_forecast),
    "probe-g.3": dict(solver=BroydenNewton(probe=True, gate=0.3), stopping=_forecast),
    "probe-g.1": dict(solver=BroydenNewton(probe=True, gate=0.1), stopping=_forecast),
    "probe-g.03": dict(solver=BroydenNewton(probe=True, gate=0.03), stopping=_forecast),
    "ptan-p32-ps.2": dict(solver=ProbedTangentNewton(probes=32, probe_sigma=0.2), stopping=_forecast),
    "ptan-p32-ps.05": dict(solver=ProbedTangentNewton(probes=32, probe_sigma=0.05), stopping=_forecast),
    "ptan-p32-s.5": dict(solver=ProbedTangentNewton(probes=32, sigma_max=0.5), stopping=_forecast),
    # round 5 (the ranks and probe counts are generated below the table)
    "tan-r8-s.5": dict(solver=TangentNewton(rank=8, sigma_max=.5), stopping=_forecast),
    "tan-r8-s.15": dict(solver=TangentNewton(rank=8, sigma_max=.15), stopping=_forecast),
}


# round 5: GatedPriorNewton by gate (-w.25: prior weight 0.25 below it), LatePriorNewton by sigma
# and scale, TangentNewton of rank r (-m2: two rounds of x_0 changes; -sec: the secant inside Q),
# ProbedTangentNewton with p probes (-prior: 1/sigma off the probed subspace)
for _gate in (0.03, 0.01, 0.003, 0.001):
    CONFIGS[f"gprior-g{_gate:g}"] = dict(solver=GatedPriorNewton(gate=_gate), stopping=_forecast)
    CONFIGS[f"gprior-g{_gate:g}-w.25"] = dict(solver=GatedPriorNewton(gate=_gate, near_weight=0.25),
                                             stopping=_forecast)
for _sigma in (0.5, 0.3, 0.15):
    for _scale in (0.0, 0.25, 0.5):
        CONFIGS[f"lprior-s{_sigma:g}-c{_scale:g}"] = dict(
            solver=LatePriorNewton(sigma_max=_sigma, scale=_scale), stopping=_forecast)
for _rank in (4, 8, 16, 32):
    CONFIGS[f"tan-r{_rank}"] = dict(solver=TangentNewton(rank=_rank), stopping=_forecast)
    CONFIGS[f"tan-r{_rank}-m2"] = dict(solver=TangentNewton(rank=_rank, memory=2), stopping=_forecast)
    CONFIGS[f"tan-r{_rank}-sec"] = dict(solver=TangentNewton(rank=_rank, tangent="secant"),
                                        stopping=_forecast)
for _probes in (8, 16, 32, 64):
    CONFIGS[f"ptan-p{_probes}"] = dict(solver=ProbedTangentNewton(probes=_probes), stopping=_forecast)
    CONFIGS[f"ptan-p{_probes}-prior"] = dict(solver=ProbedTangentNewton(probes=_probes, complement="prior"),
                                             stopping=_forecast)


# round 6: speculative late-slope candidates (sigma < s), chosen per sample by look-ahead
for _sigma in (0.5, 0.3, 0.15):
    CONFIGS[f"spec-s{_sigma:g}"] = dict(solver=SpeculativeNewton(sigma_max=_sigma), stopping=_forecast)
    CONFIGS[f"spec-s{_sigma:g}-res"] = dict(solver=SpeculativeNewton(sigma_max=_sigma, merit="residual"),
                                           stopping=_forecast)
    CONFIGS[f"spec-s{_sigma:g}-x"] = dict(  # two more: half and twice newton's blended slope
        solver=SpeculativeNewton(sigma_max=_sigma, alternatives=("zero", "prior", 0.5, 2.0)),
        stopping=_forecast)


# round 7: a first guess from a neighbouring batch, and window schedules (both idea 5)
for _mode in ("x0", "mean", "trajectory", "data", "zero"):
    CONFIGS[f"default+nb-{_mode}"] = dict(initializer=NeighbourStart(mode=_mode), stopping=_forecast)
# the same starts traced past every rule (as default/long-row5e-6), for --replay of the rules
CONFIGS["data/long-row5e-6"] = dict(initializer=NeighbourStart(mode="data"),
                                    stopping=_x0(atol=2e-3, tol=5e-6))
CONFIGS["mean4/long-row5e-6"] = dict(initializer=NeighbourStart(mode="mean", pool=4),
                                     stopping=_x0(atol=2e-3, tol=5e-6))
for _pool in (2, 4, 64):  # how many earlier samples the mean needs
    CONFIGS[f"default+nb-mean{_pool}"] = dict(initializer=NeighbourStart(mode="mean", pool=_pool),
                                             stopping=_forecast)
for _first, _growth in ((0.25, "double"), (0.5, "double"), (0.25, "linear"), (0.1, "double")):
    CONFIGS[f"sched-{_first:g}-{_growth}"] = dict(window=ScheduledWindow(first=_first, growth=_growth),
                                                 stopping=_forecast)


@attrs.define(eq=False)
class _Watch(StoppingRule):
    """Delegates to ``rule``; records, per iteration, the x_0 the driver would output now."""

    rule: StoppingRule
    outputs: list[torch.Tensor] = attrs.field(factory=list)
    residuals: list[float] = attrs.field(factory=list)
    steps: int = 0

    def converged(self, view: StoppingView) -> torch.Tensor | None:
        if view.hi == self.steps:
            self.outputs.append((view.states[-1] + view.residual[-1]).detach().clone())
            self.residuals.append(float(view.residual[-1].abs().max()))
        else:
            self.outputs.append(torch.full_like(view.states[-1], float("nan")))
            self.residuals.append(float("nan"))
        return self.rule.converged(view)

    def stop(self, iteration: int) -> str | None:
        return self.rule.stop(iteration)


def load_model(name: str) -> Any:
    """A shipped reference (``digits``, ``digits-flow``, ``gmm``), ``heldout`` / ``heldout2``: the
    held-out digits UNets of benchmarks/heldout (other seeds and widths; for checking only), or
    ``memorise``: the exact (memorising) denoiser of the digits training set."""
    from fpsolve.models import digits
    from fpsolve.models.reference import ReferenceModel

    if name == "memorise":  # the exact denoiser of the digits training set: it memorises
        abar = digits.digits_alphas_cumprod()
        model = EmpiricalDenoiser(digits.load_digits_dataset(), abar)
        return ReferenceModel("memorise", model, abar, tuple(digits.DIGITS_SHAPE), digits.digits_to_images)
    if name not in ("heldout", "heldout2"):
        return load_reference(name)

    unet = digits.load_digits_unet(weights_dir=HELDOUT if name == "heldout" else HELDOUT / "heldout2")
    return ReferenceModel(name, digits.digits_denoiser(unet), digits.digits_alphas_cumprod(),
                          tuple(digits.DIGITS_SHAPE), digits.digits_to_images, unet)


def _px(ref: Any, sample: torch.Tensor, reference: torch.Tensor) -> float:
    if not torch.isfinite(sample).all():
        return float("inf")
    if ref.name == "gmm":
        return float((sample - reference).abs().max() * 127.5)
    a = ref.to_images(sample.reshape(-1, *ref.shape)).astype(np.int64)
    b = ref.to_images(reference.reshape(-1, *ref.shape)).astype(np.int64)
    return float(np.abs(a - b).max())


def _system(ref: Any, cell: str, samples: int, seed: int) -> fpsolve.TriangularSystem:
    return fpsolve.TriangularSystem(
        sampler=parse_sampler(cell).build(ref), denoiser=ref.denoiser, shape=ref.shape,
        batch=samples, generator=torch.Generator().manual_seed(seed))


def _reference(ref: Any, cell: str, samples: int, seed: int) -> torch.Tensor:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{ref.name}-{cell}-n{samples}-s{seed}.pt"
    if path.exists():
        return torch.load(path)
    sample = fpsolve.solve(_system(ref, cell, samples, seed), "sequential").sample
    torch.save(sample, path)
    return sample


def _options(config: dict[str, Any], steps: int) -> dict[str, Any]:
    return {k: (v(steps) if k == "stopping" and callable(v) and not isinstance(v, type) else v)
            for k, v in config.items()}


def run_cell(ref: Any, cell: str, config: dict[str, Any], samples: int, seed: int) -> dict[str, Any]:
    """Solve one cell with ``config``; iterations, error and the oracle iteration."""
    system = _system(ref, cell, samples, seed)
    reference = _reference(ref, cell, samples, seed)
    EXTRA_EVALS[0] = 0
    options = _options(config, system.num_steps)
    rule = options.pop("stopping", None)
    if rule is None:
        _, preset = resolve_method(options.get("solver", "newton"),
                                   {k: v for k, v in options.items()
                                    if k not in ("solver", "initializer", "window", "max_iters")})
        rule = resolve_stopping(None, None, preset)  # the preset's rule, else rms
    watch = _Watch(rule, steps=system.num_steps)
    started = time.perf_counter()
    solution = fpsolve.solve(system, stopping=watch, **options)
    wall = time.perf_counter() - started
    errors = [_px(ref, x, reference.reshape(x.shape)) for x in watch.outputs]
    # model units: the max abs error of each output, and its max abs change since the previous one
    abs_errors = [float((x - reference.reshape(x.shape)).abs().max()) for x in watch.outputs]
    changes = [float("nan")] + [float((b - a).abs().max())
                                for a, b in zip(watch.outputs, watch.outputs[1:], strict=False)]
    offset = solution.iterations - len(watch.outputs)  # rounds spent by the initializer
    oracle = next((offset + i + 1 for i, e in enumerate(errors) if e <= 1.0), None)
    return dict(cell=cell, it=solution.iterations, px=_px(ref, solution.sample, reference),
                oracle=oracle, evals=(solution.model_evals + EXTRA_EVALS[0]) / samples,
                status=solution.status.name,
                wall=round(wall, 2), trace=[None if e != e else e for e in errors],
                abs_error=_finite(abs_errors), change=_finite(changes),
                last_residual=_finite(watch.residuals), offset=offset)


def _finite(values: list[float]) -> list[float | None]:
    return [None if v != v else v for v in values]


#: Rules replayed offline by ``--replay``: name -> (atol, bound, trust, stall); bound None: the
#: x0 rule; stall None: no stall guard (the rules' defaults have it at 0.7 since round 5).
REPLAY_RULES: dict[str, tuple[float, float | None, float, float | None]] = {
    "x0 (atol 1.5e-2)": (1.5e-2, None, 0.0, None),
    "x0 (atol 1e-2)": (1e-2, None, 0.0, None),
    "x0 (atol 7.5e-3)": (7.5e-3, None, 0.0, None),
    "forecast (default: 1.5e-2, 1.2e-2, 3e-2)": (1.5e-2, 1.2e-2, 3e-2, None),
    "forecast (1.5e-2, 1e-2, 3e-2)": (1.5e-2, 1e-2, 3e-2, None),
    "forecast (1e-2, 8e-3, 3e-2)": (1e-2, 8e-3, 3e-2, None),
    "forecast (7.5e-3, 6e-3, 3e-2)": (7.5e-3, 6e-3, 3e-2, None),
    "forecast (default), stall guard 0.7 (default)": (1.5e-2, 1.2e-2, 3e-2, 0.7),
    "forecast (default), stall guard 0.5": (1.5e-2, 1.2e-2, 3e-2, 0.5),
    "x0 (atol 1e-2), stall guard 0.7": (1e-2, None, 0.0, 0.7),
    "x0 (atol 1.5e-2), stall guard 0.7": (1.5e-2, None, 0.0, 0.7),
}


#: The x0 rule's atol of the recorded configurations that ``--replay`` reads.
RECORDED_ATOL = {"default/long": 2e-3, "default/long-row5e-6": 2e-3, "default/long-row1e-6": 2e-3,
                 "default": 1.5e-2, "default/x0": 1.5e-2,
                 "data/long-row5e-6": 2e-3, "mean4/long-row5e-6": 2e-3}


def replay_stop(change: list[float | None], atol: float, bound: float | None, trust: float,
                recorded_atol: float, stall: float | None = None,
                residual: list[float | None] | None = None) -> int | None:
    """The iteration (1-based) at which ``X0Change(atol)`` (``bound`` None) or ``X0Forecast(atol,
    bound, trust)`` would stop on a run whose output changes were ``change``, recorded with
    ``X0Change(recorded_atol)``. The rules only decide when to stop, not the iterates (rows are
    judged by the same RMS rule), so this is exact; a rule that has not fired when the recorded
    run ended stops there too if ``atol >= recorded_atol`` (the run ended by its rows, which
    every such rule accepts as well), else the answer is unknown (None). ``stall``: the rules'
    stall guard on the recorded last-row residuals ``residual`` (a refused stop is not taken)."""
    for k, c in enumerate(change):
        if c is None:
            continue
        r = residual[k] if residual is not None else None
        before = residual[k - 1] if residual is not None and k >= 1 else None
        if stall is not None and r is not None and before is not None and r > atol and r > stall * before:
            continue  # the stall guard refuses this stop
        if c <= atol:
            return k + 1
        previous = change[k - 1] if k >= 1 else None
        if bound is not None and previous is not None and c <= trust and c < previous:
            ratio = c / previous
            if c * ratio / (1 - ratio) <= bound:
                return k + 1
    return len(change) if atol >= recorded_atol else None


def replay(paths: list[str]) -> int:
    """Replay :data:`REPLAY_RULES` on recorded runs (``--json`` output of ``default/long``)."""
    rows = [json.loads(line) for path in paths for line in Path(path).read_text().splitlines() if line]
    for name, (atol, bound, trust, stall) in REPLAY_RULES.items():
        print(f"## {name}")
        cells: dict[tuple[str, str], list[str]] = {}
        worst, over_oracle, fails = 0.0, 0, 0
        for row in rows:
            stop = replay_stop(row["change"], atol, bound, trust, RECORDED_ATOL[row["config"]], stall,
                               row.get("last_residual"))
            key = (row["model"], row["cell"])
            if stop is None:
                cells.setdefault(key, []).append("-")
                continue
            px = row["trace"][stop - 1]
            stop += row["offset"]
            worst = max(worst, px)
            fails += px > 1
            over_oracle = max(over_oracle, stop - (row["oracle"] or 10**6))
            mark = "" if px <= 1 else f" **{px:.0f} px**"
            cells.setdefault(key, []).append(f"{stop} ({row['oracle']}){mark}")
        for (model, cell), entries in cells.items():
            print(f"{model:12s} {cell:16s} " + ", ".join(entries))
        print(f"worst {worst:.0f} px; cells above 1 px: {fails}; stop - oracle at most {over_oracle}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", help=f"configurations: {', '.join(CONFIGS)}")
    parser.add_argument("--model", default="digits",
                        help="digits, digits-flow, gmm, heldout, heldout2 or memorise")
    parser.add_argument("--cells", default=",".join(CELLS))
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--json", help="append results as JSON lines to this file")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--trace", action="store_true", help="print the per-iteration px error")
    parser.add_argument("--replay", nargs="+", metavar="JSONL",
                        help="replay the stopping rules of REPLAY_RULES on recorded runs instead of solving")
    args = parser.parse_args(argv)
    if args.replay:
        return replay(args.replay)
    if args.list or not args.configs:
        for name, config in CONFIGS.items():
            print(f"{name:24s} {config}")
        return 0
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ref = load_model(args.model)
    for name in args.configs:
        row = [f"{name:22s}"]
        for cell in args.cells.split(","):
            result = run_cell(ref, cell, CONFIGS[name], args.samples, args.seed)
            row.append(f"{cell} {result['it']:>3} it {result['px']:>4.0f}px (o {result['oracle']}) "
                       f"{result['evals']:.0f} ev")
            if args.trace:
                print(name, cell, result["trace"], file=sys.stderr)
            if args.json:
                with open(args.json, "a") as handle:
                    handle.write(json.dumps(dict(config=name, model=args.model, samples=args.samples,
                                                 seed=args.seed, **result)) + "\n")
        print(" | ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
