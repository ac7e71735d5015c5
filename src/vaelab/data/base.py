"""The data types every dataset loader returns, and the split/subset helpers they share.

Images are stored as ``uint8`` tensors of shape (N, C, H, W) and turned into float32 in [0, 1]
one batch at a time (:func:`to_float`), so a 60k-image MNIST costs 47 MB, not 188 MB, and dynamic
binarization can draw a fresh Bernoulli sample each time a batch is drawn.

Storage convention (``ImageSet.images``):
  * ``value_kind == "8bit"`` or ``"continuous"``: integers 0..255, read as ``x / 255``.
  * ``value_kind == "binary"`` with ``binarization`` ``"static"`` or ``None``: the values 0/1.
  * ``value_kind == "binary"`` with ``binarization`` ``"dynamic"`` or ``"threshold"``: the grey
    levels 0..255; :func:`to_float` draws ``Bernoulli(x / 255)`` or takes ``x / 255 > 0.5``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from vaelab.registry import Registry

VALUE_KINDS = ("binary", "continuous", "8bit")
BINARIZATIONS = ("static", "dynamic", "threshold")

# The seed of every validation/test carve. It is a constant, not the run's seed, so that runs
# with different seeds are scored on the same held-out images.
SPLIT_SEED = 0


@dataclass(frozen=True)
class DataInfo:
    """Facts about a dataset that models and reports need.

    Attributes:
        name: registered name plus binarization, e.g. ``"mnist"``, ``"mnist-dynamic"``,
            ``"binarized-mnist-static"``; put it in every report.
        shape: (C, H, W) of one image.
        value_kind: ``"binary"`` (0/1), ``"continuous"`` (in [0, 1]) or ``"8bit"`` (integers
            0..255 scaled to [0, 1]; a discretized likelihood can use 256 bins).
        num_classes: number of classes when labels are classes, else ``None``.
        label_names: class names, index = label.
        attribute_names: names of the columns of (N, A) labels (CelebA's 40 attributes,
            dSprites' 6 latent factors).
        binarization: ``"static"``, ``"dynamic"``, ``"threshold"`` or ``None`` (not binarized,
            or binary by nature like dSprites).
        description: one line, with the citation.
    """

    name: str
    shape: tuple[int, int, int]
    value_kind: str
    num_classes: int | None = None
    label_names: tuple[str, ...] | None = None
    attribute_names: tuple[str, ...] | None = None
    binarization: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if len(self.shape) != 3:
            raise ValueError(f"DataInfo.shape must be (C, H, W), got {self.shape}")
        if self.value_kind not in VALUE_KINDS:
            raise ValueError(f"value_kind {self.value_kind!r} is not one of {VALUE_KINDS}")
        if self.binarization is not None and self.binarization not in BINARIZATIONS:
            raise ValueError(f"binarization {self.binarization!r} is not one of {BINARIZATIONS}")

    @property
    def num_pixels(self) -> int:
        """D = C * H * W, the number of dimensions (for bits/dim = nats / (D ln 2))."""
        c, h, w = self.shape
        return c * h * w


def to_float(
    images: torch.Tensor, info: DataInfo, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Convert stored uint8 images (B, C, H, W) to float32 in [0, 1] on the same device.

    Dynamic binarization draws ``Bernoulli(x / 255)`` with ``generator`` (which must live on
    the images' device); threshold binarization returns ``x / 255 > 0.5``; static binary data
    (stored as 0/1) are returned as is; everything else is ``x / 255``.
    """
    x = images.to(torch.float32)
    if info.binarization == "dynamic":
        return torch.bernoulli(x.div_(255.0), generator=generator)
    if info.binarization == "threshold":
        return (x > 127.5).to(torch.float32)  # x / 255 > 0.5
    if info.value_kind == "binary":
        return x
    return x.div_(255.0)


def mean_image(split, max_images: int | None = None, chunk: int = 5_000) -> torch.Tensor:
    """The mean float image (C, H, W), float64, of a split as training sees it.

    Under dynamic binarization this is the expected value x / 255 (no draws, so no random
    state is used); otherwise the mean of :func:`to_float`. At most ``max_images`` images
    (default 10,000 held in memory, or 1,000 of a :class:`~vaelab.data.StreamingImageSet`,
    whose files are decoded one by one), evenly spaced through the split, are read, ``chunk``
    images at a time but at most 4M values (a 3x64x64 chunk of 5,000 float64 images held
    0.8 GB at once; 4M values hold 48 MB).

    Raises:
        ValueError: an empty split.
    """
    n = len(split)
    if n == 0:
        raise ValueError(f"{split.info.name}: cannot take the mean image of an empty split")
    if max_images is None:
        max_images = 10_000 if isinstance(split, ImageSet) else 1_000
    idx = torch.linspace(0, n - 1, min(n, max_images)).round().long().unique()
    total = torch.zeros(split.info.shape, dtype=torch.float64)
    chunk = max(1, min(chunk, (4 << 20) // total.numel()))
    for start in range(0, len(idx), chunk):
        part = idx[start : start + chunk]
        if isinstance(split, ImageSet):
            u8 = split.images.index_select(0, part)
        else:
            u8 = torch.stack([split[int(i)][0] for i in part])
        if split.info.binarization == "dynamic":
            x = u8.cpu().to(torch.float64) / 255.0
        else:
            x = to_float(u8.cpu(), split.info).double()
        total += x.sum(0)
    return total / len(idx)


_BINARIZE_NOTES = {
    "dynamic": "binarized dynamically: a fresh Bernoulli(x) draw per batch (Burda et al. 2016)",
    "threshold": "binarized by thresholding x > 0.5",
}


def binarized_info(info: DataInfo, mode: str) -> DataInfo:
    """``info`` of grey-level data re-labelled for ``mode`` ``"dynamic"`` or ``"threshold"``.

    The name gains the mode (``mnist`` -> ``mnist-dynamic``) so every report names it.
    """
    if mode not in _BINARIZE_NOTES:
        raise ValueError(
            f"binarize must be None, 'dynamic' or 'threshold', got {mode!r} (static binarization "
            "is a fixed file: use the dataset 'binarized-mnist')"
        )
    if info.binarization == mode:
        return info
    if info.value_kind == "binary":
        raise ValueError(f"{info.name} is already binary (binarization={info.binarization})")
    return DataInfo(
        f"{info.name}-{mode}",
        info.shape,
        "binary",
        info.num_classes,
        info.label_names,
        info.attribute_names,
        mode,
        f"{info.description}; {_BINARIZE_NOTES[mode]}",
    )


Index = torch.Tensor | np.ndarray | Sequence[int] | slice


def as_index(idx: Index) -> torch.Tensor | slice:
    """A slice, a bool mask or int64 indices as something that indexes a tensor's first axis."""
    if isinstance(idx, slice):
        return idx
    t = torch.as_tensor(np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx))
    return t if t.dtype == torch.bool else t.to(torch.long)


class ImageSet:
    """One split held in memory.

    Attributes:
        images: uint8 (N, C, H, W); see the module docstring for what the values mean.
        labels: int64 (N,) class labels, or (N, A) attributes (CelebA: 0/1; dSprites: latent
            class indices), or ``None``.
        info: the dataset's :class:`DataInfo`.
        extras: other per-image tensors indexed like ``images`` (dSprites: ``"latents_values"``
            float64 (N, 6)).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        info: DataInfo,
        extras: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"{info.name}: images must be uint8 (N, C, H, W), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        if tuple(images.shape[1:]) != tuple(info.shape):
            raise ValueError(
                f"{info.name}: image shape {tuple(images.shape[1:])} != info.shape {info.shape}"
            )
        n = images.shape[0]
        if labels is not None and labels.shape[0] != n:
            raise ValueError(f"{info.name}: {labels.shape[0]} labels for {n} images")
        for key, value in (extras or {}).items():
            if value.shape[0] != n:
                raise ValueError(f"{info.name}: extras[{key!r}] has {value.shape[0]} rows, not {n}")
        self.images = images
        self.labels = labels
        self.info = info
        self.extras = dict(extras or {})

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        lab = None if self.labels is None else tuple(self.labels.shape)
        return f"ImageSet({self.info.name}, images={tuple(self.images.shape)}, labels={lab})"

    def to_float(
        self, images_uint8: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """float32 (B, C, H, W) in [0, 1] from stored uint8 images; see :func:`to_float`."""
        return to_float(images_uint8, self.info, generator)

    def subset(self, idx: Index) -> ImageSet:
        """The images (and labels, extras) at ``idx``: indices, a boolean mask or a slice."""
        i = as_index(idx)

        def take(t: torch.Tensor) -> torch.Tensor:
            # index_select is ~3x faster than fancy indexing on uint8 images
            return (
                t.index_select(0, i)
                if isinstance(i, torch.Tensor) and i.dtype == torch.long
                else t[i]
            )

        return ImageSet(
            take(self.images),
            None if self.labels is None else take(self.labels),
            self.info,
            {k: take(v) for k, v in self.extras.items()},
        )

    def with_info(self, info: DataInfo) -> ImageSet:
        """The same tensors under another :class:`DataInfo` (e.g. after choosing a binarization)."""
        return ImageSet(self.images, self.labels, info, self.extras)


@dataclass
class DataSplits:
    """Train / validation / test splits of one dataset; the test split is never for training.

    ``skipped`` lists files a folder loader skipped (``skip_broken=True``).
    """

    info: DataInfo
    train: ImageSet
    valid: ImageSet
    test: ImageSet
    skipped: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        """One line for logs and reports: name, sizes, shape, value kind and binarization."""
        c, h, w = self.info.shape
        return (
            f"{self.info.name}: train {len(self.train)} / valid {len(self.valid)} / test "
            f"{len(self.test)}, {c}x{h}x{w}, {self.info.value_kind}, "
            f"binarization={self.info.binarization}"
        )

    def map(self, fn: Callable[[ImageSet], ImageSet]) -> DataSplits:
        """Apply ``fn`` to each split; the info is taken from the new train split."""
        train, valid, test = fn(self.train), fn(self.valid), fn(self.test)
        return replace(self, info=train.info, train=train, valid=valid, test=test)


@dataclass(frozen=True)
class LoadRequest:
    """What a registered loader is asked for (built by :func:`vaelab.data.load_dataset`).

    ``valid_size`` None means the dataset's own validation split or default carve;
    ``image_size`` is (H, W); ``path`` is the PATH of ``folder:PATH``.
    """

    data_dir: Path
    download: bool = True
    valid_size: int | None = None
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    skip_broken: bool = False
    path: Path | None = None


# name -> loader(LoadRequest) -> DataSplits
DATASETS: Registry[Callable[[LoadRequest], DataSplits]] = Registry("dataset")


def permutation(n: int, seed: int) -> torch.Tensor:
    """A fixed permutation of range(n) (int64) from ``seed`` (torch's CPU generator)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)


def carve(n: int, sizes: Sequence[int], seed: int = SPLIT_SEED) -> list[torch.Tensor]:
    """Split range(n) by a seeded permutation into parts of ``sizes`` from the end, plus the rest.

    ``carve(60000, [10000])`` returns [train (50000,), valid (10000,)]: the valid part is the
    last 10000 of the permutation. Each part's indices are sorted (file order is kept).
    """
    if sum(sizes) > n or any(s < 0 for s in sizes):
        raise ValueError(f"cannot carve parts of sizes {list(sizes)} out of {n} items")
    perm = permutation(n, seed)
    parts, end = [], n
    for s in sizes:
        parts.append(_sorted(perm[end - s : end]))
        end -= s
    return [_sorted(perm[:end]), *parts]


def _sorted(idx: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.sort(idx.numpy()))  # numpy: torch's CPU sort is ~100x slower


def split_with_default(
    data: ImageSet, valid_size: int | None, default_valid: int, test_size: int | None = None
) -> tuple[ImageSet, ...]:
    """Carve validation (and, when ``test_size`` is given, test) from one pool by SPLIT_SEED.

    Returns (train, valid) or (train, valid, test). ``test_size`` is carved first, so changing
    ``valid_size`` never moves an image into or out of the test split.
    """
    v = default_valid if valid_size is None else valid_size
    if test_size is None:
        train_idx, valid_idx = carve(len(data), [v])
        return data.subset(train_idx), data.subset(valid_idx)
    rest_idx, test_idx = carve(len(data), [test_size])
    rest = data.subset(rest_idx)
    train_idx, valid_idx = carve(len(rest), [v], seed=SPLIT_SEED + 1)
    return rest.subset(train_idx), rest.subset(valid_idx), data.subset(test_idx)


def concat(a: ImageSet, b: ImageSet) -> ImageSet:
    """Concatenate two sets with the same info (used to re-carve a dataset's own split)."""
    labels = None if a.labels is None else torch.cat([a.labels, b.labels])
    extras = {k: torch.cat([v, b.extras[k]]) for k, v in a.extras.items()}
    return ImageSet(torch.cat([a.images, b.images]), labels, a.info, extras)


def resplit_defined(
    train: ImageSet, valid: ImageSet, valid_size: int | None
) -> tuple[ImageSet, ImageSet]:
    """Keep a dataset's own train/valid split (``valid_size=None``) or pool and re-carve.

    ``valid_size=0`` trains on train+valid (as Burda et al. did on binarized MNIST).
    """
    if valid_size is None:
        return train, valid
    out = split_with_default(concat(train, valid), valid_size, valid_size)
    return out[0], out[1]


def choose_subset(n: int, size: int | None, mode: str, seed: int) -> torch.Tensor | None:
    """Indices of a subset of ``size`` out of ``n``: the first ``size`` or a seeded random draw.

    Returns ``None`` when ``size`` is None (keep everything). Random subsets are sorted.
    """
    if size is None:
        return None
    if mode not in ("first", "random"):
        raise ValueError(f"subset_mode must be 'first' or 'random', got {mode!r}")
    if not 0 <= size <= n:
        raise ValueError(f"subset of {size} requested from a split of only {n} images")
    if mode == "first":
        return torch.arange(size)
    return _sorted(permutation(n, seed)[:size])
