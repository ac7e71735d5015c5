"""CIFAR-10 from the canonical python pickle batches (Krizhevsky 2009).

Accepted forms, in order: the extracted folder ``cifar-10-batches-py/`` (``data_batch_1..5``,
``test_batch``, ``batches.meta``; each batch may also be ``.xz``-compressed, verified after
decompression), else the official ``cifar-10-python.tar.gz`` (read in place, not extracted).
Looked up in ``<data_dir>/`` and ``<data_dir>/cifar-10/``. Split: 45,000 / 5,000 / 10,000, the
validation images carved from the 50,000 training images by a fixed-seed permutation.
"""

from __future__ import annotations

import io
import lzma
import pickle
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from vaelab.data.base import DATASETS, DataInfo, DataSplits, ImageSet, LoadRequest
from vaelab.data.base import split_with_default as _split
from vaelab.data.files import DatasetFiles, FileSpec, register_files, require_files

CIFAR_VALID = 5000
FOLDER = "cifar-10-batches-py"
TARBALL = "cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


def _batch(name: str, size: int, md5: str, sha256: str, xz_sha256: str) -> FileSpec:
    # ``xz_sha256``: the SHA-256 of a known ``.xz`` copy (vaelab's test data), a fast path.
    return FileSpec(
        name,
        md5=md5,
        sha256=sha256,
        size=size,
        folder=FOLDER,
        compressed=("xz",),
        known_sha256=(xz_sha256,),
    )


CIFAR_FILES = register_files(
    DatasetFiles(
        "cifar10",
        "cifar-10",
        (
            (
                _batch(
                    "data_batch_1",
                    31035704,
                    "c99cafc152244af753f735de768cd75f",
                    "54636561a3ce25bd3e19253c6b0d8538147b0ae398331ac4a2d86c6d987368cd",
                    "880a31d350bdb45370c76e115c0ceee822c56ebf37ae1af8496f2f45aa8f20a9",
                ),
                _batch(
                    "data_batch_2",
                    31035320,
                    "d4bba439e000b95fd0a9bffe97cbabec",
                    "766b2cef9fbc745cf056b3152224f7cf77163b330ea9a15f9392beb8b89bc5a8",
                    "fb99e794058c25fdbb6c8d27c2153aa151d98f601601835f089421b4803d0ced",
                ),
                _batch(
                    "data_batch_3",
                    31035999,
                    "54ebc095f3ab1f0389bbae665268c751",
                    "0f00d98ebfb30b3ec0ad19f9756dc2630b89003e10525f5e148445e82aa6a1f9",
                    "15f1265fae7ca046543a9003c2827e10670715a510ef94e80c03e39e45e38752",
                ),
                _batch(
                    "data_batch_4",
                    31035696,
                    "634d18415352ddfa80567beed471001a",
                    "3f7bb240661948b8f4d53e36ec720d8306f5668bd0071dcb4e6c947f78e9682b",
                    "eeb8395b53179f51e22c61f733f5fd46c257bfb843717da76e7c1299eb052f11",
                ),
                _batch(
                    "data_batch_5",
                    31035623,
                    "482c414d41f54cd18b22e5b47cb7c3cb",
                    "d91802434d8376bbaeeadf58a737e3a1b12ac839077e931237e0dcd43adcb154",
                    "abc7dd850696ce1ccd99ffb5f79a6429fb999dae728b079628eec19af24b80fb",
                ),
                _batch(
                    "test_batch",
                    31035526,
                    "40351d587109b95175f43aff81a1287e",
                    "f53d8d457504f7cff4ea9e021afcf0e0ad8e24a91f3fc42091b8adef61157831",
                    "84aeae3bc5d85110d875e63dbbfc70e6427a54b2294986e2150202f256a1f4c6",
                ),
                FileSpec(
                    "batches.meta",
                    md5="5ff9c542aee3614f3951f8cda6e48888",
                    sha256="f962466ef690d46b226450fb9aadc74ba4bc64a76aa526b5827fe4bc5c7125cb",
                    size=158,
                    folder=FOLDER,
                ),
            ),
            (
                FileSpec(
                    TARBALL,
                    md5="c58f30108f718f92721af3b95e74349a",
                    size=170498071,
                    urls=("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                ),
            ),
        ),
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
    )
)

CIFAR_LABELS = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR_INFO = DataInfo(
    "cifar10",
    (3, 32, 32),
    "8bit",
    10,
    CIFAR_LABELS,
    description="CIFAR-10, 32x32 colour images in 10 classes (Krizhevsky 2009)",
)

# What a CIFAR batch pickle may construct: numpy arrays and nothing else (no arbitrary code).
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes in a protocol-2 pickle (re-saved copies)
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def unpickle_batch(data: bytes, source: str) -> dict[str, object]:
    """Decode one CIFAR pickle (Python 2 protocol) to a dict with ``str`` keys.

    Only numpy arrays may be constructed; anything else raises ``ValueError`` naming ``source``.
    """
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"{source} is not a CIFAR pickle batch ({err})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{source} holds a {type(obj).__name__}, not a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _batch_arrays(d: dict[str, object], source: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(d.get("data"))
    labels = np.asarray(d.get("labels"), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{source}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{source}: {labels.shape} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), labels  # rows are channel-major R, G, B planes


def _read_path(path: Path) -> bytes:
    if path.suffix == ".xz":
        try:
            with lzma.open(path) as f:
                return f.read()
        except (lzma.LZMAError, EOFError) as err:
            raise ValueError(f"{path} is truncated or not valid xz ({err})") from err
    return path.read_bytes()


def read_cifar(source: str | Path | dict[str, Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read CIFAR-10 from a tarball path or a mapping batch name -> file (plain or ``.xz``).

    Returns {"train": (images uint8 (50000, 3, 32, 32), labels int64 (50000,)),
    "test": (..., (10000,))} in canonical order (batches 1..5, then test).
    """
    names = (*TRAIN_BATCHES, "test_batch")
    if isinstance(source, dict):
        with ThreadPoolExecutor(max_workers=min(6, len(names))) as pool:  # lzma frees the GIL
            raws = dict(
                zip(names, pool.map(lambda n: _read_path(Path(source[n])), names), strict=True)
            )
        where = {n: str(source[n]) for n in names}
    else:
        path = Path(source)
        try:
            with tarfile.open(path, "r:gz") as tar:
                raws = {}
                for n in names:
                    member = tar.extractfile(f"{FOLDER}/{n}")
                    if member is None:
                        raise ValueError(f"{path}: {FOLDER}/{n} is not a file")
                    raws[n] = member.read()
        except (tarfile.TarError, KeyError, EOFError, OSError) as err:
            raise ValueError(f"{path} is not a complete CIFAR-10 tarball ({err})") from err
        where = {n: f"{path}:{FOLDER}/{n}" for n in names}
    arrays = {n: _batch_arrays(unpickle_batch(raws[n], where[n]), where[n]) for n in names}
    train = [arrays[n] for n in TRAIN_BATCHES]
    return {
        "train": (np.concatenate([a for a, _ in train]), np.concatenate([b for _, b in train])),
        "test": arrays["test_batch"],
    }


@DATASETS.register("cifar10")
def load_cifar10(req: LoadRequest) -> DataSplits:
    """CIFAR-10, 32x32 RGB (8bit), 10 classes; 45k/5k/10k (Krizhevsky 2009)."""
    paths = require_files(CIFAR_FILES, req.data_dir, download=req.download)
    arrays = read_cifar(paths[TARBALL] if TARBALL in paths else paths)
    sets = {
        k: ImageSet(torch.from_numpy(x), torch.from_numpy(y), CIFAR_INFO)
        for k, (x, y) in arrays.items()
    }
    train, valid = _split(sets["train"], req.valid_size, CIFAR_VALID)
    return DataSplits(CIFAR_INFO, train, valid, sets["test"])
