"""Datasets of the VAE literature from their canonical files, and the user's own images.

``load_dataset(name)`` returns :class:`DataSplits` (train / valid / test :class:`ImageSet`s of
uint8 images plus a :class:`DataInfo`); :class:`BatchIterator` turns a split into float batches.
Registered names: ``DATASETS.names()`` (mnist, fashion-mnist, binarized-mnist, mnist-dynamic,
mnist-threshold, frey-face, cifar10, celeba, dsprites, digits, folder:PATH). ``digits`` is
embedded (no download). See docs/data.md.
"""

# Importing the dataset modules registers them in DATASETS and their files in FILES.
from vaelab.data import celeba, cifar, digits, dsprites, folder, frey, mnist  # noqa: F401
from vaelab.data.base import (
    BINARIZATIONS,
    DATASETS,
    SPLIT_SEED,
    VALUE_KINDS,
    DataInfo,
    DataSplits,
    ImageSet,
    LoadRequest,
    binarized_info,
    carve,
    choose_subset,
    concat,
    mean_image,
    to_float,
)
from vaelab.data.batches import BatchIterator, derive_seed
from vaelab.data.download import (
    ChecksumError,
    DownloadError,
    download_file,
    resolve_data_dir,
    user_cache_dir,
)
from vaelab.data.files import (
    FILES,
    DatasetFiles,
    FileSpec,
    dataset_status,
    fetch_dataset,
    list_datasets,
    verify_dataset,
)
from vaelab.data.folder import StreamingImageSet, load_folder
from vaelab.data.load import load_dataset

__all__ = [
    "BINARIZATIONS",
    "DATASETS",
    "FILES",
    "SPLIT_SEED",
    "VALUE_KINDS",
    "BatchIterator",
    "ChecksumError",
    "DataInfo",
    "DataSplits",
    "DatasetFiles",
    "DownloadError",
    "FileSpec",
    "ImageSet",
    "LoadRequest",
    "StreamingImageSet",
    "binarized_info",
    "carve",
    "choose_subset",
    "concat",
    "dataset_status",
    "derive_seed",
    "download_file",
    "fetch_dataset",
    "list_datasets",
    "load_dataset",
    "load_folder",
    "mean_image",
    "resolve_data_dir",
    "to_float",
    "user_cache_dir",
    "verify_dataset",
]
