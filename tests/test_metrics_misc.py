"""Reconstruction (MSE, PSNR, SSIM), active units, the linear probe and parameter counts."""

import numpy as np
import pytest
import torch
from torch import nn

from vaelab.config import ModelConfig
from vaelab.likelihoods import build_likelihood
from vaelab.metrics.active_units import active_units, active_units_from_means
from vaelab.metrics.params import parameter_counts
from vaelab.metrics.probe import linear_probe
from vaelab.metrics.reconstruction import (
    mse_per_image,
    psnr_from_mse,
    ssim,
    ssim_settings,
    ssim_torch,
)
from vaelab.model import VAE, build_model

skimage_metrics = pytest.importorskip("skimage.metrics")


# -------------------------------------------------------------------------- reconstruction


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
def test_ssim_of_an_image_with_itself_is_one(shape):
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))


def test_ssim_is_scikit_image_with_wang_settings():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 28, 28, generator=g)
    y = (x + 0.2 * torch.randn(2, 1, 28, 28, generator=g)).clamp(0, 1)
    want = skimage_metrics.structural_similarity(
        x[1, 0].double().numpy(),
        y[1, 0].double().numpy(),
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    got = ssim(x, y)
    assert got[1].item() == pytest.approx(want, rel=1e-12)
    assert 0 < got[1] < 1
    kw, desc = ssim_settings(8, 8)
    assert kw["win_size"] == 7 and "uniform" in desc


@pytest.mark.parametrize(
    "shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8), (3, 11, 13), (1, 5, 6)], ids=str
)
def test_ssim_torch_is_the_scikit_image_ssim(shape):
    """Both window kinds (Gaussian from 11x11, uniform below) and odd sizes, to 1e-12."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, *shape, generator=g)
    y = (x + 0.2 * torch.randn(6, *shape, generator=g)).clamp(0, 1)
    got = ssim_torch(x, y)
    assert got.dtype == torch.float64 and got.shape == (6,)
    torch.testing.assert_close(got, ssim(x, y), atol=1e-12, rtol=0)
    assert torch.allclose(ssim_torch(x, x), torch.ones(6, dtype=torch.float64))


def test_mse_and_psnr():
    x = torch.zeros(2, 1, 4, 4)
    y = torch.full((2, 1, 4, 4), 0.1)
    y[1] = 0.0
    mse = mse_per_image(x, y)
    assert torch.allclose(mse, torch.tensor([0.01, 0.0], dtype=torch.float64))
    psnr = psnr_from_mse(mse)
    assert psnr[0].item() == pytest.approx(20.0) and psnr[1].item() == pytest.approx(100.0)


# ---------------------------------------------------------------------------- active units


class PartlyDeadEncoder(nn.Module):
    """mu: the first ``live`` dims follow the input; the others are constant (collapsed)."""

    def __init__(self, d_in, latent, live):
        super().__init__()
        self.proj = nn.Linear(d_in, live)
        self.latent, self.live = latent, live

    def forward(self, x):
        h = self.proj(x.flatten(1)) * 3.0
        dead = torch.full((x.shape[0], self.latent - self.live), 0.7)
        dead[:, 0] += 0.05 * x.flatten(1)[:, 0]  # tiny variation, far below the 0.01 threshold
        mu = torch.cat([h, dead], 1)
        return mu, torch.zeros_like(mu)


def test_active_units_counts_known_dead_dimensions():
    torch.manual_seed(0)
    shape = (1, 4, 4)
    model = VAE(
        PartlyDeadEncoder(16, 6, 4),
        nn.Sequential(nn.Linear(6, 16), nn.Unflatten(1, shape)),
        build_likelihood("bernoulli", shape),
        6,
        shape,
    )
    x = torch.rand(500, *shape)
    au = active_units(model, [x[:200], x[200:]])
    assert au.count == 4
    assert au.active.tolist() == [True] * 4 + [False] * 2
    assert torch.all(au.variances[4:] < 0.01)


def test_active_units_threshold_is_on_variance():
    mu = torch.stack([torch.tensor([0.0, 1.0] * 50), torch.tensor([0.0, 0.1] * 50)], 1)
    # variances: ~0.2525 and ~0.002525
    assert active_units_from_means(mu).count == 1
    assert active_units_from_means(mu, threshold=0.001).count == 2


# ----------------------------------------------------------------------------------- probe


def test_probe_reaches_one_on_linearly_separable_latents():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 8, generator=g) * 10
    y = torch.randint(0, 5, (600,), generator=g)
    z = centers[y] + torch.randn(600, 8, generator=g)
    res = linear_probe(z[:400], y[:400], z[400:], y[400:])
    assert res.accuracy >= 0.99
    assert 0.1 < res.chance[0] < 0.5


def test_probe_on_attribute_columns_averages_and_skips_constants():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(400, 3, generator=g)
    y = torch.stack([(z[:, 0] > 0).long(), (z[:, 1] > 0).long(), torch.zeros(400).long()], 1)
    res = linear_probe(z[:300], y[:300], z[300:], y[300:])
    assert res.skipped == [2] and len(res.per_column) == 2
    assert res.accuracy > 0.95
    with pytest.raises(ValueError, match="labels"):
        linear_probe(z[:10], y[:9], z, y)


# ---------------------------------------------------------------------------------- params


def test_parameter_counts_add_up():
    model = build_model(
        ModelConfig(arch="mlp", hidden=(400,), latent_dim=20, likelihood="gaussian-channel"),
        (1, 28, 28),
    )
    c = parameter_counts(model)
    # 784-400-(2x20) encoder, 20-400-784 decoder, one learned sigma.
    assert c["encoder"] == 784 * 400 + 400 + 400 * 40 + 40
    assert c["decoder"] == 20 * 400 + 400 + 400 * 784 + 784
    assert c["likelihood"] == 1
    assert c["total"] == c["encoder"] + c["decoder"] + c["likelihood"]
    assert np.isclose(sum(v for k, v in c.items() if k != "total"), c["total"])


def test_ssim_is_skipped_with_a_note_without_scikit_image(monkeypatch):
    from vaelab.data import load_dataset
    from vaelab.evaluate import evaluate
    from vaelab.metrics import reconstruction

    monkeypatch.setattr(reconstruction, "have_skimage", lambda: False)
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="mlp", hidden=(8,), latent_dim=2), (1, 8, 8))
    rep = evaluate(
        model, load_dataset("digits"), metrics="reconstruction", max_images=20, progress=False
    )
    assert rep.value("recon.ssim") is None and "scikit-image" in rep.get("recon.ssim").notes[0]
    assert rep.value("recon.mse") > 0
