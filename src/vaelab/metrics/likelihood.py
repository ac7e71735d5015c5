"""The ELBO with its terms, and the importance-sampled log-likelihood (Burda et al. 2015).

Units: nats per image (summed over pixels), and bits/dim = -(nats) / (D ln 2) with D = C*H*W.

:func:`importance_sampled_log_likelihood` estimates

    log p(x) ~= log (1/k) sum_{i=1..k} p(x|z_i) p(z_i) / q(z_i|x),   z_i ~ q(z|x)

(Burda et al. 2015, eq. 8 evaluated with large k). It encodes each image once, draws the k
samples in chunks of at most ``rows`` decoder rows (images x samples), and folds every chunk into
a running logsumexp, so memory is bounded by ``rows`` whatever k is. For a Bernoulli decoder the
per-pixel work is fused (see :func:`bernoulli_log_prob`): the decoder's matrix products are then
most of the cost.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from vaelab.metrics.base import METRICS, EvalContext, mean_and_stderr

LN2 = math.log(2.0)
# Decoder rows (images x samples) per chunk: big enough for efficient matrix products, small
# enough that a (rows, D) block of logits stays in cache for the per-pixel passes.
DEFAULT_ROWS = 2048
# Products of this many factors in [1/2, 1) stay above float32's smallest normal (2^-126).
_GROUP = 112


def bits_per_dim(nats: float, num_dims: int) -> float:
    """-nats / (D ln 2): a log-likelihood in nats per image as a NLL in bits per dimension."""
    return -nats / (num_dims * LN2)


# ----------------------------------------------------------------------------------- ELBO


@dataclass
class ElboStats:
    """Per-image single-sample ELBO terms over a data pass (all (N,) float64 nats, CPU)."""

    elbo: torch.Tensor
    log_px_z: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor  # (Z,) mean over images


@torch.inference_mode()
def elbo_stats(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    batch_size: int = 1000,
) -> ElboStats:
    """The true ELBO (beta = 1, one sampled z per image, analytic KL) over ``batches``.

    Uses :func:`vaelab.objectives.elbo`, the same function training logs, so evaluation and
    training agree by construction.
    """
    from vaelab.objectives import elbo

    parts: dict[str, list[torch.Tensor]] = {"elbo": [], "log_px_z": [], "kl": []}
    kl_dim_sum, n = None, 0
    for batch in batches:
        for x in batch.split(batch_size):
            out = elbo(model, x, generator=generator)
            parts["elbo"].append(out.elbo.double().cpu())
            parts["log_px_z"].append(out.log_px_z.double().cpu())
            parts["kl"].append(out.kl.double().cpu())
            s = out.kl_per_dim.double().sum(0).cpu()
            kl_dim_sum = s if kl_dim_sum is None else kl_dim_sum + s
            n += x.shape[0]
    if n == 0:
        raise ValueError("elbo_stats got no images")
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return ElboStats(cat["elbo"], cat["log_px_z"], cat["kl"], kl_dim_sum / n)


# ------------------------------------------------------------------ importance sampling


@dataclass
class ISResult:
    """Importance-sampled log p(x) per image.

    Attributes:
        log_px: (N,) float64 nats, log (1/k) sum_i w_i.
        mean_log_w: (N,) float64 nats, (1/k) sum_i log w_i: a k-sample ELBO estimate from the
            same draws (always <= ``log_px``, by Jensen's inequality).
        ess: (N,) effective sample size (sum w)^2 / sum w^2, between 1 and k.
        k: importance samples per image.
        seconds: wall time.
    """

    log_px: torch.Tensor
    mean_log_w: torch.Tensor
    ess: torch.Tensor
    k: int
    seconds: float

    @property
    def mean(self) -> float:
        return mean_and_stderr(self.log_px)[0]

    @property
    def stderr(self) -> float | None:
        return mean_and_stderr(self.log_px)[1]


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x|z) = sum_d [x_d l_d - softplus(l_d)] for logits (B, n, D) and images x (B, D).

    Returns (B, n) nats. Fused for speed, using softplus(l) = (l + |l|)/2 - log sigmoid(|l|):

        log p(x|z) = (x - 1/2) . l  -  (1/2) sum_d |l_d|  +  sum_d log sigmoid(|l_d|)

    The dot product is one batched matrix-vector product, and the last sum takes the log of
    products of 112 factors in [1/2, 1) (no underflow in float32), so the per-pixel work is
    |.|, a sum and a sigmoid instead of exp and log per pixel. ``logits`` is overwritten.
    """
    if logits.dim() != 3 or x.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(
            f"expected logits (B, n, D) and x (B, D), got {tuple(logits.shape)} and {tuple(x.shape)}"
        )
    xl = torch.bmm(logits, (x - 0.5).unsqueeze(-1)).squeeze(-1)  # (B, n)
    a = logits.abs_()
    abs_sum = a.sum(-1)
    torch.sigmoid(a, out=a)
    return xl - 0.5 * abs_sum + _sum_log_groups(a)


def _sum_log_groups(a: torch.Tensor) -> torch.Tensor:
    """sum_d log a_d over the last dim for a_d in [1/2, 1], as logs of products of 112 factors."""
    d = a.shape[-1]
    full = d // _GROUP * _GROUP
    out = a[..., :full].unflatten(-1, (full // _GROUP, _GROUP)).prod(-1).log_().sum(-1)
    if full < d:
        out = out + a[..., full:].prod(-1).log_()
    return out


def _fast_bernoulli(model: nn.Module, dtype: torch.dtype) -> bool:
    from vaelab.likelihoods import Bernoulli

    return type(model.likelihood) is Bernoulli and dtype in (torch.float32, torch.float64)


def _log_px_z(model: nn.Module, z: torch.Tensor, x: torch.Tensor, fast: bool) -> torch.Tensor:
    """log p(x|z) for latents z (B, n, Z) and images x (B, C, H, W): (B, n) nats."""
    b, n, zdim = z.shape
    raw = model.decoder(z.reshape(b * n, zdim))
    if fast:
        return bernoulli_log_prob(raw.reshape(b, n, -1), x.reshape(b, -1))
    x_rep = x.unsqueeze(1).expand(b, n, *x.shape[1:]).reshape(b * n, *x.shape[1:])
    return model.likelihood(raw).log_prob(x_rep).view(b, n)


@torch.inference_mode()
def importance_sampled_log_likelihood(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    k: int = 1000,
    generator: torch.Generator | None = None,
    rows: int = DEFAULT_ROWS,
    progress: bool = False,
    total: int | None = None,
) -> ISResult:
    """Importance-sampled log p(x) for every image of ``batches`` (Burda et al. 2015).

    Args:
        model: a :class:`vaelab.model.VAE` (put in eval mode by the caller).
        batches: float images (B, C, H, W) in [0, 1], on the model's device.
        k: importance samples per image (1000 is the usual; 5000 for paper tables).
        generator: for the draws z = mu + sigma * eps.
        rows: decoder rows (images x samples) per chunk; bounds memory at about
            ``rows * D`` floats whatever k is.
        progress: show a tqdm bar over images (``total`` images expected).

    Returns:
        :class:`ISResult` with per-image estimates.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    from tqdm import tqdm

    start = time.perf_counter()
    out_lp, out_mean, out_ess = [], [], []
    with tqdm(total=total, unit="img", desc=f"log p(x), k={k}", disable=not progress) as bar:
        for batch in batches:
            q_z = model.encode(batch)
            std = torch.exp(0.5 * q_z.logvar)
            fast = _fast_bernoulli(model, q_z.mu.dtype)
            per_chunk = max(1, rows // k)  # images per chunk
            for i in range(0, batch.shape[0], per_chunk):
                sl = slice(i, i + per_chunk)
                lp, mlw, ess = _is_chunk(
                    model, batch[sl], q_z.mu[sl], std[sl], q_z.logvar[sl], k, rows, generator, fast
                )
                out_lp.append(lp)
                out_mean.append(mlw)
                out_ess.append(ess)
                bar.update(lp.shape[0])
    if not out_lp:
        raise ValueError("importance_sampled_log_likelihood got no images")
    return ISResult(
        torch.cat(out_lp), torch.cat(out_mean), torch.cat(out_ess), k, time.perf_counter() - start
    )


def _is_chunk(model, x, mu, std, logvar, k, rows, generator, fast):
    """k importance samples for a few images; returns (log_px, mean_log_w, ess), each (b,)."""
    b, zdim = mu.shape
    n_per = max(1, min(k, rows // b))  # samples per sub-chunk
    # log p(z) - log q(z|x) = -|z|^2/2 + |eps|^2/2 + sum(logvar)/2 (the 2 pi terms cancel).
    half_logdet = 0.5 * logvar.sum(-1, keepdim=True)
    m = torch.full((b,), -math.inf, dtype=torch.float64, device=mu.device)
    s = torch.zeros(b, dtype=torch.float64, device=mu.device)
    s2 = torch.zeros_like(s)
    total = torch.zeros_like(s)
    for start in range(0, k, n_per):
        n = min(n_per, k - start)
        eps = torch.randn(b, n, zdim, generator=generator, device=mu.device, dtype=mu.dtype)
        z = torch.addcmul(mu.unsqueeze(1), std.unsqueeze(1), eps)  # (b, n, Z)
        log_w = _log_px_z(model, z, x, fast)
        log_w += 0.5 * (eps.square().sum(-1) - z.square().sum(-1)) + half_logdet
        lw = log_w.double()
        new_m = torch.maximum(m, lw.max(1).values)
        shift = torch.exp(m - new_m)
        e = torch.exp(lw - new_m.unsqueeze(1))
        s = s * shift + e.sum(1)
        s2 = s2 * shift * shift + e.square().sum(1)
        total += lw.sum(1)
        m = new_m
    log_px = m + torch.log(s) - math.log(k)
    return log_px.cpu(), (total / k).cpu(), (s * s / s2).cpu()


# ------------------------------------------------------------------------- registered


def _kind_note(ctx: EvalContext) -> tuple[str, ...]:
    return ctx.likelihood_notes()


@METRICS.register("elbo")
def elbo_metric(ctx: EvalContext) -> list:
    """ELBO (beta = 1, one sampled z) in nats/image and bits/dim, its terms and KL per dimension."""
    stats = elbo_stats(
        ctx.model, ctx.batches(), generator=ctx.generator("elbo"), batch_size=ctx.batch_size
    )
    d = ctx.info.num_pixels
    notes = _kind_note(ctx)
    est = (
        "single-sample ELBO: log p(x|z) - KL(q(z|x) || p(z)), one z ~ q(z|x), analytic KL, beta = 1"
    )
    mean, se = mean_and_stderr(stats.elbo)
    rec, rec_se = mean_and_stderr(stats.log_px_z)
    kl, kl_se = mean_and_stderr(stats.kl)
    return [
        ctx.label("elbo", mean, "nats/image", est, k=1, stderr=se, notes=notes),
        ctx.label(
            "elbo.bits_per_dim",
            bits_per_dim(mean, d),
            "bits/dim",
            f"-ELBO / (D ln 2), D = {d}",
            k=1,
            stderr=None if se is None else se / (d * LN2),
            notes=notes,
        ),
        ctx.label(
            "elbo.reconstruction",
            rec,
            "nats/image",
            "E_q[log p(x|z)] with one z ~ q(z|x)",
            k=1,
            stderr=rec_se,
            notes=notes,
        ),
        ctx.label(
            "elbo.kl",
            kl,
            "nats/image",
            "KL(q(z|x) || N(0, I)), closed form; extra.per_dim: mean KL of each latent dimension",
            stderr=kl_se,
            extra={"per_dim": [round(v, 6) for v in stats.kl_per_dim.tolist()]},
        ),
    ]


@METRICS.register("loglik")
def loglik_metric(ctx: EvalContext) -> list:
    """Importance-sampled log p(x) (Burda et al. 2015) in nats/image and bits/dim, with stderr."""
    res = importance_sampled_log_likelihood(
        ctx.model,
        ctx.batches(),
        k=ctx.k,
        generator=ctx.generator("loglik"),
        progress=ctx.progress,
        total=ctx.n_images,
    )
    d = ctx.info.num_pixels
    notes = _kind_note(ctx)
    mean, se = res.mean, res.stderr
    est = (
        f"importance sampling, log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x), k = {res.k} "
        "(Burda et al. 2015); stderr over images"
    )
    extra = {
        "mean_log_w": mean_and_stderr(res.mean_log_w)[0],
        "ess_mean": res.ess.mean().item(),
        "ess_min": res.ess.min().item(),
        "seconds": round(res.seconds, 3),
    }
    return [
        ctx.label("log_px", mean, "nats/image", est, k=res.k, stderr=se, notes=notes, extra=extra),
        ctx.label(
            "log_px.bits_per_dim",
            bits_per_dim(mean, d),
            "bits/dim",
            f"-log p(x) / (D ln 2), D = {d}, log p(x) by importance sampling",
            k=res.k,
            stderr=None if se is None else se / (d * LN2),
            notes=notes,
        ),
    ]
