"""Linear-probe accuracy: how linearly the labels can be read from the latent means.

A logistic regression (scikit-learn, imported only here) is fitted on standardised E_q[z|x] of
training images and scored on the evaluated split. Class labels (N,) give one multinomial
probe; 0/1 attributes (N, A) (CelebA) or factor indices (N, A) (dSprites) give one probe per
column, and the reported number is their mean accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vaelab.metrics.active_units import posterior_means
from vaelab.metrics.base import METRICS, EvalContext, MetricUnavailable

MAX_ITER = 1000


@dataclass
class ProbeResult:
    """Mean accuracy over label columns, with each column's accuracy and the chance level
    (the majority class's frequency in the evaluated labels)."""

    accuracy: float
    per_column: list[float] = field(default_factory=list)
    chance: list[float] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


def linear_probe(
    z_train: torch.Tensor | np.ndarray,
    y_train: torch.Tensor | np.ndarray,
    z_test: torch.Tensor | np.ndarray,
    y_test: torch.Tensor | np.ndarray,
    *,
    C: float = 1.0,
    seed: int = 0,
) -> ProbeResult:
    """Fit logistic regression on (z_train, y_train), return accuracy on (z_test, y_test).

    Args:
        z_train, z_test: latent means (N, Z).
        y_train, y_test: labels (N,) or (N, A) integer columns.
        C: inverse L2 regularisation strength (scikit-learn's default 1).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    zt, zs = _np(z_train).astype(np.float64), _np(z_test).astype(np.float64)
    yt, ys = _np(y_train), _np(y_test)
    if yt.ndim == 1:
        yt, ys = yt[:, None], ys[:, None]
    if zt.shape[0] != yt.shape[0] or zs.shape[0] != ys.shape[0]:
        raise ValueError(
            f"{zt.shape[0]} train latents for {yt.shape[0]} labels, "
            f"{zs.shape[0]} test latents for {ys.shape[0]} labels"
        )
    accs, chance, skipped = [], [], []
    for j in range(yt.shape[1]):
        if np.unique(yt[:, j]).size < 2:  # a constant column cannot be probed
            skipped.append(j)
            continue
        clf = make_pipeline(
            StandardScaler(), LogisticRegression(C=C, max_iter=MAX_ITER, random_state=seed)
        )
        clf.fit(zt, yt[:, j])
        accs.append(float((clf.predict(zs) == ys[:, j]).mean()))
        _, counts = np.unique(ys[:, j], return_counts=True)
        chance.append(float(counts.max() / counts.sum()))
    if not accs:
        raise ValueError("every label column is constant in the training labels; nothing to probe")
    return ProbeResult(float(np.mean(accs)), accs, chance, skipped)


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _means_and_labels(ctx: EvalContext, split: str, limit: int | None):
    """E_q[z|x] (N, Z) and labels of the first ``limit`` images of ``split``; with several
    processes each encodes its slices and every process gets all the means, in order."""
    images = ctx.images(split)
    if limit is not None and limit < len(images):
        images = images.subset(slice(0, limit))
    if images.labels is None:
        raise MetricUnavailable(
            f"dataset {ctx.info.name} has no labels in its {split} split to probe"
        )
    if ctx.dist is not None and len(images) < ctx.dist.world_size:
        raise MetricUnavailable(
            f"{len(images)} {split} images cannot be shared by {ctx.dist.world_size} processes"
        )
    part = ctx.shard_batches(split, limit=limit)
    means = posterior_means(ctx.model, part)  # fills part.index
    return ctx.gather(part.index, means)[0], images.labels


@METRICS.register("probe")
def probe_metric(ctx: EvalContext) -> list:
    """Linear-probe accuracy: logistic regression on E_q[z|x] of train images, scored on the split."""
    z_test, y_test = _means_and_labels(ctx, ctx.split, None)  # ctx.images applies max_images
    train_split = "train" if ctx.split != "train" else "valid"
    z_train, y_train = _means_and_labels(ctx, train_split, ctx.probe_train_images)
    # several processes: rank 0 alone fits the probe; the others get its result
    res = ctx.on_main(lambda: linear_probe(z_train, y_train, z_test, y_test, seed=ctx.seed))
    cols = "" if y_test.dim() == 1 else f", mean over {len(res.per_column)} label columns"
    extra = {"fit_on": train_split, "fit_images": int(z_train.shape[0]), "chance": res.chance}
    if y_test.dim() > 1:
        extra["per_column"] = res.per_column
        extra["skipped_constant_columns"] = res.skipped
    return [
        ctx.label(
            "probe.accuracy",
            res.accuracy,
            "fraction",
            f"logistic regression (scikit-learn lbfgs, C = 1, standardised E_q[z|x]) fitted on "
            f"{z_train.shape[0]} {train_split} images, accuracy on the {ctx.split} split{cols}",
            extra=extra,
        )
    ]
