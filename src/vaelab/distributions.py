"""Latent-space distributions: the diagonal Gaussian posterior q(z|x) and the N(0, I) prior.

All ``log_prob`` and ``kl`` results are per example, summed over latent dimensions, in nats,
shape (B,) (or (..., B) when the value carries leading sample dimensions).
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2.0 * math.pi)


class DiagonalGaussian:
    """q(z|x) = N(mu, diag(exp(logvar))), with ``mu`` and ``logvar`` of shape (B, Z)."""

    def __init__(self, mu: torch.Tensor, logvar: torch.Tensor) -> None:
        if mu.shape != logvar.shape:
            raise ValueError(
                f"mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} differ in shape"
            )
        self.mu = mu
        self.logvar = logvar

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    def rsample(
        self,
        n: int | None = None,
        generator: torch.Generator | None = None,
        eps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reparameterised sample z = mu + sigma * eps (Kingma & Welling 2013, eq. 4).

        Returns (B, Z), or (n, B, Z) when ``n`` is given. ``eps`` supplies the standard-normal
        noise explicitly (same shape as the result), e.g. so that data-parallel ranks can use
        their slice of one global draw.
        """
        shape = self.mu.shape if n is None else (n, *self.mu.shape)
        if eps is None:
            eps = torch.randn(
                shape, generator=generator, device=self.mu.device, dtype=self.mu.dtype
            )
        elif tuple(eps.shape) != tuple(shape):
            raise ValueError(f"eps has shape {tuple(eps.shape)}, expected {tuple(shape)}")
        return self.mu + self.std * eps

    def sample(
        self, n: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(n, generator)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) in nats, summed over Z: (..., B, Z) -> (..., B)."""
        return -0.5 * (((z - self.mu) ** 2) * torch.exp(-self.logvar) + self.logvar + LOG_2PI).sum(
            -1
        )

    def kl_per_dim(self) -> torch.Tensor:
        """Closed-form KL(q || N(0, I)) per latent dimension, (B, Z) nats (Kingma & Welling, App. B)."""
        return 0.5 * (self.mu**2 + torch.exp(self.logvar) - 1.0 - self.logvar)

    def kl(self) -> torch.Tensor:
        """Closed-form KL(q || N(0, I)) summed over Z: (B,) nats."""
        return self.kl_per_dim().sum(-1)


class StandardNormal:
    """The prior p(z) = N(0, I) over ``latent_dim`` dimensions."""

    def __init__(self, latent_dim: int) -> None:
        self.latent_dim = latent_dim

    def sample(
        self,
        n: int,
        *,
        temperature: float = 1.0,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(n, Z) draws, scaled by ``temperature`` (the prior's standard deviation)."""
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)
        return z * temperature

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I) in nats: (..., Z) -> (...)."""
        return -0.5 * (z**2 + LOG_2PI).sum(-1)
