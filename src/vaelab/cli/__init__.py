"""The ``vaelab`` command: a thin skin over the API.

Subcommands are discovered: every module ``vaelab/cli/<name>.py`` (not starting with ``_``)
that defines ``register(subparsers)`` adds its subparser and sets ``func`` with
``set_defaults(func=handler)``; ``handler(args) -> int | None`` returns the exit status. So a
new command is one new file. Modules import heavy libraries (torch, matplotlib) inside their
handlers, which keeps ``vaelab --help`` fast.

Errors a user can fix (``ValueError``, ``FileNotFoundError``) print ``vaelab: error: ...`` and
exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence

from vaelab import __version__


def command_modules() -> list:
    """The subcommand modules of this package, in name order."""
    modules = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{__name__}.{info.name}")
        except ImportError as exc:  # one broken command must not take the others down
            print(f"vaelab: warning: command {info.name!r} unavailable: {exc}", file=sys.stderr)
            continue
        if callable(getattr(module, "register", None)):
            modules.append(module)
    return modules


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with one subparser per discovered command module."""
    from vaelab.cli._common import add_data_dir

    parser = argparse.ArgumentParser(
        prog="vaelab",
        description="Train, evaluate and explore Variational Autoencoders on images.",
        epilog="Run 'vaelab COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"vaelab {__version__}")
    add_data_dir(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in command_modules():
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vaelab`` console script and ``python -m vaelab``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        status = func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"vaelab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vaelab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. 'vaelab list | head': the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(status or 0)
