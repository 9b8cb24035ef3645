"""Download, verify and cache the course's data files, as listed in `data_manifest.yaml`.

Files are cached under `data_dir()`, each at its manifest `name` (`hnct/demo.h5`, ...).
Environment variables:

- `TEACHREG_DATA_DIR`: the cache directory (default: `pooch.os_cache("teachreg")`).
- `TEACHREG_DATA_MIRROR`: a mirror tried before the upstream URL, either a directory laid out
  as `sha256/<hex digest>` or a base URL (then `BASE/sha256/<hex digest>` is downloaded).

Every file is checked against its SHA-256 before it lands in the cache (writes are atomic: a
temporary file `.NAME.<16 hex digits>.part` next to it, then `os.replace`), and a cached file
is re-hashed the first time a process uses it, so a truncated or corrupted file is downloaded
again. Cached files get the permissions the umask allows, so a cache can be shared.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pooch
import yaml

from teachreg import files

__all__ = [
    "DATA_DIR_ENV", "MIRROR_ENV", "TIMEOUT_S", "DataError", "UnknownDatasetError",
    "DownloadError", "ChecksumError", "CacheError", "FileEntry", "Dataset", "manifest",
    "dataset", "data_dir", "fetch_file", "fetch", "is_cached", "verify", "remove_leftovers",
    "manifest_markdown",
]

DATA_DIR_ENV = "TEACHREG_DATA_DIR"
MIRROR_ENV = "TEACHREG_DATA_MIRROR"
TIMEOUT_S = 60
# Temporary files of interrupted downloads: ours, and those of teachreg versions that downloaded
# with pooch.retrieve (tempfile's names). A download in progress writes at least every TIMEOUT_S,
# so one untouched for _STALE_S was interrupted.
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{16}\.part|tmp[a-z0-9_]{8}")
_STALE_S = 10 * TIMEOUT_S


class DataError(Exception):
    """Base class of the errors raised by `teachreg.data`."""


class UnknownDatasetError(DataError, LookupError):
    """A dataset name that is not in the manifest."""


class DownloadError(DataError, ConnectionError):
    """A file could not be obtained from the mirror or from upstream."""


class ChecksumError(DataError, ValueError):
    """A file's SHA-256 differs from the manifest's."""


class CacheError(DataError, OSError):
    """The cache directory cannot be created or written."""


@dataclass(frozen=True)
class FileEntry:
    """One file: its cache path `name`, upstream `url`, `sha256` and `size` in bytes."""

    name: str
    url: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Dataset:
    """A named group of files with their description, licence and citation."""

    name: str
    description: str
    license: str
    citation: str
    files: tuple[FileEntry, ...]

    @property
    def size(self) -> int:
        """Total size in bytes."""
        return sum(f.size for f in self.files)


@functools.cache
def manifest() -> dict[str, Dataset]:
    """The datasets of `teachreg/data_manifest.yaml`, by name."""
    text = resources.files("teachreg").joinpath("data_manifest.yaml").read_text(encoding="utf-8")
    return {
        name: Dataset(
            name=name,
            description=d["description"],
            license=d["license"],
            citation=d["citation"],
            files=tuple(FileEntry(**f) for f in d["files"]),
        )
        for name, d in yaml.safe_load(text)["datasets"].items()
    }


def dataset(name: str) -> Dataset:
    """The manifest entry of dataset `name`; UnknownDatasetError lists the known ones."""
    datasets = manifest()
    if name not in datasets:
        raise UnknownDatasetError(
            f"unknown dataset {name!r}; known datasets: {', '.join(datasets)} "
            "(run `teachreg data list`)"
        )
    return datasets[name]


def data_dir() -> Path:
    """The cache directory: `$TEACHREG_DATA_DIR` or `pooch.os_cache("teachreg")`."""
    return Path(os.environ.get(DATA_DIR_ENV) or pooch.os_cache("teachreg"))


# Cached files verified by this process: path -> (size, mtime_ns) when they were hashed.
_verified: dict[Path, tuple[int, int]] = {}


def _stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _is_valid(path: Path, entry: FileEntry) -> bool:
    """True if `path` holds `entry`'s bytes (hashed once per process while unchanged)."""
    if not path.is_file():
        return False
    key = _stat_key(path)
    if _verified.get(path) == key:
        return True
    if key[0] != entry.size or files.sha256(path) != entry.sha256:
        return False
    _verified[path] = key
    return True


def _write_verified(dest: Path, entry: FileEntry, write) -> bool:
    """Put `entry` at `dest` with `write(file)` if its digest matches; False if it does not.

    `write` fills a temporary file next to `dest`, which is removed whatever happens (an
    error, Ctrl-C); created by open(), it has the permissions the umask allows.
    """
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(8)}.part")
    try:
        with open(tmp, "xb") as out:
            write(out)
        if files.sha256(tmp) != entry.sha256:
            return False
        os.replace(tmp, dest)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _copy(src: Path, out) -> None:
    with open(src, "rb") as f:
        shutil.copyfileobj(f, out)


def _download(entry: FileEntry, dest: Path, progressbar: bool) -> None:
    """Put `entry` at `dest`: from the mirror if there is one, else (or then) from upstream."""
    mirror = os.environ.get(MIRROR_ENV, "")
    urls = [entry.url]
    failures: list[tuple[str, type[DataError], object]] = []
    if "://" in mirror:
        urls.insert(0, f"{mirror.rstrip('/')}/sha256/{entry.sha256}")
    elif mirror:
        src = Path(mirror) / "sha256" / entry.sha256
        if not src.is_file():
            failures.append((str(src), DownloadError, "not in the mirror directory"))
        elif _write_verified(dest, entry, lambda out: _copy(src, out)):
            return
        else:
            failures.append((str(src), ChecksumError, "SHA-256 mismatch in the mirror"))
    downloader = pooch.HTTPDownloader(progressbar=progressbar, timeout=TIMEOUT_S)
    for url in urls:
        try:
            if _write_verified(dest, entry, lambda out: downloader(url, out, None)):
                return
            failures.append((url, ChecksumError, "SHA-256 mismatch"))
        except OSError as err:  # requests' errors are OSErrors: no network, HTTP error, cut off
            if err.errno == errno.ENOSPC:
                raise
            failures.append((url, DownloadError, err))
    tried = "\n".join(f"  {source}: {err}" for source, _, err in failures)
    if any(kind is ChecksumError for _, kind, _ in failures):
        raise ChecksumError(
            f"{entry.name}: the file obtained does not match SHA-256 {entry.sha256} and was "
            f"not kept.\n{tried}\nThe upstream file may have changed; try again later, or set "
            f"{MIRROR_ENV} to a mirror directory or URL that has sha256/{entry.sha256}."
        )
    raise DownloadError(
        f"could not download {entry.name} (no network, refused, or cut off).\n{tried}\n"
        f"Check your connection, or set {MIRROR_ENV} to a mirror: a directory laid out as "
        f"sha256/<digest>, or a base URL. Files are cached in {data_dir()} "
        f"(set {DATA_DIR_ENV} to change that)."
    )


def fetch_file(entry: FileEntry, *, progressbar: bool = False) -> Path:
    """Return the cached path of `entry`, downloading (and verifying) it if needed."""
    dest = data_dir() / entry.name
    if _is_valid(dest, entry):
        return dest
    if dest.is_dir():
        raise CacheError(
            f"{dest} is a directory, where the cached file {entry.name} should be (teachreg did "
            f"not create it). Move it away or delete it, or set {DATA_DIR_ENV} to another "
            "directory."
        )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=dest.parent).close()
    except OSError as err:
        raise CacheError(
            f"cannot write the data cache directory {dest.parent}: {err}. "
            f"Set {DATA_DIR_ENV} to a writable directory."
        ) from err
    try:
        _download(entry, dest, progressbar)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise CacheError(
            f"the disk is full: no space left for {entry.name} ({_mib(entry.size)}) in the data "
            f"cache directory {dest.parent}; nothing was kept. Free some space there, or set "
            f"{DATA_DIR_ENV} to a directory on a disk with room."
        ) from err
    _verified[dest] = _stat_key(dest)
    return dest


def fetch(name: str, *, progressbar: bool = False) -> dict[str, Path]:
    """Download (if needed) every file of dataset `name` and return `{file name: local path}`.

    Keys are the manifest file names (e.g. `"hnct/demo.h5"`); paths are in `data_dir()`.
    Raises UnknownDatasetError, DownloadError, ChecksumError or CacheError (all DataError).
    """
    return {f.name: fetch_file(f, progressbar=progressbar) for f in dataset(name).files}


def is_cached(name: str) -> bool:
    """True if every file of dataset `name` is in the cache with the right size (not hashed)."""
    root = data_dir()
    return all(
        (root / f.name).is_file() and (root / f.name).stat().st_size == f.size
        for f in dataset(name).files
    )


def _files(names: list[str] | None) -> list[FileEntry]:
    """The files of datasets `names` (default: all)."""
    datasets = [dataset(n) for n in names] if names else manifest().values()
    return [f for ds in datasets for f in ds.files]


def verify(names: list[str] | None = None) -> list[Path]:
    """Re-hash the cached files of `names` (default: all datasets); return the bad ones.

    Bad: a file whose SHA-256 differs, or a directory where a cached file should be. Files not
    in the cache are skipped; a bad file stays in place until `fetch` replaces it.
    """
    root = data_dir()
    bad = []
    for f in _files(names):
        path = root / f.name
        _verified.pop(path, None)
        if path.exists() and not _is_valid(path, f):
            bad.append(path)
    return bad


def remove_leftovers(names: list[str] | None = None) -> list[Path]:
    """Remove the temporary files that interrupted downloads left in the cache; return them.

    Only in the cache directories of `names` (default: all datasets), only files named as the
    fetcher names its temporary files, and only those untouched for 10 minutes (younger ones
    may belong to a download in progress).
    """
    folders = {(data_dir() / f.name).parent for f in _files(names)}
    removed = []
    for folder in sorted(p for p in folders if p.is_dir()):
        for path in sorted(folder.iterdir()):
            if (
                _TEMP_NAME.fullmatch(path.name)
                and path.is_file()
                and time.time() - path.stat().st_mtime > _STALE_S
            ):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def manifest_markdown() -> str:
    """The book's data page (`book/data.md`): every dataset with its details, as Markdown."""
    lines = [
        "# Data",
        "",
        "<!-- Generated by `teachreg data page > book/data.md`; do not edit by hand. -->",
        "",
        "The course uses these public datasets. `teachreg data fetch NAME` downloads one into a "
        f"per-user cache (`{DATA_DIR_ENV}` overrides where), checking every file's SHA-256; "
        "`teachreg.data.load(NAME)` reads it as NumPy arrays in (z, y, x) order, spacing in mm.",
        "",
        "| dataset | description | files | size |",
        "|---|---|---:|---:|",
    ]
    lines += [
        f"| `{d.name}` | {d.description} | {len(d.files)} | {_mib(d.size)} |"
        for d in manifest().values()
    ]
    for d in manifest().values():
        lines += [
            "",
            f"## `{d.name}`",
            "",
            d.description,
            "",
            f"- Files: {len(d.files)} ({_mib(d.size)})",
            f"- Licence: {d.license}",
            f"- Citation: {d.citation}",
        ]
    return "\n".join(lines) + "\n"
