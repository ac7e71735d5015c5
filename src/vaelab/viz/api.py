"""Figures by name: :func:`render` one kind from in-memory inputs, :func:`plot_run` one kind of
a saved run to a file, :func:`plot_runs` a figure of several runs, :func:`plot_sweep` one of
every run of a sweep folder, and :func:`save_default_figures`, the
quick pair that ``fit()`` writes at the end of a run."""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from vaelab.viz.base import FIGURES, INPUTS, Frames, figure_options, output_suffix, save_figure

DEFAULT_FIGURES = ("reconstructions", "samples")


def render(
    kind: str, *, model=None, data=None, metrics=None, runs=None, **options
) -> Figure | Frames:
    """Make the figure ``kind`` from the inputs it takes; other keywords are its options.

    A missing input or an option the figure does not have raises a ``ValueError`` that lists
    what it takes.
    """
    fn = FIGURES.get(kind)
    params = inspect.signature(fn).parameters
    given = {"model": model, "data": data, "metrics": metrics, "runs": runs}
    kwargs = {}
    for name in INPUTS:
        if name not in params:
            continue
        if given[name] is None and params[name].default is inspect.Parameter.empty:
            raise ValueError(f"figure {kind!r} needs {name}")
        kwargs[name] = given[name]
    valid = figure_options(kind)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"figure {kind!r} has no option(s) {', '.join(unknown)}; "
            f"its options: {', '.join(f'{k}={v!r}' for k, v in valid.items()) or 'none'}"
        )
    return fn(**kwargs, **options)


def applicable_figures(model, data=None, metrics: list[dict] | None = None) -> list[str]:
    """The figure kinds that apply to one run: those whose inputs are at hand (``metrics``
    non-empty, ``data`` given), attribute figures only when the data has labels, and none of
    the several-run kinds."""
    labelled = data is not None and all(
        getattr(s, "labels", None) is not None for s in (data.train, data.test)
    )
    kinds = []
    for kind in FIGURES.names():
        params = inspect.signature(FIGURES.get(kind)).parameters
        if "runs" in params:
            continue
        needs = {p for p in INPUTS if p in params and params[p].default is inspect.Parameter.empty}
        if "metrics" in needs and not metrics:
            continue
        if "data" in needs and data is None:
            continue
        if kind.startswith("attribute-") and not labelled:
            continue
        kinds.append(kind)
    return kinds


def _as_run(run):
    if hasattr(run, "model") and hasattr(run, "path"):
        return run
    from vaelab.runs import load_run

    return load_run(run)


def plot_run(
    run,
    kind: str,
    *,
    out: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    data=None,
    **options,
) -> Path:
    """Draw figure ``kind`` of a run (a :class:`~vaelab.runs.Run` or its folder) and save it.

    The default file is ``<run>/figures/<kind>.png`` (``.gif`` for animations). The dataset is
    loaded (from ``data_dir``) only when the figure needs it, unless ``data`` is given.
    """
    fn = FIGURES.get(kind)
    params = inspect.signature(fn).parameters
    run = _as_run(run)
    inputs = {}
    if "model" in params:
        inputs["model"] = run.model
    if "data" in params:
        inputs["data"] = data if data is not None else run.data(data_dir)
    if "metrics" in params:
        inputs["metrics"] = run.metrics()
    if "runs" in params:
        inputs["runs"] = [run]
    fig = render(kind, **inputs, **options)
    path = Path(out) if out is not None else Path(run.figures_dir) / f"{kind}{output_suffix(kind)}"
    return save_figure(fig, path)


def plot_runs(
    runs: Sequence,
    kind: str = "latent-comparison",
    *,
    out: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    data=None,
    **options,
) -> Path:
    """Draw a figure over several runs (a sweep), e.g. the latent-size comparison, to ``out``.

    The data, when needed, is that of the first run.
    """
    runs = [_as_run(r) for r in runs]
    if not runs:
        raise ValueError("plot_runs needs at least one run")
    if "runs" not in inspect.signature(FIGURES.get(kind)).parameters:
        raise ValueError(f"figure {kind!r} is drawn from one run; use plot_run")
    needs_data = options.get("mode") == "reconstructions"
    if data is None and needs_data:
        data = runs[0].data(data_dir)
    return save_figure(render(kind, runs=runs, data=data, **options), out)


def plot_sweep(
    sweep_dir: str | os.PathLike,
    kind: str = "bound-curves",
    *,
    out: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    **options,
) -> Path:
    """Draw a figure of several runs from every run folder in ``sweep_dir`` (see
    :func:`vaelab.sweep.sweep_run_dirs`; all seeds), to ``out``, by default
    ``<sweep_dir>/figures/<kind>.png``."""
    from vaelab.sweep import sweep_run_dirs

    runs = sweep_run_dirs(sweep_dir)
    if out is None:
        out = Path(sweep_dir) / "figures" / f"{kind}{output_suffix(kind)}"
    return plot_runs(runs, kind, out=out, data_dir=data_dir, **options)


def save_default_figures(model, data, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``reconstructions.png`` and ``samples.png`` into ``out_dir`` (fast; for ``fit()``)."""
    out_dir = Path(out_dir)
    paths = [
        save_figure(
            render("reconstructions", model=model, data=data), out_dir / "reconstructions.png"
        )
    ]
    paths.append(save_figure(render("samples", model=model), out_dir / "samples.png"))
    return paths
