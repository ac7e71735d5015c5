"""Prior samples: decode z ~ N(0, T^2 I) (Astorga et al. Fig. 3, the TF walkthrough's samples)."""

from __future__ import annotations

import math

import torch
from matplotlib.figure import Figure

from vaelab.viz.base import FIGURES, as_numpy, evaluating, new_figure, show_grid, tile, tile_inches


@FIGURES.register("samples")
def samples(
    model, *, n: int = 64, temperature: float | tuple[float, ...] = 1.0, seed: int = 0
) -> Figure:
    """Prior samples: means of p(x|z) for z ~ N(0, T^2 I), one panel per temperature T.

    A temperature below 1 draws from the prior's core (cleaner, less varied images).
    """
    temps = (float(temperature),) if isinstance(temperature, (int, float)) else tuple(temperature)
    if not temps or any(t < 0 for t in temps):
        raise ValueError(f"temperatures must be >= 0, got {temps}")
    ncols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / ncols)
    inch = tile_inches(model.shape)
    fig = new_figure(len(temps) * (ncols * inch + 0.2) + 0.2, rows * inch + 0.8)
    axes = fig.subplots(1, len(temps), squeeze=False)[0]
    with evaluating(model):
        for ax, t in zip(axes, temps):
            g = torch.Generator(device=model.device).manual_seed(seed)
            x = model.sample(n, temperature=t, generator=g)
            show_grid(ax, tile(as_numpy(x), ncols), f"T = {t:g}")
    fig.suptitle("Prior samples: means of p(x|z), z ~ N(0, T²I)", fontsize=11)
    return fig
