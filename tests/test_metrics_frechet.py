"""Frechet distance: closed form for Gaussians, scipy's sqrtm formula, self-distance, and the
sufficient statistics that add up across batches."""

import numpy as np
import pytest
import scipy.linalg
import torch

from vaelab.metrics.frechet import (
    FeatureStats,
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
)


def _scipy_fd(mu1, s1, mu2, s2):
    """pytorch-fid's formula: |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def _random_cov(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_closed_form_for_diagonal_gaussians():
    # For commuting covariances, d^2 = |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(
        expected, rel=1e-12
    )


@pytest.mark.parametrize("d", [2, 16, 64])
def test_matches_scipy_sqrtm_formula(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_cov(d, rng), _random_cov(d, rng)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        _scipy_fd(mu1, s1, mu2, s2), rel=1e-8
    )


def test_singular_covariances_are_handled():
    """Rank-deficient covariances (fewer samples than features) need no eps offset."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 20)), rng.standard_normal((5, 20))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    d = frechet_distance(a.mean(0), s1, b.mean(0), s2)
    assert np.isfinite(d) and d > 0
    assert d == pytest.approx(_scipy_fd(a.mean(0), s1, b.mean(0), s2), rel=1e-5)


def test_self_distance_is_zero_and_stats_match_numpy():
    rng = np.random.default_rng(1)
    feats = torch.from_numpy(rng.standard_normal((500, 32)) * 3 + 1)
    st = FeatureStats.of(feats)
    mu, cov = st.mean_cov()
    assert np.allclose(mu, feats.numpy().mean(0))
    assert np.allclose(cov, np.cov(feats.numpy(), rowvar=False))
    assert frechet_distance_from_stats(st, st) == pytest.approx(0.0, abs=1e-9)


def test_stats_add_up_across_batches():
    feats = torch.randn(300, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole = FeatureStats.of(feats)
    parts = FeatureStats.of(feats[:100]).merge(FeatureStats.of(feats[100:250]))
    parts = parts.merge(FeatureStats.empty(8).update(feats[250:]))
    assert parts.count == whole.count
    assert torch.allclose(parts.sum, whole.sum) and torch.allclose(parts.outer, whole.outer)


def test_sample_estimate_approaches_the_gaussian_closed_form():
    g = torch.Generator().manual_seed(0)
    d, n = 4, 200_000
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64) * 2.0 + 0.5
    expected = d * 0.5**2 + d * (1.0 - 2.0) ** 2  # |mu diff|^2 + sum (sigma1 - sigma2)^2
    got = frechet_distance_from_stats(FeatureStats.of(a), FeatureStats.of(b))
    assert got == pytest.approx(expected, rel=0.02)


def test_feature_stats_over_batches_and_errors():
    net = torch.nn.Flatten()
    x = torch.rand(10, 1, 2, 2)
    st = feature_stats(net, [x[:4], x[4:]], batch_size=3)
    assert st.count == 10 and torch.allclose(st.sum, x.flatten(1).double().sum(0))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.of(torch.zeros(1, 3)).mean_cov()
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
