"""Checks of the shipped digits UNet: files, interface, and that it is actually a trained denoiser."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")
pytest.importorskip("sklearn")

from fpsolve.errors import ShapeError  # noqa: E402
from fpsolve.models import digits  # noqa: E402


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


# Measured eps-MSE of the shipped model on 256 noised real digits (seed 0): see the bounds below.
# A predictor that ignores x_t (always 0) scores 1.0; the bounds leave margin for threads and BLAS.
EPS_MSE_BOUNDS = {10: 0.35, 100: 0.15, 500: 0.10, 900: 0.05}


def test_eps_prediction_beats_trivial_predictor(unet):
    gen = torch.Generator().manual_seed(0)
    data = digits.load_digits_dataset()
    x0 = data[torch.randperm(data.shape[0], generator=gen)[:256]]
    ab = digits.digits_alphas_cumprod()
    denoiser = digits.digits_denoiser(unet)
    for t, bound in EPS_MSE_BOUNDS.items():
        noise = torch.randn(x0.shape, generator=gen)
        xt = math.sqrt(ab[t]) * x0 + math.sqrt(1 - ab[t]) * noise
        mse = (denoiser(xt, torch.full((x0.shape[0],), t)) - noise).pow(2).mean().item()
        assert mse < bound, f"eps-MSE at t={t} is {mse:.4f}, expected < {bound}"


def test_ddim_samples_are_diverse_digits(unet):
    x = digits.ddim_sample_digits(unet, 16, steps=50, seed=1)
    assert x.shape == (16, *digits.DIGITS_SHAPE) and torch.isfinite(x).all()
    # Mostly inside the data range, with a dark background like the training digits.
    assert (x.abs() <= 1.05).float().mean() > 0.97
    assert (x < -0.8).float().mean() > 0.3
    # Not collapsed to one image: per-pixel std across samples is large.
    assert x.std(dim=0).mean() > 0.3
    # Deterministic given the seed.
    torch.testing.assert_close(digits.ddim_sample_digits(unet, 2, steps=5, seed=1),
                               digits.ddim_sample_digits(unet, 2, steps=5, seed=1))


def test_training_smoke(tmp_path):
    result = digits.train_digits(tmp_path, steps=3, batch_size=8, progress=False)
    assert math.isfinite(result["final_loss"]) and result["final_loss"] > 0
    for name in ("digits_unet.safetensors", "digits_unet.json", "digits_loss.json"):
        assert (tmp_path / name).is_file()
    meta = json.loads((tmp_path / "digits_unet.json").read_text())
    assert meta["training"]["steps"] == 3 and meta["final_loss"] == result["final_loss"]
    assert len(json.loads((tmp_path / "digits_loss.json").read_text())["loss"]) == 3
    reloaded = digits.load_digits_unet(weights_dir=tmp_path)
    x = torch.randn(2, *digits.DIGITS_SHAPE)
    assert digits.digits_denoiser(reloaded)(x, torch.tensor([3, 700])).shape == x.shape


def test_training_is_reproducible(tmp_path):
    a = digits.train_digits(tmp_path / "a", steps=2, batch_size=4, progress=False)
    b = digits.train_digits(tmp_path / "b", steps=2, batch_size=4, progress=False)
    assert a["final_loss"] == b["final_loss"]
