"""Registration pairs on disk in DeepReg's paired layout: `write_pair` writes a `Pair`, `load_paired` reads them.

Layout of one split folder (`ROOT/SPLIT`), one file per pair and kind, named after the pair::

    {moving,fixed}_images/case_XXX.nii.gz  int16 (HU for the lung pairs)
    {moving,fixed}_labels/case_XXX.nii.gz  uint8, 1 = lung
                                           ([.., L] with L labels)
    ddfs/case_XXX.nii.gz                   float32 [.., 3], the true DDF
                                           (voxels, fixed grid)

Arrays are stored (x, y, z) like the Learn2Reg NIfTI files, a DDF's components too (x, y, z),
so that the file pairs each component with its axis as DeepReg and nibabel read it; with an
affine of the spacing (LPS axes), and gzipped with no time stamp, so the same pair gives byte-identical files. The real
Learn2Reg pairs (CT images and masks, no DDF) come in the same layout from DeepReg's
`demos/paired_ct_lung/demo_data.py`, which downloads
https://zenodo.org/record/3835682/files/training.zip (Hering et al., Learn2Reg 2020), splits it
at random into train/valid/test and rescales the images to [0, 255] (not HU); `load_paired`
reads them too.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from .fetch import DataError, data_dir
from .loaders import Pair, Volume

__all__ = ["write_pair", "load_paired"]


def _write_nifti(path: Path, array: np.ndarray, spacing) -> None:
    """Write `array` `[z, y, x, ...]` as a gzipped NIfTI stored (x, y, z, ...), byte-deterministic."""
    affine = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])
    image = nib.Nifti1Image(np.ascontiguousarray(np.swapaxes(array, 0, 2)), affine)
    image.header.set_xyzt_units("mm")
    path.write_bytes(gzip.compress(image.to_bytes(), compresslevel=1, mtime=0))


def _read_nifti(path: Path) -> tuple[np.ndarray, tuple]:
    """A NIfTI file's array, stored (x, y, z, ...), as `[z, y, x, ...]`, and its voxel size (z, y, x) mm."""
    image = nib.load(path)
    return np.swapaxes(np.asanyarray(image.dataobj), 0, 2), tuple(float(z) for z in image.header.get_zooms()[2::-1])


def write_pair(pair: Pair, folder, name: str) -> None:
    """Write `pair` into the split `folder` as `name`.nii.gz in each kind's folder (made if needed).

    Images are rounded to int16, labels stored as uint8 `[D, H, W]` (one label) or `[D, H, W, L]`,
    the DDF as float32 `[D, H, W, 3]` if the pair has one; each file with its volume's spacing
    (the DDF with the fixed one).
    """
    folder = Path(folder)
    arrays = {}
    for role, volume in (("moving", pair.moving), ("fixed", pair.fixed)):
        arrays[f"{role}_images"] = np.round(volume.image).astype(np.int16), volume.spacing
        if volume.labels is not None:
            labels = volume.labels[..., 0] if volume.labels.shape[-1] == 1 else volume.labels
            arrays[f"{role}_labels"] = labels.astype(np.uint8), volume.spacing
    if pair.ddf is not None:  # components (z, y, x) -> (x, y, z), as the axes
        arrays["ddfs"] = np.asarray(pair.ddf, np.float32)[..., ::-1], pair.fixed.spacing
    for kind, (array, spacing) in arrays.items():
        (folder / kind).mkdir(parents=True, exist_ok=True)
        _write_nifti(folder / kind / f"{name}.nii.gz", array, spacing)


def load_paired(root=None, split: str = "test") -> list[Pair]:
    """Read the pairs of `root/split` in DeepReg's paired layout (default root: `data_dir() / "lung_ct"`).

    Returns Pairs sorted by file name, named after it (`case_001`): `moving`/`fixed` Volumes with
    image float32 `[D, H, W]` (z, y, x) (HU for `teachreg.lung.build`'s pairs; DeepReg's
    Learn2Reg download is rescaled to [0, 255]), labels uint8 `[D, H, W, L]` or None, spacing
    (z, y, x) mm from the fixed label file (DeepReg's rescaled images lost theirs) or else the
    fixed image; `ddf` float32 `[D, H, W, 3]` or None. Files are read as stored (x, y, z), as
    DeepReg does, ignoring their orientation.
    """
    folder = (Path(root) if root is not None else data_dir() / "lung_ct") / split
    names = sorted(p.name for p in (folder / "fixed_images").glob("*.nii*"))
    if not names:
        raise DataError(f"no pairs in {folder}: build them with `teachreg data build-lung` "
                        "(teachreg.lung.build) or give the folder of a DeepReg paired dataset")
    pairs = []
    for name in names:
        def read(kind: str):
            path = folder / kind / name
            return _read_nifti(path) if path.exists() else (None, None)

        spacing = read("fixed_labels")[1] or read("fixed_images")[1]
        volumes = []
        for role in ("moving", "fixed"):
            image = read(f"{role}_images")[0]
            if image is None:
                raise DataError(f"{folder}: {role}_images/{name} is missing")
            labels = read(f"{role}_labels")[0]
            if labels is not None:
                labels = (labels.reshape(*labels.shape[:3], -1) > 0).astype(np.uint8)
            volumes.append(Volume(image.astype(np.float32), spacing, labels, ("lung",) if labels is not None else (),
                                  f"{folder.name}/{role}/{name}"))
        ddf = read("ddfs")[0]  # components stored (x, y, z), as the axes
        pairs.append(Pair(volumes[0], volumes[1], None if ddf is None else ddf[..., ::-1].astype(np.float32),
                          name.split(".")[0]))
    return pairs
