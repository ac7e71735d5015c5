"""Latent distributions: closed-form KL against known values and Monte Carlo."""

import math

import pytest
import torch

from vaelab.distributions import DiagonalGaussian, StandardNormal


def test_kl_known_values():
    # KL(N(0,1) || N(0,1)) = 0; KL(N(1, 1) || N(0,1)) = 0.5; KL(N(0, e) || N(0,1)) = (e - 1 - 1)/2.
    mu = torch.tensor([[0.0, 1.0, 0.0]])
    logvar = torch.tensor([[0.0, 0.0, 1.0]])
    kl = DiagonalGaussian(mu, logvar).kl_per_dim()
    assert torch.allclose(kl, torch.tensor([[0.0, 0.5, (math.e - 2.0) / 2.0]]))


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    q = DiagonalGaussian(mu, logvar)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, torch.exp(0.5 * logvar)),
        torch.distributions.Normal(0.0, 1.0),
    ).sum(-1)
    assert torch.allclose(q.kl(), ref, atol=1e-5)


def test_kl_closed_form_vs_monte_carlo_within_standard_error():
    g = torch.Generator().manual_seed(1)
    mu, logvar = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g) * 0.5
    q, p = DiagonalGaussian(mu, logvar), StandardNormal(3)
    z = q.rsample(200_000, generator=g)  # (n, B, Z)
    samples = q.log_prob(z) - p.log_prob(z)  # (n, B)
    mc, se = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    assert torch.all((mc - q.kl()).abs() < 4 * se)


def test_log_prob_matches_torch():
    g = torch.Generator().manual_seed(2)
    mu, logvar, z = (torch.randn(6, 4, generator=g) for _ in range(3))
    ref = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    assert torch.allclose(DiagonalGaussian(mu, logvar).log_prob(z), ref, atol=1e-5)
    ref0 = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    assert torch.allclose(StandardNormal(4).log_prob(z), ref0, atol=1e-5)


def test_rsample_is_differentiable_and_has_right_moments():
    mu = torch.tensor([[2.0, -1.0]], requires_grad=True)
    logvar = torch.tensor([[0.0, math.log(4.0)]], requires_grad=True)
    z = DiagonalGaussian(mu, logvar).rsample(100_000, generator=torch.Generator().manual_seed(3))
    z.sum().backward()
    assert mu.grad is not None and logvar.grad is not None
    assert torch.allclose(z.mean((0, 1)), torch.tensor([2.0, -1.0]), atol=0.03)
    assert torch.allclose(z.std((0, 1)), torch.tensor([1.0, 2.0]), atol=0.03)


def test_prior_temperature_scales_std():
    z = StandardNormal(3).sample(
        50_000, temperature=0.5, generator=torch.Generator().manual_seed(4)
    )
    assert z.std().item() == pytest.approx(0.5, abs=0.01)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="differ in shape"):
        DiagonalGaussian(torch.zeros(2, 3), torch.zeros(2, 4))
