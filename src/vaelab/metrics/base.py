"""What every metric shares: the ``METRICS`` registry, the labelled :class:`Entry` a metric
reports, and the :class:`EvalContext` the registered metrics read their inputs from.

A metric family is a module with pure functions of a model (or tensors) and a data iterable
(``importance_sampled_log_likelihood(model, batches, k=...)``) plus one registered adapter
``metric(ctx) -> list[Entry]`` that calls them on the split being evaluated and labels every
number with its unit, estimator, k, split and binarization.

Under torchrun the context holds the process group (``ctx.dist``) and the adapters shard: every
process reads the same read batches (so dynamic binarization is the same) and scores its
contiguous slice of each (:meth:`EvalContext.shard_batches`); per-image results come back in
split order through :meth:`EvalContext.gather`, sufficient statistics through
:meth:`EvalContext.sum_`. Random draws stay those of one process: they are seeded per read
batch or chunk (binarization, importance sampling), or every process draws a batch's noise
whole and keeps its slice (ELBO, prior samples).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vaelab.registry import Registry

METRICS: Registry[Callable[[EvalContext], list[Entry]]] = Registry("metric")

# Images are read in batches of this size whatever the compute batch size, so a dynamically
# binarized split gets the same 0/1 draw (seeded per read batch) in every metric and every call.
READ_BATCH = 1000


class MetricUnavailable(ValueError):
    """The data lack what a metric needs (labels for a probe, say). :func:`vaelab.evaluate.evaluate`
    reports such a metric as skipped when it runs the defaults, and raises when it was named."""


@dataclass
class Entry:
    """One reported number and everything needed to read it.

    Attributes:
        name: dotted name, e.g. ``"log_px"``, ``"elbo.kl"``, ``"fd_lenet.samples"``.
        value: the number (``None`` for a metric that was skipped; ``notes`` says why).
        unit: ``"nats/image"``, ``"bits/dim"``, ``"dB"``, ``"units"``, ...
        estimator: how the number was computed, in words, with the paper where there is one.
        split: the data split (``"test"``), or ``None`` when no data is involved.
        n_images: how many images the number averages over.
        k: importance or Monte Carlo samples per image, where that applies.
        binarization: how the evaluated images were binarized (or that they were not).
        stderr: standard error of the mean over images, where applicable.
        notes: warnings and caveats (e.g. ``"not a proper likelihood: ..."``).
        extra: further numbers (KL per latent dimension, per-dimension variances, ...).
    """

    name: str
    value: float | None
    unit: str
    estimator: str
    split: str | None = None
    n_images: int | None = None
    k: int | None = None
    binarization: str | None = None
    stderr: float | None = None
    notes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Entry:
        d = dict(d)
        d["notes"] = tuple(d.get("notes", ()))
        return cls(**d)


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample std with N - 1, over sqrt N) in float64."""
    v = values.detach().to(torch.float64).flatten().cpu()
    n = v.numel()
    if n == 0:
        raise ValueError("cannot average over zero images")
    mean = v.mean().item()
    if n < 2:
        return mean, None
    return mean, v.std(correction=1).item() / math.sqrt(n)


def shard_bounds(n: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """The slice [lo, hi) of n items that process ``rank`` of ``world`` takes, for ``shard`` =
    (rank, world): contiguous, sizes differing by at most one (as
    :meth:`vaelab.distributed.Distributed.bounds`). ``None`` (one process): (0, n)."""
    if shard is None:
        return 0, n
    rank, world = shard
    return rank * n // world, (rank + 1) * n // world


class ShardPass:
    """One pass over ``batches`` that yields this process's slice of each batch (the whole
    batch in one process; empty slices are skipped), recording where its images sit.

    After (or during) iteration, ``index`` (n,) int64 holds the positions in the split of the
    images yielded so far, for :meth:`EvalContext.gather`.
    """

    def __init__(self, batches: Iterable[torch.Tensor], shard: tuple[int, int] | None) -> None:
        self._batches, self._shard = batches, shard
        self._index: list[torch.Tensor] = []

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._index, start = [], 0
        for x in self._batches:
            lo, hi = shard_bounds(x.shape[0], self._shard)
            if hi > lo:
                self._index.append(torch.arange(start + lo, start + hi))
                yield x[lo:hi]
            start += x.shape[0]

    @property
    def index(self) -> torch.Tensor:
        return torch.cat(self._index) if self._index else torch.zeros(0, dtype=torch.int64)


def derive_generator(seed: int, tag: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, tag): each metric draws its own reproducible noise, so
    adding or dropping one metric never changes another's numbers."""
    from vaelab.data.batches import derive_seed

    tag_int = int.from_bytes(tag.encode("utf-8")[:8].ljust(8, b"\0"), "little")
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, tag_int))
    return g


@dataclass
class EvalContext:
    """The inputs of one evaluation, handed to every registered metric.

    ``batches()`` starts a fresh pass over the evaluated split (float images on ``device``,
    in file order, read ``READ_BATCH`` at a time); ``label(...)`` builds an :class:`Entry` with
    the split, image count and binarization filled in.

    ``dist`` is a :class:`vaelab.distributed.Distributed` under torchrun (None in one
    process): ``shard`` is then (rank, world size), ``shard_batches()`` this process's slices,
    and ``gather``, ``sum_`` and ``on_main`` exchange results; in one process they hand their
    inputs back unchanged.
    """

    model: Any
    data: Any  # vaelab.data.DataSplits
    split: str
    k: int = 1000
    seed: int = 0
    batch_size: int = 1000
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    data_dir: Path | None = None
    feature_net: Any = "lenet"
    max_images: int | None = None
    progress: bool = False
    probe_train_images: int | None = None
    workers: int | None = None  # importance-sampling threads (None: automatic)
    loglik_sample: int | None = None  # importance-sample only this many random images
    requested: bool = False  # True when the metric was named explicitly (errors then raise)
    dist: Any = None  # vaelab.distributed.Distributed under torchrun, else None

    @property
    def info(self):
        return self.data.info

    def images(self, split: str | None = None):
        """The :class:`ImageSet` of ``split`` (default: the evaluated one), cut to ``max_images``
        for the evaluated split."""
        name = split or self.split
        if name not in ("train", "valid", "test"):
            raise ValueError(f"split must be train, valid or test, got {name!r}")
        images = getattr(self.data, name)
        if name == self.split and self.max_images is not None and self.max_images < len(images):
            images = images.subset(slice(0, self.max_images))
        return images

    @property
    def n_images(self) -> int:
        return len(self.images())

    def batches(
        self, split: str | None = None, with_labels: bool = False, limit: int | None = None
    ) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]]:
        """One deterministic pass over ``split`` (its first ``limit`` images): float
        (B, C, H, W) in [0, 1] on ``device``, ``READ_BATCH`` images at a time."""
        from vaelab.data.batches import BatchIterator

        images = self.images(split)
        if limit is not None and limit < len(images):
            images = images.subset(slice(0, limit))
        it = BatchIterator(
            images,
            READ_BATCH,
            shuffle=False,
            seed=self.seed,
            device=self.device,
            with_labels=with_labels,
        )
        return it.epoch(0)

    # ------------------------------------------------------------------ several processes

    @property
    def shard(self) -> tuple[int, int] | None:
        """(rank, world size) under torchrun, else None."""
        return None if self.dist is None else (self.dist.rank, self.dist.world_size)

    def shard_batches(self, split: str | None = None, limit: int | None = None) -> ShardPass:
        """This process's contiguous slice of every read batch of :meth:`batches` (every
        process reads the same batches, so dynamically binarized images are the same)."""
        return ShardPass(self.batches(split, limit=limit), self.shard)

    def gather(self, index: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Per-image results of all processes, in split order: ``tensors`` (n, ...) are this
        process's rows at positions ``index`` (n,). One process: ``tensors`` unchanged."""
        if self.dist is None:
            return list(tensors)
        return self.dist.gather_rows(index, *tensors)

    def sum_(self, *tensors: torch.Tensor) -> None:
        """Sum CPU ``tensors`` over the processes, in place (nothing to do in one process)."""
        if self.dist is not None:
            self.dist.sum_cpu_(*tensors)

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0, its result (or error) handed to every process; in one process,
        just ``fn()``."""
        return fn() if self.dist is None else self.dist.on_main(fn)

    def generator(self, tag: str) -> torch.Generator:
        return derive_generator(self.seed, tag, self.device)

    @property
    def binarization(self) -> str:
        return describe_binarization(self.info, self.seed)

    def likelihood_notes(self) -> tuple[str, ...]:
        """``("not a proper likelihood: ...",)`` when the decoder's likelihood is not a proper
        density or mass on this data (e.g. Bernoulli on grey levels), else ``()``."""
        lik = self.model.likelihood
        kind = self.info.value_kind
        if lik.is_proper(kind):
            return ()
        name = type(lik).__name__
        return (
            f"not a proper likelihood: {name} on {kind} data (proper for "
            f"{', '.join(lik.proper_for) or 'nothing'}); the number is not comparable with "
            "published log-likelihoods",
        )

    def label(self, name: str, value: float | None, unit: str, estimator: str, **kw) -> Entry:
        kw.setdefault("split", self.split)
        kw.setdefault("n_images", self.n_images)
        kw.setdefault("binarization", self.binarization)
        return Entry(name, value, unit, estimator, **kw)


def describe_binarization(info, seed: int) -> str:
    """How the evaluated images were made binary, in words (goes into every entry)."""
    b = info.binarization
    if b == "dynamic":
        return (
            f"dynamic: each image binarized once as Bernoulli(x), draws seeded by eval seed "
            f"{seed} (the same 0/1 images for every metric)"
        )
    if b == "static":
        return "static: the dataset's fixed binarization"
    if b == "threshold":
        return "threshold: x > 0.5"
    if info.value_kind == "binary":
        return "none (binary by nature)"
    return f"none ({info.value_kind} values in [0, 1])"
