"""Read the course's datasets as NumPy arrays with one axis order and spacing in mm.

Every volume is indexed `vol[z, y, x]` = (slice, row, column), like SimpleITK's
`GetArrayFromImage` or a DICOM stack, and its `spacing` is in mm in the same (z, y, x) order.
Where the file says how it lies in the patient, the axes are put in DICOM patient (LPS) order:
z runs inferior to superior, y anterior to posterior (so anterior is at the top of an axial slice
`vol[k]` shown with `imshow`), and x from the patient's right to left (radiological view).
The HDF5 files store no orientation: they are arranged so that `vol[k]` is an upright axial
slice with z running inferior to superior; their left-right direction is not known.
"""

from __future__ import annotations

import gzip
import io
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import nibabel as nib
import nrrd
import numpy as np
import pydicom
import scipy.io

from .fetch import DataError, dataset, fetch

__all__ = [
    "HNCT_SPACING", "PROSTATE_SPACING", "L2R_SPACING", "Volume", "Pair", "lps_to_zyx",
    "read_nifti", "read_nrrd", "read_dicom_series", "read_volume", "load",
    "DIRLAB_4DCT_GRIDS", "read_keypoints", "read_landmarks",
]

# RAS (NIfTI world) <-> LPS (DICOM/NRRD world): flip the first two world axes.
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Assumed spacings (mm, z, y, x) where the file stores none.
HNCT_SPACING = (12.0, 4.0, 4.0)
PROSTATE_SPACING = (1.0, 1.0, 1.0)
# Learn2Reg case_001 as stored in test_lung_ct.mat (the file says 1 mm): (z, y, x).
L2R_SPACING = (1.75, 1.25, 1.75)
# DIR-Lab 4D-CT image grids as published (Castillo et al. 2009): case -> (shape, spacing mm), (z, y, x).
DIRLAB_4DCT_GRIDS = {
    1: ((94, 256, 256), (2.5, 0.97, 0.97)),
    2: ((112, 256, 256), (2.5, 1.16, 1.16)),
    3: ((104, 256, 256), (2.5, 1.15, 1.15)),
    4: ((99, 256, 256), (2.5, 1.13, 1.13)),
    5: ((106, 256, 256), (2.5, 1.10, 1.10)),
    6: ((128, 512, 512), (2.5, 0.97, 0.97)),
    7: ((136, 512, 512), (2.5, 0.97, 0.97)),
    8: ((128, 512, 512), (2.5, 0.97, 0.97)),
    9: ((128, 512, 512), (2.5, 0.97, 0.97)),
}


@dataclass
class Volume:
    """One image with its voxel spacing and optional binary label masks.

    image: float32 `[D, H, W]` = (z, y, x); Hounsfield units for CT, arbitrary units for MR.
    spacing: voxel size in mm, (z, y, x).
    labels: uint8 `[D, H, W, L]` binary masks (0/1), channel l named `label_names[l]`; or None.
    name: where it comes from (dataset and file).
    """

    image: np.ndarray
    spacing: tuple[float, float, float]
    labels: np.ndarray | None
    label_names: tuple[str, ...]
    name: str


@dataclass
class Pair:
    """A registration pair: the `moving` volume is warped onto the `fixed` one.

    ddf: the true displacement where it is known (built pairs), else None: float32 `[D, H, W, 3]`
    in voxels on the fixed grid, components (z, y, x), `fixed(x) = moving(x + ddf(x))`.
    name: the pair's name (its file name in the paired layout, e.g. `case_001`).
    """

    moving: Volume
    fixed: Volume
    ddf: np.ndarray | None = None
    name: str = ""


def lps_to_zyx(array: np.ndarray, affine_ras: np.ndarray) -> tuple[np.ndarray, tuple]:
    """Reorient `array` `[i, j, k, ...]` with voxel-to-RAS `affine_ras` `[4, 4]` to (z, y, x) = (S, P, L).

    Returns the array `[z, y, x, ...]` and its spacing (z, y, x) in mm.
    """
    to_lps = nib.orientations.ornt_transform(
        nib.io_orientation(affine_ras), nib.orientations.axcodes2ornt(("L", "P", "S"))
    )
    xyz = nib.orientations.apply_orientation(array, to_lps)
    zooms = np.sqrt((affine_ras[:3, :3] ** 2).sum(axis=0))
    spacing = np.empty(3)
    spacing[to_lps[:, 0].astype(int)] = zooms
    zyx = np.ascontiguousarray(np.swapaxes(xyz, 0, 2))
    return zyx, tuple(float(s) for s in spacing[::-1])


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI file's array `[i, j, k, ...]` as stored and its voxel-to-RAS affine `[4, 4]` (mm)."""
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img.affine


def read_nrrd(path: Path) -> tuple[np.ndarray, tuple]:
    """A 3-D NRRD file as `[z, y, x]` (S, P, L) with its spacing (z, y, x) in mm."""
    array, header = nrrd.read(str(path))
    space = header.get("space")
    if space not in ("left-posterior-superior", "right-anterior-superior"):
        raise DataError(f"{path}: NRRD space {space!r} is not supported")
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(header["space directions"], dtype=float).T
    affine[:3, 3] = header["space origin"]
    if space == "left-posterior-superior":
        affine = _RAS_FROM_LPS @ affine
    return lps_to_zyx(array, affine)


def _dicom_series(paths: list[Path]) -> list[pydicom.Dataset]:
    """The slices of the one DICOM image series among `paths` (the files of one folder).

    Files that are not DICOM images (a README, a DICOMDIR) are skipped with a warning that
    names them; DataError if there is no series, or several (listed).
    """
    folder = paths[0].parent if paths else "an empty folder"
    series: dict[str, list[pydicom.Dataset]] = {}
    skipped = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            ds = None
        if ds is None or "PixelData" not in ds:
            skipped.append(path.name)
        else:
            series.setdefault(ds.get("SeriesInstanceUID", "(no SeriesInstanceUID)"), []).append(ds)
    if skipped:
        warnings.warn(
            f"{folder}: skipped {len(skipped)} file(s) that are not DICOM images: "
            f"{', '.join(skipped)}",
            stacklevel=3,
        )
    if not series:
        raise DataError(f"{folder}: no DICOM image files; give a folder of one CT series' slices")
    if len(series) > 1:
        found = "".join(
            f"\n  {uid} {slices[0].get('SeriesDescription', '')!r}: {len(slices)} slices"
            for uid, slices in series.items()
        )
        raise DataError(
            f"{folder}: {len(series)} DICOM series (a volume is read from exactly one):{found}\n"
            "Put the files of each series (SeriesInstanceUID) in a folder of its own and read "
            "that folder."
        )
    return next(iter(series.values()))


def read_dicom_series(paths: list[Path]) -> tuple[np.ndarray, tuple]:
    """The one DICOM CT series among `paths` as float32 HU `[z, y, x]` (S, P, L), spacing (z, y, x) mm.

    Slices are sorted by position along the slice normal; values are rescaled with
    RescaleSlope/Intercept; spacing comes from PixelSpacing and the slice positions.
    """
    slices = _dicom_series(paths)
    orientation = np.asarray(slices[0].ImageOrientationPatient, dtype=float)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = [np.asarray(s.ImagePositionPatient, dtype=float) for s in slices]
    order = np.argsort([p @ normal for p in positions])
    slices = [slices[i] for i in order]
    steps = np.diff([positions[i] @ normal for i in order])
    if not np.allclose(steps, steps.mean(), rtol=1e-3):
        raise DataError(f"{paths[0].parent}: uneven slice spacing, {steps.min()}-{steps.max()} mm")
    hu = np.stack(
        [
            s.pixel_array.astype(np.float32) * float(s.RescaleSlope) + float(s.RescaleIntercept)
            for s in slices
        ]
    )
    row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
    affine = np.eye(4)  # voxel (column, row, slice) -> LPS
    affine[:3, 0] = row_dir * col_spacing
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 2] = normal * steps.mean()
    affine[:3, 3] = positions[order[0]]
    return lps_to_zyx(hu.transpose(2, 1, 0), _RAS_FROM_LPS @ affine)


def read_volume(path: Path) -> Volume:
    """A CT or mask from a NIfTI or NRRD file or a DICOM folder: image float32 `[z, y, x]`, spacing mm.

    No labels; the name is the file's or folder's. Raises DataError naming `path` if it cannot be
    read or holds NaN or infinite values.
    """
    path = Path(path)
    try:
        if path.is_dir():
            array, spacing = read_dicom_series(sorted(p for p in path.iterdir() if p.is_file()))
        elif path.suffix == ".nrrd":
            array, spacing = read_nrrd(path)
        else:
            array, spacing = lps_to_zyx(*read_nifti(path))
    except DataError:  # already names the file or folder (a DICOM folder with several series)
        raise
    except Exception as err:  # nibabel, pynrrd and pydicom each have their own errors
        raise DataError(f"{path}: not a readable NIfTI or NRRD file or DICOM folder ({err})") from err
    array = np.asarray(array, np.float32)
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise DataError(f"{path}: {bad} voxel{' is' if bad == 1 else 's are'} not finite (NaN or infinite); "
                        "give a file with a value in every voxel")
    return Volume(array, spacing, None, (), path.name)


def _masks(*masks: np.ndarray) -> np.ndarray:
    """Stack masks `[D, H, W]` into uint8 binary labels `[D, H, W, L]`."""
    return np.ascontiguousarray(np.stack([m > 0 for m in masks], axis=-1), dtype=np.uint8)


def _hnct() -> Volume:
    """Head-and-neck CT: image `[37, 128, 128]` HU, labels `[..., 2]` = (spinal_cord, brainstem).

    The file stores [x, y, z] (128x128x37), labels in the order (brainstem, spinal cord), and
    no spacing or orientation; we transpose to (z, y, x) (z inferior to superior, anterior at
    the top; left-right unknown) and put the spinal cord first. Spacing (12, 4, 4) mm is an
    ASSUMPTION estimated from the anatomy (head 56 x 41 voxels, vertex to chin 17.5 slices,
    brainstem 6 slices): treat distances in mm as approximate.
    """
    path = fetch("hnct")["hnct/demo.h5"]
    with h5py.File(path, "r") as f:
        image = np.ascontiguousarray(f["image"][()].transpose(2, 1, 0), dtype=np.float32)
        brainstem, cord = f["label"][()].transpose(3, 2, 1, 0)
    return Volume(
        image=image,
        spacing=HNCT_SPACING,
        labels=_masks(cord, brainstem),
        label_names=("spinal_cord", "brainstem"),
        name="hnct",
    )


def _prostate_mr() -> Pair:
    """Prostate MR of two subjects: moving = subject 0 (image0), fixed = subject 1 (image1).

    Images `[32, 128, 128]` float32 (arbitrary MR units), labels `[..., 1]` = (prostate,).
    This matches DeepReg's classical nonrigid prostate demo (image0 moving, image1 fixed).
    The file stores (z, y, x) with no spacing: 1 mm isotropic is an ASSUMPTION (it makes the
    gland volumes 18 and 15 mL, plausible).
    """
    path = fetch("prostate_mr")["promise12/demo2.h5"]
    with h5py.File(path, "r") as f:
        moving, fixed = (
            Volume(
                image=f[f"image{i}"][()].astype(np.float32),
                spacing=PROSTATE_SPACING,
                labels=_masks(f[f"label{i}"][()]),
                label_names=("prostate",),
                name=f"prostate_mr/image{i}",
            )
            for i in (0, 1)
        )
    return Pair(moving=moving, fixed=fixed)


def _lung_cases(split: str) -> list[int]:
    """The case numbers of a lung_masks split ("train" or "test")."""
    prefix = f"lung_masks/{split}/fixed_labels/case_"
    names = [f.name for f in dataset("lung_masks").files if f.name.startswith(prefix)]
    return sorted(int(n[len(prefix) : -len(".nii.gz")]) for n in names)


def _lung_masks(case: int = 1, split: str = "train") -> Pair:
    """Learn2Reg lung masks of one patient: moving = expiration, fixed = inspiration.

    Each Volume has image = the mask as float32 `[208, 192, 192]` and labels `[..., 1]` = (lung,),
    spacing (1.75, 1.25, 1.75) mm (z, y, x) from the NIfTI header.
    `split` is "train" (cases 1-7, 9, 10, 13-19) or "test" (cases 11, 12).
    """
    cases = _lung_cases(split) if split in ("train", "test") else []
    if case not in cases:
        raise DataError(
            f"no lung_masks case {case!r} in split {split!r}; train cases: "
            f"{_lung_cases('train')}, test cases: {_lung_cases('test')}"
        )
    paths = fetch("lung_masks")

    def volume(kind: str) -> Volume:
        name = f"lung_masks/{split}/{kind}_labels/case_{case:03d}.nii.gz"
        mask, spacing = lps_to_zyx(*read_nifti(paths[name]))
        return Volume(mask.astype(np.float32), spacing, _masks(mask), ("lung",), name)

    return Pair(moving=volume("moving"), fixed=volume("fixed"))


def _l2r_case001() -> Volume:
    """Learn2Reg case_001 expiration chest CT `[208, 192, 192]`, labels `[..., 1]` = (lung,).

    The MATLAB file holds `vol`, uint8, stored like the case's NIfTI lung mask (whose header
    gives the orientation), and `voxdims` = 1 mm, which is wrong: the true spacing is
    (1.75, 1.25, 1.75) mm (z, y, x). The uint8 values have no published map to HU; we use the
    ESTIMATE HU = 9.04 * value - 1000 (air 0 -> -1000 HU, soft-tissue peak 115 -> +40 HU), so
    treat the HU values as approximate.
    """
    paths = fetch("chest_ct_l2r_case001")
    vol = scipy.io.loadmat(paths["chest_ct/l2r_case001_exp/test_lung_ct.mat"])["vol"]
    mask, affine = read_nifti(paths["lung_masks/train/moving_labels/case_001.nii.gz"])
    image, _ = lps_to_zyx(9.04 * vol.astype(np.float32) - 1000.0, affine)
    mask, _ = lps_to_zyx(mask, affine)
    return Volume(image, L2R_SPACING, _masks(mask), ("lung",), "chest_ct_l2r_case001")


def _dynagan_0103() -> Volume:
    """TCIA 4D-Lung patient 0103, phase 5: `[128, 128, 128]` HU, spacing from the NIfTI header."""
    path = fetch("chest_ct_dynagan_0103")["chest_ct/dynagan_0103/LungCT_0103_0005.nii.gz"]
    array, affine = read_nifti(path)
    image, spacing = lps_to_zyx(array.astype(np.float32), affine)
    return Volume(image, spacing, None, (), "chest_ct_dynagan_0103")


def _cip() -> list[Volume]:
    """Chest Imaging Platform test CTs: [ct-64, TestInput], HU, spacing from the NRRD headers.

    ct-64 `[79, 64, 64]` at (3.99, 4.17, 4.17) mm has labels `[..., 3]` = (lung, right_lung,
    left_lung): `lung` is wholeLung-64.nrrd, the two others come from the CIP label map
    lm-64.nrrd (value = 256 * type + region; regions 2, 4-6, 12-14 are right, 3, 7-11 left).
    TestInput `[50, 64, 64]` at (6.99, 5.28, 5.28) mm is another chest CT, without labels.
    """
    paths = fetch("chest_ct_cip")
    ct, spacing = read_nrrd(paths["chest_ct/cip/ct-64.nrrd"])
    lung, _ = read_nrrd(paths["chest_ct/cip/wholeLung-64.nrrd"])
    region = read_nrrd(paths["chest_ct/cip/lm-64.nrrd"])[0] & 0xFF
    right = np.isin(region, (2, 4, 5, 6, 12, 13, 14))
    left = np.isin(region, (3, 7, 8, 9, 10, 11))
    test, test_spacing = read_nrrd(paths["chest_ct/cip/TestInput.nrrd"])
    return [
        Volume(
            image=ct.astype(np.float32),
            spacing=spacing,
            labels=_masks(lung, right, left),
            label_names=("lung", "right_lung", "left_lung"),
            name="chest_ct_cip/ct-64",
        ),
        Volume(test.astype(np.float32), test_spacing, None, (), "chest_ct_cip/TestInput"),
    ]


def _dicom_dataset(name: str) -> Volume:
    image, spacing = read_dicom_series(sorted(fetch(name).values()))
    return Volume(image, spacing, None, (), name)


def _cptac() -> Volume:
    """TCIA CPTAC C3N-00247 chest CT (DICOM): `[99, 512, 512]` HU, (3, 0.564, 0.564) mm."""
    return _dicom_dataset("chest_ct_cptac")


def _lidc_0314() -> Volume:
    """LIDC-IDRI-0314 chest CT in HU: every second slice of the 1 mm series, 2 mm apart."""
    return _dicom_dataset("chest_ct_lidc_0314")


def _lungdx(patient: str) -> Volume:
    """Lung-PET-CT-Dx `patient` ("a0001": 5 mm slices, "a0002": 8 mm slices) chest CT in HU."""
    return _dicom_dataset(f"chest_ct_lungdx_{patient}")


def _dirlab4dct(case: int = 1) -> tuple[np.ndarray, np.ndarray, tuple]:
    """DIR-Lab 4D-CT `case` (1-9): (inspiration, expiration) dense landmarks `[N, 3]`, voxels
    (z, y, x) of the case's image grid (`read_landmarks`), and that grid's spacing in mm (z, y, x)."""
    if case not in DIRLAB_4DCT_GRIDS:
        raise DataError(f"no lung_landmarks_dirlab4dct case {case!r}; cases are 1-9")
    path = fetch("lung_landmarks_dirlab4dct")[f"lung_motion/dirlab4dct/dense_case{case}.mat"]
    return (*read_landmarks(path), DIRLAB_4DCT_GRIDS[case][1])


def _itkelastix() -> Volume:
    """ITKElastix example chest CT (DICOM): `[141, 512, 512]` HU, (2, 0.977, 0.977) mm."""
    return _dicom_dataset("chest_ct_itkelastix")


def _file_bytes(path: Path, member: str | None) -> bytes:
    """The bytes of file `path`, or of `member` inside the zip archive `path`."""
    if member is None:
        return Path(path).read_bytes()
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.read(member)
    except (KeyError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: cannot read {member!r} from it ({err})") from err


def _points_to_zyx(points: np.ndarray, affine_ras: np.ndarray | None, shape) -> np.ndarray:
    """Voxel points `[N, 3]` (i, j, k) of a stored array to the (z, y, x) indices of `lps_to_zyx`'s array.

    With no affine, (i, j, k) = (x, y, z) is reversed; with one, the points are flipped and
    permuted exactly as `lps_to_zyx` reorients the array of that voxel-to-RAS affine and `shape`.
    """
    if affine_ras is None:
        return points[:, ::-1].copy()
    to_lps = nib.orientations.ornt_transform(
        nib.io_orientation(affine_ras), nib.orientations.axcodes2ornt(("L", "P", "S"))
    )
    lps = np.empty_like(points)
    for axis, (new, flip) in enumerate(to_lps):
        lps[:, int(new)] = points[:, axis] if flip > 0 else shape[axis] - 1 - points[:, axis]
    return lps[:, ::-1].copy()


def read_keypoints(path: Path, member: str | None = None, *, first: str = "expiration",
                   affine=None, shape=None) -> tuple[np.ndarray, np.ndarray]:
    """corrField keypoint correspondences: `(inspiration, expiration)`, float64 `[N, 3]` each.

    Points are voxel coordinates (z, y, x), 0-based, in teachreg's order: row n of both arrays is
    the same piece of lung at inspiration and at expiration, both on the masks' voxel grid (mm:
    multiply by the spacing). Sources: a `.csv` file (6 comma-separated columns), or a `.dat` file
    (float32, 6 per point), on disk or as `member` of the zip archive `path`. Each row holds the
    voxel (x, y, z) of the point in one state (columns 0-2, integers: where corrField detected
    it) and in the other (columns 3-5); `first` names the state of columns 0-2.

    Which is which, checked against the lung masks (a point lies inside the lungs of its own
    state; the expiration lungs are the smaller, so the telling share is that inside the
    expiration mask): Learn2Reg `keypoints/case_XXX.csv` (the 18 cases with masks) and
    `l2r_expXXX.dat`, and COPD `case_XX_exp.dat`, hold expiration in columns 0-2 (98-100 % inside
    the expiration mask, against 66-95 % for columns 3-5, which are 97-100 % inside the
    inspiration mask): `first="expiration"`. `l2r_inspXXX.dat` and COPD `case_XX_insp.dat` hold
    inspiration first (columns 0-2 100 % inside the inspiration mask and 56-91 % inside the
    expiration one, columns 3-5 92-100 %): `first="inspiration"`. The csv and `l2r_exp` files share
    their detected points but not their matches (separate corrField runs).

    The stored (x, y, z) index the file's NIfTI array as stored. Give that mask's voxel-to-RAS
    `affine` and stored `shape` to get points on the array `lps_to_zyx` (and `read_volume`) make of
    it; with none, (x, y, z) is just reversed, which is right for the Learn2Reg masks (stored in
    LPS order: `load("lung_masks")` only transposes them) but not for the COPD masks (stored RAS).
    """
    if first not in ("expiration", "inspiration"):
        raise ValueError(f"first must be 'expiration' or 'inspiration', got {first!r}")
    name = member or Path(path).name
    raw = _file_bytes(path, member)
    if name.endswith(".csv"):
        table = np.loadtxt(io.StringIO(raw.decode()), delimiter=",", ndmin=2)
    else:
        table = np.frombuffer(raw, np.float32).astype(np.float64)
        if table.size % 6:
            raise DataError(f"{path} {member or ''}: {table.size} float32 values, not 6 per point")
        table = table.reshape(-1, 6)
    if table.ndim != 2 or table.shape[1] != 6:
        raise DataError(f"{path} {member or ''}: expected 6 columns, got shape {table.shape}")
    a, b = (_points_to_zyx(table[:, cols], affine, shape) for cols in (slice(0, 3), slice(3, 6)))
    return (b, a) if first == "expiration" else (a, b)


def read_landmarks(path: Path, *, original: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """DIR-Lab 4D-CT landmark pairs: `(inspiration, expiration)`, float64 `[N, 3]` each.

    Inspiration = end-inhalation (EI), expiration = end-exhalation (EE); row n of both is one
    landmark. Points are voxel coordinates (z, y, x), 0-based, on the case's DIR-Lab image grid
    (`DIRLAB_4DCT_GRIDS`: multiply by its spacing for mm). The MATLAB file holds `landmark_EE`
    and `landmark_EI` (the dense sets), or `landmark_EE`, `landmark_dirlab_EI` (DIR-Lab's expert
    EI points) and `landmark_new_EI` (refined by Fu et al. 2019), each `[N, 3]` voxels [y, x, z],
    1-based. Without `landmark_EI`, EI is `landmark_new_EI`, or `landmark_dirlab_EI` with
    `original=True`: those give the published mean initial error of the 300 expert pairs (3.89 mm
    for case 1 ... 14.99 mm for case 8, to 0.01 mm); the refined set differs by up to 0.1 mm.
    """
    try:
        mat = scipy.io.loadmat(path)
    except Exception as err:  # scipy raises ValueError, OSError or its own MatReadError
        raise DataError(f"{path}: not a readable MATLAB file ({err})") from err
    ei_key = next((k for k in ("landmark_EI", "landmark_dirlab_EI" if original else "landmark_new_EI") if k in mat), None)
    if "landmark_EE" not in mat or ei_key is None:
        raise DataError(f"{path}: expected variables landmark_EE and landmark_EI (or landmark_new_EI), "
                        f"found {sorted(k for k in mat if not k.startswith('__'))}")
    ee, ei = (np.asarray(mat[k], np.float64) for k in ("landmark_EE", ei_key))
    if ee.shape != ei.shape or ee.ndim != 2 or ee.shape[1] != 3:
        raise DataError(f"{path}: landmark_EE {ee.shape} and {ei_key} {ei.shape} must both be [N, 3]")
    return ei[:, [2, 0, 1]] - 1, ee[:, [2, 0, 1]] - 1


def _l2r_keypoints(case: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Learn2Reg lung keypoints of `case` (1-20) from `keypoints/case_XXX.csv`: `(inspiration,
    expiration)` `[N, 3]` voxels (z, y, x) on the grid of `load("lung_masks", case=case)`."""
    if case not in range(1, 21):
        raise DataError(f"no lung_keypoints_l2r case {case!r}; cases are 1-20")
    path = fetch("lung_keypoints_l2r")["lung_motion/l2r_lung_keypoints.zip"]
    return read_keypoints(path, f"l2r_lung_ct/keypoints/case_{case:03d}.csv")


def _zip_nifti(path: Path, member: str) -> tuple[np.ndarray, np.ndarray]:
    """A gzipped NIfTI file inside a zip archive: its stored array and voxel-to-RAS affine."""
    img = nib.Nifti1Image.from_bytes(gzip.decompress(_file_bytes(path, member)))
    return np.asanyarray(img.dataobj), img.affine


def _copd(case: int = 1) -> tuple[Pair, np.ndarray, np.ndarray]:
    """DIR-Lab COPD `case` (1-10): (Pair of lung masks, inspiration, expiration keypoints).

    Masks as `lung_masks`: moving = expiration, fixed = inspiration, image = the mask as float32
    `[208, 192, 192]`, labels `[..., 1]` = (lung,), spacing (1.75, 1.25, 1.75) mm from the headers.
    Keypoints `[N, 3]` voxels (z, y, x) on that grid, from `case_XX_insp.dat` (the one file every
    case has: case 1 has no `_exp.dat`).
    """
    if case not in range(1, 11):
        raise DataError(f"no lung_motion_copd case {case!r}; cases are 1-10")
    paths = fetch("lung_motion_copd")
    volumes = {}
    for state in ("insp", "exp"):
        name = f"case_{case:02d}_{state}_mask.nii.gz"
        mask, affine = _zip_nifti(paths["lung_motion/copd_masks.zip"], name)
        zyx, spacing = lps_to_zyx(mask, affine)
        volumes[state] = Volume(zyx.astype(np.float32), spacing, _masks(zyx), ("lung",), f"lung_motion_copd/{name}")
    inspiration, expiration = read_keypoints(
        paths["lung_motion/copd_keypoints.zip"], f"COPDgene/keypoints/case_{case:02d}_insp.dat",
        first="inspiration", affine=affine, shape=mask.shape,
    )
    return Pair(moving=volumes["exp"], fixed=volumes["insp"], name=f"copd_{case:02d}"), inspiration, expiration


_LOADERS = {
    "hnct": _hnct,
    "prostate_mr": _prostate_mr,
    "lung_masks": _lung_masks,
    "chest_ct_l2r_case001": _l2r_case001,
    "chest_ct_dynagan_0103": _dynagan_0103,
    "chest_ct_cip": _cip,
    "chest_ct_cptac": _cptac,
    "chest_ct_itkelastix": _itkelastix,
    "chest_ct_lidc_0314": _lidc_0314,
    "chest_ct_lungdx_a0001": lambda: _lungdx("a0001"),
    "chest_ct_lungdx_a0002": lambda: _lungdx("a0002"),
    "lung_landmarks_dirlab4dct": _dirlab4dct,
    "lung_keypoints_l2r": _l2r_keypoints,
    "lung_motion_copd": _copd,
}


def load(name: str, **kwargs) -> Volume | Pair | list[Volume] | tuple:
    """Fetch dataset `name` if needed and read it; arrays are (z, y, x), spacing in mm.

    - `"hnct"` -> Volume, CT in HU, labels (spinal_cord, brainstem); spacing assumed.
    - `"prostate_mr"` -> Pair (moving = subject 0, fixed = subject 1), labels (prostate,);
      spacing assumed 1 mm.
    - `"lung_masks"`, `case=1, split="train"` -> Pair of mask Volumes
      (moving = expiration, fixed = inspiration).
    - `"chest_ct_l2r_case001"` -> Volume, approximate HU, labels (lung,).
    - `"chest_ct_dynagan_0103"`, `"chest_ct_cptac"`, `"chest_ct_itkelastix"`,
      `"chest_ct_lidc_0314"`, `"chest_ct_lungdx_a0001"`, `"chest_ct_lungdx_a0002"` -> Volume, HU.
    - `"chest_ct_cip"` -> [ct-64 with labels (lung, right_lung, left_lung), TestInput].
    - `"lung_keypoints_l2r"`, `case=1` -> (inspiration, expiration) keypoints `[N, 3]`, voxels
      (z, y, x) on the `lung_masks` grid (`read_keypoints`).
    - `"lung_motion_copd"`, `case=1` -> (Pair of mask Volumes, moving = expiration, fixed =
      inspiration; inspiration keypoints; expiration keypoints).
    - `"lung_landmarks_dirlab4dct"`, `case=1` -> (inspiration, expiration) dense landmarks
      `[N, 3]` voxels (z, y, x) of the case's DIR-Lab grid, that grid's spacing (mm, z, y, x).

    See each loader's docstring (`teachreg.data.loaders`) for shapes and assumptions.
    """
    dataset(name)  # raises UnknownDatasetError listing the known names
    return _LOADERS[name](**kwargs)
