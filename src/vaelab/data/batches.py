"""Batches of float images drawn by indexing a uint8 tensor, reproducible per (seed, epoch).

The order of an epoch is ``randperm(N)`` from a generator seeded by (seed, epoch), and the
dynamic-binarization draw of batch b is seeded by (seed, epoch, b). So ``epoch(e, start_batch=b)``
yields exactly the batches an uninterrupted epoch e yields from b on: a resumed run sees the
same data. No per-sample Python work: one index operation per batch, on the training device
when the whole uint8 tensor fits there.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from vaelab.data.base import ImageSet
from vaelab.data.folder import StreamingImageSet

Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]

# Keep the dataset on an accelerator only when it takes at most this fraction of free memory.
_DEVICE_FRACTION = 0.25


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, batch, ...), well mixed (NumPy SeedSequence)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


def _fits_on(device: torch.device, nbytes: int) -> bool:
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes <= _DEVICE_FRACTION * free
    return nbytes <= 1 << 30  # mps and others: no free-memory query; keep up to 1 GiB


class BatchIterator:
    """Iterates batches of float images (and labels) by indexing the uint8 tensor.

    Each batch is float32 (B, C, H, W) in [0, 1] on ``device`` (dynamic binarization draws
    fresh 0/1 values), or ``(x, labels)`` with ``with_labels`` (labels int64 (B,) or (B, A), or
    None). ``shuffle=False`` keeps file order. A :class:`StreamingImageSet` is read through a
    DataLoader with worker processes, with the same order and resume rules.
    """

    def __init__(
        self,
        data: ImageSet | StreamingImageSet,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        with_labels: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.device = torch.device(device)
        self.with_labels = with_labels
        self._epoch = 0
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        if isinstance(data, ImageSet):
            on_device = _fits_on(self.device, data.images.numel())
            where = self.device if on_device else torch.device("cpu")
            self._images = data.images.to(where)
            self._labels = None if data.labels is None else data.labels.to(where)

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The int64 permutation of range(N) used in ``epoch`` (identity without shuffle)."""
        n = len(self.data)
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(n, generator=g)

    def _generator(self, epoch: int, batch: int) -> torch.Generator | None:
        if self.data.info.binarization != "dynamic":
            return None
        g = torch.Generator(device=self.device)
        return g.manual_seed(derive_seed(self.seed, epoch, batch, 1))

    def _finish(self, x_u8: torch.Tensor, y: torch.Tensor | None, epoch: int, b: int) -> Batch:
        x_u8 = x_u8.to(self.device, non_blocking=True)
        x = self.data.to_float(x_u8, self._generator(epoch, b))
        if not self.with_labels:
            return x
        return x, None if y is None else y.to(self.device, non_blocking=True)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Yield the batches of ``epoch`` from batch index ``start_batch`` on."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} outside 0..{len(self)}")
        order = self.order(epoch)[: len(self) * self.batch_size if self.drop_last else None]
        if isinstance(self.data, StreamingImageSet):
            yield from self._stream(order, epoch, start_batch)
            return
        images, labels = self._images, self._labels
        order = order.to(images.device)
        for b in range(start_batch, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            # index_select: ~3x faster than images[idx] for a uint8 batch (~0.1 ms a step)
            x_u8 = images.index_select(0, idx)
            y = None if labels is None else labels.index_select(0, idx)
            yield self._finish(x_u8, y, epoch, b)

    def _stream(self, order: torch.Tensor, epoch: int, start_batch: int) -> Iterator[Batch]:
        data = self.data
        loader = DataLoader(
            data,
            batch_size=self.batch_size,
            sampler=order[start_batch * self.batch_size :].tolist(),
            num_workers=data.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        for b, (x_u8, y) in enumerate(loader, start=start_batch):
            yield self._finish(x_u8, None if data.labels is None else y, epoch, b)

    def __iter__(self) -> Iterator[Batch]:
        """Iterate one epoch (0 first), then count the epoch up for the next ``iter``."""
        epoch = self._epoch
        self._epoch += 1
        return self.epoch(epoch)
