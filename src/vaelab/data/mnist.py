"""MNIST, Fashion-MNIST and the three binarizations of MNIST used in the VAE literature.

* ``mnist``, ``fashion-mnist``: the four canonical IDX ``.gz`` files; grey levels 0..255 (8bit).
  Validation = 10,000 images carved from the 60,000 training images by a fixed-seed permutation
  (``SPLIT_SEED``), leaving 50,000 for training (the sizes of Larochelle & Murray's split).
* ``binarized-mnist`` (info name ``binarized-mnist-static``): Larochelle & Murray's fixed
  binarization, ``binarized_mnist_{train,valid,test}.amat`` (plain or ``.gz``), 50k/10k/10k,
  with its own validation split. No labels.
* ``mnist-dynamic``: MNIST grey levels, re-binarized by a fresh Bernoulli draw every time a batch
  is drawn (Burda et al. 2016's protocol); ``load_dataset("mnist", binarize="dynamic")`` is the same.
* ``mnist-threshold``: MNIST thresholded at 0.5 (``x / 255 > 0.5``).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from vaelab.data.base import (
    DATASETS,
    DataInfo,
    DataSplits,
    ImageSet,
    LoadRequest,
    binarized_info,
    resplit_defined,
    split_with_default,
)
from vaelab.data.files import DatasetFiles, FileSpec, register_files, require_files

MNIST_VALID = 10_000

_MNIST_URLS = (
    "http://yann.lecun.com/exdb/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_FASHION_URLS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
_LAROCHELLE = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"


def _idx(name: str, md5: str, sha256: str, size: int, bases: tuple[str, ...]) -> FileSpec:
    return FileSpec(name, md5=md5, sha256=sha256, size=size, urls=tuple(b + name for b in bases))


MNIST_FILES = register_files(
    DatasetFiles(
        "mnist",
        "mnist",
        (
            (
                _idx(
                    "train-images-idx3-ubyte.gz",
                    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                    "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                    9912422,
                    _MNIST_URLS,
                ),
                _idx(
                    "train-labels-idx1-ubyte.gz",
                    "d53e105ee54ea40749a09fcbcd1e9432",
                    "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                    28881,
                    _MNIST_URLS,
                ),
                _idx(
                    "t10k-images-idx3-ubyte.gz",
                    "9fb629c4189551a2d022fa330f9573f3",
                    "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                    1648877,
                    _MNIST_URLS,
                ),
                _idx(
                    "t10k-labels-idx1-ubyte.gz",
                    "ec29112dd5afa0611ce80d1b7f02629c",
                    "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                    4542,
                    _MNIST_URLS,
                ),
            ),
        ),
        homepage="http://yann.lecun.com/exdb/mnist/",
    ),
    "mnist-dynamic",
    "mnist-threshold",
)

FASHION_FILES = register_files(
    DatasetFiles(
        "fashion-mnist",
        "fashion-mnist",
        (
            (
                _idx(
                    "train-images-idx3-ubyte.gz",
                    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                    "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                    26421880,
                    _FASHION_URLS,
                ),
                _idx(
                    "train-labels-idx1-ubyte.gz",
                    "25c81989df183df01b3e8a0aad5dffbe",
                    "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                    29515,
                    _FASHION_URLS,
                ),
                _idx(
                    "t10k-images-idx3-ubyte.gz",
                    "bef4ecab320f06d8554ea6380940ec79",
                    "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                    4422102,
                    _FASHION_URLS,
                ),
                _idx(
                    "t10k-labels-idx1-ubyte.gz",
                    "bb300cfdad3c16e7a12a480ee83cd310",
                    "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                    5148,
                    _FASHION_URLS,
                ),
            ),
        ),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )
)


def _amat(split: str, sha256: str, size: int, gz_sha256: str) -> FileSpec:
    # The canonical files are plain text; a .gz copy is verified by its decompressed SHA-256
    # (or, quickly, by the SHA-256 of the known `gzip -9 -n` copy).
    name = f"binarized_mnist_{split}.amat"
    return FileSpec(
        name,
        sha256=sha256,
        size=size,
        urls=(_LAROCHELLE + name,),
        compressed=("gz",),
        known_sha256=(gz_sha256,),
    )


BINARIZED_FILES = register_files(
    DatasetFiles(
        "binarized-mnist",
        "binarized-mnist",
        (
            (
                _amat(
                    "train",
                    "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
                    78_400_000,
                    "af247bd6075cf9adc4715459dcd5f13eaa99a2c92d8d81379a05da94770b6c0e",
                ),
                _amat(
                    "valid",
                    "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
                    15_680_000,
                    "533b71bc0198f4d73c54ae5fe6c96fc08dc3cf1b3fae24c5521dbc0452507e38",
                ),
                _amat(
                    "test",
                    "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
                    15_680_000,
                    "32a3c54d03504632bf9f131b4a148c7567aa6fc87da017049b044bdc14c2a0f2",
                ),
            ),
        ),
        homepage=_LAROCHELLE,
    )
)

MNIST_INFO = DataInfo(
    "mnist",
    (1, 28, 28),
    "8bit",
    10,
    tuple(str(i) for i in range(10)),
    description="MNIST handwritten digits, grey levels (LeCun, Cortes & Burges 1998)",
)
FASHION_INFO = DataInfo(
    "fashion-mnist",
    (1, 28, 28),
    "8bit",
    10,
    (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    description="Fashion-MNIST, Zalando article images (Xiao, Rasul & Vollgraf 2017)",
)
BINARIZED_INFO = DataInfo(
    "binarized-mnist-static",
    (1, 28, 28),
    "binary",
    binarization="static",
    description="MNIST, fixed stochastic binarization of Larochelle & Murray (AISTATS 2011)",
)


def _decompress(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ValueError(f"{path} is truncated or not a valid gzip file ({err})") from err


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (``.gz`` or plain) of unsigned bytes into a uint8 array.

    Returns shape (N, H, W) for image files (magic 2051) or (N,) for label files (2049).
    Raises ``ValueError`` naming the file when the header or length is wrong.
    """
    path = Path(path)
    raw = _decompress(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(dims)):
        raise ValueError(
            f"{path}: IDX header says {dims} = {int(np.prod(dims))} bytes of data, file holds "
            f"{len(raw) - header} (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_amat(path: str | Path) -> np.ndarray:
    """Parse a binarized-MNIST ``.amat`` (plain or ``.gz``) into uint8 0/1 of shape (N, 784).

    Each line is 784 digits 0/1 separated by single spaces and ended by ``\\n`` (1568 bytes), so
    the digits are every other byte: no text parsing.
    """
    path = Path(path)
    raw = np.frombuffer(_decompress(path), dtype=np.uint8)
    if raw.size == 0 or raw.size % 1568:
        raise ValueError(f"{path}: {raw.size} bytes is not a whole number of 1568-byte .amat lines")
    lines = raw.reshape(-1, 1568)
    seps = lines[:, 1::2]
    values = lines[:, 0::2] - ord("0")
    if (seps[:, :-1] != ord(" ")).any() or (seps[:, -1] != ord("\n")).any() or (values > 1).any():
        raise ValueError(f"{path}: not 784 space-separated 0/1 values per line")
    return values


def _images(array: np.ndarray) -> torch.Tensor:
    # (N, H, W) uint8 -> (N, 1, H, W); copy out of the read-only buffer.
    return torch.from_numpy(array.copy()).unsqueeze(1)


def load_idx_splits(files: DatasetFiles, info: DataInfo, req: LoadRequest) -> DataSplits:
    """Train/valid/test of an MNIST-like dataset: 60k train -> 50k train + 10k valid, 10k test."""
    paths = require_files(files, req.data_dir, download=req.download)
    sets = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(paths[f"{prefix}-images-idx3-ubyte.gz"])
        y = read_idx(paths[f"{prefix}-labels-idx1-ubyte.gz"])
        if x.shape[0] != y.shape[0] or x.shape[1:] != info.shape[1:]:
            raise ValueError(f"{files.dataset} {split}: images {x.shape} vs labels {y.shape}")
        sets[split] = ImageSet(_images(x), torch.from_numpy(y.astype(np.int64)), info)
    train, valid = split_with_default(sets["train"], req.valid_size, MNIST_VALID)
    return DataSplits(info, train, valid, sets["test"])


@DATASETS.register("mnist")
def load_mnist(req: LoadRequest) -> DataSplits:
    """MNIST digits, 28x28 grey levels (8bit); 50k/10k/10k (LeCun et al. 1998)."""
    return load_idx_splits(MNIST_FILES, MNIST_INFO, req)


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(req: LoadRequest) -> DataSplits:
    """Fashion-MNIST, 28x28 grey levels (8bit); 50k/10k/10k (Xiao et al. 2017)."""
    return load_idx_splits(FASHION_FILES, FASHION_INFO, req)


@DATASETS.register("mnist-dynamic")
def load_mnist_dynamic(req: LoadRequest) -> DataSplits:
    """MNIST, dynamically binarized: fresh Bernoulli draws per batch (Burda et al. 2016)."""
    splits = load_mnist(req)
    return splits.map(lambda s: s.with_info(binarized_info(MNIST_INFO, "dynamic")))


@DATASETS.register("mnist-threshold")
def load_mnist_threshold(req: LoadRequest) -> DataSplits:
    """MNIST thresholded at 0.5; 50k/10k/10k."""
    splits = load_mnist(req)
    return splits.map(lambda s: s.with_info(binarized_info(MNIST_INFO, "threshold")))


@DATASETS.register("binarized-mnist")
def load_binarized_mnist(req: LoadRequest) -> DataSplits:
    """Static binarized MNIST of Larochelle & Murray (2011): fixed 0/1 images, 50k/10k/10k."""
    paths = require_files(BINARIZED_FILES, req.data_dir, download=req.download)
    sets = {}
    for split in ("train", "valid", "test"):
        values = read_amat(paths[f"binarized_mnist_{split}.amat"])
        sets[split] = ImageSet(
            torch.from_numpy(values.reshape(-1, 1, 28, 28)), None, BINARIZED_INFO
        )
    train, valid = resplit_defined(sets["train"], sets["valid"], req.valid_size)
    return DataSplits(BINARIZED_INFO, train, valid, sets["test"])
