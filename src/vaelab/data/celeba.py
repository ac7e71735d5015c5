"""CelebA aligned faces with their 40 binary attributes (Liu et al., ICCV 2015).

Files (in ``<data_dir>/`` or ``<data_dir>/celeba/``): the folder ``img_align_celeba/`` or the
zip ``img_align_celeba.zip`` (read in place), ``list_attr_celeba.txt`` and
``list_eval_partition.txt``. The split is the official partition (train 162,770 / valid 19,867 /
test 19,962). Images are 178x218; vaelab takes the central box 148 pixels wide and resizes it
(Pillow bilinear, antialiased):

* ``image_size=(64, 64)`` (default): the central 148x148 square (rows 35..183, columns 15..163),
  the crop of most CelebA VAE code (e.g. PyTorch-VAE, after Larsen et al. 2016);
* ``image_size=(64, 48)`` (H, W): the central 148-wide, 197-high box (rows 10..207), as for the
  64x48 faces of Astorga et al.; any other (H, W) uses the same 148-wide rule.

Labels are the 40 attributes as 0/1 (the file's -1/1), shape (N, 40). CelebA is distributed
through Google Drive, so files are not downloaded automatically. The text files' checksums are
those of the full release; a subset (like vaelab's 100-image test sample) loads with a warning.
"""

from __future__ import annotations

import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from vaelab.data.base import DATASETS, DataInfo, DataSplits, ImageSet, LoadRequest, resplit_defined
from vaelab.data.files import DatasetFiles, FileSpec, register_files, require_files
from vaelab.data.images import decode

IMG_DIR = "img_align_celeba"
IMG_ZIP = "img_align_celeba.zip"
ATTR_FILE = "list_attr_celeba.txt"
PART_FILE = "list_eval_partition.txt"
CROP_WIDTH = 148
DEFAULT_SIZE = (64, 64)
_HOMEPAGE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"

_ATTR = FileSpec(ATTR_FILE, md5="75e246fa4810816ffd6ee81facbd244c", strict=False)
_PART = FileSpec(PART_FILE, md5="d32c9cbf5e040fd4025c592c306e6668", strict=False)
CELEBA_FILES = register_files(
    DatasetFiles(
        "celeba",
        "celeba",
        (
            (FileSpec(IMG_DIR, is_dir=True), _ATTR, _PART),
            (FileSpec(IMG_ZIP, md5="00d2c5bc6d35e252742224ab0c1e8fcb"), _ATTR, _PART),
        ),
        homepage=_HOMEPAGE,
        manual=f"download {IMG_ZIP}, {ATTR_FILE} and {PART_FILE} from the Google Drive linked on "
        f"{_HOMEPAGE} (non-commercial research use only)",
    )
)


def _text_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="ascii").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a CelebA text file (not ASCII: {err})") from err


def read_attributes(path: str | Path) -> tuple[tuple[str, ...], list[str], np.ndarray]:
    """Parse ``list_attr_celeba.txt``: (40 names, image names, int64 0/1 array (N, 40)).

    Layout: a count line, a line of attribute names, then ``NNNNNN.jpg`` and 40 values of
    -1/1 per line (any whitespace, CRLF or LF).
    """
    path = Path(path)
    lines = _text_lines(path)
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise ValueError(f"{path}: expected a count line and an attribute-name line")
    names = tuple(lines[1].split())
    rows = [line.split() for line in lines[2:] if line.strip()]
    if len(rows) != int(lines[0]):
        raise ValueError(f"{path}: header says {int(lines[0])} rows, file has {len(rows)}")
    bad = next((r for r in rows if len(r) != len(names) + 1), None)
    if bad is not None:
        raise ValueError(f"{path}: row {bad[0]!r} has {len(bad) - 1} values, not {len(names)}")
    values = np.array([r[1:] for r in rows], dtype=np.int64).reshape(len(rows), len(names))
    if not np.isin(values, (-1, 1)).all():
        raise ValueError(f"{path}: attribute values must be -1 or 1")
    return names, [r[0] for r in rows], (values + 1) // 2


def read_partition(path: str | Path) -> list[tuple[str, int]]:
    """Parse ``list_eval_partition.txt``: [(image name, 0 train | 1 valid | 2 test), ...]."""
    path = Path(path)
    out = []
    for line in _text_lines(path):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ValueError(f"{path}: bad line {line!r}; expected 'NNNNNN.jpg 0|1|2'")
        out.append((fields[0], int(fields[1])))
    return out


def read_images(
    source: Path,
    names: list[str],
    size: tuple[int, int],
    channels: int = 3,
    crop_width: float = CROP_WIDTH,
) -> np.ndarray:
    """Decode ``names`` from the image folder or zip ``source``: uint8 (N, channels, H, W).

    Each image is cropped to the central box ``crop_width`` wide with the aspect of ``size``
    and resized to ``size`` (H, W). A missing image raises ``FileNotFoundError`` naming it.
    """
    out = np.empty((len(names), channels, *size), dtype=np.uint8)

    def work(i: int, data: bytes | Path, label: str) -> None:
        out[i] = decode(data, channels, size, crop_width, name=label)

    with ThreadPoolExecutor() as pool:  # Pillow releases the GIL while decoding
        if source.is_dir():
            jobs = []
            for i, n in enumerate(names):
                path = source / n
                if not path.is_file():
                    raise FileNotFoundError(f"{path} is listed in {PART_FILE} but missing")
                jobs.append(pool.submit(work, i, path, str(path)))
        else:
            with zipfile.ZipFile(source) as zf:
                members = {Path(m).name: m for m in zf.namelist() if not m.endswith("/")}
                jobs = []
                for i, n in enumerate(names):
                    if n not in members:
                        raise FileNotFoundError(f"{source} has no {IMG_DIR}/{n}")
                    jobs.append(pool.submit(work, i, zf.read(members[n]), f"{source}:{n}"))
        for job in jobs:
            job.result()
    return out


def celeba_info(size: tuple[int, int], channels: int, attribute_names: tuple[str, ...]) -> DataInfo:
    """DataInfo for CelebA at ``size`` (H, W) with ``channels`` 3 (RGB) or 1 (grey)."""
    return DataInfo(
        "celeba",
        (channels, *size),
        "8bit",
        attribute_names=attribute_names,
        description=f"CelebA aligned faces, central {CROP_WIDTH}-wide crop resized to "
        f"{size[0]}x{size[1]} (Liu et al. 2015)",
    )


@DATASETS.register("celeba")
def load_celeba(req: LoadRequest) -> DataSplits:
    """CelebA faces, 64x64 RGB by default (or image_size), 40 attribute labels; official split."""
    paths = require_files(CELEBA_FILES, req.data_dir, download=req.download)
    size = req.image_size or DEFAULT_SIZE
    channels = req.channels or 3
    attr_names, attr_rows, attrs = read_attributes(paths[ATTR_FILE])
    row_of = {n: i for i, n in enumerate(attr_rows)}
    partition = read_partition(paths[PART_FILE])
    missing = [n for n, _ in partition if n not in row_of]
    if missing:
        raise ValueError(
            f"{paths[ATTR_FILE]} has no attributes for {missing[:3]} "
            f"({len(missing)} images of {paths[PART_FILE]})"
        )
    names = [n for n, _ in partition]
    which = torch.tensor([s for _, s in partition], dtype=torch.long)
    images = read_images(paths.get(IMG_DIR) or paths[IMG_ZIP], names, size, channels)
    labels = torch.from_numpy(attrs[[row_of[n] for n in names]])
    info = celeba_info(size, channels, attr_names)
    full = ImageSet(torch.from_numpy(images), labels, info)
    train, valid, test = (full.subset(which == s) for s in (0, 1, 2))
    train, valid = resplit_defined(train, valid, req.valid_size)
    return DataSplits(info, train, valid, test)
