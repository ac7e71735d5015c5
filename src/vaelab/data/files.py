"""The files of each dataset: published checksums, where copies are looked for, verification.

Each dataset module registers a :class:`DatasetFiles` (groups of :class:`FileSpec`) with
:func:`register_files`; :func:`require_files` is what a loader calls to get verified paths,
downloading what is missing (:func:`vaelab.data.download.download_file`).
:func:`dataset_status`, :func:`verify_dataset` and :func:`fetch_dataset` back ``vaelab data
list|verify|fetch``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from vaelab.data.download import (
    ENV_DATA_DIR,
    ENV_OFFLINE,
    ChecksumError,
    download_file,
    file_digests,
    offline,
    resolve_data_dir,
)

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


# ----------------------------------------------------------------------------- verification


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


def list_datasets(data_dir: str | os.PathLike | None = None, *, verify: bool = False) -> list[dict]:
    """One row per dataset with files (aliases folded), for ``vaelab data list``.

    Row keys: dataset, names (registered names sharing these files), files, size (bytes on
    disk of the files present), present (all files there), verified (True when all verify,
    False when one fails, None when not checked or nothing to check).
    """
    rows, seen = [], set()
    for _, files in sorted(FILES.items()):
        if files.dataset in seen:
            continue
        seen.add(files.dataset)
        per_file = (verify_dataset if verify else dataset_status)(files.dataset, data_dir)
        oks = [r["verified"] for r in per_file]
        rows.append(
            {
                "dataset": files.dataset,
                "names": sorted(k for k, v in FILES.items() if v is files),
                "files": len(per_file),
                "size": sum(r["size"] or 0 for r in per_file if r["present"]),
                "present": all(r["present"] for r in per_file),
                "verified": False if False in oks else (True if oks and all(oks) else None),
            }
        )
    return rows
