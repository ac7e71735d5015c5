"""What every figure shares: the FIGURES registry, blank figures, image grids, images and latents
taken from a dataset, and the one save helper.

Figures are built with the object-oriented API on an Agg canvas (``matplotlib.figure.Figure``,
never ``pyplot``), so nothing here touches a global figure manager or the user's backend, and a
figure made inside ``fit()`` is freed when it goes out of scope.

A registered figure is a plain function returning a :class:`~matplotlib.figure.Figure` (or, for
animations, :class:`Frames`, saved as a GIF). Its parameters say what it needs:
``model`` (a :class:`~vaelab.model.VAE`), ``data`` (a :class:`~vaelab.data.DataSplits`),
``metrics`` (the records of ``metrics.jsonl``) or ``runs`` (several runs); every other
keyword-only parameter is an option (``n``, ``temperature``, ``dims``, ...).
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import io
import math
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vaelab.io import atomic_path
from vaelab.registry import Registry

FIGURES: Registry[Callable[..., Figure | Frames]] = Registry("figure")

# Parameter names that are inputs, not options (see the module docstring).
INPUTS = ("model", "data", "metrics", "runs")
DPI = 150


@dataclass
class Frames:
    """An animation as RGB frames, uint8 arrays (H, W, 3) of one size; saved as a looping GIF.

    In a notebook it displays itself (``_repr_html_``).
    """

    frames: list[np.ndarray]
    duration_ms: int = 100

    def gif_bytes(self) -> bytes:
        from PIL import Image

        if not self.frames:
            raise ValueError("an animation needs at least one frame")
        grey = all(
            np.array_equal(f[..., 0], f[..., 1]) and np.array_equal(f[..., 0], f[..., 2])
            for f in self.frames
        )
        # Grey frames go in as "L": GIF needs no palette quantisation for them (much faster).
        images = [Image.fromarray(f[..., 0] if grey else f) for f in self.frames]
        buf = io.BytesIO()
        images[0].save(
            buf,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=self.duration_ms,
            loop=0,
        )
        return buf.getvalue()

    def _repr_html_(self) -> str:
        data = base64.b64encode(self.gif_bytes()).decode("ascii")
        return f'<img src="data:image/gif;base64,{data}" alt="animation">'


# ------------------------------------------------------------------------------ registry helpers


def figure_inputs(kind: str) -> list[str]:
    """The inputs (``model``, ``data``, ``metrics``, ``runs``) the figure ``kind`` takes."""
    params = inspect.signature(FIGURES.get(kind)).parameters
    return [p for p in INPUTS if p in params]


def figure_options(kind: str) -> dict[str, object]:
    """The options of figure ``kind`` and their defaults."""
    params = inspect.signature(FIGURES.get(kind)).parameters
    return {k: p.default for k, p in params.items() if k not in INPUTS}


def output_suffix(kind: str) -> str:
    """``.gif`` for animations, ``.png`` for figures (from the function's return annotation)."""
    ret = inspect.signature(FIGURES.get(kind)).return_annotation
    return ".gif" if "Frames" in str(ret) else ".png"


# --------------------------------------------------------------------------------- figure shells


def new_figure(width: float, height: float, **kwargs) -> Figure:
    """A white figure of ``width`` x ``height`` inches on an Agg canvas, constrained layout."""
    kwargs.setdefault("layout", "constrained")
    fig = Figure(figsize=(width, height), dpi=100, facecolor="white", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def tile_inches(shape: tuple[int, ...]) -> float:
    """Display size of one image tile: about 0.55 in for 8-28 px images, up to 1 in for 64 px."""
    h = shape[-2]
    return float(min(1.0, max(0.55, h / 50)))


# ----------------------------------------------------------------------------------- image grids


def as_numpy(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Images (N, C, H, W) -> float32 numpy in [0, 1] (clipped)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    return np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)


def tile(images: torch.Tensor | np.ndarray, ncols: int, pad: int = 1, pad_value: float = 1.0):
    """Tile N images (N, C, H, W) into rows of ``ncols``: (rows*(H+pad)+pad, ncols*(W+pad)+pad, C).

    Missing tiles in the last row are left as padding. Returns a float32 array in [0, 1].
    """
    x = as_numpy(images)
    n, c, h, w = x.shape
    rows = max(1, math.ceil(n / ncols))
    grid = np.full((rows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, np.float32)
    for i in range(n):
        r, k = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[top : top + h, left : left + w] = x[i].transpose(1, 2, 0)
    return grid


def wrap_title(title: str, width_in: float, fontsize: float = 10) -> str:
    """Wrap ``title`` to fit ``width_in`` inches at ``fontsize`` points (about 0.55 em a char)."""
    chars = max(20, int(width_in * 72 / (fontsize * 0.55)))
    return "\n".join(textwrap.wrap(title, chars)) if len(title) > chars else title


def show_grid(ax: Axes, grid: np.ndarray, title: str | None = None) -> None:
    """Draw a tiled grid (H, W, C) on ``ax``: grey colormap for one channel, no axis frame."""
    if grid.shape[-1] == 1:
        ax.imshow(grid[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=10)


def tile_centres(count: int, size: int, pad: int = 1) -> list[float]:
    """Pixel centres of ``count`` tiles of ``size`` px along one axis of a :func:`tile` grid."""
    return [pad + i * (size + pad) + (size - 1) / 2 for i in range(count)]


def label_rows(ax: Axes, labels: list[str], size: int, pad: int = 1, fontsize: float = 8) -> None:
    ax.set_yticks(tile_centres(len(labels), size, pad), labels, fontsize=fontsize)
    ax.tick_params(axis="y", length=0)


def label_cols(ax: Axes, labels: list[str], size: int, pad: int = 1, fontsize: float = 8) -> None:
    ax.set_xticks(tile_centres(len(labels), size, pad), labels, fontsize=fontsize)
    ax.tick_params(axis="x", length=0)


def grid_figure(
    images: torch.Tensor | np.ndarray,
    ncols: int,
    title: str,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    pad: int = 1,
    xlabel: str | None = None,
) -> Figure:
    """One tiled grid of images as a whole figure, with optional row and column labels.

    ``pad`` pixels of white separate the tiles (0 for a seamless manifold).
    """
    x = as_numpy(images)
    rows = max(1, math.ceil(len(x) / ncols))
    inch = tile_inches(x.shape)
    width = max(3.5, ncols * inch + (1.1 if row_labels else 0.2))
    title = wrap_title(title, width)
    extra_h = 0.3 + 0.2 * (title.count("\n") + 1) + (0.3 if col_labels else 0.0)
    extra_h += 0.25 if xlabel else 0.0
    fig = new_figure(width, rows * inch + extra_h)
    ax = fig.add_subplot()
    show_grid(ax, tile(x, ncols, pad=pad), title)
    if row_labels:
        label_rows(ax, row_labels, x.shape[2], pad)
    if col_labels:
        label_cols(ax, col_labels, x.shape[3], pad)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=9)
    return fig


# ------------------------------------------------------------------------ images and latents


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (batch norm, dropout) and no gradients; the training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


SPLITS = ("test", "valid", "train")


def resolve_split(data, split: str | None = None) -> str:
    """The split name ``split``, or for None the first non-empty of test, valid and train (the
    held-out images when there are any). An :class:`ImageSet` given directly is ``"images"``."""
    if hasattr(data, "images"):
        return split or "images"
    if split is None:
        for name in SPLITS:
            if len(getattr(data, name)) > 0:
                return name
        raise ValueError(f"every split of {data.info.name} is empty")
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")
    return split


def split_of(data, split: str | None = None):
    """The :class:`ImageSet` ``split`` of a :class:`DataSplits` (see :func:`resolve_split`); an
    ImageSet is returned as is."""
    if hasattr(data, "images"):
        return data
    return getattr(data, resolve_split(data, split))


def pick(data, n: int, split: str | None = None, seed: int = 0):
    """``n`` images drawn at random (seeded) from a split.

    Returns ``(x, labels, idx)``: float32 images (n, C, H, W) as the model sees them (dynamic
    binarization drawn with the same seed), labels at ``idx`` (or None) and the indices.
    """
    images = split_of(data, split)
    total = len(images)
    if total == 0:
        raise ValueError(f"the {resolve_split(data, split)} split of {images.info.name} is empty")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(total, generator=g)[: min(n, total)]
    x = images.to_float(images.images[idx], generator=g)
    labels = None if images.labels is None else images.labels[idx]
    return x, labels, idx


def encode(
    model, data, split: str | None = None, n: int | None = None, batch_size: int = 500, seed=0
):
    """Posterior means and log-variances of (up to ``n``, seeded) images of a split.

    Returns ``(mu, logvar, labels)``: float32 numpy (N, Z), (N, Z) and labels (N,) / (N, A) or None.
    """
    images = split_of(data, split)
    total = len(images)
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(total) if n is None or n >= total else torch.randperm(total, generator=g)[:n]
    mus, logvars = [], []
    with evaluating(model):
        for chunk in idx.split(batch_size):
            x = images.to_float(images.images[chunk], generator=g).to(model.device)
            q_z = model.encode(x)
            mus.append(q_z.mu.float().cpu())
            logvars.append(q_z.logvar.float().cpu())
    labels = None if images.labels is None else images.labels[idx].numpy()
    return torch.cat(mus).numpy(), torch.cat(logvars).numpy(), labels


def kl_per_dim(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """Mean closed-form KL(q(z|x) || N(0, 1)) per latent dimension over the rows, (Z,) nats."""
    return (0.5 * (mu**2 + np.exp(logvar) - 1.0 - logvar)).mean(0)


def dims_by_kl(
    model, data=None, split: str | None = None, n: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """Latent dimensions ordered by mean KL, most first, and their KL (nats).

    Without data the order is 0, 1, ... and the KL is NaN.
    """
    if data is None:
        return np.arange(model.latent_dim), np.full(model.latent_dim, np.nan)
    mu, logvar, _ = encode(model, data, split, n=n)
    kl = kl_per_dim(mu, logvar)
    order = np.argsort(-kl, kind="stable")
    return order, kl[order]


def decode_mean(model, z: torch.Tensor | np.ndarray, batch_size: int = 500) -> torch.Tensor:
    """The means of p(x|z) for latents (N, Z), decoded in batches on the model's device; CPU."""
    z = torch.as_tensor(np.asarray(z), dtype=torch.float32)
    out = []
    with evaluating(model):
        for chunk in z.split(batch_size):
            out.append(model.decode(chunk.to(model.device)).mean.float().cpu())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------ save


def save_figure(fig: Figure | Frames, path: str | Path, dpi: int = DPI) -> Path:
    """Write a Figure as PNG (:class:`Frames` as GIF) atomically; returns ``path``.

    The format follows the object, not the suffix: a Figure is always PNG, Frames a GIF.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        if isinstance(fig, Frames):
            tmp.write_bytes(fig.gif_bytes())
        else:
            fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")
    return path
