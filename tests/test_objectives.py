"""Objectives: bounds, identities, batch-size invariance, beta, and the PPCA exact answer."""

import math

import pytest
import torch

from vaelab.config import ModelConfig, ObjectiveConfig
from vaelab.model import build_model
from vaelab.objectives import (
    beta_schedule,
    capacity_schedule,
    compute_objective,
    cyclical_warmup,
    elbo,
    iwae,
    linear_warmup,
)


def _small_model(seed=0, shape=(1, 4, 4), likelihood="bernoulli"):
    torch.manual_seed(seed)
    return build_model(
        ModelConfig(arch="mlp", hidden=(16,), latent_dim=3, likelihood=likelihood), shape
    ).eval()


def _binary(b=8, shape=(1, 4, 4), seed=0):
    return torch.bernoulli(
        torch.full((b, *shape), 0.4), generator=torch.Generator().manual_seed(seed)
    )


# ------------------------------------------------------------------------------- PPCA


def _ppca_model(W, m, s, rotation=None):
    """A linear-Gaussian vaelab VAE holding the PPCA generative model x = W z + m + s eps and a
    diagonal posterior with the exact mean and the exact marginal variances diag(s^2 M^-1).
    (Marginal variances are wider than the reverse-KL optimum, so importance weights stay bounded
    and the IWAE estimate converges quickly.)"""
    d, q = W.shape
    model = (
        build_model(
            ModelConfig(
                arch="linear",
                latent_dim=q,
                likelihood="gaussian",
                sigma=s,
                gaussian_link="identity",
            ),
            (1, 1, d),
        )
        .double()
        .eval()
    )
    M = W.T @ W + s**2 * torch.eye(q, dtype=W.dtype)
    A = torch.linalg.solve(M, W.T)  # posterior mean = A (x - m)
    posterior_cov = s**2 * torch.linalg.inv(M)
    with torch.no_grad():
        model.decoder[0].weight.copy_(W)
        model.decoder[0].bias.copy_(m)
        heads = model.encoder.heads.linear
        heads.weight.zero_()
        heads.weight[:q] = A
        heads.bias[:q] = -A @ m
        heads.bias[q:] = torch.log(torch.diagonal(posterior_cov))
    return model


def _ppca_ml_fit(x, q, rotation):
    """Tipping & Bishop (1999) closed-form maximum-likelihood PPCA: W = U_q (L_q - s^2 I)^1/2 R."""
    m = x.mean(0)
    S = torch.cov(x.T, correction=0)
    evals, evecs = torch.linalg.eigh(S)
    evals, evecs = evals.flip(0), evecs.flip(1)
    s2 = evals[q:].mean()
    W = evecs[:, :q] @ torch.diag(torch.sqrt(evals[:q] - s2)) @ rotation
    return W, m, math.sqrt(s2.item())


@pytest.fixture(scope="module")
def ppca_data():
    g = torch.Generator().manual_seed(0)
    d, q = 8, 3
    # Unequal signal strengths: the rotated ML solution then has a strongly correlated posterior.
    scales = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    W_true = torch.randn(d, q, generator=g, dtype=torch.float64) * scales
    z = torch.randn(2000, q, generator=g, dtype=torch.float64)
    x = z @ W_true.T + 0.3 + 0.4 * torch.randn(2000, d, generator=g, dtype=torch.float64)
    return x, q


@pytest.mark.parametrize("rotate", [False, True])
def test_ppca_iwae_reaches_exact_log_likelihood_and_elbo_stays_below(ppca_data, rotate):
    x, q = ppca_data
    R = torch.eye(q, dtype=torch.float64)
    if rotate:  # any rotation is also an ML solution, but then the true posterior is not diagonal
        R = torch.linalg.qr(
            torch.randn(q, q, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        )[0]
    W, m, s = _ppca_ml_fit(x, q, R)
    model = _ppca_model(W, m, s)
    cov = W @ W.T + s**2 * torch.eye(W.shape[0], dtype=torch.float64)
    test = x[:64]
    exact = torch.distributions.MultivariateNormal(m, cov).log_prob(test)
    xi = test.view(-1, 1, 1, W.shape[0])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        e = elbo(model, xi, n_samples=5000, generator=g).elbo
        bound = iwae(model, xi, k=5000, generator=g).bound
    assert (bound - exact).abs().max().item() < 0.5
    assert (bound - exact).abs().mean().item() < 0.05
    # ELBO below log p(x) and below the IWAE bound, up to Monte Carlo error (5000 samples).
    assert torch.all(e <= exact + 0.15) and e.mean() <= exact.mean() + 0.02
    assert torch.all(bound >= e - 0.15) and bound.mean() >= e.mean() - 0.02
    if rotate:  # mean-field posterior of a correlated true posterior: a real gap IWAE closes
        assert (exact - e).mean().item() > 0.5
        assert (exact - bound).mean().item() < 0.1 * (exact - e).mean().item()
    else:  # the true posterior is exactly diagonal: the ELBO is tight
        assert (exact - e).mean().abs().item() < 0.02


# ------------------------------------------------------------------------ identities


def test_iwae_k1_equals_single_sample_elbo_for_same_noise():
    model, x = _small_model(), _binary()
    with torch.no_grad():
        a = iwae(model, x, k=1, generator=torch.Generator().manual_seed(3)).bound
        b = elbo(model, x, analytic_kl=False, generator=torch.Generator().manual_seed(3)).elbo
    assert torch.allclose(a, b, atol=1e-5)


def test_iwae_bound_grows_with_k():
    model, x = _small_model(), _binary(b=32)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        means = [
            torch.stack([iwae(model, x, k=k, generator=g).bound.mean() for _ in range(20)]).mean()
            for k in (1, 5, 50)
        ]
    assert means[0] < means[1] < means[2]


def test_loss_does_not_depend_on_batch_size():
    model, x = _small_model(), _binary(b=8)
    with torch.no_grad():  # a near-deterministic posterior makes the loss exactly comparable
        model.encoder.heads.linear.bias[3:] = -40.0
        model.encoder.heads.linear.weight[3:] = 0.0
        full = elbo(model, x).loss
        halves = (elbo(model, x[:4]).loss + elbo(model, x[4:]).loss) / 2
        repeated = elbo(model, x.repeat(3, 1, 1, 1)).loss
    assert full.item() == pytest.approx(halves.item(), rel=1e-5)
    assert full.item() == pytest.approx(repeated.item(), rel=1e-5)


def test_beta_changes_loss_never_elbo():
    model, x = _small_model(), _binary()
    outs = [elbo(model, x, beta=b, generator=torch.Generator().manual_seed(0)) for b in (1.0, 4.0)]
    assert torch.allclose(outs[0].elbo, outs[1].elbo)
    assert outs[1].loss > outs[0].loss
    assert outs[0].loss.item() == pytest.approx(-outs[0].elbo.mean().item(), rel=1e-5)
    kl = outs[0].kl.mean()
    assert (outs[1].loss - outs[0].loss).item() == pytest.approx(3 * kl.item(), rel=1e-4)


def test_capacity_and_free_bits_losses():
    model, x = _small_model(), _binary()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    base = elbo(model, x, generator=g())
    cap = elbo(model, x, capacity=2.0, gamma=10.0, generator=g())
    expected = (-base.log_px_z + 10.0 * (base.kl - 2.0).abs()).mean()
    assert cap.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(cap.elbo, base.elbo)
    fb = elbo(model, x, free_bits=5.0, generator=g())
    per_dim = base.kl_per_dim.mean(0)
    assert fb.loss.item() == pytest.approx(
        (-base.log_px_z.mean() + torch.clamp(per_dim, min=5.0).sum()).item(), rel=1e-5
    )


def test_multi_sample_elbo_reduces_variance():
    model, x = _small_model(), _binary(b=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        one = torch.stack([elbo(model, x, generator=g).elbo for _ in range(200)])
        many = torch.stack([elbo(model, x, n_samples=10, generator=g).elbo for _ in range(200)])
    assert (many.var(0) < one.var(0)).all()
    assert torch.allclose(one.mean(0), many.mean(0), atol=3 * one.std(0).max().item() / 10)


def test_gradients_flow_through_iwae():
    model, x = _small_model(), _binary()
    model.train()
    iwae(model, x, k=5).loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)


def test_bad_sample_counts_raise():
    model, x = _small_model(), _binary()
    with pytest.raises(ValueError, match="n_samples"):
        elbo(model, x, n_samples=0)
    with pytest.raises(ValueError, match="k must be"):
        iwae(model, x, k=0)


# -------------------------------------------------------------------------- schedules


def test_linear_and_cyclical_warmup():
    assert linear_warmup(0, 100) == 0.0 and linear_warmup(50, 100) == 0.5
    assert linear_warmup(500, 100) == 1.0 and linear_warmup(3, 0) == 1.0
    # 4 cycles over 400 steps, rising over the first half of each.
    assert cyclical_warmup(0, 400, 4, 0.5) == 0.0
    assert cyclical_warmup(25, 400, 4, 0.5) == 0.5
    assert cyclical_warmup(75, 400, 4, 0.5) == 1.0
    assert cyclical_warmup(100, 400, 4, 0.5) == 0.0


def test_beta_and_capacity_schedules():
    cfg = ObjectiveConfig(
        beta=4.0, warmup="linear", warmup_steps=10, capacity=25.0, capacity_steps=100
    )
    assert beta_schedule(5, cfg, 1000) == 2.0
    assert capacity_schedule(50, cfg) == 12.5 and capacity_schedule(500, cfg) == 25.0
    assert capacity_schedule(5, ObjectiveConfig()) is None
    with pytest.raises(ValueError, match="warmup"):
        beta_schedule(0, ObjectiveConfig(warmup="sigmoid"), 10)


def test_compute_objective_dispatch():
    model, x = _small_model(), _binary()
    out = compute_objective(model, x, ObjectiveConfig(name="iwae", k=3))
    assert out.bound.shape == (8,)
    out = compute_objective(
        model, x, ObjectiveConfig(beta=2.0, warmup="linear", warmup_steps=4), step=2
    )
    assert out.beta == 1.0


def test_explicit_noise_matches_generator_noise():
    model, x = _small_model(), _binary()
    eps = torch.randn(2, 8, 3, generator=torch.Generator().manual_seed(9))
    a = elbo(model, x, n_samples=2, eps=eps).elbo
    b = elbo(model, x, n_samples=2, generator=torch.Generator().manual_seed(9)).elbo
    assert torch.allclose(a, b)
    with pytest.raises(ValueError, match="eps has shape"):
        elbo(model, x, eps=torch.zeros(1, 4, 3))
