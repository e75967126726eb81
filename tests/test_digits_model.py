"""Checks of the shipped digits UNet: files, interface, and that it is actually a trained denoiser."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from fpsolve.errors import ShapeError
from fpsolve.models import digits

from ._diffusers_helpers import one_thread_per_module

# find_spec rather than importorskip: importing diffusers takes seconds, and the fixtures do it anyway.
_MISSING = [
    name for name in ("diffusers", "safetensors", "sklearn") if importlib.util.find_spec(name) is None
]
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"needs the models extra (missing: {_MISSING})")


# small model calls: on a shared or busy machine one thread is faster than contending ones
_one_thread = one_thread_per_module()


@pytest.fixture(scope="module")
def unet():
    return digits.load_digits_unet()


@pytest.fixture(scope="module")
def meta():
    return json.loads((digits.WEIGHTS_DIR / "digits_unet.json").read_text())


def test_shipped_files_and_size(unet):
    weights = digits.WEIGHTS_DIR / "digits_unet.safetensors"
    assert weights.stat().st_size < 20 * 1024**2
    n_params = sum(p.numel() for p in unet.parameters())
    assert n_params < 5_000_000
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    assert not unet.training


def test_metadata_records_config_and_loss(meta, unet):
    assert meta["unet"] == digits.DEFAULT_UNET_CONFIG
    assert meta["parameter_count"] == sum(p.numel() for p in unet.parameters())
    assert tuple(meta["shape"]) == digits.DIGITS_SHAPE
    assert meta["schedule"]["num_train_timesteps"] == digits.NUM_TRAIN_TIMESTEPS
    for key in ("seed", "steps", "batch_size", "lr", "ema_decay"):
        assert key in meta["training"]
    assert 0.0 < meta["final_loss"] < 0.2
    assert meta["wall_time_s"] > 0 and meta["threads"] >= 1 and meta["torch_version"]


def test_alphas_cumprod():
    ab = digits.digits_alphas_cumprod()
    assert ab.dtype == torch.float64 and ab.shape == (1000,)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(ab, torch.cumprod(1 - betas, 0), rtol=0, atol=0)
    assert torch.all(ab[1:] < ab[:-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_denoiser_shape_and_dtype(unet, dtype):
    denoiser = digits.digits_denoiser(unet)
    x = torch.randn(3, *digits.DIGITS_SHAPE, dtype=dtype)
    eps = denoiser(x, torch.tensor([0, 500, 999]))
    assert eps.shape == x.shape and eps.dtype == dtype
    assert torch.isfinite(eps).all()
    # A scalar timestep is broadcast over the batch.
    torch.testing.assert_close(denoiser(x, torch.tensor(500))[1], eps[1])


def test_denoiser_rejects_bad_shapes(unet):
    denoiser = digits.digits_denoiser(unet)
    with pytest.raises(ShapeError):
        denoiser(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ShapeError):
        denoiser(torch.randn(2, *digits.DIGITS_SHAPE), torch.tensor([1, 2, 3]))


def test_digits_to_images():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5)
    img = digits.digits_to_images(x)
    assert img.dtype.name == "uint8" and img.shape == (1, 1, 5)
    assert img.tolist() == [[[0, 0, 128, 255, 255]]]


# eps-MSE of the shipped model on 64 noised real digits (seed 0), measured when it was trained:
# t=10: 0.135, t=100: 0.062, t=500: 0.011, t=900: 0.0001. A predictor that ignores x_t scores 1.0
# and an untrained UNet about 1. The bounds leave roughly 50 % margin for thread/BLAS differences.
EPS_MSE_BOUNDS = {10: 0.2, 100: 0.1, 500: 0.025, 900: 0.005}


def test_eps_prediction_beats_trivial_predictor(unet):
    gen = torch.Generator().manual_seed(0)
    data = digits.load_digits_dataset()
    x0 = data[torch.randperm(data.shape[0], generator=gen)[:64]]
    ab = digits.digits_alphas_cumprod()
    denoiser = digits.digits_denoiser(unet)
    for t, bound in EPS_MSE_BOUNDS.items():
        noise = torch.randn(x0.shape, generator=gen)
        xt = math.sqrt(ab[t]) * x0 + math.sqrt(1 - ab[t]) * noise
        mse = (denoiser(xt, torch.full((x0.shape[0],), t)) - noise).pow(2).mean().item()
        assert mse < bound, f"eps-MSE at t={t} is {mse:.4f}, expected < {bound}"


def _off_subspace_rms(x: torch.Tensor) -> torch.Tensor:
    """Per-sample RMS of the part of x that no bilinearly upsampled 8x8 image can have.

    Every training image lies in the 64-dimensional range of the 8x8 -> 16x16 upsampling, so this
    residual is exactly 0 on the data. A poorly trained model leaves salt-and-pepper noise in
    these directions after DDIM sampling (two undertrained candidates scored 0.1-0.9 on most
    samples); the shipped model leaves under 0.01.
    """
    basis = torch.eye(64).view(64, 1, 8, 8)
    up = torch.nn.functional.interpolate(
        basis, size=digits.DIGITS_SHAPE[1:], mode="bilinear", align_corners=False
    )
    q, _ = torch.linalg.qr(up.reshape(64, -1).T.double())
    flat = x.reshape(x.shape[0], -1).double()
    return (flat - flat @ q @ q.T).pow(2).mean(dim=1).sqrt()


def test_off_subspace_residual_is_zero_on_data():
    assert _off_subspace_rms(digits.load_digits_dataset()[:64]).max() < 1e-5


def test_ddim_samples_are_clean_diverse_digits(unet):
    # DDIM-25 rather than 50 keeps the test fast; it is as clean (measured) and still catches the
    # undertrained candidates (off-subspace RMS 0.8-2.2 on 6 of 16 samples).
    x = digits.ddim_sample_digits(unet, 16, steps=25, seed=1)
    assert x.shape == (16, *digits.DIGITS_SHAPE) and torch.isfinite(x).all()
    # Measured: 100 % of pixels within [-1.05, 1.05], 41 % background (< -0.8; the data: 43 %),
    # mean per-pixel std across samples 0.34 (the data: 0.37), worst off-subspace RMS 0.008.
    assert (x.abs() <= 1.05).float().mean() > 0.97
    assert (x < -0.8).float().mean() > 0.25
    assert x.std(dim=0).mean() > 0.25, "samples are (nearly) all alike"
    assert _off_subspace_rms(x).max() < 0.05, "samples contain high-frequency noise"
    # Deterministic given the seed.
    torch.testing.assert_close(
        digits.ddim_sample_digits(unet, 2, steps=5, seed=1),
        digits.ddim_sample_digits(unet, 2, steps=5, seed=1),
    )


def test_cli_hooks(tmp_path, capsys):
    import argparse

    from fpsolve.cli import train_reference

    parser = argparse.ArgumentParser()
    train_reference.add_arguments(parser)
    args = parser.parse_args([])
    assert args.out == digits.WEIGHTS_DIR and args.threads == 1 and args.steps == digits.DEFAULT_STEPS
    assert train_reference.run is train_reference.run_train
    bad = parser.parse_args(["--out", str(tmp_path), "--steps", "0", "--no-progress"])
    assert train_reference.run_train(bad) == 2
    assert "steps" in capsys.readouterr().err
    sub = argparse.ArgumentParser().add_subparsers()
    assert train_reference.add_train_parser(sub).parse_args(["--seed", "3"]).func is train_reference.run_train


@pytest.fixture(scope="module")
def two_tiny_runs(tmp_path_factory):
    """Two identical 2-step trainings, for the smoke and reproducibility tests."""
    root = tmp_path_factory.mktemp("train")
    return [
        (root / name, digits.train_digits(root / name, steps=2, batch_size=4, progress=False))
        for name in "ab"
    ]


def test_training_smoke(two_tiny_runs):
    out, result = two_tiny_runs[0]
    assert math.isfinite(result["final_loss"]) and result["final_loss"] > 0
    for name in ("digits_unet.safetensors", "digits_unet.json", "digits_loss.json", "digits_loss.png"):
        assert (out / name).is_file()
    meta = json.loads((out / "digits_unet.json").read_text())
    assert meta["training"]["steps"] == 2 and meta["final_loss"] == result["final_loss"]
    assert meta["threads"] == 1 and meta["wall_time_s"] > 0
    assert len(json.loads((out / "digits_loss.json").read_text())["loss"]) == 2
    reloaded = digits.load_digits_unet(weights_dir=out)
    x = torch.randn(2, *digits.DIGITS_SHAPE)
    assert digits.digits_denoiser(reloaded)(x, torch.tensor([3, 700])).shape == x.shape


def test_training_is_reproducible(two_tiny_runs):
    (a, _), (b, _) = two_tiny_runs
    name = "digits_unet.safetensors"
    assert (a / name).read_bytes() == (b / name).read_bytes()
