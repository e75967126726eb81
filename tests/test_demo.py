"""``fpsolve demo``: runs on tiny settings, writes the PNGs, prints the required numbers, and falls
back to the gmm model when the digits weights are missing."""

from __future__ import annotations

import re

import matplotlib.image
import pytest
import torch

from fpsolve import demo
from fpsolve.cli import main
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


def test_demo_on_an_image_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "load_reference", lambda name: tiny_image_model())
    threads = torch.get_num_threads()
    assert main(["demo", "--steps", "20", "--samples", "6", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert torch.get_num_threads() == threads  # --threads is restored after the run
    figures = numbers(out)
    assert figures["calls"] == figures["T"] == 20
    assert 1 <= figures["iterations"] == figures["reduction_iterations"] < 20  # fewer than T on this model
    assert figures["reduction"] == pytest.approx(20 / figures["iterations"], abs=0.05)
    assert figures["evals"] >= 6 * figures["iterations"]
    pixels = re.search(r"max pixel difference to sequential: (\d+) \(on \[0, 255\]\)", out)
    assert pixels and int(pixels[1]) <= 3  # TAA at the default tolerance reproduces the sequential grid
    assert {p.name for p in tmp_path.iterdir()} == {"sequential.png", "taa.png", "residuals.png"}
    for name in ("sequential.png", "taa.png", "residuals.png"):
        assert_png(tmp_path / name)
    grids = [matplotlib.image.imread(tmp_path / name) for name in ("sequential.png", "taa.png")]
    assert abs(grids[0] - grids[1]).max() <= 4 / 255 + 1e-6
    # 6 samples in one row of 4x4 tiles, 1-pixel borders, upscaled 6x
    assert matplotlib.image.imread(tmp_path / "sequential.png").shape[:2] == (6 * 6, 6 * 31)


def test_demo_falls_back_to_gmm_without_digits_weights(tmp_path, capsys, monkeypatch):
    def missing_digits(name):
        if name == "digits":
            raise FileNotFoundError("digits model file digits_unet.json is missing")
        return load_reference(name)

    monkeypatch.setattr(demo, "load_reference", missing_digits)
    assert main(["demo", "--steps", "6", "--samples", "2", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "Falling back to the 'gmm' model" in captured.err and "no image grids" in captured.err
    assert numbers(captured.out)["T"] == 6
    assert "max abs difference to sequential" in captured.out
    assert [p.name for p in tmp_path.iterdir()] == ["residuals.png"]
    assert_png(tmp_path / "residuals.png")


def test_demo_rejects_bad_settings(tmp_path, capsys):
    assert main(["demo", "--steps", "1", "--out", str(tmp_path)]) == 2
    assert "--steps" in capsys.readouterr().err


@pytest.mark.skipif(
    not (WEIGHTS_DIR / "digits_unet.safetensors").is_file(), reason="digits weights not built yet"
)
def test_demo_with_the_shipped_digits_model(tmp_path, capsys):
    assert main(["demo", "--steps", "6", "--samples", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model digits") and numbers(out)["T"] == 6
    assert {p.name for p in tmp_path.iterdir()} == {"sequential.png", "taa.png", "residuals.png"}
