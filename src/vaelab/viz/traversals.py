"""Latent traversals: vary one dimension at a time (ordered by KL) around a base latent, as a
grid (one row per dimension) and as an animated GIF (one panel per dimension)."""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.figure import Figure

from vaelab.viz.base import (
    FIGURES,
    Frames,
    as_numpy,
    decode_mean,
    dims_by_kl,
    evaluating,
    grid_figure,
    new_figure,
    pick,
    tile_inches,
)


def base_latent(
    model, data, base: str = "data", split: str | None = None, seed: int = 0
) -> np.ndarray:
    """The latent traversals start from: ``data`` (the posterior mean of one test image, drawn
    by ``seed``), ``zero`` (the prior mean) or ``prior`` (a draw from N(0, I)); shape (Z,)."""
    if base == "zero" or (base == "data" and data is None):
        return np.zeros(model.latent_dim)
    if base == "prior":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(model.latent_dim, generator=g).double().numpy()
    if base == "data":
        x, _, _ = pick(data, 1, split, seed)
        with evaluating(model):
            return model.encode(x.to(model.device)).mu[0].double().cpu().numpy()
    raise ValueError(f"base must be 'data', 'zero' or 'prior', got {base!r}")


def traversal_latents(base: np.ndarray, dims, values: np.ndarray) -> np.ndarray:
    """(len(dims), len(values), Z): ``base`` with dimension ``dims[r]`` set to ``values[c]``."""
    z = np.repeat(np.asarray(base, np.float64)[None, None], len(dims), 0)
    z = np.repeat(z, len(values), 1)
    for r, d in enumerate(dims):
        z[r, :, d] = values
    return z


def _chosen_dims(model, data, n: int | None, dims) -> tuple[list[int], list[float]]:
    order, kl = dims_by_kl(model, data)
    if dims is not None:
        chosen = [int(d) for d in dims]
        for d in chosen:
            if not 0 <= d < model.latent_dim:
                raise ValueError(f"dims must lie in 0..{model.latent_dim - 1}, got {dims}")
        lookup = dict(zip(order.tolist(), kl.tolist()))
        return chosen, [lookup[d] for d in chosen]
    k = min(model.latent_dim, 10 if n is None else n)
    return order[:k].tolist(), kl[:k].tolist()


def _row_label(d: int, kl: float) -> str:
    return f"z[{d}]" if math.isnan(kl) else f"z[{d}]  KL {kl:.2f}"


@FIGURES.register("traversal")
def traversal(
    model,
    data=None,
    *,
    n: int | None = None,
    dims: tuple[int, ...] | None = None,
    steps: int = 11,
    limit: float = 3.0,
    base: str = "data",
    split: str | None = None,
    seed: int = 0,
) -> Figure:
    """Traversals: one row per latent dimension (most KL first), the others held at a base.

    ``n`` rows (default: up to 10) or the dimensions ``dims``; each row sets that dimension of
    the base latent to ``steps`` values in [-limit, limit]."""
    chosen, kls = _chosen_dims(model, data, n, dims)
    values = np.linspace(-limit, limit, steps)
    z = traversal_latents(base_latent(model, data, base, split, seed), chosen, values)
    x = decode_mean(model, z.reshape(-1, model.latent_dim))
    rows = [_row_label(d, k) for d, k in zip(chosen, kls)]
    cols = [f"{v:+.1f}" for v in values]
    title = f"Latent traversals from a {base} latent (rows ordered by KL)"
    return grid_figure(
        x, steps, title, row_labels=rows, col_labels=cols, xlabel="value of the traversed dimension"
    )


@FIGURES.register("traversal-animation")
def traversal_animation(
    model,
    data=None,
    *,
    n: int | None = None,
    dims: tuple[int, ...] | None = None,
    steps: int = 21,
    limit: float = 3.0,
    base: str = "data",
    split: str | None = None,
    seed: int = 0,
) -> Frames:
    """Traversals as an animated GIF: one panel per dimension, all swept together.

    The value runs from -limit to +limit and back."""
    chosen, kls = _chosen_dims(model, data, n, dims)
    values = np.linspace(-limit, limit, steps)
    z = traversal_latents(base_latent(model, data, base, split, seed), chosen, values)
    frames = as_numpy(decode_mean(model, z.reshape(-1, model.latent_dim)))
    frames = frames.reshape(len(chosen), steps, *frames.shape[1:])  # (dims, steps, C, H, W)

    ncols = min(len(chosen), 5)
    nrows = math.ceil(len(chosen) / ncols)
    inch = max(1.0, tile_inches(model.shape) * 1.6)
    fig = new_figure(ncols * inch + 0.2, nrows * (inch + 0.3) + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    images = []
    for k, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= len(chosen):
            ax.set_visible(False)
            continue
        ax.set_title(_row_label(chosen[k], kls[k]), fontsize=8)
        cmap = "gray" if frames.shape[2] == 1 else None
        images.append(
            ax.imshow(
                _hwc(frames[k, 0]),
                vmin=0,
                vmax=1,
                interpolation="nearest",
                cmap=cmap,
                animated=True,
            )
        )
    title = fig.suptitle("traversal value", fontsize=10, animated=True)
    # Blitting: draw the static parts once, then only the images and the title per frame.
    fig.canvas.draw()
    fig.set_layout_engine("none")
    background = fig.canvas.copy_from_bbox(fig.bbox)
    rendered = []
    for s in range(steps):
        fig.canvas.restore_region(background)
        for k, im in enumerate(images):
            im.set_data(_hwc(frames[k, s]))
            fig.draw_artist(im)
        title.set_text(f"traversal value {values[s]:+.2f}")
        fig.draw_artist(title)
        rendered.append(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    out = [rendered[s] for s in list(range(steps)) + list(range(steps - 2, 0, -1))]  # and back
    return Frames(out, duration_ms=100)


def _hwc(img: np.ndarray) -> np.ndarray:
    return img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
