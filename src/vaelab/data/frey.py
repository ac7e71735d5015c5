"""Frey Face: 1965 grey 28x20 frames of Brendan Frey's face (Kingma & Welling 2014's dataset).

File: ``frey_rawface.mat`` (Sam Roweis' copy), one uint8 variable ``ff`` of shape (560, 1965):
one column per image, rows in row-major 28x20 order. There is no official split; vaelab carves
a fixed-seed 1765 / 100 / 100 train/valid/test split (test carved first, ``SPLIT_SEED``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vaelab.data.base import DATASETS, DataInfo, DataSplits, ImageSet, LoadRequest
from vaelab.data.base import split_with_default as _split
from vaelab.data.files import DatasetFiles, FileSpec, register_files, require_files

FREY_VALID = 100
FREY_TEST = 100

FREY_FILES = register_files(
    DatasetFiles(
        "frey-face",
        "frey-face",
        (
            (
                FileSpec(
                    "frey_rawface.mat",
                    md5="5aeb024d42b8a6091f30e5eb18c8a48d",
                    sha256="265a83a23adb081755cd3de375509828e690324d1d60f076b8ecebc840d59c64",
                    size=1100584,
                    urls=("https://cs.nyu.edu/~roweis/data/frey_rawface.mat",),
                ),
            ),
        ),
        homepage="https://cs.nyu.edu/~roweis/data.html",
    )
)

FREY_INFO = DataInfo(
    "frey-face",
    (1, 28, 20),
    "8bit",
    description="Frey Face, 1965 video frames (B. Frey; Roweis' frey_rawface.mat; Kingma & "
    "Welling 2014)",
)


def read_frey(path: str | Path) -> np.ndarray:
    """Read ``frey_rawface.mat`` into uint8 images of shape (N, 28, 20) (N = 1965)."""
    import scipy.io  # imported here: scipy.io is slow to import

    path = Path(path)
    try:
        mat = scipy.io.loadmat(path)
    except (ValueError, OSError) as err:
        raise ValueError(f"{path} is not a readable MATLAB file ({err})") from err
    if "ff" not in mat:
        raise ValueError(
            f"{path} has no variable 'ff' (found {sorted(k for k in mat if k[0] != '_')})"
        )
    ff = mat["ff"]
    if ff.dtype != np.uint8 or ff.ndim != 2 or ff.shape[0] != 28 * 20:
        raise ValueError(f"{path}: 'ff' is {ff.dtype} {ff.shape}, expected uint8 (560, N)")
    return np.ascontiguousarray(ff.T).reshape(-1, 28, 20)


@DATASETS.register("frey-face")
def load_frey_face(req: LoadRequest) -> DataSplits:
    """Frey Face, 28x20 grey (8bit); fixed-seed 1765/100/100 split."""
    paths = require_files(FREY_FILES, req.data_dir, download=req.download)
    images = torch.from_numpy(read_frey(paths["frey_rawface.mat"])).unsqueeze(1)
    train, valid, test = _split(
        ImageSet(images, None, FREY_INFO), req.valid_size, FREY_VALID, test_size=FREY_TEST
    )
    return DataSplits(FREY_INFO, train, valid, test)
