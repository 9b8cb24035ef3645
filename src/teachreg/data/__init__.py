"""The course's data: a manifest of public files, a verified download cache, loaders, and
registration pairs on disk (`load_paired`, `write_pair`).

>>> from teachreg import data
>>> vol = data.load("hnct")     # Volume: image [z, y, x] (HU), spacing (mm)
>>> paths = data.fetch("hnct")  # {"hnct/demo.h5": Path(...)}, in the cache
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
    remove_leftovers,
    verify,
)
from .loaders import (
    DIRLAB_4DCT_GRIDS,
    Pair,
    Volume,
    load,
    lps_to_zyx,
    read_dicom_series,
    read_keypoints,
    read_landmarks,
    read_nifti,
    read_nrrd,
    read_volume,
)
from .paired import load_paired, write_pair

__all__ = [
    "DIRLAB_4DCT_GRIDS",
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
    "load_paired",
    "lps_to_zyx",
    "manifest",
    "manifest_markdown",
    "read_dicom_series",
    "read_keypoints",
    "read_landmarks",
    "read_nifti",
    "read_nrrd",
    "read_volume",
    "remove_leftovers",
    "verify",
    "write_pair",
]
