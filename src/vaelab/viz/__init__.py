"""Figures of a VAE: every figure is a function returning a matplotlib Figure, registered in
``FIGURES`` by kind, with one save helper. See docs/figures.md.

Importing this package imports matplotlib (Agg canvases only; ``import vaelab`` does not).

    from vaelab.viz import FIGURES, render, save_figure, plot_run
    fig = render("manifold", model=model, data=data, n=20)
    save_figure(fig, "manifold.png")
    plot_run("runs/quickstart", "latent-scatter", method="tsne")
    plot_sweep("sweeps/zdim", "bound-curves")   # every run folder of a sweep, one figure
"""

# Importing the figure modules registers them in FIGURES.
from vaelab.viz import (  # noqa: F401
    attributes,
    compare,
    curves,
    interpolations,
    latent,
    manifolds,
    prior,
    reconstruction,
    traversals,
)
from vaelab.viz.api import (
    DEFAULT_FIGURES,
    applicable_figures,
    plot_run,
    plot_runs,
    plot_sweep,
    render,
    save_default_figures,
)
from vaelab.viz.attributes import (
    AttributeDirection,
    binary_attributes,
    find_direction,
    fit_directions,
    probe_attributes,
)
from vaelab.viz.base import (
    FIGURES,
    Frames,
    figure_inputs,
    figure_options,
    output_suffix,
    save_figure,
    tile,
)
from vaelab.viz.compare import bound_curves, latent_comparison
from vaelab.viz.curves import training_curves
from vaelab.viz.interpolations import interpolation, lerp, slerp
from vaelab.viz.latent import kl_per_dimension, latent_scatter, project
from vaelab.viz.manifolds import inverse_cdf_grid, manifold, manifold_latents
from vaelab.viz.prior import samples
from vaelab.viz.reconstruction import neighbourhood, reconstructions
from vaelab.viz.traversals import traversal, traversal_animation

__all__ = [
    "DEFAULT_FIGURES",
    "FIGURES",
    "Frames",
    "AttributeDirection",
    "applicable_figures",
    "binary_attributes",
    "bound_curves",
    "figure_inputs",
    "figure_options",
    "find_direction",
    "fit_directions",
    "interpolation",
    "inverse_cdf_grid",
    "kl_per_dimension",
    "latent_comparison",
    "latent_scatter",
    "lerp",
    "manifold",
    "manifold_latents",
    "neighbourhood",
    "output_suffix",
    "plot_run",
    "plot_runs",
    "plot_sweep",
    "probe_attributes",
    "project",
    "reconstructions",
    "render",
    "save_default_figures",
    "samples",
    "save_figure",
    "slerp",
    "tile",
    "training_curves",
    "traversal",
    "traversal_animation",
]
