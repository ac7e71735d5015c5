"""Images through the autoencoder: reconstructions (Zhao et al. Figs. 6-7, Astorga et al. Fig. 2)
and decodes of the neighbourhood of real encodings (Chakravarthy Fig. 20)."""

from __future__ import annotations

import math

import torch
from matplotlib.figure import Figure

from vaelab.viz.base import FIGURES, decode_mean, evaluating, grid_figure, pick


@FIGURES.register("reconstructions")
def reconstructions(
    model, data, *, n: int = 32, layout: str = "columns", split: str | None = None, seed: int = 0
) -> Figure:
    """Originals beside their reconstructions (alternating columns, or paired rows).

    The reconstruction is the mean of p(x | z = E[q(z|x)]). ``layout="columns"``: odd columns originals, even columns reconstructions (Zhao et al.
    Figures 6-7); ``"rows"``: a row of originals over a row of reconstructions.
    """
    if layout not in ("columns", "rows"):
        raise ValueError(f"layout must be 'columns' or 'rows', got {layout!r}")
    x, _, _ = pick(data, n, split, seed)
    with evaluating(model):
        x_hat = model.reconstruct(x.to(model.device)).float().cpu()
    n = len(x)
    if layout == "columns":
        # (n, C, H, W) x 2 -> pairs (original, reconstruction) laid out in consecutive columns.
        pairs_per_row = max(1, math.ceil(math.sqrt(n / 2)))  # about as many rows as columns
        inter = torch.stack([x, x_hat], 1).flatten(0, 1)  # (2n, C, H, W)
        title = "Reconstructions: odd columns originals, even columns reconstructions"
        return grid_figure(inter, 2 * pairs_per_row, title)
    ncols = min(n, 16)
    rows = []
    for start in range(0, n, ncols):
        block = slice(start, start + ncols)
        orig, rec = x[block], x_hat[block]
        if len(orig) < ncols:  # pad the last block so originals and reconstructions stay aligned
            fill = torch.ones(ncols - len(orig), *x.shape[1:])
            orig, rec = torch.cat([orig, fill]), torch.cat([rec, fill])
        rows += [orig, rec]
    labels = ["original", "reconstruction"] * (len(rows) // 2)
    return grid_figure(torch.cat(rows), ncols, "Reconstructions", row_labels=labels)


@FIGURES.register("neighbourhood")
def neighbourhood(
    model,
    data,
    *,
    n: int = 6,
    sigma: float | tuple[float, ...] = (0.1, 0.5, 1.0),
    samples: int = 3,
    split: str | None = None,
    seed: int = 0,
) -> Figure:
    """Decodes of mu(x) + sigma * eps around real encodings (Chakravarthy Fig. 20).

    Each row: the original, its reconstruction, then ``samples`` decodes per noise level
    ``sigma`` (in latent units; the prior has unit scale).
    """
    sigmas = (float(sigma),) if isinstance(sigma, (int, float)) else tuple(map(float, sigma))
    x, _, _ = pick(data, n, split, seed)
    with evaluating(model):
        mu = model.encode(x.to(model.device)).mu.float().cpu()  # (n, Z)
    g = torch.Generator().manual_seed(seed + 1)
    cols = [mu]
    for s in sigmas:
        for _ in range(samples):
            cols.append(mu + s * torch.randn(mu.shape, generator=g))
    z = torch.stack(cols, 1)  # (n, 1 + len(sigmas) * samples, Z)
    decoded = decode_mean(model, z.flatten(0, 1)).view(len(x), z.shape[1], *x.shape[1:])
    tiles = torch.cat([x.unsqueeze(1), decoded], 1).flatten(0, 1)
    col_labels = ["x", "recon"] + [f"σ={s:g}" for s in sigmas for _ in range(samples)]
    title = "Neighbourhood samples: decode mu(x) + σ·ε, ε ~ N(0, I)"
    return grid_figure(tiles, len(col_labels), title, col_labels=col_labels)
