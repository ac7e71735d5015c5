"""Likelihood metrics: the fused Bernoulli kernel, the IS estimator's identities and bounds, and
probabilistic PCA, whose log p(x) is known in closed form."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vaelab.config import ModelConfig
from vaelab.likelihoods import build_likelihood
from vaelab.metrics.fused import LogLikelihoodRunner, bernoulli_log_prob
from vaelab.metrics.likelihood import bits_per_dim, elbo_stats, importance_sampled_log_likelihood
from vaelab.model import VAE, build_model


def _mlp(shape=(1, 6, 6), z=3, seed=0, likelihood="bernoulli"):
    torch.manual_seed(seed)
    cfg = ModelConfig(  # PyTorch's init: a wide posterior, so IS here has modest variance
        arch="mlp", hidden=(16,), latent_dim=z, likelihood=likelihood, init="torch"
    )
    return build_model(cfg, shape).eval()


def _binary(n=12, shape=(1, 6, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, *shape), 0.3), generator=g)


@pytest.mark.parametrize("d", [784, 200, 64, 7])
def test_fused_bernoulli_matches_bce_with_logits(d):
    g = torch.Generator().manual_seed(d)
    logits = torch.randn(3, 40, d, generator=g) * 6
    logits[0, 0, : min(d, 4)] = torch.tensor([80.0, -80.0, 0.0, 1e-4])[: min(d, 4)]
    x = torch.bernoulli(torch.full((3, d), 0.5), generator=g)
    x[2] = torch.rand(d, generator=g)  # grey levels: the same formula applies
    ref = -F.binary_cross_entropy_with_logits(
        logits, x.unsqueeze(1).expand_as(logits), reduction="none"
    ).sum(-1)
    got = bernoulli_log_prob(logits.clone(), x)
    assert torch.allclose(got, ref, rtol=1e-5, atol=2e-3)
    got64 = bernoulli_log_prob(logits.double(), x.double())
    ref64 = -F.binary_cross_entropy_with_logits(
        logits.double(), x.double().unsqueeze(1).expand_as(logits), reduction="none"
    ).sum(-1)
    assert torch.allclose(got64, ref64, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("act", ["relu", "elu", "gelu", "tanh"])
def test_fused_and_generic_paths_agree(act):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="mlp", hidden=(16, 8), latent_dim=3, activation=act)
    model, x = build_model(cfg, (1, 6, 6)).eval(), _binary()
    assert LogLikelihoodRunner(model, torch.float32).path == "mlp-fused"
    est = {
        f: importance_sampled_log_likelihood(model, [x], k=64, seed=0, rows=50, fused=f).log_px
        for f in ("auto", "bernoulli", "none")
    }
    assert torch.allclose(est["auto"], est["none"], atol=1e-4)
    assert torch.allclose(est["bernoulli"], est["none"], atol=1e-4)


def test_workers_do_not_change_the_estimate():
    """Same draws, same chunks: bit for bit when every product runs on one thread (as each
    worker's do); with torch's threads in the one-worker run, MKL may block a product
    differently (seen on an AMD EPYC: 2e-7 nats apart), so that case is checked to 1e-6."""
    model, x = _mlp(), _binary()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = importance_sampled_log_likelihood(model, [x[:5], x[5:]], k=100, seed=3, rows=100)
        two = importance_sampled_log_likelihood(model, [x], k=100, seed=3, rows=100, workers=2)
        assert torch.equal(one.log_px, two.log_px)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    one = importance_sampled_log_likelihood(model, [x[:5], x[5:]], k=100, seed=3, rows=100)
    torch.testing.assert_close(one.log_px, two.log_px, rtol=0, atol=1e-6)


def test_conv_decoder_uses_the_bernoulli_path():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="conv", latent_dim=3, hidden=(4, 4, 4)), (1, 8, 8)).eval()
    assert LogLikelihoodRunner(model, torch.float32).path == "bernoulli-fused"
    x = torch.bernoulli(torch.full((3, 1, 8, 8), 0.4))
    a = importance_sampled_log_likelihood(model, [x], k=30, seed=0, fused="auto").log_px
    b = importance_sampled_log_likelihood(model, [x], k=30, seed=0, fused="none").log_px
    assert torch.allclose(a, b, atol=1e-4)


def test_is_bounds_and_k1_identity():
    model, x = _mlp(), _binary()
    res = importance_sampled_log_likelihood(model, [x], k=200, seed=0)
    # log mean w >= mean log w for every image (Jensen), and ESS lies in [1, k].
    assert torch.all(res.log_px >= res.mean_log_w - 1e-9)
    assert torch.all((res.ess >= 1 - 1e-6) & (res.ess <= 200 + 1e-6))
    one = importance_sampled_log_likelihood(model, [x], k=1, seed=0)
    assert torch.allclose(one.log_px, one.mean_log_w)
    # The IS estimate is above the ELBO (on average over images; Monte Carlo noise per image).
    e = elbo_stats(model, [x], generator=torch.Generator().manual_seed(1))
    assert res.log_px.mean() >= e.elbo.mean()


def test_chunking_bounds_memory_and_keeps_the_estimate():
    """Tiny chunks (3 decoder rows) give the same estimate up to Monte Carlo noise."""
    model, x = _mlp(), _binary(n=4)
    big = importance_sampled_log_likelihood(model, [x], k=3000, seed=0)
    small = importance_sampled_log_likelihood(model, [x], k=3000, seed=1, rows=3)
    assert (big.log_px - small.log_px).abs().max() < 0.1


# ----------------------------------------------------------------------------------- PPCA


class PPCAEncoder(nn.Module):
    """The PPCA posterior: mean M^-1 W^T (x - m), diagonal covariance s^2 M^-1 * inflate."""

    def __init__(self, W, m, s, inflate=1.0):
        super().__init__()
        M = W.T @ W + s**2 * torch.eye(W.shape[1], dtype=W.dtype)
        self.register_buffer("A", torch.linalg.solve(M, W.T))
        self.register_buffer("m", m)
        self.register_buffer(
            "logvar", torch.log(torch.diagonal(s**2 * torch.linalg.inv(M)) * inflate)
        )

    def forward(self, x):
        mu = (x.flatten(1) - self.m) @ self.A.T
        return mu, self.logvar.expand_as(mu)


class PPCADecoder(nn.Module):
    def __init__(self, W, m):
        super().__init__()
        self.register_buffer("W", W)
        self.register_buffer("m", m)

    def forward(self, z):
        return (z @ self.W.T + self.m).view(z.shape[0], 1, 1, -1)


def _ppca(d=10, q=3, s=0.5, inflate=1.0, seed=0):
    """x = W z + m + s eps with orthogonal columns of W, so the true posterior is diagonal."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, q, generator=g, dtype=torch.float64))
    W = Q * torch.tensor([2.0, 1.0, 0.6], dtype=torch.float64)[:q]
    m = torch.randn(d, generator=g, dtype=torch.float64) * 0.3
    lik_head = build_likelihood("gaussian", (1, 1, d), {"sigma": s, "gaussian_link": "identity"})
    model = VAE(PPCAEncoder(W, m, s, inflate), PPCADecoder(W, m), lik_head, q, (1, 1, d)).double()
    cov = W @ W.T + s**2 * torch.eye(d, dtype=torch.float64)
    x = torch.distributions.MultivariateNormal(m, cov).sample((64,))
    exact = torch.distributions.MultivariateNormal(m, cov).log_prob(x)
    return model.eval(), x.view(-1, 1, 1, d), exact


def test_ppca_exact_posterior_gives_exact_log_px_for_any_k():
    """With q(z|x) = p(z|x) every importance weight equals p(x): the estimate is exact."""
    model, x, exact = _ppca()
    res = importance_sampled_log_likelihood(model, [x], k=7, seed=0, rows=5)
    assert torch.allclose(res.log_px, exact, atol=1e-8)


def test_ppca_is_approaches_exact_log_px_and_stays_above_elbo():
    model, x, exact = _ppca(inflate=3.0)  # a wrong (too wide) posterior: a real ELBO gap
    res = importance_sampled_log_likelihood(model, [x], k=5000, seed=0)
    e = elbo_stats(model, [x], generator=torch.Generator().manual_seed(1))
    gap = (exact - res.log_px).abs()
    assert gap.max() < 0.5 and gap.mean() < 0.05
    assert (exact - e.elbo).mean() > 0.5  # the ELBO is visibly below log p(x)
    assert res.log_px.mean() > e.elbo.mean() + 0.4
    assert torch.all(res.log_px >= res.mean_log_w)


def test_bits_per_dim():
    assert bits_per_dim(-784 * math.log(2), 784) == pytest.approx(1.0)
