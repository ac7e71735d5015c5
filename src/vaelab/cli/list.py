"""``vaelab list [presets|architectures|likelihoods|datasets|objectives|metrics|figures]``."""

from __future__ import annotations

import argparse
import importlib

from vaelab.cli._common import format_table

# kind -> (module, registry attribute); presets are files, listed separately.
REGISTRIES = {
    "architectures": ("vaelab.nets", "ARCHITECTURES"),
    "likelihoods": ("vaelab.likelihoods", "LIKELIHOODS"),
    "datasets": ("vaelab.data", "DATASETS"),
    "objectives": ("vaelab.objectives", "OBJECTIVES"),
    "metrics": ("vaelab.metrics", "METRICS"),
    "figures": ("vaelab.viz", "FIGURES"),
}
KINDS = ("presets", *REGISTRIES)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "list",
        help="list presets, architectures, likelihoods, datasets, objectives, metrics, figures",
    )
    p.add_argument(
        "kind", nargs="?", choices=KINDS, default=None, help="what to list (default: everything)"
    )
    p.set_defaults(func=run)


def table(kind: str) -> str:
    """The table ``vaelab list KIND`` prints."""
    if kind == "presets":
        from vaelab.config import load_preset, preset_description, preset_names

        rows = []
        for name in preset_names():
            cfg = load_preset(name)
            rows.append([name, cfg.data.name, cfg.model.arch, preset_description(name)])
        return format_table(rows, ["preset", "dataset", "arch", "description"])
    module, attr = REGISTRIES[kind]
    registry = getattr(importlib.import_module(module), attr)
    rows = [[name, registry.describe(name)] for name in registry.names()]
    return format_table(rows, [kind[:-1], "description"])


def run(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else list(KINDS)
    print("\n\n".join(table(k) for k in kinds))
    return 0
