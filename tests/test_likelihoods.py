"""Each likelihood's log_prob against torch.distributions or the direct formula."""

import math

import pytest
import torch

from vaelab.likelihoods import LIKELIHOODS, build_likelihood, continuous_bernoulli_log_norm

SHAPE = (2, 3, 4)


def _raw(name, b=5, seed=0):
    lik = build_likelihood(name, SHAPE)
    g = torch.Generator().manual_seed(seed)
    return lik, torch.randn(b, lik.params_per_channel * SHAPE[0], *SHAPE[1:], generator=g) * 2


def test_bernoulli_matches_torch():
    lik, raw = _raw("bernoulli")
    x = torch.bernoulli(torch.full((5, *SHAPE), 0.3), generator=torch.Generator().manual_seed(1))
    ref = torch.distributions.Bernoulli(logits=raw).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(lik(raw).log_prob(x), ref, atol=1e-4)


def test_bernoulli_is_stable_for_extreme_logits():
    lik = build_likelihood("bernoulli", (1, 1, 2))
    raw = torch.tensor([[[[200.0, -200.0]]]])
    lp = lik(raw).log_prob(torch.tensor([[[[1.0, 0.0]]]]))
    assert torch.isfinite(lp).all() and lp.abs().item() < 1e-6


def test_gaussian_fixed_matches_torch_including_constant():
    lik = build_likelihood("gaussian", SHAPE, {"sigma": 0.5, "gaussian_link": "identity"})
    _, raw = _raw("gaussian")
    x = torch.rand(5, *SHAPE)
    ref = torch.distributions.Normal(raw, 0.5).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(lik(raw).log_prob(x), ref, atol=1e-4)


def test_gaussian_sigmoid_link():
    lik = build_likelihood("gaussian", SHAPE)
    _, raw = _raw("gaussian")
    assert torch.allclose(lik(raw).mean, torch.sigmoid(raw))


def test_gaussian_learned_pixel_matches_torch_and_respects_floor():
    lik = build_likelihood(
        "gaussian-pixel", SHAPE, {"sigma_floor": 0.01, "gaussian_link": "identity"}
    )
    _, raw = _raw("gaussian-pixel")
    loc, log_sigma = raw.split(SHAPE[0], dim=1)
    p = lik(raw)
    assert torch.all(p.log_sigma >= math.log(0.01) - 1e-6)
    x = torch.rand(5, *SHAPE)
    ref = torch.distributions.Normal(loc, torch.exp(p.log_sigma)).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(p.log_prob(x), ref, atol=1e-3)
    # Far below the floor, sigma sits at the floor.
    very_small = lik(torch.cat([loc, torch.full_like(log_sigma, -30.0)], 1))
    assert torch.allclose(
        very_small.log_sigma, torch.full_like(log_sigma, math.log(0.01)), atol=1e-4
    )


def test_gaussian_learned_channel_has_one_parameter_per_channel():
    lik = build_likelihood("gaussian-channel", SHAPE, {"sigma": 0.2})
    assert lik.log_sigma.shape == (1, SHAPE[0], 1, 1)
    raw = torch.zeros(1, *SHAPE)
    assert torch.allclose(lik(raw).log_sigma, torch.full((1, 2, 1, 1), math.log(0.2)), atol=1e-3)


def test_continuous_bernoulli_matches_torch():
    lik, raw = _raw("continuous-bernoulli")
    raw = torch.cat([raw, torch.zeros(1, *raw.shape[1:]), torch.full((1, *raw.shape[1:]), 1e-3)])
    x = torch.rand(raw.shape[0], *SHAPE)
    ref = torch.distributions.ContinuousBernoulli(logits=raw).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(lik(raw).log_prob(x), ref, atol=1e-3)
    ref_mean = torch.distributions.ContinuousBernoulli(logits=raw).mean
    assert torch.allclose(lik(raw).mean, ref_mean, atol=1e-4)


def test_continuous_bernoulli_density_integrates_to_one():
    logits = torch.tensor([-5.0, -0.3, 0.0, 0.004, 2.0])
    x = torch.linspace(0, 1, 20001)[:, None]
    dens = torch.exp(
        -torch.nn.functional.binary_cross_entropy_with_logits(
            logits.expand(len(x), -1), x.expand(-1, 5), reduction="none"
        )
        + continuous_bernoulli_log_norm(logits)
    )
    integral = torch.trapezoid(dens, x[:, 0], dim=0)
    assert torch.allclose(integral, torch.ones(5), atol=1e-4)


def test_discretized_logistic_bins_sum_to_one():
    lik = build_likelihood("discretized-logistic", (1, 1, 1))
    for loc, log_scale in [(0.0, -2.0), (0.9, -4.0), (-1.2, 0.5), (0.3, -7.0)]:
        raw = torch.tensor([loc, log_scale]).view(1, 2, 1, 1).expand(256, 2, 1, 1)
        x = (torch.arange(256.0) / 255.0).view(256, 1, 1, 1)
        total = torch.exp(lik(raw).log_prob(x)).sum()
        assert total.item() == pytest.approx(1.0, abs=1e-4)


def test_discretized_logistic_matches_direct_formula_interior_bin():
    lik = build_likelihood("discretized-logistic", (1, 1, 1))
    loc, log_scale, k = 0.1, -2.5, 140
    raw = torch.tensor([loc, log_scale]).view(1, 2, 1, 1)
    x = torch.tensor(k / 255.0).view(1, 1, 1, 1)
    s = math.exp(log_scale)
    v = 2 * k / 255 - 1

    def sig(t):
        return 1 / (1 + math.exp(-t))

    direct = math.log(sig((v + 1 / 255 - loc) / s) - sig((v - 1 / 255 - loc) / s))
    assert lik(raw).log_prob(x).item() == pytest.approx(direct, abs=1e-4)


@pytest.mark.parametrize("name", LIKELIHOODS.names())
def test_every_likelihood_samples_and_means_in_range(name):
    lik, raw = _raw(name)
    p = lik(raw)
    s = p.sample(generator=torch.Generator().manual_seed(0))
    assert s.shape == (5, *SHAPE) and p.mean.shape == (5, *SHAPE)
    if name != "gaussian" and not name.startswith("gaussian"):
        assert s.min() >= 0 and s.max() <= 1
    assert torch.isfinite(p.log_prob(torch.rand(5, *SHAPE).round())).all()


def test_wrong_channel_count_is_a_clear_error():
    lik = build_likelihood("gaussian-pixel", SHAPE)
    with pytest.raises(ValueError, match="needs 4 decoder channels"):
        lik(torch.zeros(1, 3, 3, 4))


def test_unknown_likelihood_lists_choices():
    with pytest.raises(ValueError, match="bernoulli"):
        build_likelihood("poisson", SHAPE)


def test_properness_flags():
    assert not build_likelihood("bernoulli", SHAPE).is_proper("continuous")
    assert build_likelihood("bernoulli", SHAPE).is_proper("binary")
    assert build_likelihood("discretized-logistic", SHAPE).is_proper("8bit")
