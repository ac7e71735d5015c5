"""``vaelab eval RUN``: evaluate a run on its dataset, print a table, write ``eval.json``."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from vaelab.cli._common import add_data_dir

    p = subparsers.add_parser(
        "eval",
        help="evaluate a run: ELBO, importance-sampled log p(x), bits/dim, FD, SSIM, ...",
        description="Evaluate a run on a split of its dataset; merges the numbers into "
        "RUN/eval.json. Every number is labelled with its estimator, k, split and binarization.",
    )
    p.add_argument("run", metavar="RUN", help="a run folder, or NAME under ./runs")
    p.add_argument(
        "--k",
        type=int,
        default=1000,
        help="importance samples per image (default 1000; 5000 for paper tables)",
    )
    p.add_argument("--split", default="test", choices=("test", "valid", "train"))
    p.add_argument(
        "--metrics",
        nargs="+",
        metavar="NAME",
        help="metrics to compute (names or comma lists; default: all, see 'vaelab list')",
    )
    p.add_argument(
        "--json", action="store_true", help="print the report as JSON instead of a table"
    )
    p.add_argument(
        "--feature-net",
        default="lenet",
        help="lenet (FD-LeNet, offline), lenet:DATASET, inception (FID) or inception:PATH",
    )
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=int, default=0, help="seeds every draw and dynamic binarization")
    p.add_argument(
        "--images", type=int, default=None, metavar="N", help="only the first N images of the split"
    )
    p.add_argument("--no-write", action="store_true", help="do not write RUN/eval.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_data_dir(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vaelab.evaluate import evaluate_run, format_table

    report = evaluate_run(
        args.run,
        data_dir=args.data_dir,
        device=args.device,
        write=not args.no_write,
        split=args.split,
        k=args.k,
        metrics=args.metrics,
        batch_size=args.batch_size,
        seed=args.seed,
        feature_net=args.feature_net,
        max_images=args.images,
        progress=not args.quiet and not args.json,
    )
    print(report.to_json() if args.json else format_table(report))
    return 0
