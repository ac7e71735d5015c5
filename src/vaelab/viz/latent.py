"""The latent space: posterior means coloured by label (Zhao et al. Fig. 5, the TF walkthrough,
Chakravarthy Fig. 18) and the KL each dimension carries."""

from __future__ import annotations

import matplotlib
import matplotlib.patches as mpatches
import numpy as np
from matplotlib.figure import Figure

from vaelab.viz.base import FIGURES, encode, kl_per_dim, new_figure, resolve_split

PROJECTIONS = ("pca", "tsne", "umap")


def project(z: np.ndarray, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Project latents (N, Z) to (N, 2); returns the points and the two axis labels.

    ``pca`` (axes carry the explained variance), ``tsne`` (scikit-learn) or ``umap`` (needs
    ``umap-learn``).
    """
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed).fit(z)
        var = pca.explained_variance_ratio_ * 100
        return pca.transform(z), [f"PC1 ({var[0]:.0f}% var.)", f"PC2 ({var[1]:.0f}% var.)"]
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (len(z) - 1) / 3)))
        out = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(z)
        return out, ["t-SNE 1", "t-SNE 2"]
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise ValueError(
                "method 'umap' needs the umap-learn package (pip install umap-learn)"
            ) from None
        return umap.UMAP(random_state=seed).fit_transform(z), ["UMAP 1", "UMAP 2"]
    raise ValueError(f"unknown projection {method!r}; choose one of: {', '.join(PROJECTIONS)}")


def _colour_values(labels, info, attribute: str | None):
    """(values, names, title) for colouring points: class labels, or one attribute column."""
    if labels is None:
        return None, None, None
    if labels.ndim == 1:
        names = info.label_names or tuple(str(k) for k in range(int(labels.max()) + 1))
        return labels, names, "label"
    attrs = list(info.attribute_names or [f"attr{k}" for k in range(labels.shape[1])])
    if attribute is None:
        col = 0
    else:
        lowered = [a.lower() for a in attrs]
        if attribute.lower() not in lowered:
            raise ValueError(f"unknown attribute {attribute!r}; choose one of: {', '.join(attrs)}")
        col = lowered.index(attribute.lower())
    values = labels[:, col]
    uniq = np.unique(values)
    return np.searchsorted(uniq, values), tuple(f"{attrs[col]}={u}" for u in uniq), attrs[col]


@FIGURES.register("latent-scatter")
def latent_scatter(
    model,
    data,
    *,
    n: int = 2000,
    method: str = "pca",
    dims: tuple[int, int] | None = None,
    attribute: str | None = None,
    split: str | None = None,
    seed: int = 0,
) -> Figure:
    """Posterior means of test images coloured by label (direct for z <= 2, else projected).

    z = 2 (or ``dims``) is plotted directly, with the prior's 1 and 2 sigma circles; larger
    latents are projected by ``method`` (``pca``, ``tsne``, ``umap``). For attribute labels
    the points are coloured by ``attribute`` (default: the first one).
    """
    mu, _, labels = encode(model, data, split, n=n, seed=seed)
    info = getattr(data, "info", None)
    direct = dims is not None or model.latent_dim <= 2
    if dims is not None:
        i, j = (int(d) for d in dims)
        for d in (i, j):
            if not 0 <= d < model.latent_dim:
                raise ValueError(f"dims must lie in 0..{model.latent_dim - 1}, got {dims}")
        points, axis = mu[:, [i, j]], [f"z[{i}]", f"z[{j}]"]
    elif model.latent_dim == 1:
        rng = np.random.default_rng(seed)
        points = np.stack([mu[:, 0], rng.uniform(-0.4, 0.4, len(mu))], 1)
        axis = ["z[0]", "jitter"]
    elif model.latent_dim == 2:
        points, axis = mu, ["z[0]", "z[1]"]
    else:
        points, axis = project(mu, method, seed)
    values, names, legend_title = _colour_values(labels, info, attribute)

    fig = new_figure(6.4, 5.2)
    ax = fig.add_subplot()
    if values is None:
        ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.6, color="tab:blue", linewidths=0)
    else:
        colours = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
        for k, name in enumerate(names):
            sel = values == k
            if sel.any():
                ax.scatter(
                    *points[sel].T,
                    s=6,
                    alpha=0.7,
                    color=colours(k % colours.N),
                    linewidths=0,
                    label=name,
                )
        ax.legend(
            title=legend_title,
            fontsize=7,
            title_fontsize=8,
            markerscale=2.5,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            frameon=False,
        )
    if dims is not None or model.latent_dim == 2:
        for r in (1, 2):
            ax.add_patch(mpatches.Circle((0, 0), r, fill=False, ls="--", lw=0.8, color="0.5"))
        ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel(axis[0])
    ax.set_ylabel(axis[1])
    how = "" if direct else f" ({method.upper() if method == 'pca' else method} projection)"
    ax.set_title(
        f"Latent means of {len(mu)} {resolve_split(data, split)} images, z = {model.latent_dim}{how}",
        fontsize=10,
    )
    return fig


@FIGURES.register("kl-per-dim")
def kl_per_dimension(
    model, data, *, n: int = 2000, split: str | None = None, seed: int = 0
) -> Figure:
    """Mean KL(q(z|x) || p(z)) per latent dimension, sorted; near-zero bars are inactive units."""
    mu, logvar, _ = encode(model, data, split, n=n, seed=seed)
    kl = kl_per_dim(mu, logvar)
    order = np.argsort(-kl, kind="stable")
    z = len(kl)
    fig = new_figure(min(12.0, max(4.0, 0.25 * z + 1.5)), 3.4)
    ax = fig.add_subplot()
    ax.bar(np.arange(z), kl[order], color="tab:blue")
    ax.set_xticks(np.arange(z), [str(d) for d in order], fontsize=7 if z > 20 else 9)
    ax.axhline(0.01, color="0.5", ls="--", lw=0.8, label="0.01 nats")
    ax.set_xlabel("latent dimension (sorted by KL)")
    ax.set_ylabel("mean KL (nats)")
    ax.set_title(
        f"KL per latent dimension, total {kl.sum():.2f} nats\n"
        f"({resolve_split(data, split)}, {len(mu)} images)",
        fontsize=10,
    )
    ax.legend(fontsize=8, frameon=False)
    return fig
