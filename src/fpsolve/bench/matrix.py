"""What the benchmark measures: frozen specs of samplers, solvers and cells, and the two plans.

A *cell* is one (model, sampler, solver, tolerance). Solvers whose stopping rule is the RMS rule
get one cell per tolerance; the others (sequential, the ParaDiGMS rule, ``taa default``) get one
cell with ``tol=None``. Every cell is run on each seed with a batch of samples, against the
sequential sample from the same noise.

Specs name things by a short ``key`` (used on the command line, e.g. ``ddim-50``, ``taa-m2``) and
show a ``label`` (used in tables and plots, e.g. ``DDIM-50``, ``taa m=2``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import attrs
import torch

from ..errors import InvalidOptionError, UnknownNameError
from ..models import ReferenceModel, reference_prediction, spaced_timesteps
from ..registry import get_registry
from ..samplers import FlowSampler, VPSampler
from ..samplers.base import SequentialSampler
from ..stopping import RMS, Paradigms, X0Change
from ..validators import as_real, check_int, integer

__all__ = [
    "SamplerSpec",
    "SolverSpec",
    "Cell",
    "CurvePlan",
    "BenchPlan",
    "SOLVERS",
    "parse_sampler",
    "parse_solver",
    "full_plan",
    "quick_plan",
]


def _as_tuple(value: Iterable[Any]) -> tuple[Any, ...]:
    """attrs converter: any iterable (list, generator) -> tuple, so frozen specs stay hashable."""
    return tuple(value)


@attrs.define(frozen=True)
class _Family:
    """A sampler family of the benchmark: its display name, and the registered sampler it runs
    with its options (settings only: the class comes from the registry, the one name -> class map).

    ``build(source, steps)`` gets a :class:`~fpsolve.models.ReferenceModel` (or, for an epsilon
    family, its ``alphas_cumprod`` tensor) and T; variance-preserving samplers take T timesteps
    evenly spaced over the training steps, flow samplers ``model.flow_sigmas(T)`` (the model's
    training schedule).
    """

    label: str
    sampler: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def cls(self) -> type[SequentialSampler]:
        """The registered sampler class (looked up on use, so a plugin's sampler is found too)."""
        return get_registry().lookup("sampler", self.sampler).cls

    @property
    def prediction(self) -> str:
        """What the model must return for this family: the sampler class's ``prediction``."""
        return self.cls.prediction

    def build(self, source: ReferenceModel | torch.Tensor, steps: int) -> SequentialSampler:
        """The family's sampler over ``steps`` steps on ``source``'s training schedule."""
        cls, options = self.cls, dict(self.options)
        if issubclass(cls, FlowSampler):
            if isinstance(source, torch.Tensor) or source.flow_sigmas is None:
                raise InvalidOptionError(
                    "a flow sampler needs a flow (velocity) ReferenceModel (its flow_sigmas), not an "
                    "alphas_cumprod schedule or an epsilon model."
                )
            return cls(sigmas=source.flow_sigmas(steps), num_train_timesteps=source.num_train_timesteps,
                       **options)
        if not issubclass(cls, VPSampler):
            raise InvalidOptionError(
                f"benchmark family {self.label!r}: sampler {self.sampler!r} ({cls.__name__}) is neither a "
                "VPSampler nor a FlowSampler, so the benchmark has no schedule to build it on."
            )
        abar = source if isinstance(source, torch.Tensor) else source.alphas_cumprod
        return cls(alphas_cumprod=abar, timesteps=spaced_timesteps(steps, abar.numel()), **options)


#: Sampler families by key prefix: (label, registered sampler name, its options).
_FAMILIES: dict[str, _Family] = {
    "ddim": _Family("DDIM", "ddim", (("eta", 0.0),)),
    "ddpm": _Family("DDPM", "ddpm"),
    "dpm2m": _Family("DPM++2M", "dpm_solver", (("order", 2),)),
    "flow-euler": _Family("FlowEuler", "flow_euler"),
    "flow-dpm2m": _Family("FlowDPM++2M", "flow_dpm_solver", (("order", 2),)),
}


@attrs.define(frozen=True)
class SamplerSpec:
    """A sampler family and its number of steps T on the model's training schedule.

    Attributes:
        family: ``ddim`` (eta 0), ``ddpm`` (ancestral, posterior variance) or ``dpm2m``
            (DPM-Solver++ 2M) for epsilon models (T timesteps evenly spaced over the 1000
            training steps); ``flow-euler`` (flow Euler) or ``flow-dpm2m`` (DPM-Solver++ 2M in
            flow form) on ``flow_sigmas(T)`` for flow models.
        steps: T.
    """

    family: str = attrs.field()
    steps: int = attrs.field(converter=integer, validator=check_int("sampler steps", minimum=2, maximum=1000))

    @family.validator
    def _check_family(self, attribute: Any, value: str) -> None:
        if value not in _FAMILIES:
            raise UnknownNameError("sampler family", value, _FAMILIES)

    @property
    def key(self) -> str:
        """Command-line name, e.g. ``ddim-50``."""
        return f"{self.family}-{self.steps}"

    @property
    def label(self) -> str:
        """Display name, e.g. ``DDIM-50``."""
        return f"{_FAMILIES[self.family].label}-{self.steps}"

    @property
    def family_label(self) -> str:
        """Display name of the family, e.g. ``DPM++2M``."""
        return _FAMILIES[self.family].label

    @property
    def prediction(self) -> str:
        """What the model must predict for this sampler: ``"epsilon"`` or ``"velocity"``."""
        return _FAMILIES[self.family].prediction

    def fits(self, prediction: str) -> bool:
        """True when this sampler runs on a model with that ``prediction``."""
        return self.prediction == prediction

    def build(self, model: ReferenceModel | torch.Tensor) -> SequentialSampler:
        """The sampler on a model's training schedule.

        Args:
            model: the reference model; for an epsilon family, its ``alphas_cumprod`` tensor alone
                also works.

        Raises:
            InvalidOptionError: when the model does not predict what the sampler needs.
        """
        if not isinstance(model, torch.Tensor) and not self.fits(model.prediction):
            raise InvalidOptionError(
                f"sampler {self.key!r} needs a model that predicts {self.prediction!r}; the "
                f"{model.name!r} model predicts {model.prediction!r}."
            )
        return _FAMILIES[self.family].build(model, self.steps)


def parse_sampler(text: str) -> SamplerSpec:
    """``"ddim-50"`` (or a label: ``"DDIM-50"``, ``"DPM++2M-25"``, ``"FlowEuler-50"``) -> a SamplerSpec."""
    match = re.fullmatch(r"(.+)-(\d+)", text.strip().lower())
    if match is None:
        raise InvalidOptionError(
            f"sampler {text!r} is not FAMILY-STEPS; use e.g. ddim-50, ddpm-100, dpm2m-25, flow-euler-50 "
            f"(families: {', '.join(_FAMILIES)})."
        )
    labels = {family.label.lower(): key for key, family in _FAMILIES.items()}  # "DPM++2M-25" works too
    return SamplerSpec(labels.get(match.group(1), match.group(1)), int(match.group(2)))


Stopping = Literal["sequential", "tolerance", "paradigms", "default", "x0"]


@attrs.define(frozen=True)
class SolverSpec:
    """A solver configuration of the matrix.

    Attributes:
        key: command-line name (``taa-m2``); label: display name (``taa m=2``).
        solver: registered solver name passed to :func:`fpsolve.solve`.
        options: solver options as ``(name, value)`` pairs; the value ``"T"`` means the sampler's
            number of steps (so ``fp k=T`` stays k = T whatever the library default becomes).
        stopping: ``tolerance`` (the RMS rule at each tolerance of the plan), ``paradigms`` (the
            ParaDiGMS rule at its default tol 0.1), ``default`` (no stopping option at all: the
            library's default rule), ``x0`` (the ``x0`` rule at its defaults: stop once the output
            settles) or ``sequential`` (no stopping rule).
        single_tolerance: run at the plan's first tolerance only.
    """

    key: str
    label: str
    solver: str
    options: tuple[tuple[str, Any], ...] = ()
    stopping: Stopping = "tolerance"
    single_tolerance: bool = False

    @property
    def uses_tolerance(self) -> bool:
        """True when the cell's stopping rule is the RMS rule at the plan's tolerances."""
        return self.stopping == "tolerance"

    def solver_options(self, steps: int) -> dict[str, Any]:
        """Options for :func:`fpsolve.solve`, with ``"T"`` replaced by ``steps``."""
        return {name: (steps if value == "T" else value) for name, value in self.options}

    def stopping_rule(self, tol: float | None) -> Any:
        """The stopping rule of a cell (``None``: leave the library default)."""
        if self.stopping == "tolerance":
            if tol is None:
                raise InvalidOptionError(f"solver {self.key!r} needs a tolerance.")
            return RMS(tol1=tol, tol2=tol)
        if self.stopping == "paradigms":
            return Paradigms()
        if self.stopping == "x0":
            return X0Change()
        return None


#: Every solver configuration the benchmark knows, by key, in display order.
SOLVERS: dict[str, SolverSpec] = {
    spec.key: spec
    for spec in (
        SolverSpec("sequential", "sequential", "sequential", stopping="sequential"),
        # The slowest baseline: its tighter-tolerance cells alone would cost a fifth of the full
        # matrix's model evaluations, and one tolerance is enough to place it.
        SolverSpec("fp-k1", "fp k=1", "fp", (("order", 1),), single_tolerance=True),
        SolverSpec("fp-kT", "fp k=T", "fp", (("order", "T"),)),
        # ParaDiGMS: Picard iteration (k = T) with its own sigma-scaled rule, tol 0.1.
        SolverSpec("fp-paradigms", "fp k=T + paradigms", "fp", (("order", "T"),), stopping="paradigms"),
        SolverSpec("aa", "aa m=2", "aa", (("order", "T"), ("history", 2))),
        SolverSpec("taa-m2", "taa m=2", "taa", (("order", "T"), ("history", 2))),
        SolverSpec("taa-m3", "taa m=3", "taa", (("order", "T"), ("history", 3))),
        SolverSpec("taa-m5", "taa m=5", "taa", (("order", "T"), ("history", 5))),
        # solve(system, "taa") with no options at all: whatever the library's defaults are.
        SolverSpec("taa-default", "taa default", "taa", (), stopping="default"),
        # The quasi-Newton solver with no options: fpsolve.solve's default solver (issue 14).
        SolverSpec("newton-default", "newton default", "newton", (), stopping="default"),
        # Issue 14's ablations, each with the x0 rule (equal error): the secant alone (newton
        # before issue 14), the x0 prior alone, the diagonal secant; taa and Picard with the rule.
        SolverSpec("newton-secant", "newton secant only", "newton",
                   (("prior", "zero"), ("prior_weight", 0.0)), stopping="x0"),
        SolverSpec("newton-prior", "newton prior only", "newton", (("prior_weight", 1.0),), stopping="x0"),
        SolverSpec("newton-diag", "newton_diag", "newton_diag", (), stopping="x0"),
        SolverSpec("taa-x0", "taa + x0 rule", "taa", (), stopping="x0"),
        SolverSpec("fp-x0", "fp k=T + x0 rule", "fp", (("order", "T"),), stopping="x0"),
    )
}


def parse_solver(text: str) -> SolverSpec:
    """A solver key (``taa-m2``) or label (``taa m=2``) -> its :class:`SolverSpec`."""
    wanted = text.strip()
    for spec in SOLVERS.values():
        if wanted in (spec.key, spec.label):
            return spec
    raise UnknownNameError("benchmark solver", wanted, SOLVERS)


@attrs.define(frozen=True)
class Cell:
    """One entry of the matrix: a model, a sampler, a solver and (for the RMS rule) a tolerance."""

    model: str
    sampler: SamplerSpec
    solver: SolverSpec
    tol: float | None = None

    @property
    def tol_label(self) -> str:
        """``1e-03``, ``0.1 (paradigms)``, ``default``, ``x0`` or ``-`` (sequential)."""
        if self.solver.stopping == "tolerance":
            return f"{self.tol:.0e}"
        labels = {"paradigms": "0.1 (paradigms)", "default": "default", "x0": "x0"}
        return labels.get(self.solver.stopping, "-")


@attrs.define(frozen=True)
class CurvePlan:
    """The quality-versus-iterations curves: error to sequential after each of 1..``max_iters``
    iterations, on seed 0, for each sampler x solver listed (keys).

    Attributes:
        samplers, solvers: keys of the samplers and solvers to trace (solvers must be parallel).
        max_iters: N, the largest iteration cap.
        tiny: the RMS tolerance that makes the cap, not the stopping rule, end the solve.
    """

    samplers: tuple[str, ...] = attrs.field(converter=_as_tuple)
    solvers: tuple[str, ...] = attrs.field(converter=_as_tuple)
    max_iters: int = attrs.field(default=30, converter=integer,
                                 validator=check_int("curve max_iters", minimum=1))
    tiny: float = 1e-10

    @solvers.validator
    def _check_solvers(self, attribute: Any, value: tuple[str, ...]) -> None:
        for key in value:
            if parse_solver(key).stopping == "sequential":
                raise InvalidOptionError("an iteration-cap curve needs a parallel solver, not 'sequential'.")


@attrs.define(frozen=True)
class BenchPlan:
    """Everything one ``fpsolve bench`` run measures.

    Attributes:
        models: reference model names (``digits``, ``digits-flow``, ``gmm``).
        samplers, solvers: the matrix axes. A sampler runs only on the models that predict what
            it needs (DDIM on epsilon models, flow Euler on flow models): see :meth:`cells`.
        tolerances: RMS tolerances of the solvers that use the RMS rule.
        seeds: number of seeds (0..seeds-1); each draws x_T and the step noise of a batch.
        samples: samples per seed, solved together as one batch.
        curve: the iteration-cap curves (``None``: none).
        heatmap: ``(sampler key, solver key)`` of the solve whose residuals are drawn (seed 0).
        quick: whether this is the reduced ``--quick`` plan (recorded in the report).
        predictions: ``(model, prediction)`` pairs for models outside the shipped references
            (a model passed to :func:`~fpsolve.bench.runner.run_plan` directly); a shipped
            reference's prediction comes from :func:`~fpsolve.models.reference_prediction`, and any
            other model is taken as an epsilon model. The runner checks it against the loaded model.
    """

    models: tuple[str, ...] = attrs.field(converter=_as_tuple)
    samplers: tuple[SamplerSpec, ...] = attrs.field(converter=_as_tuple)
    solvers: tuple[SolverSpec, ...] = attrs.field(converter=_as_tuple)
    tolerances: tuple[float, ...] = attrs.field(converter=_as_tuple)
    seeds: int = attrs.field(default=2, converter=integer, validator=check_int(minimum=1))
    samples: int = attrs.field(default=4, converter=integer, validator=check_int(minimum=1))
    curve: CurvePlan | None = None
    heatmap: tuple[str, str] | None = None
    quick: bool = False
    predictions: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=lambda v: tuple(
        (dict(v) if isinstance(v, dict) else dict(tuple(pair) for pair in v)).items()))

    def __attrs_post_init__(self) -> None:
        if not self.models or not self.samplers or not self.solvers:
            raise InvalidOptionError("a benchmark plan needs at least one model, sampler and solver.")
        for name in self.models:
            if not self.samplers_for(name):
                prediction = self.prediction_of(name)
                fitting = sorted(k for k, f in _FAMILIES.items() if f.prediction == prediction)
                raise InvalidOptionError(
                    f"no sampler of the plan runs on the {name!r} model, which predicts {prediction!r}; "
                    f"add one of the families {', '.join(fitting)} (e.g. {fitting[0]}-50)."
                )
        if any(s.uses_tolerance for s in self.solvers) and not self.tolerances:
            raise InvalidOptionError("solvers that use the RMS rule need at least one tolerance.")
        for tol in self.tolerances:
            as_real("tolerances", tol, minimum=0.0, strict=True, maximum=1.0, strict_maximum=True)

    def prediction_of(self, model: str) -> str:
        """What ``model`` predicts: from :attr:`predictions`, else the shipped reference's, else epsilon."""
        return dict(self.predictions).get(model) or _shipped_prediction(model)

    def samplers_for(self, model: str) -> list[SamplerSpec]:
        """The plan's samplers that run on ``model``, in plan order."""
        prediction = self.prediction_of(model)
        return [spec for spec in self.samplers if spec.fits(prediction)]

    def cells(self, model: str | None = None, sampler: SamplerSpec | None = None) -> list[Cell]:
        """The cells in display order (optionally only one model's / one sampler's); a sampler
        that does not fit a model (see :meth:`samplers_for`) has no cells for it."""
        cells = []
        for name in self.models:
            for spec in self.samplers_for(name):
                for solver in self.solvers:
                    tolerances: Sequence[float | None] = (None,)
                    if solver.uses_tolerance:
                        tolerances = self.tolerances[:1] if solver.single_tolerance else self.tolerances
                    cells += [Cell(name, spec, solver, tol) for tol in tolerances]
        return [
            c
            for c in cells
            if (model is None or c.model == model) and (sampler is None or c.sampler == sampler)
        ]


#: Samplers of the full plan, by what the model predicts.
FULL_SAMPLERS: dict[str, tuple[str, ...]] = {
    "epsilon": ("ddim-25", "ddim-50", "ddim-100", "ddpm-100", "dpm2m-25", "dpm2m-50"),
    "velocity": ("flow-euler-25", "flow-euler-50", "flow-euler-100", "flow-dpm2m-25", "flow-dpm2m-50"),
}
#: Samplers of the quick plan, by what the model predicts.
QUICK_SAMPLERS: dict[str, tuple[str, ...]] = {
    "epsilon": ("ddim-25", "dpm2m-25"),
    "velocity": ("flow-euler-25",),
}


def _sampler_axis(models: Sequence[str], table: dict[str, tuple[str, ...]]) -> list[SamplerSpec]:
    """The samplers of ``table`` for every kind of model among ``models`` (epsilon first)."""
    kinds = {_shipped_prediction(m) for m in models}
    return [parse_sampler(k) for kind in ("epsilon", "velocity") if kind in kinds for k in table[kind]]


def _shipped_prediction(model: str) -> str:
    """A shipped reference's prediction; any other model is taken as an epsilon model."""
    try:
        return reference_prediction(model)
    except UnknownNameError:
        return "epsilon"


def full_plan(models: Sequence[str]) -> BenchPlan:
    """The committed report's matrix: 6 samplers for epsilon models (DDIM, DDPM, DPM++2M) and 5
    for flow models (flow Euler, flow DPM++2M) x every solver x tolerances 1e-3, 1e-4.

    Sized for about fifteen minutes on two shared CPU cores with the digits UNet: two seeds of
    one sample each (``--seeds``/``--samples`` raise it), curves on DDIM-50, DDPM-100 and
    flow Euler-50.
    """
    samplers = _sampler_axis(models, FULL_SAMPLERS)
    keys = [s.key for s in samplers]
    return BenchPlan(
        models=models,
        samplers=samplers,
        solvers=list(SOLVERS.values()),
        tolerances=(1e-3, 1e-4),
        seeds=2,
        samples=1,
        curve=CurvePlan(
            samplers=[k for k in ("ddim-50", "ddpm-100", "flow-euler-50") if k in keys],
            # not fp k=1: at a tolerance this tight it moves one state per iteration (flat curve)
            solvers=("fp-kT", "aa", "taa-m3", "taa-default", "newton-default"),
            max_iters=25,
        ),
        heatmap=("ddim-100" if "ddim-100" in keys else "flow-euler-100", "newton-default"),
    )


def quick_plan(models: Sequence[str]) -> BenchPlan:
    """A reduced matrix that runs in well under two minutes on two CPU cores."""
    samplers = _sampler_axis(models, QUICK_SAMPLERS)
    keys = [s.key for s in samplers]
    return BenchPlan(
        models=models,
        samplers=samplers,
        solvers=[SOLVERS[k] for k in ("sequential", "fp-kT", "fp-paradigms", "taa-m2", "taa-default")],
        tolerances=(1e-3,),
        seeds=1,
        samples=2,
        curve=CurvePlan(samplers=[k for k in ("ddim-25", "flow-euler-25") if k in keys],
                        solvers=("fp-kT", "taa-default"), max_iters=12),
        heatmap=("ddim-25" if "ddim-25" in keys else "flow-euler-25", "taa-default"),
        quick=True,
    )
