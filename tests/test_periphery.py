"""The periphery's homes (issue 12): one package for the command line, the digits model split by
job, the GPU benchmark's parts in the library, and the registry as the one name -> class map."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import tomllib
import torch

import fpsolve
from fpsolve import cli, registry, samplers
from fpsolve.bench import matrix, prediction
from fpsolve.bench.gpu import tight_sequential
from fpsolve.cli import COMMANDS, train_reference
from fpsolve.cli import sample as sample_cli
from fpsolve.errors import UnknownNameError
from fpsolve.models import ReferenceModel, digits, spaced_timesteps
from fpsolve.system import TriangularSystem
from fpsolve.testing import problems

ROOT = Path(__file__).resolve().parents[1]

# -- the command line ------------------------------------------------------------------------------


def test_every_command_module_is_found_by_the_dispatcher():
    # every module of the package fpsolve.cli is a command the dispatcher names, and back
    modules = {info.name for info in pkgutil.iter_modules(cli.__path__, "fpsolve.cli.")}
    assert modules == {module for module, _ in COMMANDS.values()}
    assert set(COMMANDS) == {"demo", "bench", "sample", "plugins", "train-reference"}
    for module_name, _ in COMMANDS.values():
        module = importlib.import_module(module_name)
        params = inspect.signature(module.add_arguments).parameters
        assert list(params) == ["parser"] and callable(module.run), module_name


def test_every_command_parses_its_own_help(capsys):
    for name in COMMANDS:
        assert cli.main([name, "--help"]) == 0, name
        assert capsys.readouterr().out.startswith(f"usage: fpsolve {name}"), name


def test_the_console_script_is_still_fpsolve_cli_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"fpsolve": "fpsolve.cli:main"}
    assert inspect.isfunction(cli.main) and cli.main.__module__ == "fpsolve.cli"


# -- the registry is the one name -> class map -----------------------------------------------------

#: The hand-written lists the registry replaced (sample CLI, bench families, test problems).
OLD_VP_SAMPLERS = ("ddim", "ddpm", "dpm_solver")
OLD_FLOW_SAMPLERS = ("flow_euler", "flow_dpm_solver")
OLD_FAMILIES = {
    "ddim": (samplers.DDIM, {"eta": 0.0}),
    "ddpm": (samplers.DDPM, {}),
    "dpm2m": (samplers.DPMSolver, {"order": 2}),
    "flow-euler": (samplers.FlowEuler, {}),
    "flow-dpm2m": (samplers.FlowDPMSolver, {"order": 2}),
}
OLD_PROBLEM_KINDS = {
    "ddim": (samplers.DDIM, {"eta": 0.0}),
    "ddim_eta1": (samplers.DDIM, {"eta": 1.0}),
    "ddpm": (samplers.DDPM, {}),
    "dpm_solver": (samplers.DPMSolver, {"order": 3}),
}


def assert_same_sampler(got, expected):
    """Same class, model times and affine coefficients, exactly."""
    assert type(got) is type(expected)
    assert tuple(got.timesteps) == tuple(expected.timesteps)
    a, b = got.affine_form(), expected.affine_form()
    for name in ("state", "output", "noise"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_registered_classes_is_the_registry_without_aliases():
    table = registry.get_registry()
    for kind in registry.KINDS:
        classes = registry.registered_classes(kind)
        assert classes == {entry.name: entry.cls for entry in table.primary(kind)}
        assert list(classes) == sorted(classes)
    flows = registry.registered_classes("sampler", samplers.FlowSampler)
    assert set(OLD_FLOW_SAMPLERS) <= set(flows) and "rectified_flow" not in flows  # an alias
    assert all(issubclass(cls, samplers.FlowSampler) for cls in flows.values())
    with pytest.raises(UnknownNameError, match="samplers"):
        registry.registered_classes("samplers")


def test_sample_command_lists_its_samplers_from_the_registry():
    assert sample_cli.vp_samplers() == OLD_VP_SAMPLERS
    # the old hand list had missed the two flow samplers registered after it was written
    assert set(sample_cli.flow_samplers()) == {*OLD_FLOW_SAMPLERS, "flow_euler_stochastic", "flow_unipc"}
    assert sample_cli.sampler_choices() == ("auto", *sample_cli.vp_samplers(), *sample_cli.flow_samplers())


def toy_flow_reference() -> ReferenceModel:
    """A flow (velocity) reference with no weights, for building flow samplers."""
    return ReferenceModel("toy-flow", lambda x, t: x, None, (4,), lambda x0: None, prediction="velocity",
                          flow_sigmas=problems.shifted_flow_sigmas, num_train_timesteps=1000)


def test_bench_families_take_their_classes_from_the_registry():
    assert set(matrix._FAMILIES) == set(OLD_FAMILIES)
    abar, flow = problems.linear_alphas_cumprod(), toy_flow_reference()
    for key, (cls, options) in OLD_FAMILIES.items():
        spec = matrix.SamplerSpec(key, 10)
        assert spec.prediction == cls.prediction
        if cls.prediction == "velocity":
            expected = cls(sigmas=flow.flow_sigmas(10), num_train_timesteps=1000, **options)
            assert_same_sampler(spec.build(flow), expected)
        else:
            expected = cls(alphas_cumprod=abar, timesteps=spaced_timesteps(10, 1000), **options)
            assert_same_sampler(spec.build(abar), expected)


def test_test_problems_take_their_classes_from_the_registry():
    abar = problems.linear_alphas_cumprod()
    for kind, (cls, options) in OLD_PROBLEM_KINDS.items():
        expected = cls(alphas_cumprod=abar, timesteps=problems.spaced_timesteps(7), **options)
        assert_same_sampler(problems.make_sampler(kind, 7), expected)


@pytest.fixture
def plugin_sampler():
    """A variance-preserving sampler registered by a plugin, removed afterwards."""

    class PluginDDIM(samplers.DDIM):
        name = "ddim_from_a_plugin"

    class Plugin:
        @fpsolve.hookimpl
        def fpsolve_register_samplers(self):
            return [PluginDDIM]

    registered = fpsolve.register_plugin(Plugin(), name="periphery-test-sampler")
    yield PluginDDIM
    registry.unregister_plugin(name=registered)


def test_a_plugins_sampler_joins_the_sample_command(plugin_sampler, capsys):
    assert plugin_sampler.name in sample_cli.vp_samplers()
    assert plugin_sampler.name not in sample_cli.flow_samplers()
    argv = ["sample", "--model", "gmm", "--sampler", plugin_sampler.name, "--steps", "4", "--samples", "1"]
    assert cli.main(argv) == 0
    assert f"{plugin_sampler.name}-4" in capsys.readouterr().out


# -- the digits package ----------------------------------------------------------------------------

#: Every public name of the old module fpsolve/models/digits.py but its command-line hooks.
OLD_DIGITS_NAMES = [
    "DIGITS_SHAPE", "NUM_TRAIN_TIMESTEPS", "WEIGHTS_DIR", "DEFAULT_UNET_CONFIG", "digits_alphas_cumprod",
    "load_digits_dataset", "build_digits_unet", "train_digits", "load_digits_unet", "digits_denoiser",
    "digits_to_images", "ddim_sample_digits", "flow_sigmas", "flow_euler_sample_digits", "OBJECTIVES",
    "save_digit_grid",
]
DIGITS_JOBS = ("model", "loading", "training", "sampling", "images")
DIGITS_MODULES = {f"fpsolve.models.digits.{job}" for job in DIGITS_JOBS}


def test_the_digits_package_keeps_every_public_name():
    for name in OLD_DIGITS_NAMES:
        assert name in digits.__all__ and hasattr(digits, name), name
        value = getattr(digits, name)
        if inspect.isfunction(value):
            assert value.__module__ in DIGITS_MODULES, name
    found = {info.name for info in pkgutil.iter_modules(digits.__path__, "fpsolve.models.digits.")}
    assert found == DIGITS_MODULES
    # the train-reference command's hooks moved to the command line's package
    for name in ("add_train_parser", "add_arguments", "run_train", "run"):
        assert not hasattr(digits, name) and callable(getattr(train_reference, name)), name


def test_the_weights_and_the_latency_table_are_package_data():
    # what the wheel ships: pyproject's package-data globs, relative to the package folder
    # (checked against a built wheel too: pip wheel . --no-deps lists fpsolve/models/weights/*)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["fpsolve"]
    package = Path(fpsolve.__file__).resolve().parent
    shipped = {path.resolve() for pattern in globs for path in package.glob(pattern)}
    for objective in digits.OBJECTIVES:
        for name in digits.FILE_NAMES[objective][:2]:  # the weights and their config
            path = (digits.WEIGHTS_DIR / name).resolve()
            assert path.is_file() and path in shipped, path
    assert digits.WEIGHTS_DIR.resolve() == package / "models" / "weights"
    assert prediction.LATENCY_TABLE.resolve() in shipped


# -- the GPU benchmark's sequential baseline is the system's one loop ------------------------------


def test_tight_sequential_runs_the_systems_one_loop(monkeypatch):
    system = problems.make_system("dpm_solver", steps=6, dtype=torch.float32)
    reference = fpsolve.solve(system, "sequential").sample
    calls = []
    original = TriangularSystem.sequential

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TriangularSystem, "sequential", spy)
    trajectory = tight_sequential(system)
    assert calls == [{"check_finite": False}]
    assert torch.equal(trajectory[-1], reference)  # bit for bit the sequential solve's sample


def test_sequential_without_the_finiteness_check_lets_a_nan_through():
    sampler = problems.make_sampler("ddim", 5)
    bad_time = sampler.timesteps[2]

    def denoiser(x, t):
        out = 0.1 * x
        return torch.where((t == bad_time)[:, None], torch.nan, out)

    def system():
        return TriangularSystem(sampler=sampler, denoiser=denoiser, shape=(3,), batch=2,
                                generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    checked, unchecked = system().sequential(), system().sequential(check_finite=False)
    assert set(checked.failures) == {0, 1} and torch.isfinite(checked.states).all()
    assert unchecked.failures == {} and unchecked.calls == 5 and torch.isnan(unchecked.states[-1]).all()
    # before the bad step both runs are the same loop
    assert torch.equal(checked.states[:3], unchecked.states[:3])
