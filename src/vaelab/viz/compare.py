"""Figures that compare the runs of a sweep.

- ``latent-comparison`` (Astorga et al. Figs. 1 and 4): one panel per model, ordered by latent
  size, of prior samples or of reconstructions of the same test images.
- ``bound-curves`` (Kingma & Welling 2013, Fig. 2): the lower bound against the number of
  training images seen, training and validation, one colour per run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

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


# ---------------------------------------------------------------------------------- bound curves

# Config keys that never change what a run learns: left out of the automatic legend labels.
HOUSEKEEPING = {
    "name",
    "data.data_dir",
    "train.device",
    "train.threads",
    "train.figures",
    "train.report",
    "train.tensorboard",
    "train.log_every",
    "train.checkpoint_every",
}
SPLIT_STYLES = (("train", "--", "train"), ("valid", "-", "validation"))


def setting_label(key: str, value) -> str:
    """A legend label for one config setting: ``z = 3`` for the latent size, else the last part
    of the dotted key (``lr = 0.0003``, ``arch = conv``)."""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    elif isinstance(value, float):
        value = f"{value:g}"
    name = "z" if key == "model.latent_dim" else key.split(".")[-1]
    return f"{name} = {value}"


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def run_labels(runs: Sequence) -> list[str]:
    """What differs between the runs' configs, one label per run: ``z = 3``,
    ``lr = 0.001, seed = 1``, ...; the run folder names when nothing (or more than three keys)
    differs, or for a single run."""
    from vaelab.config import to_dict

    names = [r.path.name for r in runs]
    if len(runs) < 2:
        return names
    flats = [_flat(to_dict(r.config)) for r in runs]
    keys = sorted({k for f in flats for k in f} - HOUSEKEEPING)
    differ = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]
    # The latent size first: it is what most sweeps vary.
    differ.sort(key=lambda k: k != "model.latent_dim")
    if not differ or len(differ) > 3:
        return names
    return [", ".join(setting_label(k, f.get(k)) for k in differ) for f in flats]


def _as_logged_run(item):
    if isinstance(item, (str, os.PathLike)):
        from vaelab.runs import load_run

        return load_run(item)
    if not (hasattr(item, "metrics") and hasattr(item, "config") and hasattr(item, "path")):
        raise ValueError(
            "bound-curves needs runs (vaelab.runs.load_run) or run folders, which hold "
            f"metrics.jsonl and config.json; got a {type(item).__name__}"
        )
    return item


def bound_series(run) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, elbo), "valid": (images, elbo)}`` from the run's epoch records.

    ``images`` = ``step`` x ``train.batch_size`` (each step counted as a whole batch, so an
    epoch's smaller last batch is counted in full); ``elbo`` is the per-epoch mean training
    ELBO or the validation ELBO, nats per image. A split without records is left out; points
    at step 0 are dropped (the x axis is logarithmic). Raises ``ValueError`` naming the run
    folder when it has no epoch records at all.
    """
    from vaelab.viz.curves import series

    metrics = run.metrics()
    batch = run.config.train.batch_size
    out = {}
    for split, _, _ in SPLIT_STYLES:
        steps, elbo = series(metrics, "elbo", "epoch", split, x="step")
        keep = steps > 0
        if keep.any():
            out[split] = (steps[keep] * batch, elbo[keep])
    if not out:
        raise ValueError(
            f"{run.path}: metrics.jsonl has no epoch records with an ELBO "
            f"({len(metrics)} records in all); the run has not finished an epoch"
        )
    return out


def _in_view(y: np.ndarray) -> np.ndarray:
    """The values of a curve the y range must show: all but an outlying first epoch."""
    rest = y[1:]
    if len(y) >= 5 and rest.min() - y[0] > rest.max() - rest.min():
        return rest
    return y


def _colours(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    return [colormaps["viridis"](v) for v in np.linspace(0.0, 0.9, n)]


@FIGURES.register("bound-curves")
def bound_curves(runs, *, labels: Sequence[str] | None = None) -> Figure:
    """ELBO against training images seen (log x): train dashed, validation solid, per run.

    The lower bound in nats per image, one colour per run, after Kingma & Welling Fig. 2.
    ``runs`` are runs (:func:`vaelab.runs.load_run`) or run folders; images seen are
    ``step * train.batch_size`` of each run, the training bound is the per-epoch mean training
    ELBO. ``labels`` name the runs in the legend (default: what differs between their configs,
    e.g. ``z = 3``). The y range leaves out a curve's first epoch when it lies further below
    the rest than the rest spans (often hundreds of nats: it would flatten the curves)."""
    items = [_as_logged_run(r) for r in runs]
    if not items:
        raise ValueError("bound_curves needs at least one run")
    if labels is None:
        labels = run_labels(items)
    labels = [str(label) for label in labels]
    if len(labels) != len(items):
        raise ValueError(f"got {len(labels)} labels for {len(items)} runs")
    curves = [bound_series(r) for r in items]
    fig = new_figure(7.0, 4.6)
    ax = fig.add_subplot()
    handles = []
    shown: list[np.ndarray] = []
    for label, colour, curve in zip(labels, _colours(len(items)), curves):
        for split, style, name in SPLIT_STYLES:
            if split not in curve:
                continue
            x, y = curve[split]
            few = len(x) <= 30  # markers only where they can be told apart
            ax.plot(
                x,
                y,
                ls=style,
                lw=1.2 if few else 0.9,
                marker="o" if few else None,
                ms=2.5,
                mfc="white" if split == "train" else colour,
                color=colour,
                label=f"{label} ({name})",
            )
            shown.append(_in_view(y))
        handles.append(Line2D([], [], color=colour, lw=2, label=label))
    handles += [Line2D([], [], color="0.3", ls=s, lw=1.2, label=n) for _, s, n in SPLIT_STYLES]
    lo = min(float(v.min()) for v in shown)
    hi = max(float(y.max()) for c in curves for _, y in c.values())
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xscale("log")
    ax.grid(alpha=0.3, which="major")
    ax.grid(alpha=0.1, which="minor")
    ax.set_xlabel("training images seen (step × batch size)")
    ax.set_ylabel("ELBO (nats / image)")
    ax.legend(
        handles=handles, fontsize=8, frameon=False, loc="lower right", ncols=1 + len(handles) // 12
    )
    datasets = ", ".join(dict.fromkeys(r.config.data.name for r in items))
    ax.set_title(f"Lower bound vs training images seen: {datasets}", fontsize=11)
    return fig
