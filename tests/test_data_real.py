"""The real, verified dataset files: counts, shapes, label histograms and statistics.

Expected numbers are those of shared/data/MANIFEST.md. The data dir is ``$VAELAB_DATA_DIR`` when
set (``.ci/run`` prepares one); otherwise a folder of links to ``<repo>/../shared/data`` with
the CIFAR-10 ``.xz`` batches decompressed once (kept in pytest's cache between runs); the
latter also when ``$VAELAB_DATA_DIR`` lacks some of the files.
"""

from __future__ import annotations

import lzma
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaelab.data import (
    binarized_info,
    dataset_status,
    list_datasets,
    load_dataset,
    verify_dataset,
)
from vaelab.data.cifar import CIFAR_FILES

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NEEDED = ("mnist", "fashion-mnist", "binarized-mnist", "frey-face", "cifar-10", "celeba")


def _decompress(src: Path, dest: Path) -> None:
    part = dest.with_name(dest.name + ".part")
    with lzma.open(src) as fin, open(part, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    os.replace(part, dest)


def _build_from_shared(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for sub in NEEDED[:-2] + ("celeba",):
        link = root / sub
        if not link.exists():
            link.symlink_to(SHARED / sub, target_is_directory=True)
    batches = root / "cifar-10" / "cifar-10-batches-py"
    batches.mkdir(parents=True, exist_ok=True)
    src = SHARED / "cifar-10" / "cifar-10-batches-py"
    if not (batches / "batches.meta").exists():
        (batches / "batches.meta").symlink_to(src / "batches.meta")
    sizes = {s.name: s.size for s in CIFAR_FILES.groups[0]}
    todo = [
        (xz, batches / xz.stem)
        for xz in sorted(src.glob("*.xz"))
        if not (batches / xz.stem).exists() or (batches / xz.stem).stat().st_size != sizes[xz.stem]
    ]
    with ThreadPoolExecutor(max_workers=len(todo) or 1) as pool:  # lzma frees the GIL
        list(pool.map(lambda job: _decompress(*job), todo))
    return root


@pytest.fixture(scope="session")
def real_data_dir(request: pytest.FixtureRequest, tmp_path_factory) -> Path:
    env = os.environ.get("VAELAB_DATA_DIR")
    if env and all(
        r["present"]
        for name in ("mnist", "fashion-mnist", "binarized-mnist", "frey-face", "cifar10", "celeba")
        for r in dataset_status(name, env)
    ):
        return Path(env)
    if not all((SHARED / sub).is_dir() for sub in NEEDED):
        pytest.skip(f"no real data: $VAELAB_DATA_DIR is unset and {SHARED} is incomplete")
    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("vaelab-real-data")) if cache else tmp_path_factory.mktemp("real")
    return _build_from_shared(root)


@pytest.fixture(scope="module")
def mnist(real_data_dir):
    return load_dataset("mnist", real_data_dir, download=False)


def _hist(labels: torch.Tensor, k: int = 10) -> list[int]:
    return torch.bincount(labels, minlength=k).tolist()


MNIST_TRAIN = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_counts_histograms_and_split(mnist):
    assert (len(mnist.train), len(mnist.valid), len(mnist.test)) == (50000, 10000, 10000)
    assert mnist.train.images.shape[1:] == (1, 28, 28) and mnist.train.images.dtype == torch.uint8
    assert mnist.info.value_kind == "8bit" and mnist.info.binarization is None
    all_train = torch.cat([mnist.train.labels, mnist.valid.labels])
    assert _hist(all_train) == MNIST_TRAIN
    assert _hist(mnist.test.labels) == MNIST_TEST
    assert int(mnist.train.images.max()) == 255 and int(mnist.train.images.min()) == 0


def test_mnist_split_is_fixed_and_disjoint(real_data_dir, mnist):
    again = load_dataset("mnist", real_data_dir, download=False, seed=123)
    assert torch.equal(again.valid.images, mnist.valid.images)  # the carve ignores the run seed
    train_rows = {bytes(x) for x in mnist.train.images.flatten(1).numpy()[:5000]}
    assert not any(bytes(x) in train_rows for x in mnist.valid.images.flatten(1).numpy()[:2000])


def test_mnist_subsets_zhao_protocol(real_data_dir, mnist):
    first = load_dataset(
        "mnist", real_data_dir, download=False, subset_train=6000, subset_test=1000
    )
    rand = load_dataset(
        "mnist",
        real_data_dir,
        download=False,
        subset_train=6000,
        subset_test=1000,
        subset_mode="random",
        seed=1,
    )
    assert (len(first.train), len(first.test)) == (6000, 1000) == (len(rand.train), len(rand.test))
    assert len(first.valid) == 10000
    assert torch.equal(first.test.labels, mnist.test.labels[:1000])
    assert not torch.equal(first.train.images, rand.train.images)


def test_fashion_mnist(real_data_dir):
    s = load_dataset("fashion-mnist", real_data_dir, download=False)
    assert (len(s.train), len(s.valid), len(s.test)) == (50000, 10000, 10000)
    assert _hist(torch.cat([s.train.labels, s.valid.labels])) == [6000] * 10
    assert _hist(s.test.labels) == [1000] * 10
    assert s.info.label_names[0] == "T-shirt/top" and s.info.label_names[9] == "Ankle boot"


def test_static_binarized_mnist(real_data_dir):
    s = load_dataset("binarized-mnist", real_data_dir, download=False)
    assert s.info.name == "binarized-mnist-static" and s.info.binarization == "static"
    assert (len(s.train), len(s.valid), len(s.test)) == (50000, 10000, 10000)
    sums = [int(x.images.sum()) for x in (s.train, s.valid, s.test)]
    assert sums == [5_118_041, 1_028_036, 1_038_896]
    assert int(s.train.images.max()) == 1
    batch = s.train.to_float(s.train.images[:4])
    assert batch.dtype == torch.float32 and set(batch.unique().tolist()) <= {0.0, 1.0}
    merged = load_dataset("binarized-mnist", real_data_dir, download=False, valid_size=0)
    assert (len(merged.train), len(merged.valid)) == (60000, 0)


def test_mnist_binarization_names(real_data_dir):
    dyn = load_dataset("mnist-dynamic", real_data_dir, download=False, subset_train=10)
    same = load_dataset("mnist", real_data_dir, download=False, binarize="dynamic", subset_train=10)
    thr = load_dataset("mnist-threshold", real_data_dir, download=False, subset_train=10)
    assert dyn.info == same.info and dyn.info.name == "mnist-dynamic"
    assert (dyn.info.binarization, thr.info.binarization) == ("dynamic", "threshold")
    x = thr.train.to_float(thr.train.images)
    assert torch.equal(x, (thr.train.images.float() / 255 > 0.5).float())
    with pytest.raises(ValueError, match="already binary"):
        binarized_info(dyn.info, "threshold")
    with pytest.raises(ValueError, match="binarized-mnist"):
        binarized_info(dyn.info, "static")


def test_frey_face(real_data_dir):
    s = load_dataset("frey-face", real_data_dir, download=False)
    assert (len(s.train), len(s.valid), len(s.test)) == (1765, 100, 100)
    everything = torch.cat([s.train.images, s.valid.images, s.test.images])
    assert everything.shape == (1965, 1, 28, 20)
    assert (int(everything.min()), int(everything.max())) == (8, 238)


def test_cifar10(real_data_dir):
    s = load_dataset("cifar10", real_data_dir, download=False)
    assert (len(s.train), len(s.valid), len(s.test)) == (45000, 5000, 10000)
    assert s.train.images.shape[1:] == (3, 32, 32)
    assert _hist(torch.cat([s.train.labels, s.valid.labels])) == [5000] * 10
    assert _hist(s.test.labels) == [1000] * 10
    test_mean = s.test.images.double().mean(dim=(0, 2, 3)) / 255
    np.testing.assert_allclose(test_mean.numpy(), [0.49421428, 0.48513139, 0.45040909], atol=1e-7)
    assert s.info.label_names[3] == "cat"


def test_celeba_sample(real_data_dir):
    with pytest.warns(UserWarning, match="not the canonical"):
        s = load_dataset("celeba", real_data_dir, download=False)
    assert (len(s.train), len(s.valid), len(s.test)) == (100, 0, 0)
    names = s.info.attribute_names
    assert len(names) == 40 and names[0] == "5_o_Clock_Shadow" and names[-1] == "Young"
    labels = s.train.labels.double()
    assert labels.shape == (100, 40)
    for attr, frac in (("Male", 0.42), ("Smiling", 0.46), ("Young", 0.82)):
        assert labels[:, names.index(attr)].mean().item() == pytest.approx(frac)
    assert s.train.images.shape == (100, 3, 64, 64)
    # The 64x64 crop is the central 148x148 square of the 178x218 image.
    with Image.open(real_data_dir / "celeba" / "img_align_celeba" / "000001.jpg") as img:
        ref = (
            img.convert("RGB").crop((15, 35, 163, 183)).resize((64, 64), Image.Resampling.BILINEAR)
        )
    assert torch.equal(
        s.train.images[0], torch.from_numpy(np.asarray(ref).transpose(2, 0, 1).copy())
    )
    with pytest.warns(UserWarning):
        tall = load_dataset("celeba", real_data_dir, download=False, image_size=(64, 48))
    assert tall.train.images.shape == (100, 3, 64, 48) and tall.info.shape == (3, 64, 48)


def test_digits_embedded(tmp_path, monkeypatch):
    from sklearn.datasets import load_digits

    monkeypatch.setenv("VAELAB_OFFLINE", "1")
    s = load_dataset("digits", tmp_path)  # no files, no network
    assert (len(s.train), len(s.valid), len(s.test)) == (1397, 200, 200)
    images = torch.cat([s.train.images, s.valid.images, s.test.images])
    assert set(images.unique().tolist()) <= {round(v * 255 / 16) for v in range(17)}
    labels = torch.cat([s.train.labels, s.valid.labels, s.test.labels])
    assert _hist(labels) == np.bincount(load_digits().target).tolist()
    assert s.info.shape == (1, 8, 8) and s.info.value_kind == "continuous"


def test_status_and_verify_real_files(real_data_dir):
    for name in ("mnist", "fashion-mnist", "binarized-mnist", "frey-face", "cifar10"):
        rows = dataset_status(name, real_data_dir)
        assert rows and all(r["present"] for r in rows) and all(r["verified"] is None for r in rows)
        assert all(r["verified"] is True for r in verify_dataset(name, real_data_dir)), name
    celeba = {r["file"]: r["verified"] for r in verify_dataset("celeba", real_data_dir)}
    assert celeba == {
        "img_align_celeba": None,
        "list_attr_celeba.txt": False,
        "list_eval_partition.txt": False,
    }


def test_list_datasets_table(real_data_dir):
    rows = {r["dataset"]: r for r in list_datasets(real_data_dir)}
    assert rows["mnist"]["names"] == ["mnist", "mnist-dynamic", "mnist-threshold"]
    assert rows["mnist"]["present"] and rows["mnist"]["size"] == 9912422 + 28881 + 1648877 + 4542
    assert rows["digits"]["present"] and not rows["dsprites"]["present"]
    checked = {r["dataset"]: r["verified"] for r in list_datasets(real_data_dir, verify=True)}
    assert checked["frey-face"] is True and checked["celeba"] is False
