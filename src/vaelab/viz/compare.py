"""Latent-size comparison for sweeps (Astorga et al. Figs. 1 and 4): one panel per model, ordered
by latent size, of prior samples or of reconstructions of the same test images."""

from __future__ import annotations

import math

import torch
from matplotlib.figure import Figure

from vaelab.viz.base import (
    FIGURES,
    as_numpy,
    evaluating,
    new_figure,
    pick,
    show_grid,
    tile,
    tile_inches,
)


def _model_of(item):
    return getattr(item, "model", item)


def _label_of(item, model) -> str:
    name = getattr(item, "path", None)
    z = f"z = {model.latent_dim}"
    return z if name is None else f"{z}\n{getattr(name, 'name', name)}"


@FIGURES.register("latent-comparison")
def latent_comparison(
    runs,
    data=None,
    *,
    mode: str = "samples",
    n: int = 16,
    temperature: float = 1.0,
    split: str | None = None,
    seed: int = 0,
) -> Figure:
    """Latent-size comparison: one panel per model, ordered by latent size (Astorga Figs. 1, 4).

    Each panel holds ``n`` prior samples (``mode="samples"``) or reconstructions of the same
    ``n`` test images (``mode="reconstructions"``, the originals first); ``runs`` are models or
    runs."""
    if mode not in ("samples", "reconstructions"):
        raise ValueError(f"mode must be 'samples' or 'reconstructions', got {mode!r}")
    items = sorted(runs, key=lambda r: _model_of(r).latent_dim)
    if not items:
        raise ValueError("latent_comparison needs at least one model or run")
    shapes = {tuple(_model_of(r).shape) for r in items}
    if len(shapes) > 1:
        raise ValueError(f"all models must take the same image shape, got {sorted(shapes)}")
    panels: list[tuple[str, torch.Tensor]] = []
    if mode == "reconstructions":
        if data is None:
            raise ValueError("mode='reconstructions' needs data")
        x, _, _ = pick(data, n, split, seed)
        panels.append(("data", x))
    for item in items:
        model = _model_of(item)
        with evaluating(model):
            if mode == "samples":
                g = torch.Generator(device=model.device).manual_seed(seed)
                out = model.sample(n, temperature=temperature, generator=g)
            else:
                out = model.reconstruct(x.to(model.device))
        panels.append((_label_of(item, model), out.float().cpu()))
    ncols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / ncols)
    inch = tile_inches(next(iter(shapes)))
    fig = new_figure(len(panels) * (ncols * inch * 0.8 + 0.15) + 0.3, rows * inch * 0.8 + 0.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, images) in zip(axes, panels):
        show_grid(ax, tile(as_numpy(images), ncols), label)
    what = "prior samples" if mode == "samples" else "reconstructions"
    fig.suptitle(f"Effect of the latent size: {what}", fontsize=11)
    return fig
