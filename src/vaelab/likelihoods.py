"""Decoder likelihoods p(x|z).

A likelihood is a registered :class:`Likelihood` module (the "head") that turns the decoder's
raw output, shape (B, P*C, H, W) for P parameters per image channel, into a distribution
object with

* ``log_prob(x)`` -> (B,) nats per image, summed over pixels, **including normalising
  constants**, so a reported negative log-likelihood is a real one;
* ``mean`` -> (B, C, H, W) in the data's [0, 1] range;
* ``sample()`` -> (B, C, H, W).

Images enter as float tensors in [0, 1] (binary data as exact 0/1). ``proper_for`` names the
value kinds (``binary``, ``continuous``, ``8bit``) on which ``log_prob`` is a proper density or
mass; reports flag any other use, e.g. a Bernoulli likelihood on grey levels.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.registry import Registry

LIKELIHOODS: Registry[type[Likelihood]] = Registry("likelihood")
LOG_2PI = math.log(2.0 * math.pi)


def _sum_pixels(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(1)


class Likelihood(nn.Module):
    """Base class: ``params_per_channel`` raw decoder channels per image channel."""

    params_per_channel: int = 1
    proper_for: tuple[str, ...] = ()

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def split(self, raw: torch.Tensor) -> list[torch.Tensor]:
        """(B, P*C, H, W) -> P tensors of (B, C, H, W)."""
        c = self.shape[0]
        if raw.shape[1] != self.params_per_channel * c:
            raise ValueError(
                f"{type(self).__name__} needs {self.params_per_channel * c} decoder channels "
                f"for {c}-channel images, got raw output of shape {tuple(raw.shape)}"
            )
        return list(raw.split(c, dim=1))

    def is_proper(self, value_kind: str) -> bool:
        return value_kind in self.proper_for

    def raw_for_mean(self, mean: torch.Tensor) -> torch.Tensor | None:
        """The raw decoder output (P*C, H, W) whose distribution has mean ``mean`` (C, H, W)
        in [0, 1], or None where this likelihood has no such inverse (see
        :func:`vaelab.model.init_output_bias`). Means are kept 1e-3 inside (0, 1) so the
        logits stay finite where the data are constant (MNIST's border)."""
        return None


# Means are clamped this far inside (0, 1) before a logit (raw_for_mean).
_MEAN_MARGIN = 1e-3

# ----------------------------------------------------------------------------------- Bernoulli


# Products of this many factors in [1, 2] stay below float32's largest value (2^128).
_LOG_GROUP = 112


def _sum_log(t: torch.Tensor) -> torch.Tensor:
    """sum_d log t_d over dim 1 of (B, D), for t_d in [1, 2]: the logs of products of 112
    factors, so one log per 112 pixels instead of one per pixel (logs are slow on CPU)."""
    d = t.shape[1]
    full = d // _LOG_GROUP * _LOG_GROUP
    out = t[:, :full].unflatten(1, (full // _LOG_GROUP, _LOG_GROUP)).prod(2).log_().sum(1)
    if full < d:
        out = out + t[:, full:].prod(1).log_()
    return out


class _BernoulliLogProb(torch.autograd.Function):
    """sum_d [x_d l_d - softplus(l_d)] for each row of logits l and images x, (B, D) -> (B,).

    softplus(l) = (l + |l|) / 2 + log(1 + exp(-|l|)) is stable for any logit, and the logs are
    taken of products (:func:`_sum_log`). The gradient is g (x - sigmoid(l)). Forward and
    backward take about half the time of ``-binary_cross_entropy_with_logits(...).sum(1)`` on
    CPU, whose log-sigmoid is not vectorised; equal to it within float rounding.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, x)
        a = logits.abs()
        abs_sum = a.sum(1)
        one_plus = a.neg_().exp_().add_(1.0)  # 1 + exp(-|l|), in [1, 2]
        return (x * logits).sum(1) - 0.5 * (logits.sum(1) + abs_sum) - _sum_log(one_plus)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        logits, x = ctx.saved_tensors
        g = g.unsqueeze(1)
        grad_logits = grad_x = None
        if ctx.needs_input_grad[0]:
            s = torch.sigmoid(logits)
            if torch.is_grad_enabled():  # double backward: keep the graph
                grad_logits = (x - s) * g
            else:
                grad_logits = torch.sub(x, s, out=s).mul_(g)
        if ctx.needs_input_grad[1]:
            grad_x = logits * g
        return grad_logits, grad_x


class BernoulliDist:
    """Independent Bernoulli pixels from logits (B, C, H, W)."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        # x*l - softplus(l) summed over pixels, stable for any logit.
        logits = self.logits
        if logits.dtype in (torch.float16, torch.bfloat16):  # as autocast runs BCE: float32
            logits = logits.float()
        x = x.expand_as(logits).to(logits.dtype)
        return _BernoulliLogProb.apply(logits.flatten(1), x.flatten(1))

    @property
    def mean(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.bernoulli(self.mean, generator=generator)


@LIKELIHOODS.register("bernoulli")
class Bernoulli(Likelihood):
    """Bernoulli from logits (binary data; on grey levels it is not a proper likelihood)."""

    params_per_channel = 1
    proper_for = ("binary",)

    def forward(self, raw: torch.Tensor) -> BernoulliDist:
        return BernoulliDist(raw)

    def raw_for_mean(self, mean: torch.Tensor) -> torch.Tensor:
        return torch.logit(mean.clamp(_MEAN_MARGIN, 1 - _MEAN_MARGIN))


# ----------------------------------------------------------------------------------- Gaussian


class GaussianDist:
    """Independent Gaussian pixels N(mean, sigma^2); ``log_sigma`` broadcasts against ``loc``."""

    def __init__(self, loc: torch.Tensor, log_sigma: torch.Tensor) -> None:
        self.loc = loc
        self.log_sigma = log_sigma

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.loc) * torch.exp(-self.log_sigma)
        return _sum_pixels(-0.5 * z * z - self.log_sigma.expand_as(z) - 0.5 * LOG_2PI)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.loc.shape, generator=generator, device=self.loc.device)
        return self.loc + torch.exp(self.log_sigma) * eps


class _GaussianBase(Likelihood):
    proper_for = ("continuous",)

    def __init__(
        self,
        shape: tuple[int, int, int],
        sigma: float = 1.0,
        sigma_floor: float = 1e-3,
        gaussian_link: str = "sigmoid",
    ) -> None:
        super().__init__(shape)
        if gaussian_link not in ("sigmoid", "identity"):
            raise ValueError(
                f"gaussian_link must be 'sigmoid' or 'identity', got {gaussian_link!r}"
            )
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.link = gaussian_link
        self.sigma = float(sigma)
        self.log_floor = math.log(sigma_floor)

    def _loc(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(raw) if self.link == "sigmoid" else raw

    def raw_for_mean(self, mean: torch.Tensor) -> torch.Tensor | None:
        if self.params_per_channel != 1:  # the decoder also predicts sigma: left as built
            return None
        if self.link == "identity":
            return mean.clone()
        return torch.logit(mean.clamp(_MEAN_MARGIN, 1 - _MEAN_MARGIN))

    def _floored(self, log_sigma: torch.Tensor) -> torch.Tensor:
        # Smooth floor: log_sigma >= log(sigma_floor), so the density cannot blow up.
        return self.log_floor + F.softplus(log_sigma - self.log_floor)


@LIKELIHOODS.register("gaussian")
class GaussianFixed(_GaussianBase):
    """Gaussian with fixed sigma (the "MSE" loss, with its normalising constant)."""

    params_per_channel = 1

    def forward(self, raw: torch.Tensor) -> GaussianDist:
        log_sigma = torch.full(
            (1, 1, 1, 1), math.log(self.sigma), device=raw.device, dtype=raw.dtype
        )
        return GaussianDist(self._loc(raw), log_sigma)


@LIKELIHOODS.register("gaussian-channel")
class GaussianLearnedChannel(_GaussianBase):
    """Gaussian with one learned sigma per image channel (floored at sigma_floor)."""

    params_per_channel = 1

    def __init__(
        self,
        shape: tuple[int, int, int],
        sigma: float = 1.0,
        sigma_floor: float = 1e-3,
        gaussian_link: str = "sigmoid",
    ) -> None:
        super().__init__(shape, sigma, sigma_floor, gaussian_link)
        # Invert the smooth floor so that the initial sigma is exactly ``sigma``.
        gap = max(math.log(self.sigma) - self.log_floor, 1e-6)
        init = self.log_floor + math.log(math.expm1(gap))
        self.log_sigma = nn.Parameter(torch.full((1, shape[0], 1, 1), init))

    def forward(self, raw: torch.Tensor) -> GaussianDist:
        return GaussianDist(self._loc(raw), self._floored(self.log_sigma))


@LIKELIHOODS.register("gaussian-pixel")
class GaussianLearnedPixel(_GaussianBase):
    """Gaussian whose sigma the decoder predicts per pixel (floored at sigma_floor)."""

    params_per_channel = 2

    def forward(self, raw: torch.Tensor) -> GaussianDist:
        loc, log_sigma = self.split(raw)
        return GaussianDist(self._loc(loc), self._floored(log_sigma))


# -------------------------------------------------------------------- continuous Bernoulli


def continuous_bernoulli_log_norm(logits: torch.Tensor) -> torch.Tensor:
    """log C(lambda) of the continuous Bernoulli (Loaiza-Ganem & Cunningham 2019, eq. 7).

    C(lambda) = 2 artanh(1 - 2 lambda) / (1 - 2 lambda), lambda = sigmoid(logits). In logits,
    artanh(1 - 2 lambda) = -logits / 2, so C = logits / (2 lambda - 1) = logits / tanh(logits / 2),
    which is even in the logit and tends to 2 at 0 (a Taylor series is used near 0).
    """
    a = logits.abs()
    small = a < 1e-2
    safe = torch.where(small, torch.ones_like(a), a)
    exact = torch.log(safe) - torch.log(torch.tanh(safe / 2))
    # log(a / tanh(a/2)) = log 2 + a^2/12 - a^4/1440 + ...
    taylor = math.log(2.0) + a * a / 12.0 - a**4 / 1440.0
    return torch.where(small, taylor, exact)


class ContinuousBernoulliDist:
    """Continuous Bernoulli density on [0, 1] per pixel, from logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        bern = -F.binary_cross_entropy_with_logits(
            self.logits, x.expand_as(self.logits), reduction="none"
        )
        return _sum_pixels(bern + continuous_bernoulli_log_norm(self.logits))

    @property
    def mean(self) -> torch.Tensor:
        # E[x] = lambda/(2 lambda - 1) + 1/(2 artanh(1 - 2 lambda)); 1/2 + l/12 near l = 0.
        lam = torch.sigmoid(self.logits)
        small = self.logits.abs() < 1e-2
        safe = torch.where(small, torch.ones_like(self.logits), self.logits)
        exact = lam / (2 * lam - 1) - 1.0 / safe
        exact = torch.where(small, 0.5 + self.logits / 12.0, exact)
        return exact.clamp(0.0, 1.0)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Inverse CDF: x = log(1 + u (e^l - 1)) / l for logit l != 0.
        u = torch.rand(self.logits.shape, generator=generator, device=self.logits.device)
        l = self.logits
        small = l.abs() < 1e-4
        safe = torch.where(small, torch.ones_like(l), l)
        x = (torch.log1p(u * torch.expm1(safe))) / safe
        return torch.where(small, u, x).clamp(0.0, 1.0)


@LIKELIHOODS.register("continuous-bernoulli")
class ContinuousBernoulli(Likelihood):
    """Continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): proper for [0, 1] data."""

    params_per_channel = 1
    proper_for = ("continuous", "binary")

    def forward(self, raw: torch.Tensor) -> ContinuousBernoulliDist:
        return ContinuousBernoulliDist(raw)


# ------------------------------------------------------------------ discretized logistic


class DiscretizedLogisticDist:
    """Logistic discretised into 256 bins per sub-pixel (Salimans et al. 2017, PixelCNN++).

    Pixels x in [0, 1] are the 8-bit values k/255; internally they map to [-1, 1] with bin
    half-width 1/255, and the edge bins take all the mass beyond them. The probabilities of
    the 256 bins sum to exactly 1, so -log_prob is a proper NLL and bits/dim compares with the
    literature.
    """

    def __init__(self, loc: torch.Tensor, log_scale: torch.Tensor) -> None:
        self.loc = loc  # in [-1, 1] units
        self.log_scale = log_scale

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 2.0 - 1.0
        centered = x - self.loc
        inv_s = torch.exp(-self.log_scale)
        plus = inv_s * (centered + 1.0 / 255.0)
        minus = inv_s * (centered - 1.0 / 255.0)
        cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
        log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus), for the 0 bin
        log_one_minus_cdf_min = -F.softplus(minus)  # log(1 - sigmoid(minus)), for the 255 bin
        mid = inv_s * centered
        # log pdf at the bin centre + log bin width: used when cdf_delta underflows.
        log_pdf_mid = mid - self.log_scale - 2.0 * F.softplus(mid) + math.log(2.0 / 255.0)
        inner = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp_min(1e-12)), log_pdf_mid)
        lp = torch.where(
            x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, inner)
        )
        return _sum_pixels(lp)

    @property
    def mean(self) -> torch.Tensor:
        """The location mapped back to [0, 1] (the mode of the continuous logistic, clamped)."""
        return (self.loc.clamp(-1.0, 1.0) + 1.0) / 2.0

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(self.loc.shape, generator=generator, device=self.loc.device).clamp(
            1e-5, 1 - 1e-5
        )
        x = self.loc + torch.exp(self.log_scale) * (torch.log(u) - torch.log1p(-u))
        return torch.round((x.clamp(-1.0, 1.0) + 1.0) / 2.0 * 255.0) / 255.0


@LIKELIHOODS.register("discretized-logistic")
class DiscretizedLogistic(Likelihood):
    """Discretized logistic over 256 bins per channel (Salimans et al. 2017): 8-bit images."""

    params_per_channel = 2
    proper_for = ("8bit",)

    def __init__(self, shape: tuple[int, int, int], sigma_floor: float = 1e-3) -> None:
        super().__init__(shape)
        self.min_log_scale = math.log(min(sigma_floor, 1e-2) / 10.0)

    def forward(self, raw: torch.Tensor) -> DiscretizedLogisticDist:
        loc, log_scale = self.split(raw)
        return DiscretizedLogisticDist(loc, log_scale.clamp_min(self.min_log_scale))


def build_likelihood(
    name: str, shape: tuple[int, int, int], options: dict[str, float | str] | None = None
) -> Likelihood:
    """Instantiate the registered likelihood ``name`` for images of ``shape`` (C, H, W).

    ``options`` may hold any of ``sigma``, ``sigma_floor``, ``gaussian_link``; each likelihood
    takes the ones its constructor names and ignores the rest (they belong to other likelihoods).
    """
    cls = LIKELIHOODS.get(name)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in (options or {}).items() if k in accepted}
    return cls(shape, **kwargs)
