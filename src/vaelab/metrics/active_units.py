"""Active units (Burda et al. 2015, section 5.2).

Latent dimension d is active when A_d = Cov_x(E_{q(z|x)}[z_d]) > 0.01: the posterior mean moves
with the input. A collapsed dimension has q(z_d|x) ~= p(z_d) for every x, so A_d ~= 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from vaelab.metrics.base import METRICS, EvalContext
from vaelab.metrics.frechet import FeatureStats

THRESHOLD = 0.01


@dataclass
class ActiveUnits:
    """``count`` dimensions of ``variances`` (Z,) (float64, over images) exceed ``threshold``."""

    count: int
    variances: torch.Tensor
    threshold: float

    @property
    def active(self) -> torch.Tensor:
        return self.variances > self.threshold


@torch.inference_mode()
def posterior_means(model: nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """E_q[z|x] for every image: (N, Z) float32 on the CPU."""
    out = [model.encode(x).mu.float().cpu() for x in batches]
    if not out:
        raise ValueError("posterior_means got no images")
    return torch.cat(out)


def active_units_from_means(mu: torch.Tensor, threshold: float = THRESHOLD) -> ActiveUnits:
    """Active units from posterior means (N, Z); the variance uses N - 1 (sample covariance)."""
    if mu.dim() != 2 or mu.shape[0] < 2:
        raise ValueError(f"need posterior means (N >= 2, Z), got {tuple(mu.shape)}")
    var = mu.to(torch.float64).var(0, correction=1)
    return ActiveUnits(int((var > threshold).sum().item()), var, threshold)


def active_units_from_stats(stats: FeatureStats, threshold: float = THRESHOLD) -> ActiveUnits:
    """Active units from sufficient statistics of the posterior means (count, sum, sum of
    outer products: :class:`~vaelab.metrics.frechet.FeatureStats`, which add across batches
    and processes); the variances are the diagonal of their covariance (N - 1)."""
    if stats.count < 2:
        raise ValueError(f"need the posterior means of >= 2 images, got {stats.count}")
    n, mean = stats.count, stats.sum / stats.count
    var = (stats.outer.diagonal() - n * mean * mean) / (n - 1)
    return ActiveUnits(int((var > threshold).sum().item()), var, threshold)


def active_units(
    model: nn.Module, batches: Iterable[torch.Tensor], threshold: float = THRESHOLD
) -> ActiveUnits:
    """Count the dimensions d with Cov_x(E_q[z_d]) > ``threshold`` over ``batches``."""
    return active_units_from_means(posterior_means(model, batches), threshold)


@METRICS.register("active-units")
def active_units_metric(ctx: EvalContext) -> list:
    """Active units: latent dimensions with Cov_x(E_q[z_d]) > 0.01 (Burda et al. 2015)."""
    # sums of E_q[z] and of its outer products, over this process's images, then all processes
    stats = FeatureStats.of(posterior_means(ctx.model, ctx.shard_batches()))
    ctx.sum_(stats.sum, stats.outer)
    stats.count = ctx.n_images
    au = active_units_from_stats(stats)
    z = au.variances.numel()
    return [
        ctx.label(
            "active_units",
            float(au.count),
            f"of {z} dims",
            f"dimensions d with Cov_x(E_q[z_d]) > {au.threshold} (Burda et al. 2015); "
            "extra.variances: Cov_x(E_q[z_d]) per dimension",
            extra={
                "latent_dim": z,
                "threshold": au.threshold,
                "variances": [round(v, 6) for v in au.variances.tolist()],
            },
        )
    ]
