"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, so this
folder is on ``sys.path``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

# ../shared/data beside the repository, the layout CI and the development machine use.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def data_dir(arg: str | None) -> str | None:
    """The data directory for MNIST: ``--data-dir`` if given, else None when
    ``$VAELAB_DATA_DIR`` is set (vaelab reads it), else ../shared/data when it holds MNIST."""
    if arg:
        return arg
    if os.environ.get("VAELAB_DATA_DIR"):
        return None
    return str(SHARED_DATA) if (SHARED_DATA / "mnist").is_dir() else None


def best_seconds(fn: Callable[[], object], calls: int, blocks: int = 3) -> float:
    """Seconds per call of ``fn``: the best of ``blocks`` blocks of ``calls`` calls, after one
    untimed call."""
    fn()
    best = float("inf")
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best
