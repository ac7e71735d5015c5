"""Frechet distance between feature distributions (Heusel et al. 2017's FID, any feature net).

    d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

is the squared 2-Wasserstein distance between N(mu_1, S_1) and N(mu_2, S_2). With the standard
Inception network it is the FID; with vaelab's LeNet features it is "FD-LeNet", which is only
comparable with FD-LeNet from the same feature network, never with a published FID.

Features are summarised by sufficient statistics (:class:`FeatureStats`: count, sum, sum of
outer products, float64), which add up across batches and processes (all-reduce the three
tensors, or :meth:`FeatureStats.merge`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from vaelab.metrics.base import METRICS, EvalContext, shard_bounds


@dataclass
class FeatureStats:
    """Count, sum (F,) and sum of outer products (F, F) of feature vectors, float64.

    ``merge`` (or an all-reduce of the three fields) combines statistics from several batches
    or processes exactly.
    """

    count: int
    sum: torch.Tensor
    outer: torch.Tensor

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        return cls(
            0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64)
        )

    @classmethod
    def of(cls, features: torch.Tensor) -> FeatureStats:
        """Statistics of one (N, F) block."""
        if features.dim() != 2:
            raise ValueError(f"features must be (N, F), got {tuple(features.shape)}")
        f = features.detach().to(torch.float64).cpu()
        return cls(f.shape[0], f.sum(0), f.T @ f)

    def update(self, features: torch.Tensor) -> FeatureStats:
        """Add an (N, F) block in place; returns self."""
        other = FeatureStats.of(features)
        if other.sum.shape != self.sum.shape:
            raise ValueError(f"feature dim {other.sum.numel()} != {self.sum.numel()}")
        self.count += other.count
        self.sum += other.sum
        self.outer += other.outer
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """A new FeatureStats holding both sets."""
        return FeatureStats(
            self.count + other.count, self.sum + other.sum, self.outer + other.outer
        )

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """The mean (F,) and the unbiased covariance (F, F) (N - 1, as ``numpy.cov``)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        n = self.count
        mu = self.sum / n
        cov = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        cov = 0.5 * (cov + cov.T)
        return mu.numpy(), cov.numpy()


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off
    eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh(0.5 * (a + a.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr((S_1 S_2)^{1/2}) for symmetric PSD S_1, S_2.

    S_1 S_2 is similar to S_1^{1/2} S_2 S_1^{1/2}, which is symmetric PSD, so the trace is the
    sum of the square roots of its eigenvalues: exact, real, and stable where
    ``scipy.linalg.sqrtm(S_1 @ S_2)`` (pytorch-fid's route) needs an eps offset for singular
    covariances.
    """
    r = _sqrt_psd(s1)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh(0.5 * (m + m.T))
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """|mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2}), in float64."""
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    s1, s2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shapes do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}"
        )
    diff = mu1 - mu2
    d = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
    return max(float(d), 0.0)


def frechet_distance_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(*a.mean_cov(), *b.mean_cov())


FEATURE_BATCH = 250  # images per feature-network forward pass


@torch.inference_mode()
def feature_stats(
    feature_net, images: Iterable[torch.Tensor], batch_size: int = FEATURE_BATCH
) -> FeatureStats:
    """Sufficient statistics of ``feature_net`` features over batches of [0, 1] images."""
    stats = None
    for batch in images:
        for x in batch.split(batch_size):
            f = feature_net(x)
            stats = FeatureStats.of(f) if stats is None else stats.update(f)
    if stats is None:
        raise ValueError("feature_stats got no images")
    return stats


# ------------------------------------------------------------------------- registered


def _reconstructions(model, batches):
    with torch.inference_mode():
        for x in batches:
            yield model.reconstruct(x).clamp(0.0, 1.0)


def _prior_samples(model, n: int, batch: int, generator: torch.Generator, shard=None):
    """Decoder means of n prior draws, ``batch`` at a time: ``model.sample``'s draws. With
    ``shard`` every process draws each batch's z whole and decodes its slice."""
    with torch.inference_mode():
        for i in range(0, n, batch):
            m = min(batch, n - i)
            z = model.prior.sample(m, device=model.device, generator=generator)
            lo, hi = shard_bounds(m, shard)
            if hi > lo:
                yield model.decode(z[lo:hi]).mean.clamp(0.0, 1.0)


@METRICS.register("fd")
def frechet_metric(ctx: EvalContext) -> list:
    """Frechet distance of features, data vs reconstructions and vs prior samples (FD-LeNet, or FID)."""
    from vaelab.metrics.features import resolve_feature_net

    def resolve():
        return resolve_feature_net(
            ctx.feature_net,
            ctx.data,
            data_dir=ctx.data_dir,
            device=ctx.device,
            progress=ctx.progress,
        )

    nets = []  # several processes: rank 0 trains (or downloads) and caches, then the rest load
    ctx.on_main(lambda: nets.append(resolve()))
    net = nets[0] if nets else resolve()
    n = ctx.n_images
    # sufficient statistics of this process's images and samples, then summed over processes
    real = feature_stats(net, ctx.shard_batches())
    recon = feature_stats(net, _reconstructions(ctx.model, ctx.shard_batches()))
    samples = FeatureStats.empty(real.sum.numel())  # a process may get no sample (tiny batches)
    gen = ctx.generator("fd-samples")
    with torch.inference_mode():
        for x in _prior_samples(ctx.model, n, ctx.batch_size, gen, ctx.shard):
            for xb in x.split(FEATURE_BATCH):
                samples.update(net(xb))
    all_stats = (real, recon, samples)
    counts = torch.tensor([float(st.count) for st in all_stats], dtype=torch.float64)
    ctx.sum_(counts, *[t for st in all_stats for t in (st.sum, st.outer)])
    for st, count in zip(all_stats, counts.tolist()):
        st.count = int(count)
    base = f"{net.display}: Frechet distance of {net.describe()}"
    notes = net.notes()
    extra = dict(net.meta)
    return [
        ctx.label(
            f"{net.key}.reconstructions",
            frechet_distance_from_stats(real, recon),
            "",
            f"{base}; {n} {ctx.split} images vs their reconstructions (decoder mean at "
            "E_q[z|x]; Zhao et al.'s use)",
            notes=notes,
            extra=extra,
        ),
        ctx.label(
            f"{net.key}.samples",
            frechet_distance_from_stats(real, samples),
            "",
            f"{base}; {n} {ctx.split} images vs {n} prior samples (decoder means at z ~ N(0, I), "
            f"seeded by the eval seed)",
            notes=notes,
            extra=extra,
        ),
    ]
