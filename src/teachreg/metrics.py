"""Evaluation metrics (NumPy in, NumPy or float out), for judging registrations, not for training.

`dice` is a score (maximised, in [0, 1]); `hausdorff_distance`, `target_registration_error`,
`landmark_error` and `folding_fraction` are errors (lower is better); `displacement_mm` maps how
far each voxel moves.
DDFs are in voxels, as in `teachreg.spatial`; errors and displacements are returned in mm using
the voxel `spacing` (mm per voxel along D, H and W).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from teachreg import _validate, spatial

__all__ = ["dice", "displacement_mm", "folding_fraction", "hausdorff_distance", "landmark_error",
           "target_registration_error"]

_DDF_SHAPE = "[D, H, W, 3] or [1, D, H, W, 3]"


def _mask(name: str, value, ranks: tuple[int, ...], expected: str) -> np.ndarray:
    """A boolean array from a boolean or 0/1 array, after `_validate`'s rank, dtype and finiteness checks."""
    array = _validate.as_float_tensor(name, value, ranks, expected).numpy()
    if not np.all((array == 0) | (array == 1)):
        raise ValueError(f"{name} must be a binary mask (boolean or 0/1 values) with shape {expected}.")
    return array == 1


def _same_shape(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}.")


def _dice(a: np.ndarray, b: np.ndarray, axis) -> np.ndarray:
    total = a.sum(axis=axis) + b.sum(axis=axis)
    overlap = np.logical_and(a, b).sum(axis=axis)
    return np.where(total > 0, 2.0 * overlap / np.maximum(total, 1), 1.0)


def dice(mask_a, mask_b) -> float:
    """Dice score `2 |A & B| / (|A| + |B|)` in [0, 1] (maximised) of two binary masks of one label.

    Masks: same shape `[..., D, H, W]`, boolean or 0/1. Two empty masks score 1.
    """
    expected = "[..., D, H, W]"
    a = _mask("mask_a", mask_a, tuple(range(3, 9)), expected)
    b = _mask("mask_b", mask_b, tuple(range(3, 9)), expected)
    _same_shape("mask_a", a, "mask_b", b)
    return float(_dice(a, b, axis=None))


def hausdorff_distance(mask_a, mask_b, spacing, percentile: float = 95.0) -> float:
    """The Hausdorff distance between the surfaces of two masks, in mm; by default its 95th percentile (HD95).

    For each surface voxel of one mask, the distance to the nearest surface voxel of the other;
    the `percentile` of those distances in each direction, and the larger of the two (as MONAI's
    `compute_hausdorff_distance`). `percentile=100` gives the Hausdorff distance itself, the
    largest gap between the outlines; the 95th percentile ignores a few stray voxels. A mask's
    surface: its voxels with a neighbour (6-connected) outside it. Masks: `[D, H, W]`, boolean or
    0/1, same shape, neither empty; spacing: mm per voxel along D, H and W.
    """
    a = _mask("mask_a", mask_a, (3,), "[D, H, W]")
    b = _mask("mask_b", mask_b, (3,), "[D, H, W]")
    _same_shape("mask_a", a, "mask_b", b)
    if not (0 <= percentile <= 100):
        raise ValueError(f"percentile must be in [0, 100], got {percentile}.")
    if not a.any() or not b.any():
        raise ValueError("hausdorff_distance needs two masks with at least one voxel each: "
                         f"mask_a has {int(a.sum())}, mask_b has {int(b.sum())}.")
    spacing = _spacing(spacing)
    surface_a, surface_b = (mask & ~ndimage.binary_erosion(mask, border_value=0) for mask in (a, b))

    def directed(surface, other):  # the percentile of the distances from `surface` to `other`, mm
        return np.percentile(ndimage.distance_transform_edt(~other, sampling=spacing)[surface], percentile)

    return float(max(directed(surface_a, surface_b), directed(surface_b, surface_a)))


def _ddf(name: str, value) -> np.ndarray:
    """A DDF `[D, H, W, 3]` (voxels) as float32 NumPy, from `[D, H, W, 3]` or `[1, D, H, W, 3]`."""
    array = _validate.as_float_tensor(name, value, (4, 5), _DDF_SHAPE, last_dim=3).numpy()
    if array.ndim == 5:
        if array.shape[0] != 1:
            raise ValueError(f"{name} must have shape {_DDF_SHAPE} (a batch of 1), got shape {array.shape}.")
        array = array[0]
    return array


def _spacing(spacing) -> np.ndarray:
    array = np.asarray(spacing, dtype=np.float64)
    if array.shape != (3,) or not np.all(np.isfinite(array)) or not np.all(array > 0):
        raise ValueError(f"spacing must be 3 positive finite numbers (mm per voxel along D, H, W), got {spacing!r}.")
    return array


def displacement_mm(ddf, spacing) -> np.ndarray:
    """The length in mm of each voxel's displacement, `[D, H, W]` (float64).

    `ddf`: `[D, H, W, 3]` or `[1, D, H, W, 3]` in voxels; `spacing`: 3 floats, mm per voxel along
    D, H and W. The error map of a DDF against the truth is `displacement_mm(ddf - ddf_true, spacing)`.
    """
    _ddf("ddf", ddf)  # checks the shape and values
    array = np.asarray(ddf, np.float64)
    return np.linalg.norm((array[0] if array.ndim == 5 else array) * _spacing(spacing), axis=-1)


def target_registration_error(ddf, ddf_true, spacing, mask=None) -> float:
    """Mean Euclidean distance in mm between two DDFs `[D, H, W, 3]` or `[1, D, H, W, 3]` (voxels).

    `spacing`: 3 floats, mm per voxel along D, H and W. With `mask` (boolean or 0/1, `[D, H, W]`),
    the mean is over the voxels inside the mask only.
    """
    ddf = _ddf("ddf", ddf)
    ddf_true = _ddf("ddf_true", ddf_true)
    _same_shape("ddf", ddf, "ddf_true", ddf_true)
    errors = np.linalg.norm((ddf.astype(np.float64) - ddf_true) * _spacing(spacing), axis=-1)
    if mask is not None:
        m = _mask("mask", mask, (3,), "[D, H, W]")
        _same_shape("mask", m, "the DDFs' spatial shape", errors)
        if not m.any():
            raise ValueError("mask selects no voxel; the error would be undefined.")
        errors = errors[m]
    return float(errors.mean())


def landmark_error(fixed_points, moving_points, ddf, spacing) -> np.ndarray:
    """Per-landmark target registration error in mm, `[N]`.

    `fixed_points` and `moving_points` are `[N, 3]` voxel coordinates (d, h, w) of corresponding
    landmarks. Each fixed point `p` is mapped to `p + ddf(p)`, the DDF `[D, H, W, 3]` or
    `[1, D, H, W, 3]` (voxels) being interpolated trilinearly at `p` (edge values repeated outside
    the volume), and compared with its moving point; `spacing` (3 floats, mm per voxel) turns
    voxels into mm.
    """
    fixed = _validate.as_float_tensor("fixed_points", fixed_points, (2,), "[N, 3]", last_dim=3).numpy()
    moving = _validate.as_float_tensor("moving_points", moving_points, (2,), "[N, 3]", last_dim=3).numpy()
    _same_shape("fixed_points", fixed, "moving_points", moving)
    ddf = _ddf("ddf", ddf)
    displacement = spatial.resample(ddf[None], fixed[None]).numpy()[0]  # [N, 3]
    error = (fixed.astype(np.float64) + displacement - moving) * _spacing(spacing)
    return np.linalg.norm(error, axis=-1)


def folding_fraction(ddf) -> float:
    """Fraction in [0, 1] of voxels where the Jacobian determinant of `x + ddf(x)` is <= 0 (folding).

    `ddf`: `[D, H, W, 3]` or `[batch, D, H, W, 3]` in voxels; the fraction is over all voxels of the
    batch. Derivatives as `spatial.jacobian_determinant`.
    """
    array = _validate.as_float_tensor("ddf", ddf, (4, 5), "[D, H, W, 3] or [batch, D, H, W, 3]", last_dim=3)
    if array.shape.rank == 4:
        array = array[None]
    return float(np.mean(spatial.jacobian_determinant(array).numpy() <= 0))
