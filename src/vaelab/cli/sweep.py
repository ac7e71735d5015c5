"""``vaelab sweep CONFIG [key=value ...] --grid KEY=V1,V2 ... --seeds N [--jobs N]``."""

from __future__ import annotations

import argparse

from vaelab.cli._common import add_data_dir, resolve_config


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="train and evaluate every cell of a grid x seeds",
        description="Run a grid of experiments: each cell is a training run in OUT/NAME/<cell>, "
        "evaluated on the test split. Finished cells are skipped and interrupted ones resumed "
        "on restart. Writes sweep.json, sweep.md (mean ± std over seeds) and comparison figures.",
    )
    p.add_argument("config", metavar="PRESET|CONFIG.toml", help="the base experiment")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the base")
    p.add_argument(
        "--grid",
        nargs="+",
        required=True,
        metavar="KEY=V1,V2",
        help="grid axes, e.g. model.latent_dim=2,5,16 model.arch=mlp,conv",
    )
    p.add_argument("--seeds", type=int, default=1, help="seeds per grid point (default 1)")
    p.add_argument("--jobs", type=int, default=1, help="cells trained at once (default 1)")
    p.add_argument("--out", default="sweeps", metavar="DIR", help="parent folder (default sweeps)")
    p.add_argument("--name", default=None, help="sweep folder name (default: the config's name)")
    p.add_argument(
        "--k",
        type=int,
        default=100,
        help="importance samples for each cell's log-likelihood (default 100)",
    )
    p.add_argument("--metrics", default=None, help="comma-separated metric names")
    p.add_argument(
        "--eval-images",
        type=int,
        default=None,
        metavar="N",
        help="evaluate on the first N test images only",
    )
    p.add_argument("--no-figures", action="store_true", help="skip the comparison figures")
    add_data_dir(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vaelab.sweep import run_sweep

    base = resolve_config(args.config, args.overrides)
    metrics = args.metrics.split(",") if args.metrics else None
    result = run_sweep(
        base,
        args.grid,
        seeds=args.seeds,
        out_dir=args.out,
        name=args.name,
        jobs=args.jobs,
        eval_k=args.k,
        metrics=metrics,
        eval_images=args.eval_images,
        data_dir=getattr(args, "data_dir", None),
        figures=not args.no_figures,
    )
    print(result.markdown)
    print(f"sweep folder: {result.path}")
    return 0
