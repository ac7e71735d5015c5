"""``vaelab train [PRESET | CONFIG.toml] [key=value ...] [--out DIR] [--resume RUN] [--nproc N]``.

``--nproc N`` runs the same command on N processes through torchrun (see
:mod:`vaelab.distributed`); ``torchrun --nproc-per-node N -m vaelab train ...`` is the same.
"""

from __future__ import annotations

import argparse
import signal
import sys

from vaelab.cli._common import DEFAULT_PRESET, add_data_dir, resolve_config, split_spec


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a VAE from a preset or a config file",
        description="Train a VAE and write its run folder (config, weights, checkpoints, "
        "metrics, summary, figures). Overrides are dotted key=value pairs, e.g. "
        "train.lr=3e-4 model.hidden=512,256; 'vaelab list presets' shows the presets.",
    )
    p.add_argument(
        "config",
        nargs="?",
        default=None,
        metavar="PRESET|CONFIG.toml",
        help=f"a preset name or a .toml/.json config file (default: {DEFAULT_PRESET})",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument(
        "--out",
        default="runs",
        metavar="DIR",
        help="parent folder of the run folder (default: runs)",
    )
    p.add_argument(
        "--resume",
        metavar="RUN",
        default=None,
        help="continue the run folder RUN from its last checkpoint",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar or epoch lines")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train data-parallel on N processes of this machine (one per GPU, or CPU "
        "processes with gloo) by running torchrun --standalone --nproc-per-node N; "
        "train.batch_size is the global batch",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as TOML and exit without training",
    )
    add_data_dir(p)
    p.set_defaults(func=run)


def _config(args: argparse.Namespace):
    spec, overrides = split_spec(args.config, args.overrides)
    if args.resume is not None and spec is None:  # continue with the run's own config
        from vaelab.config import override
        from vaelab.runs import read_config, resolve_run

        return override(read_config(resolve_run(args.resume))[0], overrides)
    return resolve_config(spec, overrides)


def _child_argv(args: argparse.Namespace) -> list[str]:
    """This command line without --nproc, for the processes torchrun starts."""
    argv = [args.config] if args.config is not None else []
    argv += [*args.overrides, "--out", args.out]
    argv += ["--resume", args.resume] if args.resume is not None else []
    argv += ["--no-progress"] if args.no_progress else []
    argv += ["--data-dir", args.data_dir] if args.data_dir is not None else []
    return ["-m", "vaelab", "train", *argv]


def run(args: argparse.Namespace) -> int:
    from vaelab.config import dumps
    from vaelab.distributed import DistributedFailure, env_world, is_main_process, launch
    from vaelab.train import TrainingDiverged, TrainingInterrupted, fit

    cfg = _config(args)
    if args.print_config:
        print(dumps(cfg), end="")
        return 0
    if args.nproc != 1:
        if env_world() is not None:
            raise ValueError("--nproc starts torchrun; under torchrun already, leave it out")
        return launch(args.nproc, _child_argv(args))
    main = is_main_process()  # under torchrun, rank 0 alone reports
    try:
        result = fit(
            cfg,
            out_dir=args.out,
            resume=args.resume,
            progress=not args.no_progress,
            data_dir=args.data_dir,
        )
    except TrainingInterrupted as exc:
        if main:
            print(f"vaelab: {exc}", file=sys.stderr)
        sig = getattr(signal.Signals, exc.reason, signal.SIGINT)  # 128 + N, as a shell reports
        return 128 + int(sig)
    except (TrainingDiverged, DistributedFailure) as exc:
        if main or isinstance(exc, DistributedFailure):
            print(f"vaelab: error: {exc}", file=sys.stderr)
        return 1
    if not main:
        return 0
    s = result.summary
    valid = s.get("valid") or s.get("train") or {}
    line = f"done: {s['epochs']} epochs, {s['steps']} steps in {s['wall_time_s']:.1f} s"
    if valid:
        line += f"; {valid['split']} ELBO {valid['elbo']:.3f} nats"
        if "bits_per_dim" in valid:
            line += f" ({valid['bits_per_dim']:.4f} bits/dim)"
    print(line)
    if not s["likelihood_proper"]:
        print(f"note: {s['likelihood_note']}")
    print(f"run folder: {result.run_dir}")
    return 0
