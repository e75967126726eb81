"""TriangularSystem: a sampler, a denoiser and the noise, as one triangular nonlinear system.

The unknowns are the states ``s_1 .. s_T`` (``s_0 = x_T`` is the first noise draw). Internally a
trajectory is a tensor ``[T+1, N, D]``: position, sample, flattened state. The system knows the
sampler's coefficients and nothing about windows or solvers; it offers

* :meth:`evaluate`: ONE batched denoiser call over any set of positions and all samples;
* :meth:`first_order_rhs`: the sampler's own step, ``G1_i = sum A s + sum B e + c xi``;
* :meth:`order_residual`: the order-k residual from the first-order one.

Order-k residuals. Let ``L`` be the strictly lower-triangular state-coefficient matrix and
``Psi = (I - L)^{-1}``. Running the frozen-output sampler from the anchor of row ``i`` (``k`` steps
back, or the solve's anchor if that is nearer) gives, exactly,

    R^k_i = sum_{j in F_i} Psi[i, j] r1_j,      F_i = (max(i - k, anchor), i],

so every order costs one small masked matrix product on the first-order residuals ``r1`` and no
extra model call. For DDIM, ``Psi[i, j]`` is the product of the step factors ``a`` from j to i,
which is the unrolled equation (E_k) of the ParaTAA paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import attrs
import torch

from .errors import DenoiserOutputError, InvalidOptionError, ShapeError
from .samplers.base import AffineForm, SequentialSampler
from .validators import as_int, is_integer

__all__ = ["TriangularSystem", "Denoiser", "Evaluator", "StepCoefficients"]

#: The denoiser signature: ``x`` ``[B, *shape]`` and model times ``t`` ``[B]`` -> the model output
#: the sampler declares (``sampler.prediction``: eps, velocity, ...). ``t`` is a long tensor of
#: integer timesteps, or, for a sampler with ``continuous_time``, a float tensor in the state dtype.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@runtime_checkable
class Evaluator(Protocol):
    """What the driver calls once per iteration: ONE batched denoiser evaluation.

    ``evaluate(states [P, N, D], positions [P]) -> outputs [P, N, D]`` in the state dtype: the
    model outputs of the ``P`` states at state indices ``positions``, for all ``N`` samples.
    :meth:`TriangularSystem.evaluate` is the plain one; :mod:`fpsolve.evaluators` holds it with
    the chunked (out-of-memory-safe) and the sharded (``torch.distributed``) ones and
    :func:`fpsolve.evaluators.choose`, which picks one for a solve. It lives here, in the system's
    layer, so that the driver (below the evaluators) can name it.
    """

    def __call__(self, states: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """The model outputs ``[P, N, D]`` of ``states`` ``[P, N, D]`` at ``positions``."""
        ...


def _as_shape(value: Any) -> tuple[int, ...]:
    # Checked, not coerced: tuple("16") would silently be (1, 6).
    if is_integer(value):
        value = (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, torch.Size)) or not all(
            is_integer(s) for s in value):
        raise InvalidOptionError(
            "shape must be an int or a tuple of ints, the shape of ONE sample (e.g. (4, 8, 8)); "
            f"got {value!r}."
        )
    shape = tuple(int(s) for s in value)
    if not shape or any(s < 1 for s in shape):
        raise InvalidOptionError(f"shape must be a non-empty tuple of positive sizes; got {value!r}.")
    return shape


def _as_batch(value: Any) -> int | None:
    if value is None:
        return None
    return as_int("batch", value, minimum=1, hint=" (the number of samples N) or None for one sample")


def _as_device(value: Any) -> torch.device:
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as error:
        raise InvalidOptionError(
            "device must be a torch.device or a device name such as 'cpu' or 'cuda:0'; "
            f"got {value!r} ({error})."
        ) from None
    if device.type == "meta":
        raise InvalidOptionError(
            "device 'meta' holds no data: a solve needs real tensors; use device='cpu' or a GPU."
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        built = torch.backends.cuda.is_built()
        raise InvalidOptionError(
            f"device {str(device)!r} was asked for, but torch sees no CUDA device "
            f"({'no GPU is visible' if built else 'this torch build has no CUDA support'}); "
            "use device='cpu' or install a CUDA build of torch."
        )
    return device


def _as_index(positions: Sequence[int] | torch.Tensor, device: torch.device) -> slice | torch.Tensor:
    """A slice for consecutive int positions (the driver's usual window), else a long tensor: a
    list index would be copied to the device by a blocking copy, which synchronises on CUDA."""
    if isinstance(positions, (list, tuple, range)) and len(positions) and isinstance(positions[0], int):
        first = positions[0]
        if list(positions) == list(range(first, first + len(positions))):
            return slice(first, first + len(positions))
    return torch.as_tensor(positions, dtype=torch.long, device=device)


def _as_dtype(value: Any) -> torch.dtype:
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise InvalidOptionError(f"dtype must be a floating torch.dtype; got {value!r}.")
    return value


class StepCoefficients(NamedTuple):
    """A sampler's step coefficients, as :meth:`TriangularSystem.coefficients` returns them.

    Attributes:
        state: ``[T+1, K]``; ``state[i, l-1]`` multiplies ``s_{i-l}`` in step ``i``.
        output: ``[T+1, K]``; ``output[i, l-1]`` multiplies the model output ``e_{i-l}``.
        noise: ``[T+1]``; ``noise[i]`` multiplies the noise draw ``xi_i`` of step ``i``.
    """

    state: torch.Tensor
    output: torch.Tensor
    noise: torch.Tensor


@attrs.define(frozen=True, eq=False, kw_only=True)
class TriangularSystem:
    """A sampler's whole trajectory as a triangular system of equations.

    Args:
        sampler: the sequential sampler (its affine form defines the equations).
        denoiser: ``denoiser(x, t) -> output`` with ``x`` ``[B, *shape]`` in ``model_dtype`` and
            ``t`` ``[B]`` model times (integer timesteps, or floats for a sampler with
            ``continuous_time``); returns what the sampler's ``prediction`` names (eps for the
            variance-preserving samplers, the velocity for the flow ones), a tensor of the input's
            shape and dtype.
        shape: the shape of ONE sample.
        batch: number of samples ``N`` solved together; ``None`` means one sample without a
            batch axis in the results (inferred from ``noise`` when that has a batch axis).
        generator: draws all noise up front: ``x_T`` first, then one draw per step, as one
            tensor ``[T+1, (N,) *shape]``.
        noise: the noise itself instead of a generator: ``noise[0]`` is ``x_T`` and ``noise[i]`` the
            noise of sequential step ``i``; shape ``[T+1, *shape]`` or ``[T+1, N, *shape]``.
        dtype: dtype of the solver state (default float64, the reference choice).
        device: where the state lives and the denoiser is called.
        model_dtype: dtype of the denoiser's input (e.g. float16 on a GPU); default ``dtype``.
    """

    sampler: SequentialSampler
    denoiser: Denoiser = attrs.field(repr=False)
    shape: tuple[int, ...] = attrs.field(converter=_as_shape)
    batch: int | None = attrs.field(default=None, converter=_as_batch)
    generator: torch.Generator | None = attrs.field(default=None, repr=False)
    noise: torch.Tensor | None = attrs.field(default=None, repr=False)
    dtype: torch.dtype = attrs.field(default=torch.float64, converter=_as_dtype)
    device: torch.device = attrs.field(default=torch.device("cpu"), converter=_as_device)
    model_dtype: torch.dtype | None = None
    _flat_noise: torch.Tensor = attrs.field(init=False, repr=False)
    _cache: dict[str, Any] = attrs.field(init=False, repr=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.sampler, SequentialSampler):
            raise InvalidOptionError(
                "sampler must be a SequentialSampler (e.g. fpsolve.samplers.DDIM(...)); "
                f"got {self.sampler!r}."
            )
        if not callable(self.denoiser):
            raise InvalidOptionError("denoiser must be callable as denoiser(x, t) -> eps.")
        if self.model_dtype is not None:
            _as_dtype(self.model_dtype)
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise InvalidOptionError(
                f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or None; "
                f"got {self.generator!r}. To seed with an int, pass torch.Generator().manual_seed(seed)."
            )
        if self.noise is not None and self.generator is not None:
            raise InvalidOptionError("give either noise= or generator=, not both.")
        object.__setattr__(self, "_flat_noise", self._prepare_noise())

    # -- noise -------------------------------------------------------------------------------

    def _prepare_noise(self) -> torch.Tensor:
        steps = self.sampler.num_steps + 1
        if self.noise is None:
            lead = (steps,) if self.batch is None else (steps, self.batch)
            gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
            drawn = torch.randn(lead + self.shape, generator=self.generator, dtype=self.dtype,
                                device=gen_device)
            noise = drawn.to(self.device)
        else:
            noise = self.noise
            if type(noise).__module__ == "numpy" and type(noise).__name__ == "ndarray":
                noise = torch.from_numpy(noise)
            if not isinstance(noise, torch.Tensor):
                raise ShapeError(
                    f"noise must be a floating-point torch.Tensor [T+1, *shape] or [T+1, N, *shape] "
                    f"(noise[0] is x_T); got {type(noise).__name__}."
                )
            if self.batch is None and noise.dim() == len(self.shape) + 2:
                object.__setattr__(self, "batch", int(noise.shape[1]))
            expected = (steps,) + (() if self.batch is None else (self.batch,)) + self.shape
            if tuple(noise.shape) != expected:
                raise ShapeError(
                    f"noise must have shape [T+1, {'N, ' if self.batch else ''}*shape] = {list(expected)} "
                    f"(noise[0] is x_T, noise[i] the noise of step i); got {list(noise.shape)}."
                )
            if not noise.is_floating_point() or not torch.isfinite(noise).all():
                raise ShapeError("noise must be a finite floating-point tensor.")
            noise = noise.to(device=self.device, dtype=self.dtype)
        return noise.reshape(steps, self.num_samples, self.state_size)

    # -- sizes ---------------------------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        """T, the number of sampler steps (unknown states)."""
        return self.sampler.num_steps

    @property
    def num_samples(self) -> int:
        """N, the number of samples solved together (1 when ``batch`` is None)."""
        return 1 if self.batch is None else self.batch

    @property
    def state_size(self) -> int:
        """D, the number of elements of one sample."""
        return math.prod(self.shape)

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the denoiser receives."""
        return self.model_dtype or self.dtype

    @property
    def flat_noise(self) -> torch.Tensor:
        """All noise as ``[T+1, N, D]``: ``[0]`` is ``x_T``, ``[i]`` the noise of step ``i``."""
        return self._flat_noise

    def unflatten(self, flat: torch.Tensor) -> torch.Tensor:
        """``[..., N, D]`` -> ``[..., *shape]`` (no batch) or ``[..., N, *shape]``."""
        lead = flat.shape[:-2]
        if self.batch is None:
            return flat.reshape(*lead, *self.shape)
        return flat.reshape(*lead, self.batch, *self.shape)

    # -- coefficients --------------------------------------------------------------------------

    def _cached(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def affine_form(self) -> AffineForm:
        """The sampler's coefficients (float64, CPU), computed once."""
        def make() -> AffineForm:
            form = self.sampler.affine_form()
            if form.num_steps != self.num_steps:
                raise InvalidOptionError(
                    f"{type(self.sampler).__name__}.affine_form() has {form.num_steps} steps but the "
                    f"sampler has {self.num_steps} timesteps."
                )
            return form
        return self._cached("affine", make)

    def coefficients(self) -> StepCoefficients:
        """The sampler's step coefficients on the device in the state dtype, computed once.

        The :attr:`affine_form` (float64, CPU) moved to where the solve runs: what the
        quasi-Newton solvers, inversion and the adjoint multiply the window's states with.
        Unpacks as ``state, output, noise``; do not write into the tensors (they are shared).
        """
        def make() -> StepCoefficients:
            form = self.affine_form
            device, dtype = self.device, self.dtype
            return StepCoefficients(form.state.to(device, dtype), form.output.to(device, dtype),
                                    form.noise.to(device, dtype))
        return self._cached("coefficients", make)

    def propagator(self) -> torch.Tensor:
        """``Psi = (I - L)^{-1}``, ``[T+1, T+1]`` on the device: how a residual at j moves state i."""
        def make() -> torch.Tensor:
            lower = self.affine_form.state_matrix()
            eye = torch.eye(lower.shape[0], dtype=torch.float64)
            psi = torch.linalg.solve_triangular(eye - lower, eye, upper=False)
            return psi.to(device=self.device, dtype=self.dtype)
        return self._cached("propagator", make)

    @property
    def timestep_tensor(self) -> torch.Tensor:
        """The model times on the device, ``[T]``: a long tensor, or, for a sampler with
        ``continuous_time``, a float tensor in the state dtype."""
        dtype = self.dtype if getattr(self.sampler, "continuous_time", False) else torch.long
        return self._cached("timesteps", lambda: torch.tensor(self.sampler.timesteps, dtype=dtype,
                                                               device=self.device))

    @property
    def sigmas(self) -> torch.Tensor:
        """``[T+1]`` noise std of each state, on the device, in the state dtype."""
        return self._cached("sigmas", lambda: self.sampler.state_sigmas().to(self.device, self.dtype))

    @property
    def step_variances(self) -> torch.Tensor:
        """``[T+1]`` DDPM posterior variance of the step producing each state."""
        return self._cached("variances",
                            lambda: self.sampler.step_variances().to(self.device, self.dtype))

    # -- the three operations ------------------------------------------------------------------

    def evaluate(self, states: torch.Tensor, positions: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Call the denoiser ONCE on ``states`` ``[P, N, D]`` at state indices ``positions`` ``[P]``.

        Returns the model outputs ``[P, N, D]`` in the state dtype (see :meth:`denoise`).
        """
        count, samples = states.shape[0], self.num_samples
        x, t = self.model_inputs(states, positions)
        return self.denoise(x, t).reshape(count, samples, self.state_size).to(self.dtype)

    def model_inputs(self, states: torch.Tensor,
                     positions: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's batch for ``states`` ``[P, N, D]``: ``x`` ``[P*N, *shape]`` in the model
        dtype and ``t`` ``[P*N]`` (position-major: all samples of a position are adjacent)."""
        count, samples = states.shape[0], self.num_samples
        # Always a copy: the denoiser may write into its input (x.mul_(...)), and x must never
        # alias the trajectory it was taken from.
        x = states.reshape(count * samples, *self.shape).to(self.input_dtype, copy=True)
        t = self.timestep_tensor[_as_index(positions, self.device)].repeat_interleave(samples)
        return x, t

    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One validated denoiser call on a model batch ``x`` ``[B, *shape]``, ``t`` ``[B]``.

        A result of the wrong type, shape or dtype raises
        :class:`~fpsolve.errors.DenoiserOutputError`; exceptions raised by the denoiser itself
        propagate unchanged.
        """
        with torch.no_grad():
            out = self.denoiser(x, t)
        if not isinstance(out, torch.Tensor):
            raise DenoiserOutputError(
                f"the denoiser must return a torch.Tensor (eps, shape {list(x.shape)}); "
                f"got {type(out).__name__}."
            )
        if out.shape != x.shape:
            raise DenoiserOutputError(
                f"the denoiser returned shape {list(out.shape)} for an input of shape {list(x.shape)}; "
                "it must return eps with the input's shape [B, *shape]."
            )
        if out.dtype != x.dtype:
            raise DenoiserOutputError(
                f"the denoiser returned dtype {out.dtype} for an input of dtype {x.dtype}; return the "
                "input's dtype (cast inside the denoiser if the model computes in another one)."
            )
        return out

    def first_order_rhs(self, states: torch.Tensor, outputs: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The sampler's own step for rows ``lo..hi`` (inclusive, ``1 <= lo``): ``[hi-lo+1, N, D]``.

        ``states`` is the full trajectory ``[T+1, N, D]``; ``outputs`` holds the model outputs
        ``[T, N, D]`` (``outputs[j] = eps(s_j)``); only the lags each row reads are used.
        """
        state_coef, output_coef, noise_coef = self.coefficients()
        rows = slice(lo, hi + 1)
        result = noise_coef[rows, None, None] * self._flat_noise[rows]
        for lag in range(1, state_coef.shape[1] + 1):
            first = max(lo, lag)  # rows whose lag reaches before s_0 have zero coefficients
            if first > hi:
                continue
            part = slice(first - lo, hi - lo + 1)
            src = slice(first - lag, hi - lag + 1)
            result[part] += state_coef[first:hi + 1, lag - 1, None, None] * states[src]
            result[part] += output_coef[first:hi + 1, lag - 1, None, None] * outputs[src]
        return result

    def order_residual(self, first_order: torch.Tensor, lo: int, order: int) -> torch.Tensor:
        """Order-k residuals of window rows ``lo..`` from their first-order residuals ``[W, N, D]``.

        The anchor is ``lo - 1``: rows closer than ``order`` to it unroll only to the anchor,
        which is exact because states at and above the anchor are final.
        """
        width = first_order.shape[0]
        if order <= 1:
            return first_order
        weights = self.propagator()[lo:lo + width, lo:lo + width]
        if order < width:
            offsets = torch.arange(width, device=self.device)
            band = (offsets[:, None] - offsets[None, :]) < order
            weights = weights * band
        return (weights @ first_order.reshape(width, -1)).reshape(first_order.shape)

    def sequential(self, evaluate: Evaluator | None = None,
                   on_step: Callable[[int], Any] | None = None, *,
                   check_finite: bool = True) -> SequentialRun:
        """The ONE sequential loop: T model calls, each over the N samples, each followed by the
        sampler's exact step (``states[t] = first_order_rhs``).

        The driver's ``sequential`` solver, the ``coarse`` initializer and the digits model's
        sequential sampling all run this loop. A sample whose model output turns non-finite keeps
        its last finite state from then on (the others go on); the loop stops early only when
        every sample has failed.

        Args:
            evaluate: ``evaluate(states [1, N, D], [position]) -> [1, N, D]`` model outputs;
                default :meth:`evaluate` (the driver passes a chunked or sharded evaluator).
            on_step: called with the row ``t`` after each step (the driver reports iterations).
            check_finite: watch the model outputs for non-finite values (above). Off, no step
                waits for the host to read a flag, which is how a GPU benchmark times the bare
                loop; a non-finite output then flows into the states unnoticed.
        """
        evaluate = evaluate or self.evaluate
        steps, samples = self.num_steps, self.num_samples
        states = torch.empty_like(self.flat_noise)
        states[0] = self.flat_noise[0]
        outputs = torch.zeros(steps, samples, self.state_size, dtype=self.dtype, device=self.device)
        failures: dict[int, str] = {}
        failed = torch.zeros(samples, dtype=torch.bool, device=self.device)
        calls, stopped_at = 0, None
        for row in range(1, steps + 1):
            # A copy: the denoiser may write into its input, and x_T (or any state) must not change.
            evaluated = evaluate(states[row - 1:row].clone(), [row - 1])
            calls = row
            if failures:
                evaluated = evaluated.masked_fill(failed[None, :, None], 0.0)
            if check_finite and not torch.isfinite(evaluated).all():
                bad = (~torch.isfinite(evaluated)).any(-1).any(0)
                where = (f"the denoiser returned non-finite values at step {row}, position {row - 1} "
                         f"(timestep {self.sampler.timesteps[row - 1]})")
                for index in bad.nonzero().flatten().tolist():
                    failures.setdefault(index, where)
                if len(failures) == samples:
                    states[row:] = states[row - 1]
                    stopped_at = row
                    break
                failed |= bad
                evaluated = evaluated.masked_fill(failed[None, :, None], 0.0)
            outputs[row - 1] = evaluated[0]
            states[row] = self.first_order_rhs(states, outputs, row, row)[0]
            if failures:  # a failed sample keeps its last finite state
                states[row] = torch.where(failed[:, None], states[row - 1], states[row])
            if on_step is not None:
                on_step(row)
        return SequentialRun(states=states, calls=calls, failures=failures, stopped_at=stopped_at)


@attrs.define(frozen=True, eq=False)
class SequentialRun:
    """What :meth:`TriangularSystem.sequential` computed.

    Attributes:
        states: ``[T+1, N, D]`` flat states, ``states[0] = x_T``.
        calls: model calls made (T unless every sample failed first).
        failures: ``{sample: why}`` for each sample whose model output turned non-finite.
        stopped_at: the step at which every sample had failed (states from there on are copies),
            or ``None`` when the loop ran to the end.
    """

    states: torch.Tensor
    calls: int
    failures: dict[int, str]
    stopped_at: int | None
