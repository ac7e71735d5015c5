"""The data directory, checksums, and atomic downloads.

Data directory: the ``data_dir`` argument (the CLI's ``--data-dir``), else ``$VAELAB_DATA_DIR``,
else a per-user cache directory (``~/.cache/vaelab/data`` on Linux). Which files each dataset
needs and where copies are looked for is in :mod:`vaelab.data.files`.

Downloads go to a ``.part`` name, are verified, and only then renamed (``os.replace``), so a
partial or wrong file never takes the real name. ``VAELAB_OFFLINE=1`` turns a download into an
error that says where to put the file, without touching the network.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import lzma
import os
import sys
import urllib.request
import zlib
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

ENV_DATA_DIR = "VAELAB_DATA_DIR"
ENV_OFFLINE = "VAELAB_OFFLINE"
_CHUNK = 1 << 20
_USER_AGENT = "vaelab (python urllib)"


class ChecksumError(ValueError):
    """A file's checksum (or size, or compressed stream) does not match the published one."""


class DownloadError(OSError):
    """Every source of a file failed (network error, wrong checksum, truncated transfer)."""


def user_cache_dir() -> Path:
    """The per-user cache folder for datasets (not created here).

    Linux/BSD: ``$XDG_CACHE_HOME/vaelab/data`` or ``~/.cache/vaelab/data``; macOS:
    ``~/Library/Caches/vaelab/data``; Windows: ``%LOCALAPPDATA%\\vaelab\\data``.
    """
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vaelab" / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$VAELAB_DATA_DIR``, else the user cache."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser()
    return user_cache_dir()


def offline() -> bool:
    """True when ``$VAELAB_OFFLINE`` is set to something other than '', '0', 'false', 'no'."""
    return os.environ.get(ENV_OFFLINE, "").strip().lower() not in ("", "0", "false", "no")


# ----------------------------------------------------------------------------- checksums


def _open_decompressed(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".xz":
        return lzma.open(path, "rb")
    return open(path, "rb")


def file_digests(path: Path, algos: Iterable[str], *, decompress: bool = False) -> dict[str, str]:
    """Hex digests of a file's bytes (or its decompressed bytes) in one pass.

    ``algos`` may hold ``"md5"``, ``"sha256"``, ``"sha1"`` and ``"git-sha1"`` (Git's blob hash,
    sha1 of ``b"blob <size>\\0" + bytes``; plain files only). Raises ``ChecksumError`` when a
    compressed stream is truncated or corrupt.
    """
    algos = list(algos)
    hashers = {a: hashlib.new("sha1" if a == "git-sha1" else a) for a in algos}
    if "git-sha1" in hashers:
        if decompress:
            raise ValueError("git-sha1 is only computed on plain files")
        hashers["git-sha1"].update(b"blob %d\0" % path.stat().st_size)
    try:
        with _open_decompressed(path) if decompress else open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                for h in hashers.values():
                    h.update(chunk)
    except (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as err:
        raise ChecksumError(
            f"{path}: the compressed stream is truncated or corrupt ({err})"
        ) from err
    return {a: h.hexdigest() for a, h in hashers.items()}


# ----------------------------------------------------------------------------- downloads


def parse_checksum(checksum: str) -> tuple[str, str]:
    """``"md5:…"``, ``"sha256:…"``, ``"git-sha1:…"`` or bare hex (32 = md5, 64 = sha256)."""
    if ":" in checksum:
        algo, value = checksum.split(":", 1)
        if algo not in ("md5", "sha256", "git-sha1"):
            raise ValueError(f"unknown checksum kind {algo!r} in {checksum!r}")
        return algo, value.lower()
    kinds = {32: "md5", 64: "sha256"}
    if len(checksum) not in kinds:
        raise ValueError(
            f"cannot tell the kind of checksum {checksum!r}; prefix it with md5:/sha256:"
        )
    return kinds[len(checksum)], checksum.lower()


def _fetch(url: str, part: Path, progress: bool, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http/https only)
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        with (
            open(part, "wb") as out,
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name[:40],
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise DownloadError(f"connection closed after {received} of {total} bytes")


def download_file(
    url_or_urls: str | Iterable[str],
    dest: str | os.PathLike,
    checksum: str | None,
    *,
    size: int | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``dest`` from the first source that yields the right bytes; return ``dest``.

    The bytes go to ``<dest>.<pid>.part``; only a transfer of the announced length whose
    ``checksum`` (see :func:`parse_checksum`) and ``size`` match is renamed to ``dest``
    (``os.replace``, atomic). Each failed source's partial file is deleted. When all sources
    fail, ``DownloadError`` names the file, the expected checksum, each failure and where to
    put the file by hand. ``$VAELAB_OFFLINE`` set: ``DownloadError`` without touching the network.
    """
    urls = [url_or_urls] if isinstance(url_or_urls, str) else list(url_or_urls)
    dest = Path(dest)
    expect = f"{checksum}" if checksum else "no checksum"
    by_hand = f"download it by hand from {' or '.join(urls)} and put it at {dest}"
    if offline():
        raise DownloadError(
            f"{dest.name} is missing and ${ENV_OFFLINE} is set; {by_hand} (expected {expect})"
        )
    if not urls:
        raise DownloadError(f"{dest.name} has no download source; put it at {dest}")
    algo, value = parse_checksum(checksum) if checksum else (None, None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    failures = []
    for url in urls:
        try:
            _fetch(url, part, progress, timeout)
            got_size = part.stat().st_size
            if size is not None and got_size != size:
                raise ChecksumError(f"got {got_size} bytes, expected {size}")
            if algo is not None:
                got = file_digests(part, [algo])[algo]
                if got != value:
                    raise ChecksumError(f"{algo} {got}, expected {value}")
            os.replace(part, dest)
            return dest
        except (OSError, ValueError, http.client.HTTPException) as err:
            # URLError/HTTPError/timeouts are OSErrors; ChecksumError is a ValueError.
            failures.append(f"{url}: {type(err).__name__}: {err}")
        finally:
            part.unlink(missing_ok=True)
    raise DownloadError(
        f"could not download {dest.name} (expected {expect}):\n  "
        + "\n  ".join(failures)
        + f"\nNo file was written. To continue, {by_hand}."
    )
