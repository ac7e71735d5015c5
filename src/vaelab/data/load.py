"""``load_dataset``: one call from a dataset name to train/valid/test splits.

It resolves the data dir, calls the registered loader (which finds, downloads and verifies the
files and applies the dataset's split), then applies what every dataset shares: a channel or
size change the loader did not do itself, a binarization, and train/valid/test subsets.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from vaelab.data.base import (
    DATASETS,
    DataInfo,
    DataSplits,
    ImageSet,
    LoadRequest,
    binarized_info,
    choose_subset,
)
from vaelab.data.download import resolve_data_dir

_CHUNK = 4096
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as Pillow's convert("L")


def parse_name(name: str) -> tuple[str, Path | None]:
    """Split ``"folder:PATH"`` into ("folder", PATH); other names give (name, None)."""
    if name.startswith("folder:"):
        path = name.split(":", 1)[1]
        if not path:
            raise ValueError("'folder:' needs a path, e.g. 'folder:~/pictures/faces'")
        return "folder", Path(path).expanduser()
    return name, None


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, channels, H, W): grey by ITU-R 601-2 luma, RGB by repetition."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor(_LUMA).view(1, 3, 1, 1)
        out = [
            (x.float() * w).sum(1, keepdim=True).round_().to(torch.uint8)
            for x in images.split(_CHUNK)
        ]
        return torch.cat(out) if out else images[:, :1]
    raise ValueError(f"cannot convert {c} channels to {channels} (only 1 <-> 3)")


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, C, *size), bilinear with antialiasing, rounded."""
    if tuple(images.shape[2:]) == tuple(size):
        return images
    out = [
        F.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        .round_()
        .clamp_(0, 255)
        .to(torch.uint8)
        for x in images.split(_CHUNK)
    ]
    return torch.cat(out) if out else images.new_zeros((0, images.shape[1], *size))


def _adapt(s: ImageSet, info: DataInfo) -> ImageSet:
    images = convert_channels(s.images, info.shape[0])
    images = resize_images(images, info.shape[1:])
    return ImageSet(images, s.labels, info, s.extras)


def _reshape(splits: DataSplits, image_size, channels) -> DataSplits:
    c, h, w = splits.info.shape
    new = (channels or c, *(image_size or (h, w)))
    if new == (c, h, w):
        return splits
    if not isinstance(splits.train, ImageSet):
        raise ValueError(f"{splits.info.name}: a streamed folder is sized by its loader")
    if (
        splits.info.value_kind == "binary"
        and splits.info.binarization in (None, "static")
        and (new[1:] != (h, w))
    ):
        raise ValueError(f"{splits.info.name} is binary data: resizing would make it grey")
    info = replace(splits.info, shape=new)
    return splits.map(lambda s: _adapt(s, info))


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    valid_size: int | None = None,
    subset_train: int | None = None,
    subset_test: int | None = None,
    subset_valid: int | None = None,
    subset_mode: str = "first",
    seed: int = 0,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    binarize: str | None = None,
    skip_broken: bool = False,
) -> DataSplits:
    """Load dataset ``name`` (a registered name or ``"folder:PATH"``) as train/valid/test.

    Args:
        data_dir: where files are looked up and downloaded (else ``$VAELAB_DATA_DIR``, else the
            per-user cache; see :func:`vaelab.data.resolve_data_dir`).
        download: fetch missing files (``$VAELAB_OFFLINE=1`` also forbids it).
        valid_size: images carved from train for validation by a fixed seed; None keeps the
            dataset's own split or default (MNIST-like 10k, CIFAR-10 5k; see each module).
            For datasets with an official validation split, a number pools train+valid and
            re-carves (0 = train on both).
        subset_train, subset_valid, subset_test: keep only N images of that split, the first N
            (``subset_mode="first"``) or a random N drawn with ``seed`` (``"random"``). E.g.
            Zhao et al.'s 6000/1000 protocol: ``subset_train=6000, subset_test=1000``.
        image_size: (H, W). CelebA and folders crop and resize while decoding; other datasets
            are resized (bilinear, antialiased). Binary data cannot be resized.
        channels: 1 or 3 (grey by ITU-R 601-2 luma, or grey repeated to RGB).
        binarize: None, ``"dynamic"`` (fresh Bernoulli draw per batch) or ``"threshold"``
            (x > 0.5), for grey-level data; the info name gains the mode (``mnist-dynamic``).
        skip_broken: folders only: skip unreadable files with a warning instead of raising.

    Returns:
        :class:`DataSplits` whose images are uint8 (N, C, H, W) and whose ``info`` names the
        dataset and its binarization. Unknown names raise ``ValueError`` listing the choices.
    """
    key, path = parse_name(name)
    loader = DATASETS.get(key)
    if key == "folder" and path is None:
        raise ValueError("name the folder: 'folder:PATH'")
    req = LoadRequest(
        data_dir=resolve_data_dir(data_dir),
        download=download,
        valid_size=valid_size,
        image_size=tuple(image_size) if image_size else None,
        channels=channels,
        skip_broken=skip_broken,
        path=path,
    )
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    splits = _reshape(loader(req), req.image_size, channels)
    if binarize is not None:
        info = binarized_info(splits.info, binarize)
        splits = splits.map(lambda s: s.with_info(info))
    for split, size in (("train", subset_train), ("valid", subset_valid), ("test", subset_test)):
        data = getattr(splits, split)
        idx = choose_subset(len(data), size, subset_mode, seed)
        if idx is not None:
            splits = replace(splits, **{split: data.subset(idx)})
    return splits
