"""Where dataset files live, how they are checked, and how they are downloaded.

Data directory: the ``data_dir`` argument (the CLI's ``--data-dir``), else ``$VAELAB_DATA_DIR``,
else a per-user cache directory (``~/.cache/vaelab/data`` on Linux). A file is looked up as
``<data_dir>/<name>`` and ``<data_dir>/<dataset-subfolder>/<name>`` (e.g. ``mnist/``), also in
a compressed form where its spec allows one (``.gz``/``.xz``, verified after decompression).

Every file is verified against its published checksum before it is parsed. Downloads go to a
``.part`` name, are verified, and only then renamed (``os.replace``), so a partial or wrong
file never takes the real name. ``VAELAB_OFFLINE=1`` (or ``download=False``) turns a missing file
into an error that says where to put it instead of trying the network.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import lzma
import os
import sys
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
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


# ----------------------------------------------------------------------------- file specs


@dataclass(frozen=True)
class FileSpec:
    """One canonical file: its name, published checksums, size and sources.

    Attributes:
        name: canonical file name (``train-images-idx3-ubyte.gz``) or folder name (``is_dir``).
        md5, sha256, git_sha1: published checksums of the canonical bytes (each given one must
            match; ``git_sha1`` is Git's blob hash, for files only a repository tree vouches for).
        size: canonical size in bytes (a wrong size fails before any hashing).
        urls: the canonical source first, then mirrors; empty when the file must be fetched
            by hand (the dataset's ``manual`` note says how).
        folder: a folder the file sits in inside the data dir (``cifar-10-batches-py``).
        compressed: also accept ``name + "." + ext`` for these of ``"gz"``, ``"xz"``; such a
            copy is verified by hashing its decompressed bytes.
        known_sha256: SHA-256s of known compressed copies (checked first, no decompression).
        is_dir: a folder of files without published checksums (CelebA's ``img_align_celeba``).
        strict: a mismatch is an error; ``False`` makes it a warning (CelebA, where subsets
            of the canonical text files are common).
    """

    name: str
    md5: str | None = None
    sha256: str | None = None
    git_sha1: str | None = None
    size: int | None = None
    urls: tuple[str, ...] = ()
    folder: str = ""
    compressed: tuple[str, ...] = ()
    known_sha256: tuple[str, ...] = ()
    is_dir: bool = False
    strict: bool = True

    def expected(self) -> str:
        """The published checksums as text, e.g. ``md5 f68b3c2d…, sha256 440fcabf…``."""
        parts = [
            f"{k} {v}"
            for k, v in (("md5", self.md5), ("sha256", self.sha256), ("git-sha1", self.git_sha1))
            if v
        ]
        if self.size is not None:
            parts.append(f"{self.size} bytes")
        return ", ".join(parts) or "no published checksum"


@dataclass(frozen=True)
class DatasetFiles:
    """The files of one dataset: groups of specs, any complete group will do.

    ``groups`` are alternatives in order of preference (CIFAR-10: the extracted batches, else the
    tarball); the last group with URLs is what :func:`fetch_dataset` downloads. ``subdir`` is
    the per-dataset folder (``mnist``); ``manual`` says how to get files by hand.
    """

    dataset: str
    subdir: str
    groups: tuple[tuple[FileSpec, ...], ...]
    homepage: str = ""
    manual: str = ""


# dataset name (and its aliases) -> files; filled in by each dataset module.
FILES: dict[str, DatasetFiles] = {}


def register_files(files: DatasetFiles, *aliases: str) -> DatasetFiles:
    """Make ``files`` known to :func:`dataset_status`/:func:`fetch_dataset` under its names."""
    for name in (files.dataset, *aliases):
        FILES[name] = files
    return files


def _files_for(name: str) -> DatasetFiles:
    key = name.split(":", 1)[0]
    if key not in FILES:
        raise ValueError(
            f"no files are known for dataset {name!r}; known: {', '.join(sorted(FILES))}"
        )
    return FILES[key]


def canonical_path(files: DatasetFiles, spec: FileSpec, data_dir: Path) -> Path:
    """Where a download (or a hand-placed copy) of ``spec`` goes: ``<data_dir>/<subdir>/…``."""
    return data_dir / files.subdir / spec.folder / spec.name


def locate(files: DatasetFiles, spec: FileSpec, data_dir: Path) -> Path | None:
    """The first existing copy of ``spec`` in ``data_dir`` (plain name first, then compressed)."""
    for base in (data_dir / spec.folder, data_dir / files.subdir / spec.folder):
        for suffix in ("", *(f".{ext}" for ext in spec.compressed)):
            path = base / (spec.name + suffix)
            if path.is_dir() if spec.is_dir else path.is_file():
                return path
    return None


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


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one file: ``ok`` True/False, or None when nothing to check."""

    ok: bool | None
    detail: str


_VERIFIED: dict[tuple[str, int, int, FileSpec], Verdict] = {}


def check_file(path: Path, spec: FileSpec) -> Verdict:
    """Check ``path`` (a copy of ``spec``, plain or compressed) against the published checksums.

    Results are remembered for the process, keyed by path, size and modification time.
    """
    if spec.is_dir:
        n = sum(1 for _ in path.iterdir())
        return Verdict(None, f"folder with {n} entries; no per-file checksums are published")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, spec)
    if key not in _VERIFIED:
        _VERIFIED[key] = _check(path, spec, st.st_size)
    return _VERIFIED[key]


def _check(path: Path, spec: FileSpec, size: int) -> Verdict:
    wanted = {a: v for a, v in (("md5", spec.md5), ("sha256", spec.sha256)) if v}
    compressed = path.name != spec.name
    if not compressed:
        if spec.git_sha1:
            wanted["git-sha1"] = spec.git_sha1
        if spec.size is not None and size != spec.size:
            return Verdict(False, f"size {size} bytes, expected {spec.size} (truncated or wrong)")
        if not wanted:
            return Verdict(None, "no published checksum")
        got = file_digests(path, wanted)
    else:
        if spec.known_sha256:
            if file_digests(path, ["sha256"])["sha256"] in spec.known_sha256:
                return Verdict(True, "matches a known compressed copy")
        if not wanted:
            return Verdict(None, "no published checksum")
        try:
            got = file_digests(path, wanted, decompress=True)
        except ChecksumError as err:
            return Verdict(False, str(err))
    bad = [f"{a} {got[a]} (expected {v})" for a, v in wanted.items() if got[a] != v]
    if bad:
        return Verdict(False, "; ".join(bad))
    what = "decompressed bytes match" if compressed else "matches"
    return Verdict(True, f"{what} " + ", ".join(f"{a} {v}" for a, v in wanted.items()))


def _put_by_hand(files: DatasetFiles, spec: FileSpec, data_dir: Path) -> str:
    where = canonical_path(files, spec, data_dir)
    src = f" from {spec.urls[0]}" if spec.urls else ""
    if not spec.urls and files.manual:
        src = f" ({files.manual})"
    return (
        f"put a correct copy{src} at {where} (the data dir is set by --data-dir or ${ENV_DATA_DIR})"
    )


def verify_or_raise(files: DatasetFiles, spec: FileSpec, path: Path, data_dir: Path) -> None:
    """Raise ``ChecksumError`` naming the file, the expected checksum and where to put a good copy.

    Non-strict specs warn instead.
    """
    verdict = check_file(path, spec)
    if verdict.ok is not False:
        return
    if spec.strict:
        raise ChecksumError(
            f"{path} failed verification: {verdict.detail}. Expected {spec.name}: "
            f"{spec.expected()}. Delete it and {_put_by_hand(files, spec, data_dir)}."
        )
    warnings.warn(
        f"{path} is not the canonical {spec.name} ({verdict.detail}); loading it anyway, but "
        f"results are not comparable with the full dataset. For the canonical file, "
        f"{_put_by_hand(files, spec, data_dir)}.",
        stacklevel=4,
    )


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


def _spec_checksum(spec: FileSpec) -> str | None:
    if spec.sha256:
        return f"sha256:{spec.sha256}"
    if spec.md5:
        return f"md5:{spec.md5}"
    if spec.git_sha1:
        return f"git-sha1:{spec.git_sha1}"
    return None


# ----------------------------------------------------------------------------- datasets


def require_files(
    files: DatasetFiles, data_dir: Path, *, download: bool = True, progress: bool = True
) -> dict[str, Path]:
    """Find (or download) and verify a complete group of ``files``; map spec name -> path.

    Raises ``ChecksumError`` for a present file that fails verification, and
    ``FileNotFoundError`` (download off or ``$VAELAB_OFFLINE``) or ``DownloadError`` for files
    that cannot be had, naming each with its checksum and where to put it by hand.
    """
    for group in files.groups:
        found = {spec.name: locate(files, spec, data_dir) for spec in group}
        if all(found.values()):
            for spec in group:
                verify_or_raise(files, spec, found[spec.name], data_dir)
            return found  # type: ignore[return-value]
    group = _download_group(files)
    if group is None or not download or offline():
        if group is None:
            why, wanted = "no download source is known", list(files.groups[0])
        else:
            why = "downloads are off (download=False)" if not download else f"${ENV_OFFLINE} is set"
            wanted = [s for s in group if locate(files, s, data_dir) is None]
        lines = [f"  {s.name}: {s.expected()}; {_put_by_hand(files, s, data_dir)}" for s in wanted]
        raise FileNotFoundError(
            f"{files.dataset}: files missing from {data_dir} and {why}:\n"
            + "\n".join(lines)
            + (f"\nSee {files.homepage}" if files.homepage else "")
        )
    for spec in (s for s in group if locate(files, s, data_dir) is None):
        download_file(
            spec.urls,
            canonical_path(files, spec, data_dir),
            _spec_checksum(spec),
            size=spec.size,
            progress=progress,
        )
    return require_files(files, data_dir, download=False)


def _download_group(files: DatasetFiles) -> tuple[FileSpec, ...] | None:
    for group in reversed(files.groups):
        if all(spec.urls for spec in group):
            return group
    return None


def _folder_row(name: str) -> list[dict]:
    path = Path(name.split(":", 1)[1]).expanduser() if ":" in name else None
    if path is None:
        raise ValueError("name the folder: 'folder:PATH'")
    n = sum(1 for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
    return [
        {
            "dataset": name,
            "file": str(path),
            "path": str(path),
            "size": None,
            "present": path.is_dir(),
            "verified": None,
            "expected": "",
            "detail": f"folder with {n} files" if path.is_dir() else "missing",
        }
    ]


def _rows(name: str, data_dir: Path, check: bool) -> list[dict]:
    if name.split(":", 1)[0] == "folder":
        return _folder_row(name)
    files = _files_for(name)
    if not files.groups:
        return [
            {
                "dataset": files.dataset,
                "file": files.manual or "(built in)",
                "path": "",
                "size": None,
                "present": True,
                "verified": None,
                "expected": "",
                "detail": files.manual,
            }
        ]
    group = next(
        (g for g in files.groups if all(locate(files, s, data_dir) for s in g)),
        _download_group(files) or files.groups[0],
    )
    rows = []
    for spec in group:
        path = locate(files, spec, data_dir)
        row = {
            "dataset": files.dataset,
            "file": spec.name,
            "path": str(path or canonical_path(files, spec, data_dir)),
            "size": (None if spec.is_dir else path.stat().st_size) if path else spec.size,
            "present": path is not None,
            "verified": None,
            "expected": spec.expected(),
            "detail": "" if path else "missing",
        }
        if path is not None and check:
            verdict = check_file(path, spec)
            row["verified"], row["detail"] = verdict.ok, verdict.detail
        rows.append(row)
    return rows


def dataset_status(name: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """One row per file of dataset ``name`` (for ``vaelab data list``), without hashing.

    Row keys: dataset, file, path (where found or where it would go), size (bytes on disk, or
    the expected size when missing), present, verified (None here; see :func:`verify_dataset`),
    expected (checksums), detail. A built-in dataset (digits) gives one row, always present.
    """
    return _rows(name, resolve_data_dir(data_dir), check=False)


def verify_dataset(name: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Like :func:`dataset_status`, with ``verified`` True/False (None: nothing to check)."""
    return _rows(name, resolve_data_dir(data_dir), check=True)


def fetch_dataset(
    name: str, data_dir: str | os.PathLike | None = None, *, progress: bool = True
) -> list[Path]:
    """Download what dataset ``name`` is missing into the data dir, verify all; return the paths."""
    files = _files_for(name)
    if not files.groups:
        return []
    found = require_files(files, resolve_data_dir(data_dir), download=True, progress=progress)
    return list(found.values())
