"""``fpsolve demo``: runs on tiny settings, writes the PNGs, prints the required numbers, and falls
back to the gmm model when the digits weights are missing."""

from __future__ import annotations

import re

import matplotlib.image
import numpy as np
import pytest
import torch

from fpsolve.bench import prediction
from fpsolve.cli import demo, main
from fpsolve.models import GaussianMixtureDenoiser, ReferenceModel, load_reference
from fpsolve.models.digits import WEIGHTS_DIR, digits_to_images

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_image_model(name: str = "digits") -> ReferenceModel:
    """A closed-form stand-in for the digits UNet on 1x4x4 images (no training, no diffusers)."""
    gmm = GaussianMixtureDenoiser.random(dim=16, components=4, std=0.2, seed=5)
    gmm = GaussianMixtureDenoiser(gmm.means, gmm.stds, gmm.weights, gmm.alphas_cumprod, shape=(1, 4, 4))
    return ReferenceModel(name, gmm, gmm.alphas_cumprod, (1, 4, 4), digits_to_images)


def numbers(out: str) -> dict[str, float]:
    """The figures the demo must print, parsed from its output."""
    found = {
        "calls": re.search(r"sequential: (\d+) model calls", out),
        "iterations": re.search(r"taa: +(\d+) parallel iterations, (\d+) model evaluations", out),
        "reduction": re.search(r"reduced ([\d.]+)x \(T / iterations = (\d+) / (\d+)\)", out),
    }
    assert all(found.values()), out
    return {
        "calls": int(found["calls"][1]),
        "iterations": int(found["iterations"][1]),
        "evals": int(found["iterations"][2]),
        "reduction": float(found["reduction"][1]),
        "T": int(found["reduction"][2]),
        "reduction_iterations": int(found["reduction"][3]),
    }


def assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert matplotlib.image.imread(path).std() > 0.01


def figure_panels(path) -> list[float]:
    """Standard deviation of each quarter (top to bottom) of the figure: every panel is drawn."""
    image = matplotlib.image.imread(path)
    return [float(part.std()) for part in np.array_split(image, 4, axis=0)]


def test_demo_on_an_image_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "load_reference", lambda name: tiny_image_model())
    threads = torch.get_num_threads()
    argv = ["demo", "--steps", "20", "--samples", "6", "--repeats", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert torch.get_num_threads() == threads  # --threads is restored after the run
    figures = numbers(out)
    assert figures["calls"] == figures["T"] == 20
    assert 1 <= figures["iterations"] == figures["reduction_iterations"] < 20  # fewer than T on this model
    assert figures["reduction"] == pytest.approx(20 / figures["iterations"], abs=0.05)
    assert figures["evals"] >= 6 * figures["iterations"]
    pixels = re.search(r"max pixel difference to sequential: (\d+) \(on \[0, 255\]\)", out)
    assert pixels and int(pixels[1]) <= 3  # TAA at the default tolerance reproduces the sequential grid
    assert out.count("(median of 2 runs)") == 2  # both reported times are medians of the repeats
    # the CPU times are explained, and the GPU ratio is labelled as a prediction from the tables
    assert "A CPU runs a batch of B rows about B times slower" in out
    assert "PREDICTED for one NVIDIA H200 (not measured here)" in out
    assert re.search(r"CUDA graphs: +sequential [\d.]+ ms, taa [\d.]+ ms -> taa [\d.]+x (faster|slower)", out)
    assert "taa run 2/2" in captured.err  # the progress bar ran over every solve
    assert {p.name for p in tmp_path.iterdir()} == {"demo.png"}
    assert_png(tmp_path / "demo.png")
    assert min(figure_panels(tmp_path / "demo.png")) > 0.01


def test_gpu_prediction_follows_the_latency_table(tmp_path):
    # a synthetic table: batch-1 calls cost 1 ms, 4 rows 1 ms, 8 rows 2 ms (rows above 8 grow linearly)
    import json

    table = tmp_path / "table.json"
    ms = {"1": 1.0, "4": 1.0, "8": 2.0}
    model = {"params_m": 1.0, "eager": ms, "cudagraph": ms}
    table.write_text(json.dumps({"device": "card", "models": {"m": model}}))
    # T = 4 steps, 2 samples, 2 iterations: sequential 4 t(2) = 4 ms; the parallel solve evaluates
    # min(4, 4 - 0) = 4 positions x 2 rows (t(8) = 2 ms), then 4 - 2 = 2 positions x 2 rows (1 ms)
    (eager, _) = prediction.predict_gpu(4, 2, 2, 10**6, table)
    assert eager["sequential_s"] == pytest.approx(4e-3)
    assert eager["parallel_s"] == pytest.approx(3e-3)
    assert eager["ratio"] == pytest.approx(4 / 3)


def test_the_packaged_latency_table_is_the_measured_one():
    import json
    from pathlib import Path

    packaged = json.loads(prediction.LATENCY_TABLE.read_text())["models"]
    measured = json.loads((Path(__file__).parent / "data" / "h200_latency.json").read_text())["models"]
    without_sizes = {name: {k: v for k, v in row.items() if k != "params_m"}
                     for name, row in packaged.items()}
    assert without_sizes == measured


def test_demo_falls_back_to_gmm_without_digits_weights(tmp_path, capsys, monkeypatch):
    def missing_digits(name):
        if name == "digits":
            raise FileNotFoundError("digits model file digits_unet.json is missing")
        return load_reference(name)

    monkeypatch.setattr(demo, "load_reference", missing_digits)
    assert main(["demo", "--steps", "6", "--samples", "2", "--repeats", "1", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "Falling back to the 'gmm' model" in captured.err
    assert numbers(captured.out)["T"] == 6
    assert "max abs difference to sequential" in captured.out
    assert [p.name for p in tmp_path.iterdir()] == ["demo.png"]
    assert_png(tmp_path / "demo.png")


def test_demo_rejects_bad_settings(tmp_path, capsys):
    assert main(["demo", "--steps", "1", "--out", str(tmp_path)]) == 2
    assert "--steps" in capsys.readouterr().err


def test_demo_refuses_an_unusable_out_before_sampling(tmp_path, capsys, monkeypatch):
    def no_model(name):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(demo, "load_reference", no_model)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (blocker, blocker / "sub"):
        assert main(["demo", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fpsolve demo: --out") and "Traceback" not in err


def test_demo_model_choices_come_from_the_model_registry():
    import argparse

    from fpsolve.models import available_references

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    choices = next(a.choices for a in parser._actions if a.dest == "model")
    assert list(choices) == available_references()


@pytest.mark.skipif(
    not (WEIGHTS_DIR / "digits_unet.safetensors").is_file(), reason="digits weights not built yet"
)
def test_demo_with_the_shipped_digits_model(tmp_path, capsys):
    assert main(["demo", "--steps", "6", "--samples", "2", "--repeats", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model digits") and numbers(out)["T"] == 6
    assert "unet-16px-1M" in out  # the 1.2M-parameter digits UNet is predicted with the 1.1M UNet's table
    assert {p.name for p in tmp_path.iterdir()} == {"demo.png"}
