"""The course's data: a manifest of public files, a verified download cache, and loaders.

>>> from teachreg import data
>>> vol = data.load("hnct")          # Volume: image [z, y, x] in HU, spacing in mm
>>> paths = data.fetch("hnct")       # {"hnct/demo.h5": Path(...)} in the per-user cache
"""

from .fetch import (
    CacheError,
    ChecksumError,
    DataError,
    Dataset,
    DownloadError,
    FileEntry,
    UnknownDatasetError,
    data_dir,
    dataset,
    fetch,
    fetch_file,
    is_cached,
    manifest,
    manifest_markdown,
    verify,
)
from .loaders import Pair, Volume, load

__all__ = [
    "CacheError",
    "ChecksumError",
    "DataError",
    "Dataset",
    "DownloadError",
    "FileEntry",
    "Pair",
    "UnknownDatasetError",
    "Volume",
    "data_dir",
    "dataset",
    "fetch",
    "fetch_file",
    "is_cached",
    "load",
    "manifest",
    "manifest_markdown",
    "verify",
]
