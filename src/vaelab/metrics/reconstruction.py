"""Reconstruction quality: MSE, PSNR and SSIM of x against the decoder mean at z = E_q[z|x].

All three compare images in [0, 1] (data range 1). MSE is the mean over pixels of one image,
then over images; PSNR is 10 log10(1 / MSE) per image, then averaged over images; SSIM (Wang et
al. 2004) is computed per image by scikit-image's ``structural_similarity`` with Wang et al.'s
settings (11-tap Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, population covariances),
averaged over channels, then over images.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vaelab.metrics.base import METRICS, EvalContext, mean_and_stderr

# PSNR of a perfect reconstruction is infinite; per-image MSE is floored here (100 dB).
MSE_FLOOR = 1e-10
SSIM_SIGMA = 1.5
_SSIM_WINDOW = 11  # 2 * int(3.5 * 1.5 + 0.5) + 1: the Gaussian window skimage uses for sigma 1.5


def have_skimage() -> bool:
    import importlib.util

    return importlib.util.find_spec("skimage") is not None


def _require_skimage():
    try:
        from skimage.metrics import structural_similarity
    except ImportError as exc:
        raise ImportError("SSIM needs scikit-image: pip install scikit-image") from exc
    return structural_similarity


def ssim_settings(height: int, width: int) -> tuple[dict, str]:
    """skimage keyword arguments for images of this size, and a description of them.

    Images of at least 11x11 use Wang et al.'s Gaussian window; smaller ones (the 8x8 digits)
    cannot, and use the largest odd uniform window that fits, which the description says.
    """
    if min(height, width) >= _SSIM_WINDOW:
        kw = {"gaussian_weights": True, "sigma": SSIM_SIGMA, "use_sample_covariance": False}
        return kw, "Gaussian window sigma 1.5 (11 taps), K1 0.01, K2 0.03"
    win = min(height, width)
    win = win if win % 2 == 1 else win - 1
    if win < 3:
        raise ValueError(f"SSIM needs images of at least 3x3, got {height}x{width}")
    kw = {"gaussian_weights": False, "win_size": win, "use_sample_covariance": False}
    return kw, f"uniform {win}x{win} window (images smaller than 11x11), K1 0.01, K2 0.03"


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of (B, C, H, W) images in [0, 1], channels averaged: (B,) float64.

    Computed by :func:`skimage.metrics.structural_similarity` (data range 1, settings from
    :func:`ssim_settings`).
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"expected two (B, C, H, W) tensors, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    structural_similarity = _require_skimage()
    kw, _ = ssim_settings(x.shape[-2], x.shape[-1])
    a = x.detach().to(torch.float64).cpu().numpy()
    b = y.detach().to(torch.float64).cpu().numpy()
    out = np.empty(a.shape[0])
    for i in range(a.shape[0]):
        if a.shape[1] == 1:
            out[i] = structural_similarity(a[i, 0], b[i, 0], data_range=1.0, **kw)
        else:
            out[i] = structural_similarity(
                a[i].transpose(1, 2, 0),
                b[i].transpose(1, 2, 0),
                data_range=1.0,
                channel_axis=-1,
                **kw,
            )
    return torch.from_numpy(out)


def _valid_filter(n: int, taps: torch.Tensor) -> torch.Tensor:
    """(n - k + 1, n) matrix M with (M @ v)[i] = sum_j taps[j] v[i + j]: a 'valid' 1-D filter."""
    k = taps.numel()
    rows = torch.arange(n - k + 1, device=taps.device)[:, None]
    m = torch.zeros(n - k + 1, n, dtype=taps.dtype, device=taps.device)
    m[rows, rows + torch.arange(k, device=taps.device)] = taps
    return m


def ssim_torch(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:func:`ssim` computed in torch on the images' device, with no loop over images and no
    scikit-image: (B, C, H, W) in [0, 1] -> (B,) float64 on the CPU, channels averaged.

    The same numbers as :func:`ssim` (to float rounding; float32 on MPS). scikit-image filters
    with reflected borders and then crops (window - 1) / 2 pixels from every border, so the
    pixels it averages are exactly those of a 'valid' filter, done here as two matrix
    products (the windows are separable). Cheap enough to score a few hundred images every
    epoch while training.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"expected two (B, C, H, W) tensors, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    b, c, h, w = x.shape
    kw, _ = ssim_settings(h, w)
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    if kw["gaussian_weights"]:
        r = _SSIM_WINDOW // 2
        taps = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=dtype) / SSIM_SIGMA) ** 2)
        taps = taps / taps.sum()
    else:
        taps = torch.full((kw["win_size"],), 1.0 / kw["win_size"], dtype=dtype)
    taps = taps.to(x.device)
    rows, cols = _valid_filter(h, taps), _valid_filter(w, taps).T

    def filt(z: torch.Tensor) -> torch.Tensor:  # (B*C, H, W) -> (B*C, H - 2r, W - 2r)
        return rows @ z @ cols

    a = x.detach().to(dtype).reshape(b * c, h, w)  # channels as separate images
    y = y.detach().to(dtype).reshape(b * c, h, w)
    ux, uy = filt(a), filt(y)
    vx, vy, vxy = filt(a * a) - ux * ux, filt(y * y) - uy * uy, filt(a * y) - ux * uy
    c1, c2 = 0.01**2, 0.03**2  # (K1 L)^2, (K2 L)^2 with data range L = 1
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean((1, 2)).view(b, c).mean(1).to(torch.float64).cpu()


def mse_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the pixels of each image: (B,) float64."""
    return (x.double() - y.double()).square().flatten(1).mean(1)


def psnr_from_mse(mse: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """10 log10(range^2 / MSE) per image, MSE floored at ``MSE_FLOOR``."""
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(MSE_FLOOR))


@dataclass
class ReconstructionStats:
    """Per-image (N,) float64 MSE, PSNR (dB) and SSIM."""

    mse: torch.Tensor
    psnr: torch.Tensor
    ssim: torch.Tensor | None


@torch.inference_mode()
def reconstruction_stats(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    with_ssim: bool = True,
    batch_size: int = 1000,
) -> ReconstructionStats:
    """MSE, PSNR and SSIM of each image against ``model.reconstruct(x)`` (the decoder mean at
    z = E_q[z|x])."""
    mse, ssims = [], []
    for batch in batches:
        for x in batch.split(batch_size):
            r = model.reconstruct(x)
            mse.append(mse_per_image(x, r).cpu())
            if with_ssim:
                ssims.append(ssim(x, r.clamp(0.0, 1.0)))
    if not mse:
        raise ValueError("reconstruction_stats got no images")
    m = torch.cat(mse)
    return ReconstructionStats(m, psnr_from_mse(m), torch.cat(ssims) if with_ssim else None)


@METRICS.register("reconstruction")
def reconstruction_metric(ctx: EvalContext) -> list:
    """Reconstruction MSE (per pixel), PSNR (dB) and SSIM of x vs the decoder mean at E_q[z|x]."""
    with_ssim = have_skimage()  # without it, SSIM is reported as skipped (MSE, PSNR still run)
    part = ctx.shard_batches()  # several processes: each scores its slices, then all gather
    stats = reconstruction_stats(ctx.model, part, with_ssim=with_ssim, batch_size=ctx.batch_size)
    per_image = [stats.mse, stats.psnr] + ([stats.ssim] if with_ssim else [])
    per_image = ctx.gather(part.index, *per_image)
    _, ssim_desc = ssim_settings(*ctx.info.shape[1:])
    what = "x vs the decoder mean at z = E_q[z|x], data range 1"
    mse, mse_se = mean_and_stderr(per_image[0])
    psnr, psnr_se = mean_and_stderr(per_image[1])
    s, s_se = mean_and_stderr(per_image[2]) if with_ssim else (None, None)
    capped = int((per_image[0] <= MSE_FLOOR).sum())
    return [
        ctx.label(
            "recon.mse",
            mse,
            "per pixel",
            f"mean squared error per pixel, averaged over images; {what}",
            stderr=mse_se,
        ),
        ctx.label(
            "recon.psnr",
            psnr,
            "dB",
            f"10 log10(1 / MSE) per image, averaged over images; {what}",
            stderr=psnr_se,
            notes=(f"{capped} perfect reconstructions capped at 100 dB",) if capped else (),
        ),
        ctx.label(
            "recon.ssim",
            s,
            "",
            f"SSIM (Wang et al. 2004; scikit-image structural_similarity, {ssim_desc}), "
            f"channels then images averaged; {what}",
            stderr=s_se,
            notes=()
            if with_ssim
            else ("skipped: scikit-image is not installed (pip install scikit-image)",),
        ),
    ]
