"""What every metric shares: the ``METRICS`` registry, the labelled :class:`Entry` a metric
reports, and the :class:`EvalContext` the registered metrics read their inputs from.

A metric family is a module with pure functions of a model (or tensors) and a data iterable
(``importance_sampled_log_likelihood(model, batches, k=...)``) plus one registered adapter
``metric(ctx) -> list[Entry]`` that calls them on the split being evaluated and labels every
number with its unit, estimator, k, split and binarization.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
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
    requested: bool = False  # True when the metric was named explicitly (errors then raise)

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
        self, split: str | None = None, with_labels: bool = False
    ) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]]:
        """One deterministic pass over ``split``: float (B, C, H, W) in [0, 1] on ``device``."""
        from vaelab.data.batches import BatchIterator

        it = BatchIterator(
            self.images(split),
            READ_BATCH,
            shuffle=False,
            seed=self.seed,
            device=self.device,
            with_labels=with_labels,
        )
        return it.epoch(0)

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
