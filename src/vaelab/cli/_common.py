"""Helpers shared by the subcommand modules (this module is not a command itself)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

DEFAULT_PRESET = "quickstart"


def add_data_dir(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """``--data-dir DIR``: accepted before the command (``vaelab --data-dir D train``) or after
    it; the later one wins. Handlers read ``args.data_dir`` (None: ``$VAELAB_DATA_DIR`` or the
    user cache)."""
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None if top_level else argparse.SUPPRESS,
        help="where datasets are looked up and downloaded (default: $VAELAB_DATA_DIR, "
        "else the user cache folder)",
    )


def split_spec(spec: str | None, overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """``vaelab train train.lr=1e-3`` puts an override where the preset goes: move it back."""
    overrides = list(overrides)
    if spec is not None and "=" in spec:
        return None, [spec, *overrides]
    return spec, overrides


def resolve_config(spec: str | None, overrides: Sequence[str] = ()):
    """A :class:`vaelab.config.Config` from a preset name or a ``.toml``/``.json`` file (None:
    the quickstart preset), with dotted ``key=value`` overrides applied and type-checked."""
    from vaelab.config import load_config, load_preset, override

    spec, overrides = split_spec(spec, overrides)
    if spec is None:
        cfg = load_preset(DEFAULT_PRESET)
    elif Path(spec).suffix in (".toml", ".json") or os.sep in spec or Path(spec).is_file():
        cfg = load_config(spec)
    else:
        cfg = load_preset(spec)
    return override(cfg, overrides)


def format_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """A plain left-aligned text table."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"
