"""``folder:PATH``: the user's own images, optionally one subfolder per class.

Layout: either image files directly in PATH, or class subfolders (``PATH/cat/*.png``,
``PATH/dog/**``) whose sorted names become ``label_names`` and labels 0..K-1. Hidden files and
folders (starting with ``.``) are ignored; every other file must be an image. Modes L, RGB,
RGBA, P, LA, I;16, CMYK ... are converted (see :mod:`vaelab.data.images`); transparency is
composited on white. ``image_size`` (H, W): the central box of that aspect ratio is resized to
it; without it all images must share one size. ``channels`` 1 or 3 (default: 1 when every image
is grey). A file that is not an image or is corrupt raises ``ValueError`` naming it; with
``skip_broken=True`` it is skipped and a warning gives the count (``DataSplits.skipped`` lists
them). Split: 10% test, then 10% validation (or ``valid_size``), by a fixed seed.

Small folders are decoded once into memory (:class:`ImageSet`); folders whose decoded size
exceeds ``max_memory`` stream from disk through a ``torch.utils.data.DataLoader`` with worker
processes (:class:`StreamingImageSet`; :class:`vaelab.data.BatchIterator` handles both).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vaelab.data.base import (
    DATASETS,
    SPLIT_SEED,
    DataInfo,
    DataSplits,
    ImageSet,
    Index,
    LoadRequest,
    as_index,
    carve,
    to_float,
)
from vaelab.data.images import decode, probe

FOLDER_FRACTION = 0.1  # of the images, for test and (default) for validation


def default_max_memory() -> int:
    """Bytes of decoded images kept in memory before streaming: min(8 GiB, RAM / 4)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        ram = 16 << 30
    return min(8 << 30, ram // 4)


def list_images(root: str | Path) -> tuple[list[Path], list[int] | None, tuple[str, ...] | None]:
    """Files under ``root`` and, with class subfolders, their labels and the class names.

    Returns (files, labels or None, class names or None), files sorted within each class.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"folder dataset {root} does not exist or is not a directory")
    visible = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    subdirs = [p for p in visible if p.is_dir()]
    top_files = [p for p in visible if p.is_file()]
    if not subdirs:
        if not top_files:
            raise ValueError(f"folder dataset {root} holds no files")
        return top_files, None, None
    if top_files:
        raise ValueError(
            f"{root} has both files ({top_files[0].name}, ...) and class subfolders "
            f"({subdirs[0].name}, ...); put every image in a class subfolder, or none"
        )
    files, labels = [], []
    for label, sub in enumerate(subdirs):
        found = sorted(
            p
            for p in sub.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(sub).parts)
        )
        files += found
        labels += [label] * len(found)
    if not files:
        raise ValueError(f"the class subfolders of {root} hold no files")
    return files, labels, tuple(p.name for p in subdirs)


class StreamingImageSet(Dataset):
    """One split of a folder dataset that is decoded from disk batch by batch.

    ``dataset[i]`` returns (uint8 (C, H, W), int64 label or -1). Use it through
    :class:`vaelab.data.BatchIterator`, which drives a DataLoader with ``num_workers`` workers.
    """

    def __init__(
        self,
        files: Sequence[Path],
        labels: torch.Tensor | None,
        info: DataInfo,
        num_workers: int | None = None,
    ) -> None:
        self.files = list(files)
        self.labels = labels
        self.info = info
        self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, h, w = self.info.shape
        x = decode(self.files[i], self.info.shape[0], (h, w))
        y = -1 if self.labels is None else int(self.labels[i])
        if not x.flags.writeable:  # torch wants to own writable memory
            x = x.copy()
        return torch.from_numpy(x), torch.tensor(y, dtype=torch.long)

    def __repr__(self) -> str:
        return f"StreamingImageSet({self.info.name}, {len(self)} files, shape={self.info.shape})"

    def to_float(
        self, images_uint8: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """float32 (B, C, H, W) in [0, 1]; see :func:`vaelab.data.base.to_float`."""
        return to_float(images_uint8, self.info, generator)

    def subset(self, idx: Index) -> StreamingImageSet:
        """The files (and labels) at ``idx`` (indices or a boolean mask)."""
        i = torch.arange(len(self))[as_index(idx)]
        labels = None if self.labels is None else self.labels[i]
        return StreamingImageSet(
            [self.files[j] for j in i.tolist()], labels, self.info, self.num_workers
        )

    def with_info(self, info: DataInfo) -> StreamingImageSet:
        """The same files under another :class:`DataInfo`."""
        return StreamingImageSet(self.files, self.labels, info, self.num_workers)


def _probe_all(files: list[Path], skip_broken: bool) -> tuple[list[tuple], list[str]]:
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
        results = list(pool.map(_try, [probe] * len(files), files))
    return _sort_out(files, results, skip_broken)


def _try(fn, *args):
    try:
        return fn(*args)
    except ValueError as err:
        return err


def _sort_out(files: list[Path], results: list, skip_broken: bool) -> tuple[list, list[str]]:
    broken = [(f, r) for f, r in zip(files, results, strict=True) if isinstance(r, ValueError)]
    if broken and not skip_broken:
        raise ValueError(
            f"{broken[0][1]} (pass skip_broken=True to skip unreadable files; {len(broken)} found)"
        )
    return results, [str(f) for f, _ in broken]


def load_folder(
    path: str | Path,
    *,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    skip_broken: bool = False,
    valid_size: int | None = None,
    stream: bool | None = None,
    max_memory: int | None = None,
    num_workers: int | None = None,
) -> DataSplits:
    """Load a folder of images as train/valid/test (see the module docstring).

    ``stream``: None decides by ``max_memory`` (bytes of decoded uint8 images, default
    :func:`default_max_memory`); True/False forces streaming/in-memory. Images are (C, H, W)
    uint8, value kind "8bit"; labels int64 (N,) when there are class subfolders.
    """
    root = Path(path).expanduser()
    files, labels, classes = list_images(root)
    headers, broken = _probe_all(files, skip_broken)
    keep = [i for i, h in enumerate(headers) if not isinstance(h, ValueError)]
    if channels is None:
        channels = 1 if all(headers[i][0] == 1 for i in keep) else 3
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size is None:
        sizes = {headers[i][1:] for i in keep}
        if len(sizes) > 1:
            raise ValueError(
                f"{root}: images have {len(sizes)} different sizes (e.g. "
                f"{sorted(sizes)[:3]} as (H, W)); pass image_size=(H, W)"
            )
        image_size = sizes.pop() if sizes else (1, 1)
    h, w = image_size
    files = [files[i] for i in keep]
    y = None if labels is None else torch.tensor([labels[i] for i in keep], dtype=torch.long)
    if stream is None:
        stream = len(files) * channels * h * w > (max_memory or default_max_memory())
    if stream:
        full = StreamingImageSet(files, y, _info(root, channels, image_size, classes), num_workers)
    else:
        with ThreadPoolExecutor() as pool:
            results = list(
                pool.map(
                    _try,
                    [decode] * len(files),
                    files,
                    [channels] * len(files),
                    [image_size] * len(files),
                )
            )
        _, more = _sort_out(files, results, skip_broken)
        broken += more
        ok = [i for i, r in enumerate(results) if not isinstance(r, ValueError)]
        images = (
            np.stack([results[i] for i in ok]) if ok else np.zeros((0, channels, h, w), np.uint8)
        )
        full = ImageSet(
            torch.from_numpy(images),
            None if y is None else y[ok],
            _info(root, channels, image_size, classes),
        )
    if broken:
        warnings.warn(
            f"{root}: skipped {len(broken)} unreadable files (e.g. {broken[0]})", stacklevel=2
        )
    n = len(full)
    n_test = round(FOLDER_FRACTION * n)
    n_valid = round(FOLDER_FRACTION * n) if valid_size is None else valid_size
    rest_idx, test_idx = carve(n, [n_test])
    rest = full.subset(rest_idx)
    train_idx, valid_idx = carve(len(rest), [n_valid], seed=SPLIT_SEED + 1)
    return DataSplits(
        full.info,
        rest.subset(train_idx),
        rest.subset(valid_idx),
        full.subset(test_idx),
        skipped=tuple(broken),
    )


def _info(root: Path, channels: int, size: tuple[int, int], classes) -> DataInfo:
    return DataInfo(
        f"folder:{root}",
        (channels, *size),
        "8bit",
        num_classes=None if classes is None else len(classes),
        label_names=classes,
        description=f"images from {root}",
    )


@DATASETS.register("folder")
def load_folder_dataset(req: LoadRequest) -> DataSplits:
    """Any folder of images: ``folder:PATH`` (class subfolders become labels)."""
    if req.path is None:
        raise ValueError("name the folder: 'folder:PATH', e.g. 'folder:~/pictures/faces'")
    return load_folder(
        req.path,
        image_size=req.image_size,
        channels=req.channels,
        skip_broken=req.skip_broken,
        valid_size=req.valid_size,
    )
