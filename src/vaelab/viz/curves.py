"""Training curves from ``metrics.jsonl``: the loss, the true ELBO, the reconstruction term and
the KL, train and validation, against steps, each on its own axis so that the walkthrough's
observation (the KL rises while the total falls) is visible; and SSIM per epoch when logged
(Chakravarthy Figs. 15-16).

Records (one JSON object per line) look like ``{"kind": "step" | "epoch", "step", "epoch",
"split": "train" | "valid", "loss", "elbo", "rec", "kl", "beta", "lr", ...}``; a valid epoch
record may carry ``ssim``.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from vaelab.viz.base import FIGURES, new_figure

PANELS = (
    ("loss", "Training objective (loss)", "nats"),
    ("elbo", "True ELBO (β = 1)", "nats, higher is better"),
    ("rec", "Reconstruction term", "nats"),
    ("kl", "KL(q(z|x) ‖ p(z))", "nats"),
)


def series(metrics: list[dict], key: str, kind: str, split: str, x: str = "step"):
    """(x, y) arrays of ``key`` over the records of ``kind`` and ``split`` that carry it."""
    pts = [
        (r[x], r[key])
        for r in metrics
        if r.get("kind") == kind
        and r.get("split") == split
        and isinstance(r.get(key), (int, float))
        and isinstance(r.get(x), (int, float))
        and math.isfinite(r[key])
    ]
    if not pts:
        return np.zeros(0), np.zeros(0)
    xs, ys = zip(*pts)
    return np.asarray(xs, float), np.asarray(ys, float)


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` points (shrinking at the ends)."""
    if window <= 1 or len(y) < 3:
        return y
    kernel = np.ones(window)
    num = np.convolve(y, kernel, mode="same")
    den = np.convolve(np.ones_like(y), kernel, mode="same")
    return num / den


@FIGURES.register("training-curves")
def training_curves(metrics: list[dict], *, smoothing: int | None = None) -> Figure:
    """Loss, true ELBO, reconstruction and KL against steps, and SSIM per epoch if logged.

    Train steps are drawn raw and smoothed, train and validation epoch means with markers."""
    if not metrics:
        raise ValueError("no training records: metrics.jsonl is empty or missing")
    has_ssim = any(isinstance(r.get("ssim"), (int, float)) for r in metrics)
    panels = list(PANELS) + ([("ssim", "SSIM per epoch (validation)", "SSIM")] if has_ssim else [])
    beta_varies = len({r.get("beta") for r in metrics if r.get("kind") == "step"}) > 1
    ncols = 3 if len(panels) > 4 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig = new_figure(5.0 * ncols, 3.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, (key, title, unit) in zip(axes, panels):
        if key == "ssim":
            for split, colour in (("valid", "tab:orange"), ("train", "tab:blue")):
                xs, ys = series(metrics, "ssim", "epoch", split, x="epoch")
                if len(xs):
                    ax.plot(xs, ys, "o-", ms=3, color=colour, label=split)
            ax.set_xlabel("epoch")
        else:
            _panel(ax, metrics, key, smoothing)
            ax.set_xlabel("step")
            if key == "kl" and beta_varies:
                twin = ax.twinx()
                xs, ys = series(metrics, "beta", "step", "train")
                twin.plot(xs, ys, color="0.5", lw=0.8, ls="--", label="β")
                twin.set_ylabel("β (KL weight)", fontsize=8, color="0.4")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit, fontsize=8)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, frameon=False)
    if not has_ssim:  # supxlabel: constrained layout makes room for it
        fig.supxlabel(
            "SSIM per epoch: not logged (no 'ssim' on the epoch records of metrics.jsonl)",
            fontsize=7,
            color="0.4",
            x=0.01,
            ha="left",
        )
    fig.suptitle("Training curves", fontsize=11)
    return fig


def _panel(ax, metrics: list[dict], key: str, smoothing: int | None) -> None:
    xs, ys = series(metrics, key, "step", "train")
    if len(xs):
        window = smoothing if smoothing is not None else max(1, len(xs) // 25)
        if window > 1:
            ax.plot(xs, ys, color="tab:blue", alpha=0.25, lw=0.7)
        ax.plot(
            xs,
            smooth(ys, window),
            color="tab:blue",
            lw=1.2,
            label="train (steps" + (", smoothed)" if window > 1 else ")"),
        )
    for split, colour, marker in (("train", "tab:blue", "s"), ("valid", "tab:orange", "o")):
        ex, ey = series(metrics, key, "epoch", split)
        if len(ex):
            ax.plot(
                ex,
                ey,
                marker=marker,
                ms=3.5,
                ls="-",
                lw=1.0,
                color=colour,
                mfc="white" if split == "train" else colour,
                label=f"{split} (epoch)",
            )
    if not ax.lines:
        ax.text(
            0.5,
            0.5,
            f"no '{key}' in the log",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="0.4",
        )
