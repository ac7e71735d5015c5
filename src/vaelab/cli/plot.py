"""``vaelab plot RUN [RUN ...] --kind KIND [options]``: one figure of a run (or of several runs,
or of every run of a sweep folder)."""

from __future__ import annotations

import argparse
import ast

from vaelab.cli._common import add_data_dir


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plot",
        help="draw one figure of a run (reconstructions, manifold, traversal, ...)",
        description="Draw figure KIND of a run into RUN/figures/KIND.png (.gif for "
        "traversal-animation). Several runs make a figure of several runs (--kind "
        "latent-comparison or bound-curves; needs --out). A sweep folder (any folder of run "
        "folders) draws every run in it into SWEEP/figures/KIND.png, e.g. 'vaelab plot "
        "sweeps/zdim --kind bound-curves' (the lower bound against training images seen, "
        "legend labels from what differs between the runs, or -o \"labels=['a', 'b']\"). "
        "'vaelab list figures' shows the kinds; an option a kind does not take is an error "
        "that lists the ones it does.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="a run folder, NAME under ./runs, or one sweep folder (all the runs in it)",
    )
    p.add_argument("--kind", required=True, help="the figure, e.g. manifold or latent-scatter")
    p.add_argument(
        "--out", metavar="FILE", help="output file (default: RUN/ or SWEEP/figures/KIND.png)"
    )
    p.add_argument("--n", type=int, help="how many images / grid size / rows")
    p.add_argument("--temperature", type=_floats, help="prior temperature(s), e.g. 0.7 or 0.5,1")
    p.add_argument("--dims", type=_ints, help="latent dimensions, e.g. 0,3")
    p.add_argument("--attribute", help="attribute name (e.g. Smiling, 3, 'is digit 3')")
    p.add_argument("--sigma", type=_floats, help="neighbourhood noise level(s), e.g. 0.1,0.5")
    p.add_argument("--method", help="scatter projection (pca, tsne, umap) or interpolation")
    p.add_argument("--steps", type=int, help="steps of an interpolation or traversal")
    p.add_argument("--split", choices=("train", "valid", "test"), help="which images (test)")
    p.add_argument("--seed", type=int, help="which images / noise")
    p.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other option of the figure, e.g. -o layout=rows -o limit=2.5",
    )
    add_data_dir(p)
    p.set_defaults(func=run)


def _floats(text: str) -> float | tuple[float, ...]:
    values = tuple(float(v) for v in text.split(",") if v.strip())
    return values[0] if len(values) == 1 else values


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def options(args: argparse.Namespace) -> dict:
    """The figure options given on the command line (unset ones are left to the defaults)."""
    names = ("n", "temperature", "dims", "attribute", "sigma", "method", "steps", "split", "seed")
    opts = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    for item in args.option:
        if "=" not in item:
            raise ValueError(f"--option {item!r} is not KEY=VALUE")
        key, text = item.split("=", 1)
        try:
            opts[key.strip()] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            opts[key.strip()] = text
    return opts


def run(args: argparse.Namespace) -> int:
    from vaelab.sweep import is_sweep_dir
    from vaelab.viz import plot_run, plot_runs, plot_sweep

    opts = options(args)
    if len(args.runs) == 1 and is_sweep_dir(args.runs[0]):
        path = plot_sweep(args.runs[0], args.kind, out=args.out, data_dir=args.data_dir, **opts)
    elif len(args.runs) > 1:
        if args.out is None:
            raise ValueError("a figure of several runs needs --out FILE")
        path = plot_runs(args.runs, args.kind, out=args.out, data_dir=args.data_dir, **opts)
    else:
        path = plot_run(args.runs[0], args.kind, out=args.out, data_dir=args.data_dir, **opts)
    print(path)
    return 0
