"""Register your own two scans, file to file: `teachreg register` and `teachreg warp` run these.

`register_files(moving, fixed, out)` reads both images with their headers (`teachreg.io`),
resamples the moving image onto the fixed image's grid, registers them (affine, then nonrigid)
and writes to the folder `out`:

- `warped.nii.gz`: the moving image warped onto the fixed image's grid and header (float32);
- `ddf.nii.gz`: the displacement field in the ITK convention (`io.save_ddf`: mm, LPS x, y, z, on
  the fixed grid), which SimpleITK, ANTs and 3D Slicer apply as teachreg does;
- `warped_label.nii.gz`: the moving label warped likewise (uint8), when labels are given;
- `report.json`: Dice of the labels before and after, the fraction of folded voxels, the
  seconds taken and every option used.

`warp_file` applies a saved field to another image or label map, `warp_points` to points in mm.
The field pulls: it maps each point of the fixed image to its match in the moving image.
"""

from __future__ import annotations

import inspect
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import tensorflow as tf

from teachreg import files, io, lung, metrics, network, presets, register, spatial

__all__ = ["METHODS", "AFFINE", "DEMONS", "OUTPUTS", "Progress", "resample", "register_files", "warp_file", "warp_points"]

METHODS = ("bspline", "ddf", "svf", "demons", "network")
"""`register_files`'s nonrigid methods: the three transforms of `register.nonrigid` (with
its defaults, chapter 4's), `register.demons` (with `DEMONS`: it compares
intensities directly, so both scans should share a contrast) and the pretrained lung CT network."""

DEMONS = dict(diffeomorphic=True, levels=3, steps=(30, 30, 30))
"""`register.demons`'s options for `method="demons"`: diffeomorphic demons (no folding), 3 levels."""

AFFINE = dict(loss="ncc", steps=(150, 100, 50))
"""`register.affine`'s options before the nonrigid step: NCC copes with two scanners' intensity scales."""

OUTPUTS = ("warped.nii.gz", "ddf.nii.gz", "warped_label.nii.gz", "report.json")
"""The files `register_files` writes into its output folder (the label only when labels are given)."""

Progress = Callable[[str, int, int, float], None]
"""Called as `progress(stage, done, total, loss)` after every optimisation step of `register_files`."""


def resample(image: sitk.Image, reference: sitk.Image, ddf=None, label: bool = False,
             outside: float | None = 0.0) -> np.ndarray:
    """`image` (any grid) sampled on `reference`'s grid, pulled through `ddf` if given: `[D, H, W]` float32.

    ddf: `[1, D, H, W, 3]` in voxels of `reference` (z, y, x): the value at voxel `v` is `image`
    at the physical point of `v + ddf(v)`, one interpolation from the original voxels, linear
    (nearest for a `label` map). Outside `image` the value is `outside` (0 as in `sitk.Resample`),
    or with `outside=None` its nearest edge voxel's.
    """
    shape = reference.GetSize()[::-1]
    grid = spatial.reference_grid(shape)
    if ddf is not None:
        grid += tf.convert_to_tensor(ddf, tf.float32)[0]
    coordinates = spatial.warp_grid(grid, io.voxel_affine(image, reference)[None])
    array = sitk.GetArrayFromImage(image).astype(np.float32)[None] - (outside or 0.0)
    out = spatial.resample(array, coordinates, interpolation="nearest" if label else "linear",
                           padding="border" if outside is None else "zeros")
    return out.numpy()[0] + (outside or 0.0)


def _minimum(image: sitk.Image) -> float:
    """The image's smallest value: what lies outside a scan (air in CT, background in MR)."""
    return float(sitk.GetArrayViewFromImage(image).min())


def _working_grid(fixed: sitk.Image, max_voxels: int) -> sitk.Image:
    """The fixed grid, or one as coarse as needed to hold at most `max_voxels`: same corners and direction,
    voxels about isotropic in mm (never finer than the fixed image's)."""
    size = np.asarray(fixed.GetSize())
    if size.prod() <= max_voxels:
        return fixed
    extent = (size - 1) * np.asarray(fixed.GetSpacing())
    step = (extent.prod() / max_voxels) ** (1 / 3)
    work = np.minimum(size, np.maximum(np.floor(extent / step), 1).astype(int) + 1)
    grid = sitk.Image([int(n) for n in work], sitk.sitkUInt8)
    grid.SetOrigin(fixed.GetOrigin())
    grid.SetDirection(fixed.GetDirection())
    grid.SetSpacing([float(s) for s in extent / (work - 1)])
    return grid


def _smoothed(image: sitk.Image, grid: sitk.Image) -> sitk.Image:
    """`image` smoothed by half the voxel size of the coarser `grid` (mm) before sampling it there."""
    return sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), [s / 2 for s in grid.GetSpacing()])


def _counter(progress: Progress | None, stage: str, start: int, total: int) -> register.Callback | None:
    """A `register` callback that reports each step to `progress` as step `start + 1, ...` of `total`."""
    if progress is None:
        return None
    count = itertools.count(start + 1)
    return lambda level, step, loss: progress(stage, next(count), total, loss)


def _network_ddf(moving: np.ndarray, fixed: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """The lung CT network's DDF `[1, D, H, W, 3]` (voxels of `grid`) for CTs `[D, H, W]` (HU) on `grid`.

    The network sees both images on its training grid (`presets.LUNG_GRID` at `presets.LUNG_SPACING`,
    axes along L, P, S) centred on `grid`, air (-1000 HU) outside them; its field is carried back in mm.
    A network that takes lung masks gets those `lung.segment_lungs` finds in the two resampled CTs.
    """
    lung_grid = sitk.Image(list(presets.LUNG_GRID[::-1]), sitk.sitkUInt8)
    lung_grid.SetSpacing(presets.LUNG_SPACING[::-1])
    centre = grid.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in grid.GetSize()])
    lung_grid.SetOrigin(np.asarray(centre) - (np.asarray(lung_grid.GetSize()) - 1) / 2 * np.asarray(lung_grid.GetSpacing()))
    pair = []
    for array in (moving, fixed):
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(grid)
        pair.append(resample(image, lung_grid, outside=network.WINDOW[0])[None])
    model = network.load_pretrained("lung_ct")
    masks = None
    if model.masks:  # the lungs of each scan, found by thresholding (on this grid, segment_lungs keeps every voxel)
        masks = [lung.segment_lungs(image[0], presets.LUNG_SPACING, name)[0][None]
                 for image, name in zip(pair, ("the moving scan", "the fixed scan"))]
    ddf = model.predict_ddf(*pair, masks=masks)
    at_grid = spatial.resample(ddf, spatial.warp_grid(spatial.reference_grid(grid.GetSize()[::-1]),
                                                      io.voxel_affine(lung_grid, grid)[None]))
    return io.ddf_from_mm(io.ddf_to_mm(at_grid.numpy(), lung_grid), grid)


def _check_out(out: Path, force: bool) -> None:
    """Refuse an output folder that holds results of an earlier run, unless `force` (then remove them)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the results.")
    earlier = [name for name in OUTPUTS if (out / name).exists()]
    if earlier and not force:
        raise ValueError(f"{out} already holds results ({', '.join(earlier)}); give another folder, or --force "
                         "(force=True) to replace them.")
    for name in earlier:
        (out / name).unlink()


def register_files(moving, fixed, out, method: str = "bspline", moving_label=None, fixed_label=None,
                   affine: bool = True, max_voxels: int = 2**19, force: bool = False,
                   progress: Progress | None = None) -> dict:
    """Register the scan at path `moving` to the scan at path `fixed`; write the results into folder `out`.

    Files: NIfTI, NRRD, MetaImage or DICOM folders (`io.read_image`); labels: binary masks on their
    image's grid (`io.read_label`), used only to measure Dice. The moving image is resampled onto
    the fixed grid, and both onto a grid of at most `max_voxels` voxels (the fixed grid's corners
    and direction, coarser where needed; the fixed grid itself when small enough). There
    `register.affine` (`AFFINE`, skipped if not `affine`) and then the nonrigid `method` (see
    `METHODS`) run; the DDF is brought back to the fixed grid. `method="network"` is the lung CT
    network: it expects chest CTs in HU. `progress(stage, done, total, loss)` follows the steps.
    Writes `OUTPUTS` (see the module's docstring) atomically; an `out` that holds earlier results
    is refused unless `force`. Returns the report (as in `report.json`); its `overlap` is the
    fraction of the fixed grid that the moving scan covers according to the two headers (near 0:
    the headers place the scans apart, and registration cannot bridge that).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}.")
    if (moving_label is None) != (fixed_label is None):
        raise ValueError("give both labels (moving_label and fixed_label) or neither.")
    out = Path(out)
    _check_out(out, force)
    start = time.perf_counter()
    fixed_image, moving_image = io.read_image(fixed), io.read_image(moving)
    labels = None
    if moving_label is not None:
        labels = io.read_label(moving_label, like=moving_image), io.read_label(fixed_label, like=fixed_image)
    grid = _working_grid(fixed_image, max_voxels)
    pair = [resample(image if grid is fixed_image else _smoothed(image, grid), grid, outside=_minimum(image))
            for image in (moving_image, fixed_image)]

    nonrigid = ({} if method == "network" else dict(DEMONS) if method == "demons"
                else dict(transform=method, steps=inspect.signature(register.nonrigid).parameters["steps"].default))
    total = (sum(AFFINE["steps"]) if affine else 0) + (sum(nonrigid["steps"]) if nonrigid else 1)
    initial = register.affine(*pair, **AFFINE, callback=_counter(progress, "affine", 0, total)) if affine else None
    done = sum(AFFINE["steps"]) if affine else 0
    if method == "network":
        moved = pair[0] if initial is None else initial.warp(pair[0])
        ddf = _network_ddf(np.asarray(moved), pair[1], grid)
        ddf = ddf if initial is None else spatial.compose_ddf(initial.ddf, ddf)
        if progress is not None:
            progress("network", total, total, float("nan"))
    elif method == "demons":  # no `initial` option: register the affinely moved image, then compose
        moved = pair[0] if initial is None else initial.warp(pair[0])
        ddf = register.demons(moved, pair[1], **nonrigid, callback=_counter(progress, method, done, total)).ddf
        ddf = ddf if initial is None else spatial.compose_ddf(initial.ddf, ddf)
    else:
        ddf = register.nonrigid(*pair, **nonrigid, initial=initial,
                                callback=_counter(progress, method, done, total)).ddf
    shape = fixed_image.GetSize()[::-1]
    overlap = spatial.inside(spatial.warp_grid(spatial.reference_grid(grid.GetSize()[::-1]),
                                               io.voxel_affine(moving_image, grid)[None]), moving_image.GetSize()[::-1])
    folded = metrics.folding_fraction(ddf)  # on the registration grid: the fixed grid's field interpolates it
    ddf = np.asarray(ddf if grid is fixed_image else spatial.resize_ddf(ddf, shape))

    out.mkdir(parents=True, exist_ok=True)
    io.write_image(out / "warped.nii.gz", resample(moving_image, fixed_image, ddf, outside=_minimum(moving_image)),
                   fixed_image)
    io.save_ddf(out / "ddf.nii.gz", ddf, fixed_image)
    report = dict(moving=str(moving), fixed=str(fixed), method=method, affine=affine, max_voxels=max_voxels,
                  fixed_grid=list(shape), working_grid=list(grid.GetSize()[::-1]),
                  affine_options=AFFINE if affine else None, nonrigid_options=nonrigid or "lung_ct network",
                  overlap=round(float(tf.reduce_mean(overlap)), 4), folded_fraction=folded)
    if labels is not None:  # linear, >= 0.5, edges repeated: as `register.Result.warp_label` and chapter 4
        moved = resample(labels[0], fixed_image, ddf, outside=None) >= 0.5
        fixed_mask = sitk.GetArrayViewFromImage(labels[1])
        report.update(moving_label=str(moving_label), fixed_label=str(fixed_label),
                      dice_before=metrics.dice(resample(labels[0], fixed_image, outside=None) >= 0.5, fixed_mask),
                      dice_after=metrics.dice(moved, fixed_mask))
        io.write_image(out / "warped_label.nii.gz", moved.astype(np.uint8), fixed_image)
    report.update(seconds=round(time.perf_counter() - start, 2), outputs=[n for n in OUTPUTS if (out / n).exists()]
                  + ["report.json"])
    files.write_atomic(out / "report.json", json.dumps(report, indent=1) + "\n")
    return report


def warp_file(field, image, out, label: bool = False, force: bool = False) -> None:
    """Warp the image (or, with `label`, the label map, nearest neighbour) at path `image` with the
    displacement field at path `field` (`io.load_ddf`); write it to `out` on the field's grid and header.

    The image may lie on any grid: it is sampled once, at `point + field(point)`, as
    `sitk.Resample` with a `sitk.DisplacementFieldTransform` does. An existing `out` is refused
    unless `force`.
    """
    out = Path(out)
    if out.exists() and not force:
        raise ValueError(f"{out} exists; give another file, or --force (force=True) to replace it.")
    ddf, grid = io.load_ddf(field)
    moving = io.read_image(image)
    warped = resample(moving, grid, ddf, label=label, outside=0.0 if label else _minimum(moving))
    io.write_image(out, warped.astype(sitk.GetArrayViewFromImage(moving).dtype) if label else warped, grid)


def warp_points(field, points) -> np.ndarray:
    """Map physical points `[N, 3]` (mm, x, y, z, LPS) of the FIXED image to the moving image: `[N, 3]` mm.

    A pull field is defined on the fixed grid: a fixed point `p` matches the moving point
    `p + field(p)` (trilinear between voxels, zero outside the grid, as
    `sitk.DisplacementFieldTransform.TransformPoint`). Moving points cannot be mapped to the fixed
    image with it: that needs the inverse field (`spatial.invert_ddf`).
    """
    points = np.asarray(points, np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape [N, 3] (x, y, z in mm), got {points.shape}.")
    ddf, grid = io.load_ddf(field)
    coordinates = io.voxel_coordinates(points, grid)
    mm = io.ddf_to_mm(spatial.resample(ddf, coordinates[None], padding="zeros").numpy()[0], grid)
    return points + mm
