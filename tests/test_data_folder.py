"""folder:PATH on mixed sizes and modes, broken files, class subfolders, and streaming."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaelab.data import (
    BatchIterator,
    ImageSet,
    StreamingImageSet,
    load_dataset,
    load_folder,
    mean_image,
)

RNG = np.random.default_rng(0)


def save(path: Path, img: Image.Image, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt)


def mixed_folder(root: Path) -> Path:
    """Two classes, 12 images in modes L, RGB, RGBA, P, LA, I;16 and sizes from 10 to 40 px."""
    for i in range(2):
        grey = RNG.integers(0, 256, (10 + i, 12), dtype=np.uint8)
        save(root / "cats" / f"grey{i}.png", Image.fromarray(grey))
        rgb = RNG.integers(0, 256, (20, 30 + i, 3), dtype=np.uint8)
        save(root / "cats" / f"rgb{i}.jpg", Image.fromarray(rgb), "JPEG")
        rgba = np.zeros((16, 16, 4), np.uint8)  # black but fully transparent -> white
        save(root / "cats" / "deep" / f"clear{i}.png", Image.fromarray(rgba))
        pal = Image.fromarray(RNG.integers(0, 256, (24, 24, 3), dtype=np.uint8))
        save(root / "dogs" / f"pal{i}.png", pal.convert("P", palette=Image.Palette.ADAPTIVE))
        la = np.stack([np.full((40, 20), 100, np.uint8), np.full((40, 20), 255, np.uint8)], -1)
        save(root / "dogs" / f"la{i}.png", Image.fromarray(la))
        wide = np.full((18, 18), 65535 if i else 32896, np.uint16)
        save(root / "dogs" / f"deep{i}.png", Image.fromarray(wide))
    (root / "dogs" / ".DS_Store").write_bytes(b"\0junk")  # hidden: ignored
    return root


def test_mixed_sizes_and_modes(tmp_path):
    root = mixed_folder(tmp_path / "pets")
    s = load_dataset(f"folder:{root}", image_size=(8, 8), channels=3)
    assert s.info.name == f"folder:{root}" and s.info.label_names == ("cats", "dogs")
    assert s.info.shape == (3, 8, 8) and s.info.num_classes == 2
    assert (len(s.train), len(s.valid), len(s.test)) == (10, 1, 1)
    every = load_folder(root, image_size=(8, 8), channels=3, valid_size=0)
    x = torch.cat([every.train.images, every.test.images])
    y = torch.cat([every.train.labels, every.test.labels])
    assert x.shape == (12, 3, 8, 8) and x.dtype == torch.uint8
    assert torch.bincount(y).tolist() == [6, 6]
    # fully transparent pixels are composited on white; 16-bit grey is scaled, not clipped
    flat = {int(img.float().mean().round()) for img in x}
    assert 255 in flat and 128 in flat
    grey = load_folder(root, image_size=(8, 8), channels=1)
    assert grey.info.shape == (1, 8, 8)


def test_sizes_must_agree_without_image_size(tmp_path):
    root = mixed_folder(tmp_path / "pets")
    with pytest.raises(ValueError, match="different sizes.*image_size"):
        load_folder(root)


def test_flat_grey_folder_keeps_its_size_and_channel(tmp_path):
    for i in range(10):
        save(tmp_path / f"{i}.png", Image.fromarray(np.full((6, 5), i * 20, np.uint8)))
    s = load_folder(tmp_path, valid_size=2)
    assert s.info.shape == (1, 6, 5) and s.train.labels is None and s.info.label_names is None
    assert (len(s.train), len(s.valid), len(s.test)) == (7, 2, 1)


def broken_folder(root: Path) -> Path:
    for i in range(8):
        save(root / f"ok{i}.png", Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)))
    good = (root / "ok0.png").read_bytes()
    (root / "cut.png").write_bytes(good[: len(good) // 2])  # header fine, data truncated
    (root / "notes.txt").write_text("not an image")
    return root


def test_broken_files_are_named(tmp_path):
    root = broken_folder(tmp_path)
    with pytest.raises(ValueError, match=r"(cut\.png|notes\.txt).*skip_broken"):
        load_dataset(f"folder:{root}")


def test_broken_files_can_be_skipped_with_a_count(tmp_path):
    root = broken_folder(tmp_path)
    with pytest.warns(UserWarning, match="skipped 2 unreadable files"):
        s = load_dataset(f"folder:{root}", skip_broken=True)
    assert sorted(Path(p).name for p in s.skipped) == ["cut.png", "notes.txt"]
    assert len(s.train) + len(s.valid) + len(s.test) == 8


def test_streaming_matches_in_memory(tmp_path):
    root = mixed_folder(tmp_path / "pets")
    mem = load_folder(root, image_size=(8, 8), channels=3, stream=False)
    streamed = load_folder(root, image_size=(8, 8), channels=3, max_memory=100, num_workers=2)
    assert isinstance(mem.train, ImageSet) and isinstance(streamed.train, StreamingImageSet)
    a = BatchIterator(mem.train, 4, seed=5, with_labels=True)
    b = BatchIterator(streamed.train, 4, seed=5, with_labels=True)
    assert len(a) == len(b) == 3
    for (xa, ya), (xb, yb) in zip(
        a.epoch(2, start_batch=1), b.epoch(2, start_batch=1), strict=True
    ):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # the mean image (init_output_bias) reads streamed files one by one: the same figure
    assert torch.allclose(mean_image(streamed.train), mean_image(mem.train), atol=1e-12)
