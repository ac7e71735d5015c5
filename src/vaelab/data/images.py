"""Decoding image files with Pillow into uint8 (C, H, W) arrays: modes, alpha, crop, resize.

Shared by the CelebA and folder loaders. Every Pillow mode is mapped explicitly:
``1``/``L``/``I``/``I;16*`` are grey, ``LA``/``RGBA``/``P`` with transparency are composited on
white, ``P``/``CMYK``/``YCbCr``/``RGB`` are colour. Grey from colour uses Pillow's ITU-R 601-2
luma (``L = 0.299 R + 0.587 G + 0.114 B``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Errors Pillow raises for a file that is not an image or is truncated/corrupt.
DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
)

_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def natural_channels(img: Image.Image) -> int:
    """1 for a grey image (any grey mode, or a palette of greys), else 3."""
    if img.mode in _GREY_MODES:
        return 1
    if img.mode == "P":
        palette = img.getpalette() or []
        rgb = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
        return 1 if (rgb[:, 0] == rgb[:, 1]).all() and (rgb[:, 1] == rgb[:, 2]).all() else 3
    return 3


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow image to ``L`` (channels 1) or ``RGB`` (channels 3).

    Transparent pixels are composited on white; 16-bit grey is scaled to 8 bits (by 1/257, so
    65535 -> 255) rather than clipped; float images in [0, 1] are scaled by 255.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":  # float images: [0, 1] if they fit, else already 0..255
            arr = arr * 255.0 if arr.max(initial=0.0) <= 1.0 else arr
        else:  # 16-bit grey (Pillow opens 16-bit PNGs as I;16 or I)
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def center_box(
    width: int, height: int, out_h: int, out_w: int, crop_width: float | None = None
) -> tuple[int, int, int, int]:
    """The central box (left, top, right, bottom), in whole pixels, of aspect out_h : out_w.

    By default the largest such box; with ``crop_width`` a box that wide (and
    ``crop_width * out_h / out_w`` high), shrunk to fit if needed. Offsets are rounded as
    torchvision's ``CenterCrop`` rounds them.
    """
    if crop_width is None:
        crop_width = min(width, height * out_w / out_h)
    crop_height = crop_width * out_h / out_w
    shrink = min(1.0, width / crop_width, height / crop_height)
    cw = min(width, max(1, round(crop_width * shrink)))
    ch = min(height, max(1, round(crop_height * shrink)))
    left, top = int(round((width - cw) / 2)), int(round((height - ch) / 2))
    return left, top, left + cw, top + ch


def decode(
    source: str | Path | bytes,
    channels: int,
    size: tuple[int, int] | None,
    crop_width: float | None = None,
    name: str | None = None,
) -> np.ndarray:
    """Decode one image file (a path or its bytes) into uint8 (channels, H, W).

    With ``size = (H, W)`` the central box of that aspect ratio (see :func:`center_box`) is
    cropped and resized to it (Pillow bilinear, antialiased when shrinking), like torchvision's
    ``CenterCrop`` then ``Resize``; without, the image keeps its size. Raises ``ValueError`` naming the file if it cannot be decoded.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()
            img = to_mode(img, channels)
            if size is not None:
                out_h, out_w = size
                box = center_box(img.width, img.height, out_h, out_w, crop_width)
                if box != (0, 0, img.width, img.height):
                    img = img.crop(box)
                if img.size != (out_w, out_h):
                    img = img.resize((out_w, out_h), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except DECODE_ERRORS as err:
        raise ValueError(f"{label}: cannot decode image ({type(err).__name__}: {err})") from err
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def probe(path: str | Path) -> tuple[int, int, int]:
    """(natural channels, height, width) from the header only; ``ValueError`` if not an image."""
    try:
        with Image.open(path) as img:
            return natural_channels(img), img.height, img.width
    except DECODE_ERRORS as err:
        raise ValueError(f"{path}: not an image file ({type(err).__name__}: {err})") from err
