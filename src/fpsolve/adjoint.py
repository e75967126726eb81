"""Gradients through a solved trajectory: the adjoint triangular system, solved in parallel.

A solved trajectory satisfies ``F(s) = s - L_A s - L_B E(s) - c xi = 0`` (the sampler's affine
form, ``E(s)_j = eps(s_j, t_j)``, ``s_0 = xi_0``). By the implicit function theorem the gradient
of a loss ``L(s)`` with direct gradient ``g = dL/ds`` is given by the adjoint ``lambda``,

    (I - L_A - L_B J)^T lambda = g,     J = blockdiag(d eps / d s_j),

so ``dL/dxi_0 = lambda_0``, ``dL/dxi_i = c_i lambda_i`` and, for any tensor ``theta`` the
denoiser reads, ``dL/dtheta = sum_j (d eps_j / d theta)^T w_j`` with ``w = L_B^T lambda`` (the
gradient with respect to the model outputs). Eliminating ``lambda = Psi^T (g + J^T w)``
(``Psi = (I - L_A)^{-1}``) leaves a LINEAR system in ``w`` alone,

    w_j = sum_{k > j} P[k, j] (g_k + J_k^T w_k),        P = Psi L_B,

strictly upper triangular: ``w_j`` reads only ``w_k`` of less noisy states. Read from ``x_0``
back to ``x_T`` it is a triangular system like the sampler's own, whose "model output" at a
state is the vector-Jacobian product ``J_k^T w_k`` at the solved forward state ``s_k``. It is
solved by the same solvers, windows and stopping rules as the forward trajectory (one batched
VJP over the window per iteration), never by storing the activations of every step. One last
batched VJP (chunked like the window) gives ``J^T w`` and every ``dL/dtheta``.

Which tensors get gradients (the contract):

* the system's noise, when ``TriangularSystem.noise`` is a tensor that requires grad (or a
  function of one: ``torch.cat([x_T[None], rest])`` with ``x_T.requires_grad``);
* every tensor in ``params=`` when given; otherwise the tensors found by
  :func:`denoiser_parameters`: the parameters (``requires_grad=True``) of every
  ``torch.nn.Module`` the denoiser is, holds or reads, and every tensor with
  ``requires_grad=True`` it reads (conditioning), looked up through closures and the globals a
  function names, ``functools.partial``, bound methods, attrs fields and object attributes, four
  levels deep.

The denoiser must be differentiable by torch autograd in its input and in those tensors (a
model that runs under ``torch.no_grad()``, like :func:`fpsolve.models.digits.digits_denoiser`,
cannot be differentiated: fpsolve raises an error naming the fix). The gradient is exact up to
the two tolerances: the forward solve's and the adjoint solve's (``adjoint_tol``, relative).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from .control import Controller
from .driver import run
from .errors import InvalidOptionError
from .evaluators import choose as choose_evaluator
from .initializers import NoiseCopy
from .registry import iteration_hook
from .samplers.base import AffineForm, SequentialSampler
from .solution import Solution
from .solvers.base import FixedPointSolver
from .stopping import RMS
from .system import TriangularSystem
from .validators import as_int, as_real

__all__ = ["AdjointSampler", "adjoint_form", "denoiser_parameters", "differentiable_solution",
           "GradientRecord", "gradient_record"]

#: How deep :func:`denoiser_parameters` looks through closures and attributes.
_SEARCH_DEPTH = 4


def _dense_output_matrix(form: AffineForm) -> torch.Tensor:
    """``L_B``: ``[T+1, T+1]``, ``L_B[i, i-l] = output[i, l-1]`` (how e_{i-l} enters step i)."""
    size = form.num_steps + 1
    dense = torch.zeros(size, size, dtype=torch.float64)
    for lag in range(1, form.lags + 1):
        rows = torch.arange(lag, size)
        dense[rows, rows - lag] = form.output[lag:, lag - 1].to(torch.float64)
    return dense


def _propagator(form: AffineForm) -> torch.Tensor:
    lower = form.state_matrix().to(torch.float64)
    eye = torch.eye(lower.shape[0], dtype=torch.float64)
    return torch.linalg.solve_triangular(eye - lower, eye, upper=False)


def adjoint_form(forward: AffineForm) -> AffineForm:
    """The affine form of the output-adjoint system of ``forward``, in reversed order.

    Adjoint position ``p`` holds ``w_{T-p}`` (``p = 0`` is ``w_T = 0``: no step reads ``e_T``).
    Row ``p`` reads the "outputs" ``J_k^T w_k`` at positions ``q = p - l`` (``k = T - q``) with
    coefficients ``P[T-p+l, T-p]``; state coefficients are zero and the noise coefficient is 1
    (the constant ``P^T g`` is passed as the adjoint's noise).
    """
    steps = forward.num_steps
    coupling = _propagator(forward) @ _dense_output_matrix(forward)  # P[k, j]: e_j -> s_k
    output = torch.zeros(steps + 1, max(steps, 1), dtype=torch.float64)
    for p in range(1, steps + 1):
        j = steps - p
        lags = torch.arange(1, p + 1)
        output[p, :p] = coupling[j + lags, j]
    state = torch.zeros_like(output)
    noise = torch.ones(steps + 1, dtype=torch.float64)
    noise[0] = 0.0
    return AffineForm(state=state, output=output, noise=noise)


@attrs.define(frozen=True, eq=False)
class AdjointSampler(SequentialSampler):
    """The adjoint of a forward sampler as a sampler: unknowns ``w_{T-1}, ..., w_0`` in that order.

    The keys (``timesteps``) of positions ``0..T-1`` are the forward state indices ``T..1`` at
    which the adjoint's denoiser (a vector-Jacobian product) is evaluated. Stopping-rule scales
    (sigmas, variances) are 1: the adjoint's tolerance is set relative to its own size.

    Args:
        forward: the affine form of the forward sampler.
    """

    name = "adjoint"

    forward: AffineForm = attrs.field(repr=False)
    timesteps: tuple[int, ...] = attrs.field(init=False)
    form: AffineForm = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        steps = self.forward.num_steps
        object.__setattr__(self, "timesteps", tuple(range(steps, 0, -1)))
        object.__setattr__(self, "form", adjoint_form(self.forward))

    def affine_form(self) -> AffineForm:
        """See :func:`adjoint_form`."""
        return self.form

    def state_sigmas(self) -> torch.Tensor:
        """Ones: the adjoint's scale is in its tolerance."""
        return torch.ones(self.num_steps + 1, dtype=torch.float64)

    def step_variances(self) -> torch.Tensor:
        """Ones (see :meth:`state_sigmas`)."""
        return torch.ones(self.num_steps + 1, dtype=torch.float64)


# -- which tensors get gradients ---------------------------------------------------------------


def denoiser_parameters(denoiser: Any) -> list[torch.Tensor]:
    """The tensors a denoiser's gradient flows to by default (see the module docstring).

    Returns the parameters with ``requires_grad`` of the ``torch.nn.Module`` objects found in
    ``denoiser`` and every tensor with ``requires_grad`` found there, deduplicated, in the order
    found. Modules are searched through their parameters only (buffers never need gradients).
    """
    found: list[torch.Tensor] = []
    seen: set[int] = set()

    def add(tensor: torch.Tensor) -> None:
        if tensor.requires_grad and id(tensor) not in seen:
            seen.add(id(tensor))
            found.append(tensor)

    visited: set[int] = set()

    def visit(obj: Any, level: int) -> None:
        if obj is None or isinstance(obj, (str, bytes, int, float, bool, type)) or id(obj) in visited:
            return
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            add(obj)
            return
        if isinstance(obj, torch.nn.Module):
            for parameter in obj.parameters():
                add(parameter)
            return
        if level >= _SEARCH_DEPTH or inspect.ismodule(obj):
            return
        children: list[Any] = []
        if isinstance(obj, functools.partial):
            children = [obj.func, *obj.args, *obj.keywords.values()]
        elif inspect.ismethod(obj):
            children = [obj.__self__, obj.__func__]
        elif inspect.isfunction(obj):
            children = _referenced(obj)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = list(obj)
        elif isinstance(obj, dict):
            children = list(obj.values())
        elif attrs.has(type(obj)):
            children = [getattr(obj, field.name, None) for field in attrs.fields(type(obj))]
        elif hasattr(obj, "__dict__"):
            children = list(vars(obj).values())
        if callable(obj) and not inspect.isfunction(obj) and not inspect.ismethod(obj):
            call = type(obj).__dict__.get("__call__")  # a callable object's method may read globals
            if inspect.isfunction(call):
                children.append(call)
        for child in children:
            visit(child, level + 1)

    visit(denoiser, 0)
    return found


def _referenced(function: Any) -> list[Any]:
    """What a function reads besides its arguments: closure cells and the globals it names."""
    try:
        names = inspect.getclosurevars(function)
    except (TypeError, ValueError):  # e.g. an empty closure cell
        return []
    return [*names.nonlocals.values(), *names.globals.values()]


def _as_params(params: Sequence[torch.Tensor] | None, denoiser: Any) -> list[torch.Tensor]:
    if params is None:
        return denoiser_parameters(denoiser)
    if isinstance(params, torch.Tensor):
        params = [params]
    result = list(params)
    for index, value in enumerate(result):
        if not isinstance(value, torch.Tensor):
            raise InvalidOptionError(
                f"params must be a sequence of tensors the denoiser reads (its parameters, its "
                f"conditioning); params[{index}] is a {type(value).__name__}."
            )
    return result


# -- the vector-Jacobian products ----------------------------------------------------------------


def _not_differentiable(system: TriangularSystem) -> InvalidOptionError:
    return InvalidOptionError(
        "differentiable=True needs a denoiser that torch autograd can differentiate, but the "
        f"output of {system.denoiser!r} does not depend on its input through autograd (does it run "
        "under torch.no_grad() or detach?). Wrap the model without no_grad, e.g. "
        "denoiser=lambda x, t: unet(x.float(), t).sample.to(x.dtype)."
    )


def _vjp(system: TriangularSystem, states: torch.Tensor, rows: torch.Tensor, cotangent: torch.Tensor,
         params: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """``J^T v`` at forward states ``rows`` (``[P]``, each < T) for cotangents ``[P, N, D]``, and
    the parameter gradients ``sum (d eps / d theta)^T v``: ONE batched forward and backward."""
    count, samples = rows.numel(), system.num_samples
    with torch.enable_grad():
        x = states[rows].detach().requires_grad_(True)  # [P, N, D] in the state dtype
        model_x, t = system.model_inputs(x, rows)
        out = system.denoiser(model_x, t)
        if not isinstance(out, torch.Tensor) or out.shape != model_x.shape:
            system.denoise(model_x.detach(), t)  # raises the system's own, precise error
        if not out.requires_grad:
            if cotangent.abs().max() == 0:
                return torch.zeros_like(x), [None] * len(params)
            raise _not_differentiable(system)
        weights = cotangent.reshape(count * samples, *system.shape).to(out.dtype)
        grads = torch.autograd.grad(out, [x, *params], grad_outputs=weights, allow_unused=True)
    jtv = grads[0] if grads[0] is not None else torch.zeros_like(x)
    return jtv.detach().to(system.dtype), [None if g is None else g.detach() for g in grads[1:]]


@attrs.define(frozen=True, eq=False)
class _VJPDenoiser:
    """The adjoint system's denoiser: ``J_k^T v`` at the solved forward state ``s_k``, ``k`` = key.

    Keys equal to T (the adjoint's ``w_T = 0``: no step reads eps at ``x_0``) give zeros without a
    model call.
    """

    system: TriangularSystem = attrs.field(repr=False)
    states: torch.Tensor = attrs.field(repr=False)

    def __call__(self, v: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        samples, steps = self.system.num_samples, self.system.num_steps
        rows = keys.reshape(-1, samples)[:, 0].long()  # position-major: one key per position
        cotangent = v.reshape(rows.numel(), samples, -1)
        result = torch.zeros_like(cotangent)
        live = rows < steps
        if bool(live.any()):
            jtv, _ = _vjp(self.system, self.states, rows[live], cotangent[live])
            result[live] = jtv.to(result.dtype)
        return result.reshape(v.shape)


# -- the backward pass ---------------------------------------------------------------------------


@attrs.define(eq=False)
class GradientRecord:
    """What the backward pass of a ``differentiable=True`` solve did (filled in by ``backward``).

    Attributes:
        adjoint: the :class:`~fpsolve.Solution` of the last adjoint solve (``None`` before any).
        vjp_evals: vector-Jacobian products of the last backward pass, per sample and state (the
            adjoint solve's, counted as the driver counts evaluations, so including position 0,
            which needs no model call, in the rounds where it is in the window; plus the final
            pass over every state).
        backward_calls: how many times the backward pass ran.
    """

    adjoint: Solution | None = None
    vjp_evals: int = 0
    backward_calls: int = 0


_RECORDS: weakref.WeakKeyDictionary[Any, GradientRecord] = weakref.WeakKeyDictionary()


def gradient_record(solution: Solution) -> GradientRecord | None:
    """The :class:`GradientRecord` of a ``differentiable=True`` solution (``None`` for others)."""
    return _RECORDS.get(solution)


@attrs.define(eq=False)
class _Backward:
    system: TriangularSystem
    states: torch.Tensor  # [T+1, N, D], detached
    solver: FixedPointSolver
    controller: Controller
    params: list[torch.Tensor]
    noise_grad: bool
    adjoint_tol: float
    chunk: int | None
    record: GradientRecord

    def adjoint_system(self, grad_states: torch.Tensor) -> TriangularSystem:
        system = self.system
        steps = system.num_steps
        form = system.affine_form
        coupling = (_propagator(form) @ _dense_output_matrix(form)).to(system.device, system.dtype)
        constant = (coupling.T @ grad_states.reshape(steps + 1, -1)).reshape(grad_states.shape)  # [j]
        noise = torch.zeros_like(grad_states)
        noise[1:] = constant[:steps].flip(0)  # position p holds w_{T-p}
        return TriangularSystem(sampler=AdjointSampler(form), denoiser=_VJPDenoiser(system, self.states),
                                shape=system.shape, batch=system.batch, noise=system.unflatten(noise),
                                dtype=system.dtype, device=system.device)

    def __call__(self, grad_states: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        system = self.system
        steps, samples = system.num_steps, system.num_samples
        if grad_states is None:
            grad_states = torch.zeros_like(self.states)
        grad_states = grad_states.detach().to(system.device, system.dtype).reshape(self.states.shape)
        adjoint = self.adjoint_system(grad_states)
        scale = float(adjoint.flat_noise.pow(2).mean(-1).sqrt().max())
        tol = self.adjoint_tol * scale if scale > 0 else 1.0
        with torch.no_grad():
            # evaluated as the forward solve is (chunked on CUDA, so a window's VJPs that do not
            # fit in memory are split instead of failing): the one choice, fpsolve.evaluators.choose
            solved = run(adjoint, self.solver, RMS(tol1=tol, tol2=tol), NoiseCopy(),
                         self.controller, [iteration_hook()], evaluate=choose_evaluator(adjoint))
        w = adjoint.flat_noise.new_zeros(self.states.shape)
        flat_adjoint = solved.trajectory.reshape(self.states.shape)
        w[:steps] = flat_adjoint.flip(0)[:steps]  # w_j for j = 0..T-1
        jtw = torch.zeros_like(self.states)
        param_grads: list[torch.Tensor | None] = [None] * len(self.params)
        chunk = self.chunk or self.controller.window_for(steps)
        for start in range(0, steps, chunk):
            rows = torch.arange(start, min(start + chunk, steps), device=system.device)
            part, grads = _vjp(system, self.states, rows, w[rows], self.params)
            jtw[rows] = part
            for index, grad in enumerate(grads):
                previous = param_grads[index]
                if grad is not None:
                    param_grads[index] = grad if previous is None else previous + grad
        lam = (system.propagator().T @ (grad_states + jtw).reshape(steps + 1, -1)).reshape(self.states.shape)
        noise_grad = None
        if self.noise_grad:
            _, _, noise_coef = system.coefficients()
            noise_grad = lam * noise_coef[:, None, None]
            noise_grad[0] = lam[0]
        self.record.adjoint = solved
        self.record.vjp_evals = solved.model_evals + steps * samples
        self.record.backward_calls += 1
        return noise_grad, param_grads


class _SolvedTrajectory(torch.autograd.Function):
    """Identity on the solved trajectory forward; the adjoint solve backward."""

    @staticmethod
    def forward(ctx: Any, backward: _Backward, noise: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.backward_pass = backward
        ctx.noise_dtype = noise.dtype
        return backward.states.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_states: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        noise_grad, param_grads = ctx.backward_pass(grad_states)
        if noise_grad is not None:
            noise_grad = noise_grad.to(ctx.noise_dtype)
        return (None, noise_grad, *param_grads)


def differentiable_solution(system: TriangularSystem, solution: Solution, solver: FixedPointSolver, *,
                            controller: Controller,
                            params: Sequence[torch.Tensor] | None = None, adjoint_tol: float = 2e-4,
                            vjp_chunk: int | None = None) -> Solution:
    """``solution`` with ``sample`` and ``trajectory`` differentiable through the solved system.

    Args:
        system: the solved system; solution: its solution (computed without autograd).
        solver, controller: how the adjoint system is solved (the forward solve's: window,
            cap and the rest of the loop policy).
        params: tensors to differentiate besides the noise (default :func:`denoiser_parameters`).
        adjoint_tol: the adjoint solve's tolerance, relative to the largest RMS of its constant
            term (rows of ``P^T g``).
        vjp_chunk: positions per vector-Jacobian product in the final pass (default: the window).

    Raises:
        InvalidOptionError: nothing requires grad (neither the noise nor any parameter).
    """
    adjoint_tol = as_real("adjoint_tol", adjoint_tol, minimum=0.0, strict=True, hint=" (relative)")
    if vjp_chunk is not None:
        vjp_chunk = as_int("vjp_chunk", vjp_chunk, minimum=1, hint=" or None")
    tensors = [p for p in _as_params(params, system.denoiser)]
    noise = system.flat_noise
    if not noise.requires_grad and not any(p.requires_grad for p in tensors):
        raise InvalidOptionError(
            "differentiable=True, but nothing requires grad: give the system noise= a tensor with "
            "requires_grad=True, use a denoiser whose parameters (or closed-over conditioning) require "
            "grad, or pass params=[...]."
        )
    states = solution.trajectory.detach().reshape(noise.shape).to(system.dtype)
    record = GradientRecord()
    backward = _Backward(system, states, solver, controller, tensors, noise.requires_grad,
                         float(adjoint_tol), vjp_chunk, record)
    flat = _SolvedTrajectory.apply(backward, noise, *tensors)
    trajectory = system.unflatten(flat)
    result = attrs.evolve(solution, sample=trajectory[-1], trajectory=trajectory)
    _RECORDS[result] = record
    return result
