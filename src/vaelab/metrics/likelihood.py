"""The ELBO with its terms, and the importance-sampled log-likelihood (Burda et al. 2015).

Units: nats per image (summed over pixels), and bits/dim = -(nats) / (D ln 2) with D = C*H*W.

:func:`importance_sampled_log_likelihood` estimates

    log p(x) ~= log (1/k) sum_{i=1..k} p(x|z_i) p(z_i) / q(z_i|x),   z_i ~ q(z|x)

(Burda et al. 2015, eq. 8 evaluated with large k). It encodes each image once, draws the k
samples in chunks of at most ``rows`` decoder rows (images x samples), and folds every chunk into
a running logsumexp, so memory is bounded by ``rows`` whatever k is. For a Bernoulli decoder the
per-pixel work is fused and an MLP decoder reuses its buffers (:mod:`vaelab.metrics.fused`): the
decoder's matrix products are then most of the cost.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from vaelab.data.batches import derive_seed
from vaelab.metrics.base import METRICS, EvalContext, mean_and_stderr, shard_bounds
from vaelab.metrics.fused import LogLikelihoodRunner

LN2 = math.log(2.0)
# Decoder rows (images x samples) per chunk: big enough for efficient matrix products, small
# enough that a (rows, D) block of logits stays in cache for the per-pixel passes.
DEFAULT_ROWS = 2048


def bits_per_dim(nats: float, num_dims: int) -> float:
    """-nats / (D ln 2): a log-likelihood in nats per image as a NLL in bits per dimension."""
    return -nats / (num_dims * LN2)


# ----------------------------------------------------------------------------------- ELBO


@dataclass
class ElboStats:
    """Per-image single-sample ELBO terms over a data pass (all (N,) float64 nats, CPU).

    ``index`` (N,) int64: the position of each image in the pass (0..N-1 in one process; a
    process's own positions with ``shard``); ``kl_per_dim`` is the mean over these images.
    """

    elbo: torch.Tensor
    log_px_z: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor  # (Z,) mean over images
    index: torch.Tensor | None = None


@torch.inference_mode()
def elbo_stats(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    batch_size: int = 1000,
    shard: tuple[int, int] | None = None,
) -> ElboStats:
    """The true ELBO (beta = 1, one sampled z per image, analytic KL) over ``batches``.

    Uses :func:`vaelab.objectives.elbo`, the same function training logs, so evaluation and
    training agree by construction. The noise of each compute batch (``batch_size`` images of
    a batch) is one (1, b, Z) draw from ``generator``, in order.

    ``shard`` = (rank, world): score only this process's contiguous slice of every batch
    (:func:`~vaelab.metrics.base.shard_bounds`). Every process still draws each batch's noise
    whole and keeps its slice, so an image gets the z it gets in one process.
    """
    from vaelab.objectives import elbo

    parts: dict[str, list[torch.Tensor]] = {"elbo": [], "log_px_z": [], "kl": [], "index": []}
    kl_dim_sum, n, start = 0.0, 0, 0
    for batch in batches:
        b = batch.shape[0]
        if start == 0 and b > 0:  # the shape and dtype of mu, as rsample draws eps with them
            mu = model.encode(batch[:1]).mu
            zdim, dtype = mu.shape[1], mu.dtype
        sizes = [min(batch_size, b - i) for i in range(0, b, batch_size)]
        draws = [  # one (1, m, Z) draw per compute batch, as rsample would make them
            torch.randn((1, m, zdim), generator=generator, device=batch.device, dtype=dtype)
            for m in sizes
        ]
        eps = torch.cat(draws, dim=1)  # (1, b, Z)
        lo, hi = shard_bounds(b, shard)
        for i in range(lo, hi, batch_size):
            j = min(i + batch_size, hi)
            out = elbo(model, batch[i:j], eps=eps[:, i:j])
            parts["elbo"].append(out.elbo.double().cpu())
            parts["log_px_z"].append(out.log_px_z.double().cpu())
            parts["kl"].append(out.kl.double().cpu())
            parts["index"].append(torch.arange(start + i, start + j))
            kl_dim_sum += out.kl_per_dim.double().sum(0).cpu()
            n += j - i
        start += b
    if start == 0:
        raise ValueError("elbo_stats got no images")
    empty = torch.zeros(0, dtype=torch.float64)
    cat = {k: torch.cat(v) if v else empty for k, v in parts.items()}
    kl_per_dim = kl_dim_sum / n if n else torch.zeros(zdim, dtype=torch.float64)
    return ElboStats(cat["elbo"], cat["log_px_z"], cat["kl"], kl_per_dim, cat["index"].long())


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
        index: (N,) int64 position of each image in the pass (0..N-1 in one process; this
            process's own positions with ``shard``).
    """

    log_px: torch.Tensor
    mean_log_w: torch.Tensor
    ess: torch.Tensor
    k: int
    seconds: float
    index: torch.Tensor | None = None

    @property
    def mean(self) -> float:
        return mean_and_stderr(self.log_px)[0]

    @property
    def stderr(self) -> float | None:
        return mean_and_stderr(self.log_px)[1]


def default_workers(model: nn.Module) -> int:
    """Worker threads for importance sampling: torch's thread count on the CPU, else 1."""
    tensors = [*model.parameters(), *model.buffers()]
    on_cpu = not tensors or tensors[0].device.type == "cpu"
    return torch.get_num_threads() if on_cpu else 1


@torch.inference_mode()
def importance_sampled_log_likelihood(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    k: int = 1000,
    seed: int = 0,
    rows: int = DEFAULT_ROWS,
    workers: int | None = None,
    fused: str = "auto",
    progress: bool = False,
    total: int | None = None,
    shard: tuple[int, int] | None = None,
) -> ISResult:
    """Importance-sampled log p(x) for every image of ``batches`` (Burda et al. 2015).

    Args:
        model: a :class:`vaelab.model.VAE` (put in eval mode by the caller).
        batches: float images (B, C, H, W) in [0, 1], on the model's device.
        k: importance samples per image (1000 is the usual; 5000 for paper tables).
        seed: the draws z = mu + sigma * eps of each chunk of images come from a generator
            seeded by (seed, chunk index), so results do not depend on ``workers``.
        rows: decoder rows (images x samples) per chunk; bounds memory at about
            ``rows * D`` floats whatever k is.
        workers: threads that each take whole chunks, running single-threaded torch ops,
            instead of splitting every op across threads (one matrix product per core runs
            closer to peak than one product split across cores, and a core taken by another
            process slows only its own chunk). ``None``: ``torch.get_num_threads()`` on the
            CPU, 1 on accelerators; 1 keeps torch's own threading.
        fused: ``"auto"``, ``"bernoulli"`` or ``"none"``: see :class:`LogLikelihoodRunner`
            (all give the same numbers up to rounding; ``"none"`` is the plain
            ``model.decode(z).log_prob(x)``).
        progress: show a tqdm bar over images (``total`` images expected).
        shard: (rank, world): score only this process's contiguous run of whole chunks of
            every batch (:func:`~vaelab.metrics.base.shard_bounds` over the batch's chunks).
            Chunks keep their global index, hence their draws, so the per-image estimates
            are those of one process; a process may get no chunk (an empty result).

    Returns:
        :class:`ISResult` with per-image estimates.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if workers is None:
        workers = default_workers(model)
    if rows < 1 or workers < 1:
        raise ValueError(f"rows and workers must be >= 1, got {rows} and {workers}")
    from tqdm import tqdm

    start = time.perf_counter()
    per_chunk = max(1, rows // k)  # images per chunk
    local = threading.local()

    def get_runner(dtype):
        runner = getattr(local, "runner", None)
        if runner is None:
            if workers > 1:
                torch.set_num_threads(1)
            runner = local.runner = LogLikelihoodRunner(model, dtype, fused)
        return runner

    def run(job):
        x, mu, std, logvar, aux, index = job
        g = torch.Generator(device=mu.device).manual_seed(derive_seed(seed, index))
        with torch.inference_mode():  # thread-local: worker threads need their own
            return _is_chunk(get_runner(mu.dtype), x, mu, std, logvar, aux, k, rows, g)

    results, index, n_chunks, n_images = [], [], 0, 0
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        with tqdm(total=total, unit="img", desc=f"log p(x), k={k}", disable=not progress) as bar:
            for batch in batches:
                b = batch.shape[0]
                first, n_chunks = n_chunks, n_chunks + -(-b // per_chunk)  # this batch's chunks
                c_lo, c_hi = shard_bounds(n_chunks - first, shard)  # ours, counted from first
                lo, hi = c_lo * per_chunk, min(c_hi * per_chunk, b)  # their images
                index.append(torch.arange(n_images + lo, n_images + max(lo, hi)))
                n_images += b
                if hi <= lo:
                    continue
                part = batch[lo:hi]
                q_z = model.encode(part)
                std = torch.exp(0.5 * q_z.logvar)
                aux = LogLikelihoodRunner(model, q_z.mu.dtype, fused).prepare(part)
                jobs = []
                for c, i in enumerate(range(0, hi - lo, per_chunk), start=first + c_lo):
                    sl = slice(i, i + per_chunk)
                    a = None if aux is None else aux[sl]
                    jobs.append((part[sl], q_z.mu[sl], std[sl], q_z.logvar[sl], a, c))
                for res in pool.map(run, jobs) if pool else map(run, jobs):
                    results.append(res)
                    bar.update(res[0].shape[0])
    finally:
        if pool is not None:
            pool.shutdown()
            torch.set_num_threads(threads)
    if n_images == 0:
        raise ValueError("importance_sampled_log_likelihood got no images")
    if results:
        lp, mlw, ess = (torch.cat(t) for t in zip(*results))
    else:  # this process's share of the chunks was empty
        lp, mlw, ess = (torch.zeros(0, dtype=torch.float64) for _ in range(3))
    return ISResult(lp, mlw, ess, k, time.perf_counter() - start, torch.cat(index))


def _is_chunk(runner, x, mu, std, logvar, aux, k, rows, generator):
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
        z = runner.latents(b, n, zdim, mu)
        torch.addcmul(mu.unsqueeze(1), std.unsqueeze(1), eps, out=z)  # (b, n, Z)
        log_w = runner(z, x, aux)
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


@METRICS.register("elbo")
def elbo_metric(ctx: EvalContext) -> list:
    """ELBO (beta = 1, one sampled z) in nats/image and bits/dim, its terms and KL per dimension."""
    stats = elbo_stats(
        ctx.model,
        ctx.batches(),
        generator=ctx.generator("elbo"),
        batch_size=ctx.batch_size,
        shard=ctx.shard,
    )
    # several processes: per-image terms gathered in split order, KL per dimension summed
    elbos, log_px_z, kls = ctx.gather(stats.index, stats.elbo, stats.log_px_z, stats.kl)
    kl_per_dim = stats.kl_per_dim
    if ctx.dist is not None:
        kl_per_dim = kl_per_dim * stats.index.numel()
        ctx.sum_(kl_per_dim)
        kl_per_dim /= ctx.n_images
    d = ctx.info.num_pixels
    notes = ctx.likelihood_notes()
    est = (
        "single-sample ELBO: log p(x|z) - KL(q(z|x) || p(z)), one z ~ q(z|x), analytic KL, beta = 1"
    )
    mean, se = mean_and_stderr(elbos)
    rec, rec_se = mean_and_stderr(log_px_z)
    kl, kl_se = mean_and_stderr(kls)
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
            extra={"per_dim": [round(v, 6) for v in kl_per_dim.tolist()]},
        ),
    ]


def difference_estimate(
    log_px_sample: torch.Tensor, elbo_sample: torch.Tensor, elbo_all: torch.Tensor
) -> tuple[float, float]:
    """The mean log p(x) of N images from the ELBO of all N and log p(x) of a random sample.

    With g_i = log p(x_i) - ELBO(x_i) on a simple random sample (without replacement) of n of
    the N images, ``mean(elbo_all) + mean(g)`` is an unbiased estimate of the N images' mean
    log p(x) (the difference estimator of survey sampling, with the ELBO as control variate);
    its standard error is ``sqrt((1 - n/N) var(g) / n)``. The gap varies far less between
    images than log p(x) itself, so a few hundred images pin down the mean of thousands.

    Args:
        log_px_sample, elbo_sample: (n,) per-image estimates on the sample, nats.
        elbo_all: (N,) the ELBO of every image (the sample's included, with the same draws).

    Returns:
        (estimate, stderr) in nats/image; the stderr is 0 when the sample is every image.
    """
    n, big_n = log_px_sample.numel(), elbo_all.numel()
    if elbo_sample.numel() != n:
        raise ValueError(f"{n} log p(x) values but {elbo_sample.numel()} ELBO values")
    if not 2 <= n <= big_n:
        raise ValueError(f"the sample must hold 2 to {big_n} images (the split's), got {n}")
    gap = (log_px_sample.double() - elbo_sample.double()).cpu()
    estimate = elbo_all.double().mean().item() + gap.mean().item()
    stderr = math.sqrt(max(0.0, 1.0 - n / big_n) * gap.var(correction=1).item() / n)
    return estimate, stderr


def _sample_batches(batches: Iterable[torch.Tensor], chosen: torch.Tensor):
    """The images at sorted positions ``chosen`` of a pass over ``batches``, in order."""
    start = 0
    for x in batches:
        b = x.shape[0]
        lo, hi = torch.searchsorted(chosen, torch.tensor([start, start + b])).tolist()
        if hi > lo:
            yield x[(chosen[lo:hi] - start).to(x.device)]
        start += b


def _log_px_entries(ctx, mean, se, estimator, k, extra, how) -> list:
    """The ``log_px`` entry (nats/image) and its bits/dim twin, labelled alike."""
    d, notes = ctx.info.num_pixels, ctx.likelihood_notes()
    return [
        ctx.label(
            "log_px", mean, "nats/image", estimator, k=k, stderr=se, notes=notes, extra=extra
        ),
        ctx.label(
            "log_px.bits_per_dim",
            bits_per_dim(mean, d),
            "bits/dim",
            f"-log p(x) / (D ln 2), D = {d}, {how}",
            k=k,
            stderr=None if se is None else se / (d * LN2),
            notes=notes,
        ),
    ]


def _loglik_sampled(ctx: EvalContext) -> list:
    """loglik on a random sample of ``ctx.loglik_sample`` images (see difference_estimate)."""
    from vaelab.metrics.base import derive_generator

    n_all, n = ctx.n_images, ctx.loglik_sample
    if ctx.dist is not None:
        raise ValueError("loglik_sample runs in one process; leave out --nproc / torchrun")
    if not 2 <= n <= n_all:
        raise ValueError(f"loglik_sample must be 2 to {n_all} (the split's images), got {n}")
    stats = elbo_stats(  # every image, with the elbo metric's draws
        ctx.model, ctx.batches(), generator=ctx.generator("elbo"), batch_size=ctx.batch_size
    )
    g = derive_generator(ctx.seed, "loglik-sample")
    chosen = torch.randperm(n_all, generator=g)[:n].sort().values
    res = importance_sampled_log_likelihood(
        ctx.model,
        _sample_batches(ctx.batches(), chosen),
        k=ctx.k,
        seed=derive_seed(ctx.seed, 1),
        workers=ctx.workers,
        progress=ctx.progress,
        total=n,
    )
    mean, se = difference_estimate(res.log_px, stats.elbo[chosen], stats.elbo)
    est = (
        f"importance sampling (Burda et al. 2015, k = {res.k}) on a random sample of {n} of the "
        f"{n_all} images, added to the single-sample ELBO of all {n_all} as a control variate: "
        "mean ELBO(all) + mean(log p(x) - ELBO)(sample); stderr of this estimate of the "
        "split's mean, from the sample (finite-population corrected)"
    )
    gap, gap_se = mean_and_stderr(res.log_px - stats.elbo[chosen])
    sample_mean, sample_se = res.mean, res.stderr
    extra = {
        "sample_images": n,
        "elbo_mean_all": mean_and_stderr(stats.elbo)[0],
        "gap_mean": gap,
        "gap_stderr": gap_se,
        "sample_log_px_mean": sample_mean,
        "sample_log_px_stderr": sample_se,
        "ess_mean": res.ess.mean().item(),
        "seconds": round(res.seconds, 3),
    }
    return _log_px_entries(ctx, mean, se, est, res.k, extra, "log p(x) as above")


@METRICS.register("loglik")
def loglik_metric(ctx: EvalContext) -> list:
    """Importance-sampled log p(x) (Burda et al. 2015) in nats/image and bits/dim, with stderr
    (on a random sample of the images with the ELBO as control variate when
    ``ctx.loglik_sample`` is set)."""
    if ctx.loglik_sample is not None:
        return _loglik_sampled(ctx)
    res = importance_sampled_log_likelihood(
        ctx.model,
        ctx.batches(),
        k=ctx.k,
        seed=derive_seed(ctx.seed, 1),
        workers=ctx.workers,
        progress=ctx.progress,
        total=ctx.n_images if ctx.dist is None else None,  # a process does only its share
        shard=ctx.shard,
    )
    # several processes: every image's estimates, gathered in split order
    log_px, mean_log_w, ess = ctx.gather(res.index, res.log_px, res.mean_log_w, res.ess)
    res = ISResult(log_px, mean_log_w, ess, res.k, res.seconds)
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
    return _log_px_entries(ctx, mean, se, est, res.k, extra, "log p(x) by importance sampling")
