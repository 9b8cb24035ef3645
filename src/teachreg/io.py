"""Users' scans with their full header, and displacement fields in the ITK convention (no TensorFlow).

An image is read and written as a SimpleITK image: its voxels, `sitk.GetArrayFromImage(image)`,
are the NumPy array `[z, y, x]` (slice, row, column) that the rest of teachreg uses, and its header
places voxel `(z, y, x)` in the patient at the physical point (mm, DICOM's LPS frame, order x, y, z)::

    point = origin + direction @ (spacing * (x, y, z))

with `image.GetOrigin()`, `image.GetSpacing()` (both x, y, z) and `image.GetDirection()` (a 3x3
matrix, row by row, whose columns are the directions of the x, y and z voxel axes).

A teachreg DDF `[batch, D, H, W, 3]` is in voxels, components (z, y, x), and pulls:
`warped(v) = moving(v + ddf(v))` on the fixed grid. `save_ddf` writes it as ITK writes a
displacement field: a vector image on the fixed image's grid (origin, spacing, direction) whose
vector at each voxel is the displacement in mm in physical (x, y, z) order, so that
`sitk.DisplacementFieldTransform`, ANTs and 3D Slicer apply it as `teachreg.spatial.warp` does
(ITK transforms also pull: a point of the fixed image maps to `point + field(point)` in the
moving image). `load_ddf` reads such a field, from teachreg or from another tool, back into voxels.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import numpy as np
import SimpleITK as sitk

__all__ = [
    "read_image", "read_label", "write_image", "save_ddf", "load_ddf", "ddf_to_mm", "ddf_from_mm",
    "voxel_affine", "voxel_coordinates",
]

_FORMATS = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a folder of one DICOM series"


def read_image(path) -> sitk.Image:
    """Read a 3-D scalar image with its header from a NIfTI, NRRD or MetaImage file or a DICOM folder.

    Returns the SimpleITK image as stored (pixel type kept). Raises FileNotFoundError if `path`
    does not exist, and ValueError naming the file if it is not an image, is 2-D (or one slice),
    4-D or holds vectors, or its header gives no voxel size (ITK would assume 1 mm).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give an image file ({_FORMATS}).")
    reader = _dicom_reader(path) if path.is_dir() else sitk.ImageFileReader()
    if not path.is_dir():
        reader.SetFileName(str(path))
    try:
        image = reader.Execute()
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1].replace("sitk::ERROR: ", "")
        raise ValueError(f"{path} is not an image that SimpleITK can read ({reason}); give {_FORMATS}.") from None
    size = image.GetSize()
    if image.GetDimension() != 3 or min(size) < 2:
        raise ValueError(f"{path} is a {image.GetDimension()}-D image of size {'x'.join(map(str, size))} "
                         "(x, y, z); teachreg registers 3-D volumes with at least 2 voxels along each axis: give a "
                         "volume (for DICOM, the folder of the whole series, not one slice).")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path} has {image.GetNumberOfComponentsPerPixel()} values per voxel (a vector or colour "
                         "image, or a displacement field); give a scalar image (a field is read by io.load_ddf).")
    if not _has_spacing(path, reader):
        raise ValueError(f"{path} gives no voxel size (spacing) in its header, so its size in mm is unknown; "
                         "write the spacing into the file (e.g. SimpleITK's image.SetSpacing, then WriteImage) "
                         "or convert it from the original scan, which has it.")
    return image


def _dicom_reader(folder: Path) -> sitk.ImageSeriesReader:
    """A reader of the one DICOM series in `folder`; ValueError if there is none or several."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(series) != 1:
        found = "no DICOM series" if not series else f"{len(series)} DICOM series ({', '.join(series)})"
        raise ValueError(f"{folder} holds {found}; give a folder of exactly one series' slices, or an image file "
                         f"({_FORMATS}).")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    reader.MetaDataDictionaryArrayUpdateOn()
    return reader


def _has_spacing(path: Path, reader) -> bool:
    """Whether the file's header states the voxel size (ITK silently assumes 1 mm where it does not)."""
    if isinstance(reader, sitk.ImageSeriesReader):
        return reader.HasMetaDataKey(0, "0028|0030")  # PixelSpacing
    if reader.HasMetaDataKey("pixdim[1]"):  # NIfTI
        return all(float(reader.GetMetaData(f"pixdim[{i}]")) > 0 for i in (1, 2, 3))
    name = path.name.lower()
    if name.endswith((".nrrd", ".nhdr")):
        with open(path, "rb") as f:
            header = f.read(1 << 16).decode("latin-1").split("\n\n")[0]
        return re.search(r"^(space directions|spacings)\s*:", header, re.I | re.M) is not None
    if name.endswith((".mha", ".mhd")):
        with open(path, "rb") as f:
            header = re.split(r"ElementDataFile", f.read(1 << 16).decode("latin-1"))[0]
        return re.search(r"^\s*(ElementSpacing|ElementSize)\s*=", header, re.M) is not None
    return True


def read_label(path, like: sitk.Image | None = None) -> sitk.Image:
    """Read a binary mask (0 outside, one other value inside) as a uint8 image of 0 and 1, header kept.

    like: the image the mask was drawn on; the mask must have its size, spacing, origin and
    direction. ValueError (naming the file) for a label map of several values or another grid.
    """
    image = read_image(path)
    values = np.unique(sitk.GetArrayViewFromImage(image))
    if len(values) > 2 or (len(values) == 2 and values[0] != 0) or values[-1] < 0:
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise ValueError(f"{path} is not a binary mask: it holds {len(values)} values ({shown}); a label must be 0 "
                         "outside and one value inside. Save the structure you want as a mask of its own "
                         "(e.g. in 3D Slicer, export one segment as a label map).")
    if like is not None and not _same_grid(image, like):
        raise ValueError(f"{path} lies on another grid than its image: size {image.GetSize()} vs {like.GetSize()}, "
                         f"spacing {_round(image.GetSpacing())} vs {_round(like.GetSpacing())}, origin "
                         f"{_round(image.GetOrigin())} vs {_round(like.GetOrigin())} (x, y, z, mm); give the mask "
                         "drawn on that image.")
    label = sitk.Cast(image != 0, sitk.sitkUInt8)
    label.CopyInformation(image)
    return label


def _round(values) -> tuple:
    return tuple(round(v, 3) for v in values)


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """Same size, and spacing, origin and direction equal to 1e-3 of a voxel."""
    tolerance = 1e-3 * min(b.GetSpacing())
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4))


def write_image(path, image, reference: sitk.Image | None = None) -> None:
    """Write `image` to `path` (format from the extension, compressed) so that `path` is never half written.

    image: a SimpleITK image, or a NumPy array `[z, y, x]` (or `[z, y, x, 3]` for a vector image)
    that takes the header (origin, spacing, direction) of `reference`, the image whose grid it
    lies on. Formats that store one file: .nii.gz, .nii, .nrrd, .mha (not .mhd or .hdr, which
    write two files and cannot be replaced at once).
    """
    path = Path(path)
    if path.name.lower().endswith((".mhd", ".hdr", ".img")):
        raise ValueError(f"{path}: this format writes two files; give a one-file format: .nii.gz, .nrrd or .mha.")
    if not isinstance(image, sitk.Image):
        array = np.asarray(image)
        if not isinstance(reference, sitk.Image):
            raise ValueError("an array has no spacing, origin or direction: give reference=, the SimpleITK image "
                             "(io.read_image) whose grid it lies on.")
        expected = reference.GetSize()[::-1]
        if array.shape[:3] != expected or array.ndim not in (3, 4):
            raise ValueError(f"image has shape {array.shape}, but reference's grid is {list(expected)} [z, y, x]; "
                             "give the array on that grid.")
        image = sitk.GetImageFromArray(array, isVector=array.ndim == 4)
        image.CopyInformation(reference)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp{suffix}")
    try:
        sitk.WriteImage(image, str(temporary), useCompression=True)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _direction(image: sitk.Image) -> np.ndarray:
    return np.asarray(image.GetDirection(), np.float64).reshape(3, 3)


def ddf_to_mm(ddf, reference: sitk.Image) -> np.ndarray:
    """A DDF `[..., 3]` in voxels of `reference`'s grid, components (z, y, x), as displacements in mm,
    physical (x, y, z) order (LPS): `direction @ (spacing * (dx, dy, dz))`. float32, same shape."""
    ddf = np.asarray(ddf, np.float64)
    return ((ddf[..., ::-1] * np.asarray(reference.GetSpacing())) @ _direction(reference).T).astype(np.float32)


def ddf_from_mm(field, reference: sitk.Image) -> np.ndarray:
    """The inverse of `ddf_to_mm`: displacements `[..., 3]` in mm (x, y, z) as voxels (z, y, x) of `reference`."""
    field = np.asarray(field, np.float64)
    voxels = field @ np.linalg.inv(_direction(reference)).T / np.asarray(reference.GetSpacing())
    return voxels[..., ::-1].astype(np.float32)


def voxel_coordinates(points, image: sitk.Image) -> np.ndarray:
    """Physical points `[..., 3]` (mm, x, y, z, LPS) as voxel coordinates `[..., 3]` (z, y, x) of `image`, float32."""
    offset = np.asarray(points, np.float64) - np.asarray(image.GetOrigin())
    return ddf_from_mm(offset, image)


def voxel_affine(image: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """The affine `[4, 3]` (rows act on `[z, y, x, 1]`, as in `teachreg.spatial`) that takes a voxel
    of `reference` to the voxel of `image` at the same physical point: `spatial.resample(array,
    spatial.warp_grid(grid, affine[None]))` samples `image`'s array on `reference`'s grid."""
    corners = np.concatenate([np.zeros((1, 3)), np.eye(3)])  # voxel (0, 0, 0) and one step along z, y, x
    points = np.asarray(reference.GetOrigin()) + ddf_to_mm(corners, reference).astype(np.float64)
    mapped = np.asarray(voxel_coordinates(points, image), np.float64)
    return np.concatenate([mapped[1:] - mapped[0], mapped[:1]]).astype(np.float32)


def save_ddf(path, ddf, reference: sitk.Image) -> None:
    """Write a teachreg DDF as an ITK displacement field on `reference`'s grid (atomic, compressed).

    ddf: `[1, D, H, W, 3]` or `[D, H, W, 3]`, voxels, components (z, y, x), on the grid of
    `reference` (the fixed image, a SimpleITK image from `read_image`). Written as a float32 vector
    image in mm, physical (x, y, z) order (LPS), with `reference`'s origin, spacing and direction:
    `sitk.DisplacementFieldTransform(sitk.ReadImage(path, sitk.sitkVectorFloat64))` applies it.
    """
    if not isinstance(reference, sitk.Image):
        raise ValueError("reference must be the fixed image as a SimpleITK image (io.read_image(path)): a NumPy "
                         "array has no spacing, origin or direction to place the field in the patient.")
    array = np.asarray(ddf)
    array = array[0] if array.ndim == 5 and array.shape[0] == 1 else array
    expected = [*reference.GetSize()[::-1], 3]
    if list(array.shape) != expected:
        raise ValueError(f"ddf has shape {list(np.shape(ddf))}, but the reference grid needs {expected} "
                         "(or [1, ...]): voxels [z, y, x] of the fixed image, 3 components.")
    write_image(path, ddf_to_mm(array, reference), reference)


def load_ddf(path) -> tuple[np.ndarray, sitk.Image]:
    """Read a displacement field written by `save_ddf` or by ITK, SimpleITK, ANTs or 3D Slicer.

    Returns the DDF `[1, D, H, W, 3]` float32 in voxels of the field's grid, components (z, y, x),
    for `teachreg.spatial.warp` (the moving image resampled onto that grid), and the field itself
    as a SimpleITK vector image of float64 (mm, x, y, z), whose header is the fixed grid and which
    `sitk.DisplacementFieldTransform` takes.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give a displacement field file (e.g. ddf.nii.gz).")
    try:
        field = sitk.ReadImage(str(path))
    except RuntimeError:
        raise ValueError(f"{path} is not an image that SimpleITK can read; give a displacement field "
                         "(.nii.gz, .nrrd or .mha).") from None
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError(f"{path} is not a 3-D displacement field: it is {field.GetDimension()}-D with "
                         f"{field.GetNumberOfComponentsPerPixel()} value(s) per voxel, where a field has 3 "
                         "(the displacement in mm along x, y, z).")
    field = sitk.Cast(field, sitk.sitkVectorFloat64)
    return ddf_from_mm(sitk.GetArrayViewFromImage(field), field)[None], field
