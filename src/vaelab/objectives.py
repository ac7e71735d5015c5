"""Training objectives: one ELBO with its variants as parameters, the IWAE bound, and schedules.

Units: every per-example term is summed over pixels and latent dimensions, in nats, shape (B,).
Exactly one mean over the batch happens, in ``loss``. Higher ``elbo`` and ``bound`` are better.

* :func:`elbo` -- the evidence lower bound (Kingma & Welling 2013, eq. 10) with L Monte Carlo
  samples, beta (Higgins et al. 2017), the capacity objective gamma |KL - C| (Burgess et al.
  2018) and free bits (Kingma et al. 2016). The reported ``elbo`` is always the true beta = 1
  bound; only ``loss`` carries the variant.
* :func:`iwae` -- the importance-weighted bound (Burda et al. 2015, eq. 8) via logsumexp.
* :func:`beta_schedule`, :func:`capacity_schedule` -- KL warm-up (linear, cyclical as in Fu et
  al. 2019) and the capacity ramp, as pure functions of the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vaelab.config import ObjectiveConfig
from vaelab.registry import Registry

OBJECTIVES: Registry = Registry("objective")


@dataclass
class ObjectiveOutput:
    """What an objective returns. Per-example tensors are (B,) nats.

    Attributes:
        loss: scalar to minimise (batch mean of the variant's negative objective).
        elbo: the true (beta = 1) ELBO per example, with z sampled.
        log_px_z: E_q[log p(x|z)] estimated with the drawn samples.
        kl: KL(q(z|x) || p(z)) (closed form unless ``analytic_kl=False``).
        kl_per_dim: (B, Z) closed-form KL per latent dimension.
        bound: the bound the loss is built on (``elbo`` for ELBO objectives; the IWAE bound).
        beta: the KL weight used.
    """

    loss: torch.Tensor
    elbo: torch.Tensor
    log_px_z: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor
    bound: torch.Tensor
    beta: float = 1.0


def _repeat(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, ...) -> (n*B, ...), sample-major, matching (n, B, Z) latents flattened."""
    if n == 1:
        return x
    return x.unsqueeze(0).expand(n, *x.shape).reshape(n * x.shape[0], *x.shape[1:])


@OBJECTIVES.register("elbo")
def elbo(
    model,
    x: torch.Tensor,
    *,
    n_samples: int = 1,
    beta: float = 1.0,
    capacity: float | None = None,
    gamma: float = 1000.0,
    free_bits: float = 0.0,
    analytic_kl: bool = True,
    generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> ObjectiveOutput:
    """The ELBO, log p(x) >= E_q[log p(x|z)] - KL(q(z|x) || p(z)), and a loss built on it.

    Args:
        model: a :class:`vaelab.model.VAE`.
        x: (B, C, H, W) images in [0, 1].
        n_samples: L Monte Carlo samples of z per image (the reconstruction term is their mean).
        beta: KL weight of the beta-VAE loss, -(log p(x|z) - beta KL) (Higgins et al. 2017);
            a float or a 0-d tensor (so that a compiled objective need not recompile for it).
        capacity: if given, the loss is -log p(x|z) + gamma |KL - C| (Burgess et al. 2018), C in
            nats (a float or a 0-d tensor).
        gamma: weight of the capacity term.
        free_bits: lambda of Kingma et al. (2016): each latent dimension's batch-mean KL enters
            the loss as max(lambda, KL_d) nats, so dimensions below lambda get no KL gradient.
        analytic_kl: closed-form KL (default) or the single-sample estimate log q(z|x) - log p(z).
        generator: for reproducible noise.
        eps: explicit standard-normal noise (L, B, Z) instead of drawing it.

    Returns:
        :class:`ObjectiveOutput`; ``elbo`` is the true beta = 1 bound whatever the variant.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    q_z = model.encode(x)
    z = q_z.rsample(n_samples, generator=generator, eps=eps)  # (L, B, Z)
    p_x = model.decode(z)
    log_px_z = p_x.log_prob(_repeat(x, n_samples))
    if n_samples > 1:
        log_px_z = log_px_z.view(n_samples, x.shape[0]).mean(0)
    kl_per_dim = q_z.kl_per_dim()
    if analytic_kl:
        kl = kl_per_dim.sum(-1)
    else:
        kl = (q_z.log_prob(z) - model.prior.log_prob(z)).mean(0)
    elbo_value = log_px_z - kl
    if capacity is not None:
        loss = (-log_px_z + gamma * (kl - capacity).abs()).mean()
    elif free_bits > 0:
        kl_term = torch.clamp(kl_per_dim.mean(0), min=free_bits).sum()
        loss = -log_px_z.mean() + beta * kl_term
    elif not torch.is_tensor(beta) and beta == 1.0:  # as below, with two fewer operations
        loss = -elbo_value.mean()
    else:
        loss = -(log_px_z - beta * kl).mean()
    return ObjectiveOutput(loss, elbo_value, log_px_z, kl, kl_per_dim, elbo_value, beta)


def log_importance_weights(
    model,
    x: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
    q_z=None,
    eps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, object]:
    """log w = log p(x|z) + log p(z) - log q(z|x) for k draws z ~ q(z|x).

    Returns ``(log_w, log_px_z)``, both (k, B) nats, and q(z|x).
    """
    if q_z is None:
        q_z = model.encode(x)
    z = q_z.rsample(k, generator=generator, eps=eps)  # (k, B, Z)
    log_px_z = model.decode(z).log_prob(_repeat(x, k)).view(k, x.shape[0])
    log_w = log_px_z + model.prior.log_prob(z) - q_z.log_prob(z)
    return log_w, log_px_z, q_z


@OBJECTIVES.register("iwae")
def iwae(
    model,
    x: torch.Tensor,
    *,
    k: int = 5,
    generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> ObjectiveOutput:
    """The importance-weighted bound L_k = E[log (1/k) sum_i w_i] (Burda et al. 2015, eq. 8).

    L_1 is the ELBO and L_k rises towards log p(x) as k grows. The bound is computed as
    ``logsumexp(log_w, 0) - log k`` and autograd gives its gradient, which weights each sample
    by its normalised importance weight (no hand-built weights).

    Returns:
        :class:`ObjectiveOutput` with ``bound`` the IWAE bound (B,), ``loss`` its negated batch
        mean, and ``elbo`` the ordinary ELBO estimated from the same k samples.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    log_w, log_px_z, q_z = log_importance_weights(model, x, k, generator, eps=eps)
    bound = torch.logsumexp(log_w, dim=0) - math.log(k)
    kl_per_dim = q_z.kl_per_dim()
    kl = kl_per_dim.sum(-1)
    rec = log_px_z.mean(0)
    return ObjectiveOutput(-bound.mean(), rec - kl, rec, kl, kl_per_dim, bound, 1.0)


# ---------------------------------------------------------------------------------- schedules


def linear_warmup(step: int, warmup_steps: int) -> float:
    """KL weight factor rising linearly from 0 at step 0 to 1 at ``warmup_steps``."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def cyclical_warmup(step: int, total_steps: int, cycles: int = 4, ratio: float = 0.5) -> float:
    """Cyclical annealing (Fu et al. 2019): ``cycles`` cycles over ``total_steps``; in each, the
    factor rises linearly from 0 to 1 over the first ``ratio`` of the cycle, then stays at 1."""
    if total_steps <= 0 or cycles <= 0:
        return 1.0
    period = total_steps / cycles
    pos = (step % period) / period
    return min(1.0, pos / ratio) if ratio > 0 else 1.0


def beta_schedule(step: int, cfg: ObjectiveConfig, total_steps: int) -> float:
    """The KL weight at ``step``: ``cfg.beta`` times the warm-up factor."""
    if cfg.warmup == "none":
        factor = 1.0
    elif cfg.warmup == "linear":
        factor = linear_warmup(step, cfg.warmup_steps)
    elif cfg.warmup == "cyclical":
        factor = cyclical_warmup(step, total_steps, cfg.cycles, cfg.cycle_ratio)
    else:
        raise ValueError(f"objective.warmup must be none, linear or cyclical, got {cfg.warmup!r}")
    return cfg.beta * factor


def capacity_schedule(step: int, cfg: ObjectiveConfig) -> float | None:
    """Burgess et al.'s capacity C at ``step`` (nats), rising linearly to ``cfg.capacity``;
    ``None`` when the capacity objective is off (``capacity`` = 0)."""
    if cfg.capacity <= 0:
        return None
    if cfg.capacity_steps <= 0:
        return cfg.capacity
    return cfg.capacity * min(1.0, step / cfg.capacity_steps)


def compute_objective(
    model,
    x: torch.Tensor,
    cfg: ObjectiveConfig,
    step: int = 0,
    total_steps: int = 0,
    generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> ObjectiveOutput:
    """Evaluate the objective ``cfg`` describes at training step ``step``.

    ``eps`` optionally gives the noise, (k or n_samples, B, Z)."""
    if cfg.name == "iwae":
        return iwae(model, x, k=cfg.k, generator=generator, eps=eps)
    if cfg.name == "elbo":
        return elbo(
            model,
            x,
            n_samples=cfg.n_samples,
            beta=beta_schedule(step, cfg, total_steps),
            capacity=capacity_schedule(step, cfg),
            gamma=cfg.capacity_gamma,
            free_bits=cfg.free_bits,
            generator=generator,
            eps=eps,
        )
    OBJECTIVES.get(cfg.name)  # raises with the list of choices
    raise ValueError(f"objective {cfg.name!r} has no training rule")
