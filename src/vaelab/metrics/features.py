"""Feature networks for Frechet distances.

* ``"lenet"`` (the offline default that always works): a small LeNet-style classifier vaelab
  trains itself on the labeled dataset, cached in the data directory as
  ``<data_dir>/vaelab-features/lenet-<dataset>-<fingerprint>.safetensors`` with a JSON file
  beside it (test accuracy, training settings, sha256 of the weights). Its distance is reported
  as **FD-LeNet**, never as FID: it is comparable only with FD-LeNet from the same weights.
* ``"inception"``: the Inception-v3 weights pytorch-fid and torch-fidelity use, giving the FID
  papers report (see :mod:`vaelab.metrics.inception`).

A feature network is a :class:`FeatureNet`: a frozen module mapping [0, 1] images (B, C, H, W)
to features (B, F), plus the name its distance is reported under.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.metrics.base import MetricUnavailable

FEATURES_DIR = "vaelab-features"
LENET_FEATURES = 128
LENET_MIN_STEPS = 500  # small datasets (the 8x8 digits) train for more than 2 epochs
# Part of the cache key: change it whenever LeNet or its training changes.
LENET_VERSION = "lenet5-6-16-128"


class FeatureNet(nn.Module):
    """A frozen feature extractor with the name its Frechet distance is reported under.

    Args:
        net: maps float images (B, C, H, W) in [0, 1] to features (B, F).
        key: entry-name prefix (``"fd_lenet"``, ``"fid"``).
        display: the metric's name in reports (``"FD-LeNet"``, ``"FID"``).
        description: what the features are, for the estimator label.
        meta: facts for ``eval.json`` (file, sha256, accuracy, ...).
        comparable: whether numbers compare with the literature (only the standard Inception).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        key: str,
        display: str,
        description: str,
        meta: dict | None = None,
        comparable: bool = False,
    ) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.key = key
        self.display = display
        self.description = description
        self.meta = dict(meta or {})
        self.comparable = comparable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1).float()

    def describe(self) -> str:
        return self.description

    def notes(self) -> tuple[str, ...]:
        if self.comparable:
            return ()
        return (
            f"{self.display} is not FID: it uses vaelab's own feature network and compares only "
            f"with {self.display} computed with the same weights (sha256 "
            f"{str(self.meta.get('sha256', '?'))[:12]})",
        )


# ----------------------------------------------------------------------------------- LeNet


class LeNet(nn.Module):
    """LeNet-5-style classifier (LeCun et al. 1998): two 5x5 conv (6 and 16 channels) + ReLU +
    2x2 max-pool stages (valid convolutions; padded for images under 20 pixels), a pool to 4x4,
    then a 128-unit ReLU layer (the features) and a linear classifier. Small on purpose: it
    trains on MNIST in well under a minute on two CPU cores."""

    def __init__(
        self,
        in_channels: int,
        num_outputs: int,
        feature_dim: int = LENET_FEATURES,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        pad = 2 if image_size < 20 else 0
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(16 * 16, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_outputs)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, 128) features."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class _Embed(nn.Module):
    def __init__(self, lenet: LeNet) -> None:
        super().__init__()
        self.lenet = lenet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lenet.embed(x)


def _task(data) -> tuple[str, int]:
    """("classes", num_classes) or ("attributes", A) from a dataset's labels."""
    labels, info = data.train.labels, data.info
    if labels is None:
        raise MetricUnavailable(
            f"dataset {info.name} has no labels to train LeNet features on; use a labeled "
            "dataset of the same shape (feature net 'lenet:mnist'), or 'inception' for FID"
        )
    if labels.dim() == 1:
        return "classes", int(info.num_classes or int(labels.max()) + 1)
    if labels.dim() == 2 and bool(((labels == 0) | (labels == 1)).all()):
        return "attributes", labels.shape[1]
    raise MetricUnavailable(
        f"dataset {info.name}: LeNet features need class labels (N,) or 0/1 attributes (N, A), "
        f"got labels of shape {tuple(labels.shape)} with values {labels.min()}..{labels.max()}"
    )


def data_fingerprint(data) -> str:
    """sha256 (hex) of the LeNet version, and the train split's stored images (or, for a
    streamed folder, its file names and sizes) and labels: names the cached LeNet, so another
    subset, dataset or network version never reuses it."""
    h = hashlib.sha256()
    h.update(LENET_VERSION.encode())
    h.update(data.info.name.encode())
    train = data.train
    images = getattr(train, "images", None)
    if images is not None:
        h.update(str(tuple(images.shape)).encode())
        h.update(images.contiguous().numpy().tobytes())
    else:  # StreamingImageSet: images stay on disk
        for f in train.files:
            h.update(f"{f}:{os.path.getsize(f)}".encode())
    if train.labels is not None:
        h.update(train.labels.contiguous().numpy().tobytes())
    return h.hexdigest()


def _accuracy(model: LeNet, data_split, task: str, device, seed: int) -> float:
    from vaelab.data.batches import BatchIterator

    correct, total = 0.0, 0
    with torch.inference_mode():
        for x, y in BatchIterator(
            data_split, 1000, shuffle=False, seed=seed, device=device, with_labels=True
        ).epoch(0):
            out = model(x)
            if task == "classes":
                correct += (out.argmax(1) == y).sum().item()
                total += y.numel()
            else:
                correct += ((out > 0).long() == y).float().sum().item()
                total += y.numel()
    return correct / max(total, 1)


def train_lenet(
    data,
    *,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    min_steps: int = LENET_MIN_STEPS,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[LeNet, dict]:
    """Train a :class:`LeNet` on ``data.train`` for ``epochs`` epochs but at least
    ``min_steps`` steps (Adam; cross-entropy for classes, BCE for 0/1 attributes).
    Returns the model (eval mode) and facts including its test-split accuracy."""
    from tqdm import tqdm

    from vaelab.data.batches import BatchIterator

    task, outputs = _task(data)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LeNet(data.info.shape[0], outputs, image_size=min(data.info.shape[1:])).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    it = BatchIterator(
        data.train, batch_size, shuffle=True, seed=seed, device=device, with_labels=True
    )
    steps = max(epochs * len(it), min_steps)
    start = time.perf_counter()
    model.train()
    step, e = 0, 0
    with tqdm(total=steps, desc="training LeNet features", disable=not progress) as bar:
        while step < steps:
            for x, y in it.epoch(e):
                out = model(x)
                if task == "classes":
                    loss = F.cross_entropy(out, y)
                else:
                    loss = F.binary_cross_entropy_with_logits(out, y.float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
                step += 1
                if step == steps:
                    break
            e += 1
    model.eval()
    facts = {
        "dataset": data.info.name,
        "shape": list(data.info.shape),
        "task": task,
        "num_outputs": outputs,
        "feature_dim": LENET_FEATURES,
        "version": LENET_VERSION,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_images": len(data.train),
        "test_images": len(data.test),
        "test_accuracy": _accuracy(model, data.test, task, device, seed),
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    return model, facts


def lenet_paths(data, data_dir: str | os.PathLike | None) -> tuple[Path, Path]:
    """(weights, json) paths of the cached LeNet for ``data`` under the data directory."""
    from vaelab.data.download import resolve_data_dir

    stem = f"lenet-{data.info.name}-{data_fingerprint(data)[:12]}"
    folder = resolve_data_dir(data_dir) / FEATURES_DIR
    return folder / f"{stem}.safetensors", folder / f"{stem}.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def lenet_feature_net(
    data,
    data_dir: str | os.PathLike | None = None,
    *,
    device: torch.device | str = "cpu",
    epochs: int = 2,
    min_steps: int = LENET_MIN_STEPS,
    retrain: bool = False,
    progress: bool = False,
) -> FeatureNet:
    """The FD-LeNet feature network for ``data``: loaded from the cache, else trained on
    ``data.train`` and cached (weights + JSON with its test accuracy) in the data directory.

    A cached file whose sha256 does not match its JSON raises (delete both to retrain).
    """
    from safetensors.torch import load_file, save_file

    from vaelab.io import atomic_path, atomic_write_text

    weights, meta_path = lenet_paths(data, data_dir)
    if weights.is_file() and meta_path.is_file() and not retrain:
        facts = json.loads(meta_path.read_text())
        got = _sha256(weights)
        if got != facts.get("sha256"):
            raise ValueError(
                f"{weights} has sha256 {got}, but {meta_path} records {facts.get('sha256')}; "
                "delete both files to retrain the LeNet features"
            )
        shape = facts["shape"]
        model = LeNet(shape[0], facts["num_outputs"], facts["feature_dim"], min(shape[1:]))
        model.load_state_dict(load_file(str(weights)))
    else:
        model, facts = train_lenet(
            data, epochs=epochs, min_steps=min_steps, device=device, progress=progress
        )
        weights.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        with atomic_path(weights) as tmp:
            save_file(state, str(tmp), metadata={"vaelab": "lenet-features"})
        facts["sha256"] = _sha256(weights)
        facts["file"] = weights.name
        atomic_write_text(meta_path, json.dumps(facts, indent=2) + "\n")
    if tuple(facts["shape"]) != tuple(data.info.shape):
        raise ValueError(
            f"LeNet {weights} expects images {facts['shape']}, data has {data.info.shape}"
        )
    acc = facts["test_accuracy"]
    what = "test accuracy" if facts["task"] == "classes" else "mean attribute test accuracy"
    desc = (
        f"{facts['feature_dim']}-d features of vaelab's LeNet trained on {facts['dataset']} "
        f"({what} {100 * acc:.2f}%, sha256 {facts['sha256'][:12]})"
    )
    meta = {
        "feature_net": "lenet",
        "file": str(weights),
        "sha256": facts["sha256"],
        "trained_on": facts["dataset"],
        "test_accuracy": acc,
        "train_images": facts["train_images"],
        "steps": facts["steps"],
    }
    return FeatureNet(
        _Embed(model).to(device), key="fd_lenet", display="FD-LeNet", description=desc, meta=meta
    )


# ------------------------------------------------------------------------------ resolving

FEATURE_NETS = ("lenet", "lenet:DATASET", "inception", "inception:PATH")


def resolve_feature_net(
    spec,
    data,
    *,
    data_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> FeatureNet:
    """A :class:`FeatureNet` from a spec: a FeatureNet itself; ``"lenet"`` (trained on
    ``data``); ``"lenet:NAME"`` (trained on dataset NAME, e.g. ``lenet:mnist`` for binarized
    MNIST, which has no labels); ``"inception"`` (the standard FID weights from the cache or a
    download); ``"inception:PATH"`` (the weights file at PATH)."""
    if isinstance(spec, FeatureNet):
        return spec.to(device)
    if not isinstance(spec, str):
        raise ValueError(f"feature net must be a FeatureNet or one of {FEATURE_NETS}, got {spec!r}")
    name, _, arg = spec.partition(":")
    if name == "lenet":
        if arg:
            from vaelab.data import load_dataset

            data = load_dataset(arg, data_dir)
        return lenet_feature_net(data, data_dir, device=device, progress=progress)
    if name == "inception":
        from vaelab.metrics.inception import inception_feature_net

        return inception_feature_net(
            arg or None, data_dir=data_dir, device=device, progress=progress
        )
    raise ValueError(f"unknown feature net {spec!r}; choose one of: {', '.join(FEATURE_NETS)}")
