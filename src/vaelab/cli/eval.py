"""``vaelab eval RUN [--nproc N]``: evaluate a run on its dataset, print a table, write
``eval.json``.

``--nproc N`` runs the same command on N processes through torchrun, each scoring a share of
the split (see :mod:`vaelab.evaluate`); ``torchrun --nproc-per-node N -m vaelab eval RUN`` is
the same. Rank 0 alone prints and writes.
"""

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
    p.add_argument(
        "--loglik-sample",
        type=int,
        default=None,
        metavar="N",
        help="importance-sample only N random images; log p(x) of the split = its mean ELBO "
        "+ the sample's mean gap log p(x) - ELBO, with that estimate's stderr",
    )
    p.add_argument("--no-write", action="store_true", help="do not write RUN/eval.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="share the split between N processes of this machine (one per GPU, or CPU "
        "processes with gloo) by running torchrun --standalone --nproc-per-node N; the "
        "numbers equal one process's",
    )
    add_data_dir(p)
    p.set_defaults(func=run)


def _child_argv(args: argparse.Namespace) -> list[str]:
    """This command line without --nproc, for the processes torchrun starts."""
    argv = [args.run, "--k", str(args.k), "--split", args.split, "--seed", str(args.seed)]
    argv += ["--metrics", *args.metrics] if args.metrics else []
    argv += ["--feature-net", args.feature_net, "--batch-size", str(args.batch_size)]
    argv += ["--device", args.device]
    argv += ["--images", str(args.images)] if args.images is not None else []
    argv += ["--loglik-sample", str(args.loglik_sample)] if args.loglik_sample else []
    argv += ["--json"] if args.json else []
    argv += ["--no-write"] if args.no_write else []
    argv += ["--quiet"] if args.quiet else []
    argv += ["--data-dir", args.data_dir] if args.data_dir is not None else []
    return ["-m", "vaelab", "eval", *argv]


def run(args: argparse.Namespace) -> int:
    from vaelab.distributed import env_world, is_main_process, launch
    from vaelab.evaluate import evaluate_run, format_table

    if args.nproc != 1:  # launch() refuses N < 1
        from vaelab.runs import resolve_run

        if env_world() is not None:
            raise ValueError("--nproc starts torchrun; under torchrun already, leave it out")
        resolve_run(args.run)  # a wrong RUN fails here, once, not in every process
        return launch(args.nproc, _child_argv(args), what="evaluation")
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
        loglik_sample=args.loglik_sample,
        progress=not args.quiet and not args.json,
    )
    if is_main_process():  # under torchrun, rank 0 alone reports
        print(report.to_json() if args.json else format_table(report))
    return 0
