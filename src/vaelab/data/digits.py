"""The embedded default: scikit-learn's bundled 8x8 handwritten digits (1,797 images).

Needs no download, so the quickstart works on any fresh machine. The UCI "Optical Recognition
of Handwritten Digits" data (Alpaydin & Kaynak 1998) count ink in 4x4 blocks: 17 grey levels
0..16, stored here as uint8 ``round(v * 255 / 16)`` (exact: 0, 16, 32, ..., 128, ..., 255).
``value_kind`` is ``"continuous"`` (not ``"8bit"``: only 17 of the 256 levels occur). Split:
1397 / 200 / 200 by a fixed seed (test carved first).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from vaelab.data.base import DATASETS, DataInfo, DataSplits, ImageSet, LoadRequest
from vaelab.data.base import split_with_default as _split
from vaelab.data.files import DatasetFiles, register_files

DIGITS_VALID = 200
DIGITS_TEST = 200

register_files(DatasetFiles("digits", "digits", (), manual="bundled with scikit-learn"))

DIGITS_INFO = DataInfo(
    "digits",
    (1, 8, 8),
    "continuous",
    10,
    tuple(str(i) for i in range(10)),
    description="8x8 handwritten digits bundled with scikit-learn, 17 grey levels (UCI; Alpaydin "
    "& Kaynak 1998)",
)


def _digits_csv() -> Path | None:
    """scikit-learn's bundled ``digits.csv.gz``, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits: images uint8 (1797, 8, 8) in 0..255 and labels int64 (1797,).

    Reads scikit-learn's bundled CSV directly (importing scikit-learn costs seconds); the
    result equals ``sklearn.datasets.load_digits()``, which is the fallback.
    """
    path = _digits_csv()
    if path is not None:
        with gzip.open(path, "rb") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.float64)
        if table.shape != (1797, 65):
            raise ValueError(f"{path}: expected 1797 rows of 64 pixels + label, got {table.shape}")
        levels, target = table[:, :64].reshape(-1, 8, 8), table[:, 64]
    else:  # pragma: no cover - layout of scikit-learn changed
        from sklearn.datasets import load_digits

        bunch = load_digits()
        levels, target = bunch.images, bunch.target
    images = np.rint(levels * 255.0 / 16.0).astype(np.uint8)
    return images, target.astype(np.int64)


@DATASETS.register("digits")
def load_digits_dataset(req: LoadRequest) -> DataSplits:
    """scikit-learn's 8x8 digits (embedded, no download); 1397/200/200."""
    images, labels = digits_arrays()
    full = ImageSet(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels), DIGITS_INFO)
    train, valid, test = _split(full, req.valid_size, DIGITS_VALID, test_size=DIGITS_TEST)
    return DataSplits(DIGITS_INFO, train, valid, test)
