"""Small files written in the exact canonical formats, read through ``load_dataset``.

The loaders verify every file against the published checksums, which synthetic files cannot
match, so ``pin`` swaps in the synthetic files' own SHA-256 for the duration of a test (as if
they had been published). Also: checksum mismatches, truncated files, missing files offline.
"""

from __future__ import annotations

import gzip
import io
import lzma
import pickle
import shutil
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from vaelab.data import DATASETS, FILES, ChecksumError, dataset_status, load_dataset
from vaelab.data import celeba as celeba_mod
from vaelab.data import cifar as cifar_mod
from vaelab.data import dsprites as dsprites_mod
from vaelab.data import frey as frey_mod
from vaelab.data import mnist as mnist_mod
from vaelab.data.download import file_digests
from vaelab.data.files import locate
from vaelab.data.mnist import read_amat, read_idx

RNG = np.random.default_rng(0)


def pin(monkeypatch, module, attr: str, data_dir: Path) -> None:
    """Publish the synthetic files' SHA-256 in place of the canonical checksums."""
    files = getattr(module, attr)

    def pinned(spec):
        path = locate(files, spec, data_dir)
        if path is None or spec.is_dir:
            return spec
        sha = file_digests(path, ["sha256"], decompress=path.name != spec.name)["sha256"]
        return replace(spec, md5=None, sha256=sha, git_sha1=None, size=None, known_sha256=())

    new = replace(files, groups=tuple(tuple(pinned(s) for s in g) for g in files.groups))
    monkeypatch.setattr(module, attr, new)
    for key, value in list(FILES.items()):
        if value is files:
            monkeypatch.setitem(FILES, key, new)


# ----------------------------------------------------------------------------- MNIST / IDX


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, n_train: int = 120, n_test: int = 30) -> dict[str, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte.gz": RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": RNG.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": RNG.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, a in arrays.items():
        write_idx(root / name, a)
    return arrays


def test_idx_files_in_the_dataset_subfolder(tmp_path, monkeypatch):
    arrays = write_mnist(tmp_path / "fashion-mnist")
    pin(monkeypatch, mnist_mod, "FASHION_FILES", tmp_path)
    s = load_dataset("fashion-mnist", tmp_path, download=False, valid_size=20)
    assert (len(s.train), len(s.valid), len(s.test)) == (100, 20, 30)
    assert s.train.images.dtype == torch.uint8 and s.train.labels.dtype == torch.int64
    test = arrays["t10k-images-idx3-ubyte.gz"]
    assert torch.equal(s.test.images[:, 0], torch.from_numpy(test))
    everything = torch.cat([s.train.images, s.valid.images])[:, 0]
    assert sorted(map(bytes, everything.numpy())) == sorted(
        map(bytes, arrays["train-images-idx3-ubyte.gz"])
    )


def test_idx_files_directly_in_the_data_dir(tmp_path, monkeypatch):
    write_mnist(tmp_path)
    pin(monkeypatch, mnist_mod, "MNIST_FILES", tmp_path)
    s = load_dataset("mnist", tmp_path, download=False, valid_size=10, subset_train=7)
    assert (len(s.train), len(s.valid), len(s.test)) == (7, 10, 30)


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    write_idx(tmp_path / "x.gz", RNG.integers(0, 256, (50, 28, 28), dtype=np.uint8))
    raw = (tmp_path / "x.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut\.gz.*truncated"):
        read_idx(tmp_path / "cut.gz")
    short = gzip.compress(gzip.decompress(raw)[:-100])
    (tmp_path / "short.gz").write_bytes(short)
    with pytest.raises(ValueError, match=r"short\.gz: IDX header says"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "text.gz").write_bytes(gzip.compress(b"hello world"))
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "text.gz")


# ----------------------------------------------------------------------------- binarized MNIST


def amat_text(bits: np.ndarray) -> bytes:
    return b"".join(
        b" ".join(b"%d" % v for v in row) + b"\n" for row in bits.reshape(len(bits), -1)
    )


@pytest.mark.parametrize("compress", [False, True])
def test_binarized_amat_plain_or_gz(tmp_path, monkeypatch, compress):
    root = tmp_path / "binarized-mnist"
    root.mkdir()
    bits = {
        s: RNG.integers(0, 2, (n, 784), dtype=np.uint8)
        for s, n in (("train", 40), ("valid", 10), ("test", 12))
    }
    for split, b in bits.items():
        name = f"binarized_mnist_{split}.amat"
        data = amat_text(b)
        if compress:
            (root / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    pin(monkeypatch, mnist_mod, "BINARIZED_FILES", tmp_path)
    s = load_dataset("binarized-mnist", tmp_path, download=False)
    assert (len(s.train), len(s.valid), len(s.test)) == (40, 10, 12)
    assert torch.equal(s.valid.images.reshape(10, 784), torch.from_numpy(bits["valid"]))
    assert s.info.binarization == "static" and s.train.labels is None


def test_read_amat_rejects_other_layouts(tmp_path):
    (tmp_path / "bad.amat").write_bytes(
        amat_text(np.ones((2, 784), np.uint8)).replace(b"\n", b"\r")
    )
    with pytest.raises(ValueError, match="0/1 values"):
        read_amat(tmp_path / "bad.amat")


# ----------------------------------------------------------------------------- Frey Face


def test_frey_mat(tmp_path, monkeypatch):
    faces = RNG.integers(0, 256, (300, 28, 20), dtype=np.uint8)
    (tmp_path / "frey-face").mkdir()
    scipy.io.savemat(tmp_path / "frey-face" / "frey_rawface.mat", {"ff": faces.reshape(300, -1).T})
    pin(monkeypatch, frey_mod, "FREY_FILES", tmp_path)
    s = load_dataset("frey-face", tmp_path, download=False)
    assert (len(s.train), len(s.valid), len(s.test)) == (100, 100, 100)
    assert s.info.shape == (1, 28, 20)
    got = {bytes(x) for x in torch.cat([s.train.images, s.valid.images, s.test.images]).numpy()}
    assert got == {bytes(x[None]) for x in faces}


# ----------------------------------------------------------------------------- CIFAR-10


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` opcodes, as the original cPickle batches have them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        op = (
            pickle.SHORT_BINSTRING + bytes([n])
            if n < 256
            else pickle.BINSTRING + n.to_bytes(4, "little")
        )
        self.write(op + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def cifar_batches(n: int = 20) -> dict[str, bytes]:
    """Pickles laid out like the originals (Python 2 protocol 2, bytes keys, uint8 rows)."""
    out = {}
    for i, name in enumerate([*cifar_mod.TRAIN_BATCHES, "test_batch"]):
        d = {
            b"batch_label": b"batch %d" % i,
            b"labels": [int(v) for v in RNG.integers(0, 10, n)],
            b"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"img_%d.png" % j for j in range(n)],
        }
        out[name] = py2_dumps(d)
    out["batches.meta"] = py2_dumps(
        {b"label_names": [n.encode() for n in cifar_mod.CIFAR_LABELS], b"num_vis": 3072}
    )
    return out


def _cifar_expected(batches):
    train = [pickle.loads(batches[n], encoding="bytes") for n in cifar_mod.TRAIN_BATCHES]
    x = np.concatenate([d[b"data"] for d in train]).reshape(-1, 3, 32, 32)
    y = np.concatenate([d[b"labels"] for d in train])
    return x, y


@pytest.mark.parametrize("form", ["folder", "xz", "tarball"])
def test_cifar_forms(tmp_path, monkeypatch, form):
    batches = cifar_batches()
    if form == "tarball":
        (tmp_path / "cifar-10").mkdir()
        with tarfile.open(tmp_path / "cifar-10" / "cifar-10-python.tar.gz", "w:gz") as tar:
            for name, data in batches.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        folder = tmp_path / "cifar-10-batches-py"
        folder.mkdir()
        for name, data in batches.items():
            if form == "xz" and name != "batches.meta":
                (folder / (name + ".xz")).write_bytes(lzma.compress(data))
            else:
                (folder / name).write_bytes(data)
    pin(monkeypatch, cifar_mod, "CIFAR_FILES", tmp_path)
    s = load_dataset("cifar10", tmp_path, download=False, valid_size=0)
    x, y = _cifar_expected(batches)
    assert torch.equal(s.train.images, torch.from_numpy(x))  # canonical order kept
    assert torch.equal(s.train.labels, torch.from_numpy(y))
    assert s.test.images.shape == (20, 3, 32, 32) and len(s.valid) == 0


def test_cifar_pickle_may_only_build_arrays(tmp_path):
    evil = pickle.dumps({b"data": print}, protocol=2)  # any callable other than numpy's
    with pytest.raises(ValueError, match=r"refusing to load (__builtin__|builtins)\.print"):
        cifar_mod.unpickle_batch(evil, "evil_batch")


# ----------------------------------------------------------------------------- dSprites


def test_dsprites_npz(tmp_path, monkeypatch):
    n = 200
    imgs = RNG.integers(0, 2, (n, 64, 64), dtype=np.uint8)
    classes = np.stack([RNG.integers(0, k, n) for k in dsprites_mod.FACTOR_SIZES], 1)
    values = classes / 10.0
    meta = np.array({"latents_names": dsprites_mod.FACTOR_NAMES}, dtype=object)
    np.savez(
        tmp_path / dsprites_mod.DSPRITES_FILE,
        imgs=imgs,
        latents_classes=classes,
        latents_values=values,
        metadata=meta,
    )
    pin(monkeypatch, dsprites_mod, "DSPRITES_FILES", tmp_path)
    s = load_dataset("dsprites", tmp_path, download=False)
    assert (len(s.train), len(s.valid), len(s.test)) == (160, 20, 20)
    assert s.info.value_kind == "binary" and s.info.attribute_names == dsprites_mod.FACTOR_NAMES
    assert s.train.labels.shape == (160, 6) and s.train.labels.dtype == torch.int64
    lab, val = s.test.labels, s.test.extras["latents_values"]
    assert torch.allclose(val, lab.double() / 10)
    x = s.train.to_float(s.train.images[:5])
    assert x.shape == (5, 1, 64, 64) and set(x.unique().tolist()) <= {0.0, 1.0}


def test_dsprites_git_blob_checksum(tmp_path):
    # The published checksum is Git's blob SHA-1; check the hash itself on a known blob.
    (tmp_path / "hello").write_bytes(b"hello\n")
    got = file_digests(tmp_path / "hello", ["git-sha1"])["git-sha1"]
    assert got == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object` of "hello\n"


# ----------------------------------------------------------------------------- CelebA


ATTRS = ("Bald", "Male", "Smiling")


def write_celeba(root: Path, n: int = 6, zipped: bool = False) -> np.ndarray:
    """178x218 JPEGs whose central 148x148 square is white, the rest black."""
    root.mkdir(parents=True, exist_ok=True)
    img = np.zeros((218, 178, 3), np.uint8)
    img[35:183, 15:163] = 255
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    files = {}
    for name in names:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=95)
        files[name] = buf.getvalue()
    if zipped:
        with zipfile.ZipFile(root / "img_align_celeba.zip", "w") as zf:
            for name, data in files.items():
                zf.writestr(f"img_align_celeba/{name}", data)
    else:
        (root / "img_align_celeba").mkdir()
        for name, data in files.items():
            (root / "img_align_celeba" / name).write_bytes(data)
    attrs = RNG.choice([-1, 1], (n, len(ATTRS)))
    lines = [str(n), " ".join(ATTRS) + " "]
    lines += [
        name + "".join(f"{v:3d}" for v in row) for name, row in zip(names, attrs, strict=True)
    ]
    (root / "list_attr_celeba.txt").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    parts = [0, 0, 0, 0, 1, 2][:n]
    (root / "list_eval_partition.txt").write_bytes(
        b"".join(b"%s %d\r\n" % (name.encode(), p) for name, p in zip(names, parts, strict=True))
    )
    return (attrs + 1) // 2


@pytest.mark.parametrize("zipped", [False, True])
def test_celeba_folder_or_zip(tmp_path, monkeypatch, zipped):
    attrs = write_celeba(tmp_path / "celeba", zipped=zipped)
    pin(monkeypatch, celeba_mod, "CELEBA_FILES", tmp_path)
    s = load_dataset("celeba", tmp_path, download=False)
    assert (len(s.train), len(s.valid), len(s.test)) == (4, 1, 1)
    assert s.info.attribute_names == ATTRS
    assert torch.equal(s.train.labels, torch.from_numpy(attrs[:4]))
    assert s.train.images.shape == (4, 3, 64, 64)
    assert s.train.images.float().mean() > 250  # the crop is the white square
    tall = load_dataset("celeba", tmp_path, download=False, image_size=(64, 48))
    assert tall.train.images.shape == (4, 3, 64, 48)
    # the 148x197 box reaches 25 rows into the black border above and below the square
    rows = tall.train.images[0, 0].float().mean(1)
    assert rows[0] < 10 and rows[-1] < 10 and rows[32] > 250
    grey = load_dataset("celeba", tmp_path, download=False, channels=1, image_size=(32, 32))
    assert grey.train.images.shape == (4, 1, 32, 32)


def test_celeba_missing_image_is_named(tmp_path, monkeypatch):
    write_celeba(tmp_path)
    (tmp_path / "img_align_celeba" / "000003.jpg").unlink()
    pin(monkeypatch, celeba_mod, "CELEBA_FILES", tmp_path)
    with pytest.raises(FileNotFoundError, match="000003.jpg"):
        load_dataset("celeba", tmp_path, download=False)


# ----------------------------------------------------------------------------- errors


def test_checksum_mismatch_names_file_checksum_and_place(tmp_path):
    (tmp_path / "frey-face").mkdir()
    bad = tmp_path / "frey-face" / "frey_rawface.mat"
    bad.write_bytes(b"\0" * 1100584)  # right size, wrong bytes
    with pytest.raises(ChecksumError) as err:
        load_dataset("frey-face", tmp_path, download=False)
    msg = str(err.value)
    assert str(bad) in msg and "5aeb024d42b8a6091f30e5eb18c8a48d" in msg
    assert "put a correct copy" in msg and str(tmp_path / "frey-face") in msg


def test_truncated_gz_is_never_taken_for_complete(tmp_path):
    src = Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized-mnist"
    if not src.is_dir():
        pytest.skip(f"{src} not found")
    root = tmp_path / "binarized-mnist"
    root.mkdir()
    for split in ("train", "valid", "test"):
        name = f"binarized_mnist_{split}.amat.gz"
        shutil.copyfile(src / name, root / name)
    data = (root / "binarized_mnist_test.amat.gz").read_bytes()
    (root / "binarized_mnist_test.amat.gz").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(
        ChecksumError, match=r"binarized_mnist_test\.amat\.gz.*truncated or corrupt"
    ):
        load_dataset("binarized-mnist", tmp_path, download=False)


def test_idx_size_mismatch_is_reported(tmp_path):
    root = tmp_path / "mnist"
    write_mnist(root)
    with pytest.raises(ChecksumError, match=r"train-images-idx3-ubyte\.gz.*expected 9912422"):
        load_dataset("mnist", tmp_path, download=False)


def test_missing_files_offline_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("mnist", tmp_path)
    msg = str(err.value)
    assert "VAELAB_OFFLINE" in msg and "f68b3c2dcbeaaa9fbdd348bbdeb94873" in msg
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in msg
    monkeypatch.delenv("VAELAB_OFFLINE")
    with pytest.raises(FileNotFoundError, match="download=False"):
        load_dataset("cifar10", tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match="Google Drive"):
        load_dataset("celeba", tmp_path)  # no automatic source


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="mnist.*cifar10|cifar10.*mnist"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="folder:PATH"):
        load_dataset("folder")


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_is_documented_and_listed(name, tmp_path):
    assert DATASETS.describe(name)
    full = f"folder:{tmp_path}" if name == "folder" else name
    rows = dataset_status(full, tmp_path)
    assert rows and all({"file", "size", "present", "verified"} <= set(r) for r in rows)
    if name not in ("digits", "folder"):
        assert not any(r["present"] for r in rows)
        assert all(str(tmp_path) in r["path"] for r in rows)
