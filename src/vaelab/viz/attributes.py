"""Attribute directions (Astorga et al. 5.2.4, Fig. 5).

A logistic regression is fit on the posterior means of labelled images against each binary
attribute. Its held-out accuracy says how well the latent space captured the attribute (next to
the majority-class baseline, since attributes like CelebA's are unbalanced); its normalised
coefficient vector is the latent direction of the attribute. Decoding along that direction
traverses the attribute, and adding it to an image's encoding "adds the attribute".

Binary attributes come from the labels: "is digit d" (one vs rest) for class labels, the
attribute columns of CelebA, and dSprites' factors (one vs rest for factors with at most three
values, "above the median" for the others; constant factors are dropped).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure

from vaelab.viz.base import (
    FIGURES,
    decode_mean,
    encode,
    evaluating,
    grid_figure,
    new_figure,
    pick,
    resolve_split,
    split_of,
)


@dataclass(frozen=True)
class AttributeDirection:
    """A linear probe of one binary attribute on latent means.

    Attributes:
        name: the attribute ("Smiling", "is digit 3", "shape=1", "scale high").
        direction: (Z,) unit vector, the normalised logistic-regression coefficients.
        accuracy: held-out accuracy of the probe.
        baseline: held-out accuracy of always predicting the majority class.
        gap: mean projection on ``direction`` of positives minus negatives (latent units).
        n_positive: positives among the ``n`` images the probe was fit on.
        n: images the probe was fit on.
        n_test: images it was scored on.
        scored_on: which images those were ("test", or "held-out" rows of the fitted set).
    """

    name: str
    direction: np.ndarray
    accuracy: float
    baseline: float
    gap: float
    n_positive: int
    n: int
    n_test: int
    scored_on: str = "held-out"


def binary_attributes(
    labels: np.ndarray, info=None, reference: np.ndarray | None = None
) -> tuple[list[str], np.ndarray]:
    """Turn labels into binary attributes: names and a bool matrix (N, A).

    Class labels (N,) give one "is <class>" attribute per class; attribute labels (N, A) give
    each column as is when it has two values (the larger one is positive), one vs rest per value
    when it has three, "<name> high" (above the median) when it has more, and nothing when it
    is constant. The classes, values and medians are read from ``reference`` (e.g. the training
    split's labels) when given, so that two splits get the same attributes.
    """
    labels = np.asarray(labels)
    ref = labels if reference is None else np.asarray(reference)
    if labels.ndim == 1:
        num = getattr(info, "num_classes", None)
        classes = np.arange(num) if num else np.unique(ref)
        names_src = getattr(info, "label_names", None)
        names = []
        for c in classes:
            name = (
                names_src[int(c)] if names_src is not None and int(c) < len(names_src) else str(c)
            )
            names.append(f"is digit {name}" if name.isdigit() else f"is {name}")
        return names, labels[:, None] == classes[None, :]
    attr_names = getattr(info, "attribute_names", None) or [
        f"attr{k}" for k in range(labels.shape[1])
    ]
    names, cols = [], []
    for k, attr in enumerate(attr_names):
        col, values = labels[:, k], np.unique(ref[:, k])
        if len(values) == 2:
            names.append(attr)
            cols.append(col == values[1])
        elif len(values) == 3:
            for v in values:
                names.append(f"{attr}={v}")
                cols.append(col == v)
        elif len(values) > 3:
            names.append(f"{attr} high")
            cols.append(col > np.median(ref[:, k]))
    return names, np.stack(cols, 1) if cols else np.zeros((len(labels), 0), bool)


def fit_directions(
    z: np.ndarray,
    targets: np.ndarray,
    names: list[str],
    *,
    z_test: np.ndarray | None = None,
    targets_test: np.ndarray | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    C: float = 1.0,
    scored_on: str = "held-out",
) -> list[AttributeDirection]:
    """Fit one logistic regression per attribute column of ``targets`` (N, A) on latents (N, Z).

    Accuracy is measured on ``z_test``/``targets_test`` when given, else on a stratified
    held-out ``test_fraction`` of the rows. Attributes with fewer than four positives or
    negatives to fit on, or none of either class to score on, are skipped.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    z = np.asarray(z, np.float64)
    targets = np.asarray(targets, bool)
    if targets.ndim != 2 or targets.shape != (len(z), len(names)):
        raise ValueError(f"targets must be (N, A) = ({len(z)}, {len(names)}), got {targets.shape}")
    if (z_test is None) != (targets_test is None):
        raise ValueError("give both z_test and targets_test, or neither")
    # Newton steps converge in a few iterations on a handful of latent dimensions.
    solver = "newton-cholesky" if z.shape[1] <= 32 else "lbfgs"
    out = []
    for k, name in enumerate(names):
        y = targets[:, k]
        if z_test is None:
            if min(y.sum(), (~y).sum()) < 4:
                continue
            z_fit, z_te, y_fit, y_te = train_test_split(
                z, y, test_size=test_fraction, random_state=seed, stratify=y
            )
        else:
            z_fit, y_fit = z, y
            z_te, y_te = np.asarray(z_test, np.float64), np.asarray(targets_test, bool)[:, k]
        if min(y_fit.sum(), (~y_fit).sum()) < 4 or len(y_te) == 0:
            continue
        clf = LogisticRegression(C=C, solver=solver, max_iter=2000).fit(z_fit, y_fit)
        w = clf.coef_[0]
        norm = np.linalg.norm(w)
        direction = w / norm if norm > 0 else w
        proj = z_fit @ direction
        out.append(
            AttributeDirection(
                name=name,
                direction=direction,
                accuracy=float(clf.score(z_te, y_te)),
                baseline=float(max(y_te.mean(), 1.0 - y_te.mean())),
                gap=float(proj[y_fit].mean() - proj[~y_fit].mean()),
                n_positive=int(y_fit.sum()),
                n=len(y_fit),
                n_test=len(y_te),
                scored_on=scored_on,
            )
        )
    return out


# The last probe, reused while the same model (unchanged weights) and data are asked about:
# a report draws three attribute figures and a table from one probe.
_last_probe: dict = {}


def _weights_version(model) -> tuple:
    return tuple(t._version for t in model.state_dict(keep_vars=True).values())


def probe_attributes(
    model, data, *, n: int = 10000, split: str | None = None, seed: int = 0
) -> list[AttributeDirection]:
    """Encode labelled images and fit a direction per binary attribute.

    With a :class:`DataSplits`, the probes are fit on up to ``n`` training images and scored
    on up to ``n`` images of ``split``; with one :class:`ImageSet`, on a held-out quarter of it.
    """
    key = (id(model), _weights_version(model), id(data), n, split, seed)
    if (
        _last_probe.get("key") == key
        and _last_probe["model"]() is model
        and _last_probe["data"]() is data
    ):
        return list(_last_probe["directions"])
    directions = _probe(model, data, n, split, seed)
    _last_probe.update(
        key=key, model=weakref.ref(model), data=weakref.ref(data), directions=directions
    )
    return list(directions)


def _probe(model, data, n: int, split: str | None, seed: int) -> list[AttributeDirection]:
    scored = split_of(data, split)
    if scored.labels is None:
        raise ValueError(f"{scored.info.name} has no labels: attribute directions need labels")
    name = resolve_split(data, split)
    if hasattr(data, "images") or name == "train":  # no held-out split: hold out a quarter
        mu, _, labels = encode(model, data, split, n=n, seed=seed)
        names, targets = binary_attributes(labels, scored.info)
        return fit_directions(mu, targets, names, seed=seed, scored_on=f"held-out {name}")
    mu, _, labels = encode(model, data, "train", n=n, seed=seed)
    mu_te, _, labels_te = encode(model, data, split, n=n, seed=seed)
    names, targets = binary_attributes(labels, scored.info)
    _, targets_te = binary_attributes(labels_te, scored.info, reference=labels)
    return fit_directions(
        mu, targets, names, z_test=mu_te, targets_test=targets_te, seed=seed, scored_on=name
    )


def find_direction(directions: list[AttributeDirection], name: str | None) -> AttributeDirection:
    """The direction called ``name`` (case-insensitive; "3" finds "is digit 3"), or, for None,
    the one whose probe beats its baseline by most."""
    if not directions:
        raise ValueError("no attribute could be probed (too few positives or negatives)")
    if name is None:
        return max(directions, key=lambda d: d.accuracy - d.baseline)
    wanted = name.lower()
    for d in directions:
        if d.name.lower() in (wanted, f"is digit {wanted}", f"is {wanted}"):
            return d
    raise ValueError(
        f"unknown attribute {name!r}; choose one of: {', '.join(d.name for d in directions)}"
    )


@FIGURES.register("attribute-accuracy")
def attribute_accuracy(
    model, data, *, n: int = 10000, split: str | None = None, seed: int = 0
) -> Figure:
    """Held-out accuracy of a linear probe per attribute, beside the majority baseline.

    How well the latent space captured each attribute (Astorga et al. 5.2.4)."""
    directions = sorted(
        probe_attributes(model, data, n=n, split=split, seed=seed), key=lambda d: d.accuracy
    )
    if not directions:
        raise ValueError("no attribute could be probed (too few positives or negatives)")
    a = len(directions)
    fig = new_figure(6.4, max(2.4, 0.22 * a + 1.2))
    ax = fig.add_subplot()
    y = np.arange(a)
    ax.barh(y, [d.accuracy for d in directions], color="tab:blue", label="probe accuracy")
    ax.scatter(
        [d.baseline for d in directions],
        y,
        marker="|",
        s=120,
        color="black",
        zorder=3,
        label="majority baseline",
    )
    ax.set_yticks(y, [d.name for d in directions], fontsize=7 if a > 20 else 9)
    lowest = min(min(d.accuracy, d.baseline) for d in directions)
    ax.set_xlim(max(0.0, np.floor(min(0.5, lowest - 0.02) * 10) / 10), 1.0)
    ax.set_xlabel("held-out accuracy")
    d0 = directions[0]
    ax.set_title(
        f"Attributes captured by the latent space: logistic probes on latent means\n"
        f"(fit on {d0.n} images, scored on {d0.n_test} {d0.scored_on} images)",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


@FIGURES.register("attribute-traversal")
def attribute_traversal(
    model,
    data,
    *,
    attribute: str | None = None,
    n: int = 6,
    steps: int = 9,
    limit: float = 3.0,
    base: str = "prior",
    split: str | None = None,
    seed: int = 0,
) -> Figure:
    """Traversals along attribute directions: decodes of base + alpha * d (Astorga Fig. 5).

    d is the unit probe direction and alpha runs over [-limit, limit].

    Rows: ``attribute``, or the ``n`` attributes whose probes beat their baseline by most. The
    base is a prior draw (as Astorga et al. Fig. 5) or, with ``base="data"``, a test encoding.
    """
    directions = probe_attributes(model, data, split=split, seed=seed)
    if attribute is not None:
        chosen = [find_direction(directions, attribute)]
    else:
        chosen = sorted(directions, key=lambda d: d.accuracy - d.baseline, reverse=True)[:n]
    if base == "prior":
        g = torch.Generator().manual_seed(seed)
        z0 = torch.randn(model.latent_dim, generator=g).double().numpy()
    elif base == "data":
        x, _, _ = pick(data, 1, split, seed)
        with evaluating(model):
            z0 = model.encode(x.to(model.device)).mu[0].double().cpu().numpy()
    else:
        raise ValueError(f"base must be 'prior' or 'data', got {base!r}")
    alphas = np.linspace(-limit, limit, steps)
    z = np.stack([z0 + alphas[:, None] * d.direction for d in chosen])  # (rows, steps, Z)
    x = decode_mean(model, z.reshape(-1, model.latent_dim))
    rows = [f"{d.name} ({d.accuracy:.2f})" for d in chosen]
    cols = [f"{a:+.1f}" for a in alphas]
    title = f"Traversal along attribute directions from a {base} latent (probe accuracy)"
    return grid_figure(
        x,
        steps,
        title,
        row_labels=rows,
        col_labels=cols,
        xlabel="α: distance along the unit direction",
    )


@FIGURES.register("attribute-add")
def attribute_add(
    model,
    data,
    *,
    attribute: str | None = None,
    n: int = 6,
    strengths: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0),
    split: str | None = None,
    seed: int = 0,
) -> Figure:
    """Add an attribute to images: decodes of mu(x) + s * gap * d for images without it.

    Each row: the image, its reconstruction, then the shifted decodes; gap is the distance
    between positives and negatives along the probe direction d."""
    images = split_of(data, split)
    directions = probe_attributes(model, data, split=split, seed=seed)
    d = find_direction(directions, attribute)
    reference = data.train.labels.numpy() if hasattr(data, "train") else None
    names, targets = binary_attributes(images.labels.numpy(), images.info, reference)
    negatives = np.flatnonzero(~targets[:, names.index(d.name)])
    rng = np.random.default_rng(seed)
    idx = torch.as_tensor(rng.choice(negatives, size=min(n, len(negatives)), replace=False))
    x = images.to_float(images.images[idx], generator=torch.Generator().manual_seed(seed))
    with evaluating(model):
        mu = model.encode(x.to(model.device)).mu.double().cpu().numpy()
    shifts = np.array([0.0, *strengths]) * d.gap
    z = mu[:, None, :] + shifts[None, :, None] * d.direction  # (n, 1 + S, Z)
    decoded = decode_mean(model, z.reshape(-1, model.latent_dim)).view(
        len(x), len(shifts), *x.shape[1:]
    )
    tiles = torch.cat([x[:, None], decoded], 1).flatten(0, 1)
    cols = ["x", "recon"] + [f"+{s:g}Δ" for s in strengths]
    title = (
        f"Adding '{d.name}' (probe accuracy {d.accuracy:.2f}; Δ = {d.gap:.2f} along its direction)"
    )
    return grid_figure(tiles, len(cols), title, col_labels=cols)
