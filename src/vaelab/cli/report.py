"""``vaelab report RUN``: write the run's self-contained report.html."""

from __future__ import annotations

import argparse

from vaelab.cli._common import add_data_dir


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="write a run's self-contained report.html (config, numbers, every figure)",
        description="Write RUN/report.html: config, summary, model table, evaluation numbers "
        "(eval.json) and every figure that applies to the run, embedded in one file. Figures "
        "already in RUN/figures and newer than the weights are reused.",
    )
    p.add_argument("run", metavar="RUN", help="a run folder, or NAME under ./runs")
    p.add_argument("--out", metavar="FILE", help="output file (default: RUN/report.html)")
    p.add_argument("--eval", action="store_true", help="evaluate the run first (eval.json)")
    p.add_argument("--regenerate", action="store_true", help="redraw every figure")
    add_data_dir(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vaelab.report import write_report

    path = write_report(
        args.run,
        data_dir=args.data_dir,
        evaluate=args.eval,
        regenerate=args.regenerate,
        out=args.out,
    )
    print(path)
    return 0
