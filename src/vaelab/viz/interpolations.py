"""Interpolation between two images' encodings, linear and spherical (slerp)."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure

from vaelab.viz.base import FIGURES, decode_mean, evaluating, grid_figure, pick

METHODS = ("linear", "slerp", "both")


def lerp(z0: np.ndarray, z1: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Linear interpolation: (Z,), (Z,), (T,) -> (T, Z)."""
    t = np.asarray(t, dtype=np.float64)[:, None]
    return (1.0 - t) * z0 + t * z1


def slerp(z0: np.ndarray, z1: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation (Shoemake 1985) about the origin: (Z,), (Z,), (T,) -> (T, Z).

    With omega the angle between z0 and z1, z(t) = sin((1-t) omega)/sin omega z0 +
    sin(t omega)/sin omega z1. Under a Gaussian prior it keeps the norm near the typical shell
    where a straight line passes through the low-norm centre. Falls back to :func:`lerp` when
    the vectors are (anti)parallel or zero.
    """
    z0, z1 = np.asarray(z0, np.float64), np.asarray(z1, np.float64)
    t = np.asarray(t, dtype=np.float64)[:, None]
    n0, n1 = np.linalg.norm(z0), np.linalg.norm(z1)
    if n0 < 1e-12 or n1 < 1e-12:
        return lerp(z0, z1, t[:, 0])
    cos = np.clip(np.dot(z0, z1) / (n0 * n1), -1.0, 1.0)
    omega = np.arccos(cos)
    if np.sin(omega) < 1e-6:
        return lerp(z0, z1, t[:, 0])
    return (np.sin((1.0 - t) * omega) * z0 + np.sin(t * omega) * z1) / np.sin(omega)


@FIGURES.register("interpolation")
def interpolation(
    model,
    data,
    *,
    n: int = 4,
    steps: int = 10,
    method: str = "both",
    split: str | None = None,
    seed: int = 0,
) -> Figure:
    """Interpolation between the latent means of pairs of test images, linear and slerp.

    Each row: image A, decodes at t = 0 ... 1, image B. ``method`` is ``linear``, ``slerp`` or
    ``both`` (a linear row above a slerp row for each pair).
    """
    if method not in METHODS:
        raise ValueError(f"unknown interpolation {method!r}; choose one of: {', '.join(METHODS)}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    x, _, _ = pick(data, 2 * n, split, seed)
    if len(x) < 2:
        raise ValueError("interpolation needs at least two images")
    pairs = len(x) // 2
    with evaluating(model):
        mu = model.encode(x.to(model.device)).mu.double().cpu().numpy()
    t = np.linspace(0.0, 1.0, steps)
    methods = ("linear", "slerp") if method == "both" else (method,)
    rows, labels = [], []
    for p in range(pairs):
        a, b = mu[2 * p], mu[2 * p + 1]
        for m in methods:
            path = lerp(a, b, t) if m == "linear" else slerp(a, b, t)
            rows.append((x[2 * p], decode_mean(model, path), x[2 * p + 1]))
            labels.append(f"{p + 1}: {m}")
    tiles = torch.cat([torch.cat([a[None], mid, b[None]]) for a, mid, b in rows])
    col_labels = ["A"] + [f"{v:.2g}" for v in t] + ["B"]
    title = "Interpolation between latent means (columns: t)"
    return grid_figure(
        tiles, steps + 2, title, row_labels=labels, col_labels=col_labels, xlabel="t"
    )
