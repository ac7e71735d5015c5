"""The learned 2-D manifold (Kingma & Welling Fig. 4, Zhao et al. Fig. 8, the TF walkthrough).

Linearly spaced coordinates on the unit square are mapped through the inverse CDF of the
Gaussian, so the grid covers the prior by equal probability mass rather than equal distance,
and the decoder's mean is drawn at each point.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from scipy.special import ndtri

from vaelab.viz.base import (
    FIGURES,
    as_numpy,
    decode_mean,
    dims_by_kl,
    new_figure,
    show_grid,
    tile,
    tile_centres,
    tile_inches,
    wrap_title,
)


def inverse_cdf_grid(n: int, lo: float = 0.05, hi: float = 0.95) -> np.ndarray:
    """``n`` latent coordinates: the standard-normal quantiles of ``n`` probabilities evenly
    spaced in [lo, hi] (Phi^{-1}(p), p = lo, ..., hi), shape (n,)."""
    if n < 1:
        raise ValueError(f"grid size must be >= 1, got {n}")
    if not 0.0 < lo <= hi < 1.0:
        raise ValueError(f"quantile range must satisfy 0 < lo <= hi < 1, got ({lo}, {hi})")
    return ndtri(np.linspace(lo, hi, n))


def manifold_latents(
    n: int,
    latent_dim: int,
    dims: tuple[int, int] = (0, 1),
    plane: np.ndarray | None = None,
    lo: float = 0.05,
    hi: float = 0.95,
) -> np.ndarray:
    """Latents (n, n, Z) of the manifold grid: row r, column c holds z with
    (first axis, second axis) = (q[c], q[n - 1 - r]) for quantiles q, the rest at the prior mean 0.

    The axes are the latent dimensions ``dims``, or the rows of ``plane`` (2, Z): two
    directions spanning a chosen plane through the origin. The second axis grows upwards.
    """
    q = inverse_cdf_grid(n, lo, hi)
    if plane is None:
        i, j = dims
        plane = np.zeros((2, latent_dim))
        plane[0, i] = 1.0
        plane[1, j] = 1.0
    plane = np.asarray(plane, dtype=np.float64)
    if plane.shape != (2, latent_dim):
        raise ValueError(f"plane must have shape (2, {latent_dim}), got {plane.shape}")
    u, v = np.meshgrid(q, q[::-1])  # u varies along columns, v decreases down the rows
    return u[..., None] * plane[0] + v[..., None] * plane[1]


@FIGURES.register("manifold")
def manifold(
    model,
    data=None,
    *,
    n: int = 15,
    dims: tuple[int, int] | None = None,
    plane: np.ndarray | None = None,
    lo: float = 0.05,
    hi: float = 0.95,
) -> Figure:
    """The 2-D manifold: decoder means over a latent grid spaced by the inverse Gaussian CDF.

    z = 2: the whole latent plane. z > 2: the two dimensions with most KL on the held-out
    split (or ``dims``), or the plane through 0 spanned by the two rows of ``plane`` (2, Z);
    all other directions at 0. z = 1: one row.
    """
    zdim = model.latent_dim
    if zdim == 1:
        q = inverse_cdf_grid(n, lo, hi)
        x = as_numpy(decode_mean(model, q[:, None]))
        fig = new_figure(len(q) * tile_inches(model.shape) + 0.4, tile_inches(model.shape) + 1.0)
        ax = fig.add_subplot()
        show_grid(ax, tile(x, len(q), pad=0), "1-D manifold: decoder means at Φ⁻¹(p)")
        _ticks(ax.set_xticks, q, model.shape[2], pad=0)
        ax.set_xlabel("z[0]")
        return fig
    if plane is not None:
        if dims is not None:
            raise ValueError("give dims or plane, not both")
        z = manifold_latents(n, zdim, plane=plane, lo=lo, hi=hi)
        axes = ("u (first row of plane)", "v (second row of plane)")
        title = "2-D manifold on a chosen plane through 0"
    else:
        chosen = ""
        if dims is None:
            order, _ = dims_by_kl(model, data)
            dims = (int(order[0]), int(order[1]))
            chosen = "" if zdim == 2 or data is None else " (the two with most KL)"
        dims = (int(dims[0]), int(dims[1]))
        for d in dims:
            if not 0 <= d < zdim:
                raise ValueError(f"dims must lie in 0..{zdim - 1}, got {dims}")
        if dims[0] == dims[1]:
            raise ValueError(f"dims must be two different dimensions, got {dims}")
        z = manifold_latents(n, zdim, dims, lo=lo, hi=hi)
        axes = (f"z[{dims[0]}]", f"z[{dims[1]}]")
        rest = "" if zdim == 2 else f", other {zdim - 2} dims at 0"
        title = f"2-D manifold on z[{dims[0]}], z[{dims[1]}]{chosen}{rest}"
    x = as_numpy(decode_mean(model, z.reshape(n * n, zdim)))
    inch = tile_inches(model.shape) * 0.8  # seamless tiles read well a little smaller
    fig = new_figure(n * inch + 1.0, n * inch + 1.0)
    ax = fig.add_subplot()
    show_grid(ax, tile(x, n, pad=0), wrap_title(title, n * inch + 1.0))
    q = inverse_cdf_grid(n, lo, hi)
    _ticks(ax.set_xticks, q, model.shape[2], pad=0)
    _ticks(ax.set_yticks, q[::-1], model.shape[1], pad=0)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    return fig


def _ticks(setter, values: np.ndarray, size: int, pad: int = 0) -> None:
    """Label about five tile centres with their latent coordinate."""
    centres = tile_centres(len(values), size, pad)
    step = max(1, len(values) // 5)
    keep = list(range(0, len(values), step))
    if keep[-1] != len(values) - 1 and len(values) - 1 - keep[-1] >= step // 2:
        keep.append(len(values) - 1)
    setter([centres[k] for k in keep], [f"{values[k]:.2f}" for k in keep], fontsize=8)
