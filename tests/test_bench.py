"""``fpsolve bench``: a tiny matrix end to end, the JSON schema, the plots, the error metrics, the
iteration-cap curves against literal capped solves, and the command line."""

from __future__ import annotations

import argparse
import json
import math
import warnings

import attrs
import matplotlib.image
import numpy as np
import pytest
import torch

import fpsolve
from fpsolve.bench import curves, matrix, metrics, plots, report, runner
from fpsolve.cli import main
from fpsolve.cli.bench import build_plan
from fpsolve.errors import ShapeError
from fpsolve.models import GaussianMixtureDenoiser, ReferenceModel, load_reference
from fpsolve.models.digits import digits_to_images
from fpsolve.stopping import RMS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 6


def image_model() -> ReferenceModel:
    """A closed-form model on 1x4x4 'images' in [-1, 1]: exercises the image metrics without a UNet."""
    gmm = GaussianMixtureDenoiser.random(dim=16, components=4, std=0.2, seed=3)
    gmm = GaussianMixtureDenoiser(gmm.means, gmm.stds, gmm.weights, gmm.alphas_cumprod, shape=(1, 4, 4))
    return ReferenceModel("tiles", gmm, gmm.alphas_cumprod, (1, 4, 4), digits_to_images)


def tiny_plan(models=("gmm",)) -> matrix.BenchPlan:
    return matrix.BenchPlan(
        models=models,
        samplers=[matrix.parse_sampler(f"ddim-{STEPS}"), matrix.parse_sampler(f"dpm2m-{STEPS}")],
        solvers=[matrix.SOLVERS[k] for k in ("sequential", "fp-paradigms", "taa-m2", "taa-default")],
        tolerances=(1e-3, 1e-4),
        seeds=2,
        samples=2,
        curve=matrix.CurvePlan(samplers=(f"ddim-{STEPS}",), solvers=("taa-m2", "taa-default"), max_iters=4),
        heatmap=(f"ddim-{STEPS}", "taa-default"),
    )


class CountingReporter(runner.Reporter):
    def __init__(self):
        self.ends = 0
        self.descriptions = []

    def begin(self, description):
        self.descriptions.append(description)

    def end(self):
        self.ends += 1


@pytest.fixture(scope="module")
def tiny_result():
    reporter = CountingReporter()
    plan = tiny_plan(models=("gmm", "tiles"))
    result = runner.run_plan(
        plan, reporter=reporter, models={"gmm": load_reference("gmm"), "tiles": image_model()}
    )
    return plan, result, reporter


def test_tiny_matrix_cells(tiny_result):
    plan, result, reporter = tiny_result
    # 2 models x 2 samplers x (sequential + paradigms + taa-m2 x 2 tols + default)
    assert len(result.cells) == 2 * 2 * 5 == len(plan.cells())
    assert reporter.ends == runner.count_units(plan) == 20 * 2 + 2 * 2
    for cell in result.cells:
        assert len(cell.records) == 2 and [r.seed for r in cell.records] == [0, 1]
        assert cell.converged, cell.cell
        if cell.cell.solver.key == "sequential":
            assert cell.iterations == STEPS and cell.evals_per_sample == STEPS
            assert cell.rms == 0.0
        elif cell.cell.solver.key == "fp-paradigms":  # sigma-scaled, tol 0.1: loose at T = 6
            assert 1 <= cell.iterations <= STEPS and math.isfinite(cell.rms)
        else:
            assert 1 <= cell.iterations <= STEPS
            assert cell.rms < 1e-2
    taa = result.cell("gmm", f"ddim-{STEPS}", "taa-m2", 1e-4)
    assert taa is not None and taa.cell.tol == 1e-4 and taa.cell.tol_label == "1e-04"
    assert result.cell("gmm", f"ddim-{STEPS}", "taa-m2", 1e-2) is None


def test_image_metrics_only_for_image_models(tiny_result):
    _, result, _ = tiny_result
    for cell in result.cells:
        if cell.cell.model == "gmm":
            assert cell.max_abs_pixels is None and cell.psnr_db is None
        else:
            assert cell.max_abs_pixels is not None and 0 <= cell.max_abs_pixels <= 255
            if cell.cell.solver.key == "sequential":
                assert cell.max_abs_pixels == 0 and math.isinf(cell.psnr_db)


def test_json_schema(tiny_result, tmp_path):
    plan, result, _ = tiny_result
    path = report.write_json(result, tmp_path / "bench.json", {"gmm": ["a.png"]})
    data = json.loads(path.read_text())  # strict JSON: write_json forbids NaN / Infinity
    assert data["schema"] == report.SCHEMA
    assert set(data) == {"schema", "meta", "plan", "cells", "curves", "heatmaps", "plots"}
    assert data["plan"]["tolerances"] == [1e-3, 1e-4] and data["plan"]["seeds"] == 2
    fields = {
        "model",
        "sampler",
        "sampler_key",
        "steps",
        "solver",
        "solver_key",
        "tol",
        "stopping",
        "samples",
        "iterations",
        "evals_per_sample",
        "wall_time_s",
        "rms",
        "max_abs_pixels",
        "psnr_db",
        "converged",
        "converged_seeds",
        "seeds",
    }
    for cell in data["cells"]:
        assert fields <= set(cell)
        assert len(cell["seeds"]) == 2 and cell["wall_time_s"] > 0
        assert {"seed", "iterations", "model_evals", "wall_time_s", "status", "converged", "rms"} <= set(
            cell["seeds"][0]
        )
    sequential = [c for c in data["cells"] if c["model"] == "tiles" and c["solver_key"] == "sequential"]
    assert sequential and all(c["psnr_db"] is None and c["max_abs_pixels"] == 0 for c in sequential)
    assert len(data["curves"]) == 4 and all(len(c["rms"]) == 4 for c in data["curves"])
    heatmap = data["heatmaps"][0]
    assert heatmap["solver"] == "taa default" and len(heatmap["first_order"][0]) == STEPS + 1
    assert heatmap["first_order"][0][0] is None  # x_T is never in the window: NaN -> null


def test_markdown_and_plots_are_written(tiny_result, tmp_path):
    plan, result, _ = tiny_result
    written = [
        plots.plot_iterations_vs_steps(result, "tiles", tmp_path / "it.png", 1e-3),
        plots.plot_error_vs_cap([c for c in result.curves if c.model == "tiles"], tmp_path / "cap.png"),
        plots.plot_error_vs_cap([c for c in result.curves if c.model == "gmm"], tmp_path / "cap_gmm.png"),
        plots.plot_residual_heatmap(
            result.heatmaps[0].first_order, tmp_path / "heat.png", "t", result.heatmaps[0].anchors
        ),
    ]
    for path in written:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        pixels = matplotlib.image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.std() > 0.01  # something was drawn
    (tmp_path / "core_gmm.md").write_text("# another script's report\n")
    page = report.write_markdown(
        result, tmp_path / "index.md", {"tiles": ["it.png"]}, "fpsolve bench x"
    ).read_text()
    assert "fpsolve bench x" in page and "![it.png](it.png)" in page
    assert page.count("### ") == 4 and "| taa default | default |" in page
    assert "- [core_gmm](core_gmm.md)" in page and "(index.md)" not in page
    assert "(in this run: `taa default` = `TAA(" in page  # what the black-box default resolved to


def test_error_metrics_known_case():
    reference = -torch.ones(2, 1, 4, 4, dtype=torch.float64)  # all black: image value 0
    sample = reference.clone()
    sample[1, 0, 2, 3] = 10 / 127.5 - 1  # one pixel at image value 10
    result = metrics.compare_samples(sample, reference, digits_to_images)
    assert result.max_abs_pixels == 10
    assert result.psnr_db == pytest.approx(10 * math.log10(255**2 / (100 / 32)))
    assert result.rms == pytest.approx((10 / 127.5) / math.sqrt(32))
    same = metrics.compare_samples(reference, reference, digits_to_images)
    assert same.max_abs_pixels == 0 and math.isinf(same.psnr_db) and same.rms == 0
    assert metrics.compare_samples(sample, reference).max_abs_pixels is None
    # uint8 arithmetic must not wrap around: 0 - 255 is a difference of 255
    assert metrics.image_errors(np.zeros((1, 2), np.uint8), np.full((1, 2), 255, np.uint8))[0] == 255
    with pytest.raises(ShapeError):
        metrics.rms_error(sample, reference[:1])


def test_image_converter_detects_image_models():
    gmm = load_reference("gmm")
    assert metrics.image_converter(gmm.to_images, gmm.shape) is None
    tiles = image_model()
    assert metrics.image_converter(tiles.to_images, tiles.shape) is tiles.to_images


@pytest.mark.parametrize("key", ["taa-default", "fp-kT", "aa"])
@pytest.mark.parametrize("steps", [8, 3])
def test_capped_samples_equal_literal_capped_solves(key, steps):
    ref = load_reference("gmm")
    sampler = matrix.parse_sampler(f"ddim-{steps}").build(ref.alphas_cumprod)
    system = fpsolve.TriangularSystem(
        sampler=sampler,
        denoiser=ref.denoiser,
        shape=ref.shape,
        batch=2,
        generator=torch.Generator().manual_seed(1),
    )
    spec = matrix.SOLVERS[key]
    caps = 5
    fast = curves.capped_samples(system, spec, caps, tiny=1e-10)
    assert len(fast) == caps
    for n in range(1, caps + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fpsolve.NotConvergedWarning)  # capped on purpose
            literal = fpsolve.solve(
                system,
                spec.solver,
                stopping=RMS(tol1=1e-10, tol2=0.0),
                window=steps,
                max_iters=n,
                **spec.solver_options(steps),
            )
        assert torch.equal(fast[n - 1], literal.sample), n


def test_error_vs_cap_decreases_to_sequential():
    ref = load_reference("gmm")
    sampler = matrix.parse_sampler("ddim-5").build(ref.alphas_cumprod)
    system = fpsolve.TriangularSystem(
        sampler=sampler,
        denoiser=ref.denoiser,
        shape=ref.shape,
        batch=1,
        generator=torch.Generator().manual_seed(0),
    )
    reference = fpsolve.solve(system, "sequential").sample
    curve = curves.error_vs_cap(system, matrix.SOLVERS["fp-kT"], reference, None, max_iters=7)
    assert curve.caps == list(range(1, 8))
    # FP on a triangular system is exact after T iterations (finite termination)
    assert curve.errors[4].rms < 1e-10 and curve.errors[6].rms < 1e-10
    assert curve.errors[0].rms > 1e-3


def test_plan_specs_validate():
    assert matrix.parse_sampler("DPM++2M-25") == matrix.SamplerSpec("dpm2m", 25)
    assert matrix.parse_solver("taa m=3").options == (("order", "T"), ("history", 3))
    assert matrix.SOLVERS["fp-kT"].solver_options(40) == {"order": 40}
    with pytest.raises(fpsolve.errors.InvalidOptionError):
        matrix.parse_sampler("ddim50")
    with pytest.raises(fpsolve.errors.UnknownNameError):
        matrix.parse_sampler("euler-50")
    with pytest.raises(fpsolve.errors.UnknownNameError):
        matrix.parse_solver("taa-m9")
    with pytest.raises(fpsolve.errors.InvalidOptionError):
        matrix.CurvePlan(samplers=("ddim-5",), solvers=("sequential",))
    full = matrix.full_plan(["digits"])
    assert len(full.samplers) == 6 and full.tolerances == (1e-3, 1e-4)
    assert full.solvers == tuple(matrix.SOLVERS.values()) and len(full.solvers) >= 9
    # tolerance solvers get one cell per tolerance (fp k=1 only the first), the others one
    per_sampler = sum(2 if s.uses_tolerance and not s.single_tolerance else 1 for s in full.solvers)
    assert per_sampler >= 5 * 2 + 1 + 3
    assert len(full.cells()) == 6 * per_sampler
    assert [c.tol for c in full.cells(sampler=full.samplers[0]) if c.solver.key == "fp-k1"] == [1e-3]


def test_build_plan_narrows_curves_and_heatmap():
    args = argparse.Namespace(
        quick=True,
        samplers=["ddim-7"],
        solvers=["sequential", "taa-m3"],
        tolerances=["1e-2"],
        seeds=3,
        samples=1,
        curve_max_iters=2,
    )
    plan = build_plan(args, ["gmm"])
    assert [s.key for s in plan.samplers] == ["ddim-7"] and plan.tolerances == (1e-2,) and plan.seeds == 3
    assert (
        plan.curve.samplers == ("ddim-7",) and plan.curve.solvers == ("taa-m3",) and plan.curve.max_iters == 2
    )
    assert plan.heatmap == ("ddim-7", "taa-m3")


def test_cli_quick_smoke(tmp_path, capsys):
    code = main(
        [
            "bench",
            "--quick",
            "--model",
            "gmm",
            "--samplers",
            "ddim-5,ddpm-5",
            "--solvers",
            "sequential,taa-default",
            "--seeds",
            "1",
            "--samples",
            "1",
            "--curve-max-iters",
            "3",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "gmm DDIM-5" in out and "gmm DDPM-5" in out and "taa default" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["plan"]["quick"] is True and len(data["cells"]) == 4
    assert data["meta"]["command"].startswith("fpsolve bench --model gmm --quick")
    names = {
        "bench.json",
        "index.md",
        "bench-gmm-iterations.png",
        "bench-gmm-error-vs-cap.png",
        "bench-gmm-residuals.png",
    }
    assert names == {p.name for p in tmp_path.iterdir()}
    assert data["plots"]["gmm"] == sorted(
        names - {"bench.json", "index.md"},
        key=["bench-gmm-iterations.png", "bench-gmm-error-vs-cap.png", "bench-gmm-residuals.png"].index,
    )


def test_cli_bad_option_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "--model", "gmm", "--samplers", "euler-5", "--out", str(tmp_path)]) == 2
    assert "euler" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def missing_digits(name, device=None):
    if name == "digits":
        raise FileNotFoundError("digits model file digits_unet.json is missing")
    return load_reference(name)


def test_cli_falls_back_to_gmm_only_when_no_model_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "prepare_model", missing_digits)
    tiny = [
        "--samplers",
        "ddim-4",
        "--solvers",
        "taa-default",
        "--seeds",
        "1",
        "--samples",
        "1",
        "--no-plots",
    ]
    assert main(["bench", *tiny, "--out", str(tmp_path / "auto")]) == 0
    captured = capsys.readouterr()
    assert "benchmarking the 'gmm' model instead" in captured.err and "gmm DDIM-4" in captured.out
    assert json.loads((tmp_path / "auto" / "bench.json").read_text())["plan"]["models"] == ["gmm"]
    assert main(["bench", "--model", "digits", *tiny, "--out", str(tmp_path / "named")]) == 2
    assert "digits_unet.json is missing" in capsys.readouterr().err
    assert not (tmp_path / "named").exists()


# -- plots readable at a glance (issue 11) and a CLI that loses no work (issue 10) --------------------


def test_one_step_count_draws_bars_labelled_with_each_series_stopping_rule(tiny_result):
    _, result, _ = tiny_result
    one_step = attrs.evolve(result, plan=attrs.evolve(result.plan, samplers=result.plan.samplers[:1]))
    fig = plots.iterations_figure(one_step, "gmm", 1e-3)
    ax = fig.axes[0]
    drawn = [s for s in result.plan.solvers if s.stopping != "sequential"]
    assert len(ax.patches) == len(drawn)  # one bar per series, not a column of markers
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    default_tol = attrs.fields(RMS).tol1.default  # the library's default rule, read from the code
    assert f"taa default (default: rms {default_tol:g})" in labels
    assert "taa m=2 (rms 0.001)" in labels and "fp k=T + paradigms (paradigms 0.1)" in labels
    assert len(labels) == len(drawn) + 1  # the series and the sequential line: nothing undrawn


def test_several_step_counts_offset_overlapping_series(tiny_result):
    _, result, _ = tiny_result
    two_steps = attrs.evolve(
        result, plan=attrs.evolve(result.plan, samplers=[matrix.parse_sampler(f"ddim-{STEPS}"),
                                                         matrix.parse_sampler("ddim-12")])
    )
    # the ddim-12 cells were not run: every series has one point, and still no two share an x
    fig = plots.iterations_figure(two_steps, "gmm", 1e-3)
    lines = fig.axes[0].get_lines()
    xs = [tuple(line.get_xdata()) for line in lines if line.get_marker() not in ("None", None)]
    assert len(xs) >= 3 and len(set(xs)) == len(xs)


def test_error_vs_cap_has_no_zero_tick_on_a_log_axis(tiny_result):
    _, result, _ = tiny_result
    fig = plots.error_vs_cap_figure([c for c in result.curves if c.model == "tiles"])
    fig.canvas.draw()
    for ax in fig.axes:
        if ax.get_yscale() in ("log", "symlog"):  # a log-like axis has no 0
            assert "0" not in [t.get_text() for t in ax.get_yticklabels()]
            low = ax.get_ylim()[0]
            assert low > 0


def test_curve_max_iters_zero_is_refused(tmp_path, capsys):
    argv = ["bench", "--model", "gmm", "--samplers", "ddim-4", "--curve-max-iters", "0"]
    argv += ["--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--curve-max-iters must be an iteration cap >= 1; got 0" in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_unusable_out_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "run_plan", lambda *a, **k: pytest.fail("ran before --out was checked"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (blocker, blocker / "below-a-file"):
        assert main(["bench", "--model", "gmm", "--samplers", "ddim-4", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fpsolve bench: --out") and err.count("\n") == 1 and "Traceback" not in err


def test_progressive_run_equals_the_whole_run_and_keeps_finished_slices(tmp_path):
    from fpsolve.bench.progressive import run_progressively

    plan = attrs.evolve(tiny_plan(), seeds=1, tolerances=(1e-3,))
    models = {"gmm": load_reference("gmm")}
    whole = runner.run_plan(plan, models=models)
    sliced = run_progressively(plan, torch.device("cpu"), runner.Reporter(), models, tmp_path / "bench.json")

    def summary(result):
        return (
            [(c.cell, [(r.seed, r.iterations, r.model_evals, r.error) for r in c.records])
             for c in result.cells],
            [(c.sampler, c.solver, c.caps, [e.rms for e in c.errors]) for c in result.curves],
            [(h.sampler, h.solver, h.anchors) for h in result.heatmaps],
        )

    assert summary(sliced) == summary(whole)  # the same cells, curves and heatmap, in the same order
    first = json.loads((tmp_path / "bench.json").read_text())  # written after the first slice
    assert first["meta"]["partial"] == "1 of 2 (model, sampler) groups finished"
    assert {c["sampler"] for c in first["cells"]} == {f"DDIM-{STEPS}"}

    class Interrupt(runner.Reporter):
        def begin(self, description):
            if "DPM" in description:
                raise KeyboardInterrupt

    (tmp_path / "bench.json").unlink()
    with pytest.raises(KeyboardInterrupt):
        run_progressively(plan, torch.device("cpu"), Interrupt(), models, tmp_path / "bench.json")
    kept = json.loads((tmp_path / "bench.json").read_text())
    assert len(kept["cells"]) == len(plan.cells(sampler=plan.samplers[0]))  # the finished slice survived


def test_progressive_run_of_an_epsilon_and_a_flow_model_runs_each_on_its_own_samplers(tmp_path):
    # A plan over both kinds of model: each (model, sampler) slice must pair a model only with
    # the samplers it predicts for (DDIM for gmm, flow Euler for digits-flow), as the whole run does.
    from fpsolve.bench.progressive import run_progressively

    plan = matrix.BenchPlan(
        models=("gmm", "digits-flow"),
        samplers=[matrix.parse_sampler("ddim-3"), matrix.parse_sampler("flow-euler-3")],
        solvers=[matrix.SOLVERS[k] for k in ("sequential", "fp-kT")],
        tolerances=(1e-3,), seeds=1, samples=1,
    )
    models = {"gmm": load_reference("gmm"), "digits-flow": load_reference("digits-flow")}
    whole = runner.run_plan(plan, models=models)
    sliced = run_progressively(plan, torch.device("cpu"), runner.Reporter(), models, tmp_path / "bench.json")
    pairs = [(c.cell.model, c.cell.sampler.label) for c in sliced.cells]
    assert pairs == [(c.cell.model, c.cell.sampler.label) for c in whole.cells]
    assert sorted(set(pairs)) == [("digits-flow", "FlowEuler-3"), ("gmm", "DDIM-3")]
    # The report and the figures show each model only with its own samplers: no empty sections,
    # no rows of dashes, no empty panels.
    page = report.write_markdown(sliced, tmp_path / "index.md", {}, "fpsolve bench").read_text()
    assert "### gmm DDIM-3" in page and "### digits-flow FlowEuler-3" in page
    assert "### gmm FlowEuler-3" not in page and "### digits-flow DDIM-3" not in page
    assert [row[0] for row in report.headline_rows(sliced, "gmm")] == ["DDIM-3"]
    figure = plots.iterations_figure(sliced, "digits-flow", 1e-3)
    assert [ax.get_title() for ax in figure.axes if ax.get_title()] == ["FlowEuler"]


def test_series_labels_state_the_x0_rules_own_bound():
    # The x0 rule stops on atol (the change of x_0); its tol is only the rows' rule: the label
    # must say both, not pass the rows' tolerance off as the rule's.
    from fpsolve.stopping import X0Forecast

    rule = X0Forecast()  # newton's default: the x0 rule plus the forecast of x_0's remaining error
    label = plots.stopping_text(matrix.SOLVERS["newton-default"], 1e-3)
    assert label == f"default: x0_forecast {rule.bound:g} (x0 {rule.atol:g}, rows rms {rule.tol:g})"
    assert plots.stopping_text(matrix.SOLVERS["taa-default"], 1e-3) == "default: rms 0.0002"


def test_every_series_of_the_full_matrix_gets_its_own_colour():
    # 15 solver rows: the default 10-colour cycle would draw two series in one colour.
    from matplotlib.colors import to_rgba

    solvers = [spec for spec in matrix.SOLVERS.values() if spec.stopping != "sequential"]
    assert len(solvers) > 10
    colours = [to_rgba(c) for c in plots.series_colors(solvers).values()]
    assert len(set(colours)) == len(solvers)
    few = solvers[:3]
    assert list(plots.series_colors(few).values()) == ["C0", "C1", "C2"]  # small plans keep the cycle
