"""A paired chest-CT dataset with real breathing motion and a known ground truth.

No public pair of one patient's chest CT at two breathing states could be mirrored, so every
pair is built from real parts (`build`, or `teachreg data build-lung`):

1. A real chest CT (one breathing state of one patient) in HU, and its lungs: the real mask where
   there is one (Learn2Reg case_001, CIP ct-64), else segmented (`segment_lungs`); a CT whose
   lungs are not those of an adult chest CT (`check_lungs`: volume, density) is refused.
2. A real breathing motion (`MOTIONS`, `patient_motions`): the displacement between one
   Learn2Reg or DIR-Lab COPD patient's expiration and inspiration lung masks, found by
   registering the masks with `teachreg.register.nonrigid`
   (Dice and SSD of the masks, bending energy, cubic B-spline, on the grid halved) in both
   directions (`estimate_motion`), with the keypoint correspondences inside the lungs where
   there are some (the point term, `POINT_WEIGHT`: the masks alone say nothing about the motion
   inside the lungs); without masks (DIR-Lab 4D-CT), the thin-plate spline through landmark
   pairs (`landmark_motion`). The scans are not aligned beforehand, so the displacement
   also holds any change in the patient's position between them.
3. The motion is carried to the CT by the affine map that matches the lungs' bounding boxes, and
   the CT is warped with it into the other breathing state; inside the lungs its density is
   scaled by the local volume change (mass preservation: tissue is denser at expiration), and
   its lung mask is warped with nearest-neighbour interpolation (`make_pair`).

Conventions, as Learn2Reg and DeepReg's `paired_ct_lung` demo: moving = expiration, fixed =
inspiration. The DDF `u` is float32 `[D, H, W, 3]` in voxels on the fixed grid, components
in (z, y, x) order, and `fixed(x) = moving(x + u(x))` (`teachreg.spatial`'s convention).
A CT at expiration is the moving image and the fixed one is it warped with `u`: `u` is
exact. A CT at inspiration is the fixed image, the moving one is it warped with the
inspiration-to-expiration motion `w`, and `u` is `w`'s inverse, solved to 0.01 voxel (`spatial.invert_ddf`).
Both images of a pair are sampled once from the original CT (Gaussian anti-aliasing, trilinear),
so `warp(moving, u)` matches `fixed` to interpolation error, outside the lungs, and inside
them once the density scaling is undone.

Breathing states: Learn2Reg case_001's CT is at expiration; TCIA 4D-Lung 0103 phase 5 is ASSUMED
to be end-expiration (the 50 % phase of its 4D-CT); the CIP, CPTAC and ITKElastix CTs are
diagnostic scans ASSUMED to be at full-inspiration breath-hold.

Several Learn2Reg expiration scans do not cover the whole lungs (case 1 loses about 4 cm at the
base and 2 cm at the apex). Where a mask's first or last slice is wider than `CUT_FRACTION` of
its widest slice, the scan's field of view cut it there; both masks are then cut at that plane
before registering, so that the missing lung does not distort the motion.

Split by patient and by motion: the test CTs (Learn2Reg case_001, ITKElastix) and test motions
(Learn2Reg cases 1, 11, 12, COPD cases 1 and 2, 4D-CT cases 1 and 6) never appear in training;
Lung-PET-CT-Dx A0002 is in no split (its 8 mm slices are too coarse, `MAX_Z_SPACING`). Every CT
takes every motion of its split that starts at its breathing state, except a landmark motion whose
landmarks miss the CT's lungs once mapped (`landmarks_inside`; case_001's scan misses the lung base
and apex), and a patient whose motions cannot be fitted is left out (both are recorded).
case_001's CT with its own motion is a test pair, and `build.json` gives the Dice of its warped
expiration mask with its real inspiration mask. Each split's content depends only on the parameters and `seed`, not on which
splits are built, so `build(splits=("test",))` alone is fast. Training pairs may instead be drawn
afresh for every epoch (`draw_pairs`; the training config's `data.draw`): a training CT with a
training motion of its breathing state (`split_parts`), the motion varied in amplitude and by a
smooth random perturbation (`vary_motion`) and carried by `make_pair` on a randomly shifted grid,
so that the DDF stays exact. The test split stays the fixed set that `build` writes.

Every CT goes on one grid of `grid` voxels (z, y, x) of `spacing` mm, by default
`presets.LUNG_GRID` and `presets.LUNG_SPACING`, 104 x 96 x 96 voxels of 3.5 x 2.5 x 3.5 mm:
half the Learn2Reg grid (208 x 192 x 192 of 1.75 x 1.25 x 1.75 mm), same field of view. It is centred on the lungs, shifted by a seeded
random offset of up to `JITTER_MM` per axis per pair (the only random choice), and the
field of view must hold the lungs.

Layout under `root`: each split in DeepReg's paired layout (`teachreg.data.paired`: images in
HU, lung masks, the DDF `u`; written by `write_pair`, read by `load_paired`; the same
parameters give byte-identical files), and::

    {train,test}/.teachreg-split  marks a split `build` made
                                  (and may replace)
    build.json                    per split: its parameters (seed
                                  included), per-motion and per-pair
                                  statistics (mask Dice, mm, sources),
                                  "skipped": the patients whose
                                  motions cannot be fitted and the
                                  CT and landmark-motion couples
                                  left out, with the reasons;
                                  "parameters": the last split's
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import measure
from tqdm.auto import tqdm

from teachreg import landmarks, metrics, presets, register, spatial
from teachreg.data import DataError, Pair, Volume, data_dir, load, write_pair
from teachreg.data.loaders import read_keypoints, read_landmarks, read_nifti, read_volume
from teachreg.files import write_atomic

__all__ = [
    "JITTER_MM", "CUT_FRACTION", "HU_AIR", "LUNG_LITRES", "LUNG_HU", "MARKER", "VERSION",
    "REGISTRATION", "REGULARISER_WEIGHTS", "CTS", "MOTIONS", "Source", "Motion",
    "HELD_OUT", "POINT_WEIGHT", "POINT_REGULARISER_WEIGHTS", "MAX_HELD_OUT_MM", "INSIDE_FRACTION", "MAX_Z_SPACING", "LANDMARK_MARGIN_MM",
    "segment_lungs", "prepare_ct", "check_lungs", "estimate_motion", "landmark_motion", "breathing_motions",
    "landmarks_inside", "patient_name", "patient_motions", "make_pair", "build", "AMPLITUDE", "PERTURBATION_MM", "PERTURBATION_SIGMA_MM", "FOLD_RETRIES", "split_parts",
    "vary_motion", "draw_pairs",
]

JITTER_MM = 7.0
CUT_FRACTION = 0.01
HU_AIR = -1000.0
# A chest CT's lungs, as `check_lungs` accepts them: litres, and their mean density in HU.
LUNG_LITRES = (1.5, 12.0)
LUNG_HU = (-975.0, -400.0)
MARKER = ".teachreg-split"  # in every split folder `build` made: it replaces no other folder
VERSION = 5  # bump when the output changes, so that cached builds are redone
# Mask registration: on the grid halved, then the DDF resized to the grid; the bending energy's
# weights are tried in turn until the displacement does not fold.
REGISTRATION = dict(loss="ssd", regulariser="bending", label_weight=1.0, transform="bspline", grid_spacing=2.0,
                    levels=2, steps=(100, 200), learning_rate=0.2, crop=1.0)
REGULARISER_WEIGHTS = (1.0, 2.0, 4.0)
# Motions with point pairs (keypoints, landmarks): the point term's weight (squared voxels of the
# halved grid), the fraction of the points held out of the fit to measure it (seeded split), the
# largest mean held-out error (mm) a motion may keep, and the fraction of points that must lie
# inside the lungs of their own state (keypoints) or of the CT once mapped onto it (landmarks).
POINT_WEIGHT = 0.2
POINT_REGULARISER_WEIGHTS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # as REGULARISER_WEIGHTS, for fits with points
HELD_OUT = 0.2
MAX_HELD_OUT_MM = 5.0
INSIDE_FRACTION = 0.9
# A CT's slices may be at most this many times the grid's z spacing apart.
MAX_Z_SPACING = 2.0
# Landmarks lie inside the lungs, not on their boundary: their bounding box grown by this margin
# (mm, z, y, x) stands for the lungs' (about that of corrField keypoints in Learn2Reg case 1's masks).
LANDMARK_MARGIN_MM = (30.0, 4.0, 14.0)
# Training pairs drawn afresh (`draw_pairs`): a motion's DDF is scaled by a factor drawn in
# AMPLITUDE, plus a random smooth field (white noise in the lungs smoothed by a Gaussian of
# PERTURBATION_SIGMA_MM) whose largest displacement is drawn in [0, PERTURBATION_MM] mm. A variant
# that folds is moved halfway back to the motion, at most FOLD_RETRIES times: some motions fold
# when scaled by little more than 1 (the mask registration keeps the least regularised fit that
# does not fold).
AMPLITUDE = (0.5, 1.5)
PERTURBATION_MM = 4.0
PERTURBATION_SIGMA_MM = 20.0
FOLD_RETRIES = 10

# Real CTs: (name, loader, breathing state, split).
CTS = (
    ("l2r_case001", lambda: load("chest_ct_l2r_case001"), "expiration", "test"),
    ("itkelastix", lambda: load("chest_ct_itkelastix"), "inspiration", "test"),
    ("dynagan_0103", lambda: load("chest_ct_dynagan_0103"), "expiration", "train"),
    ("cptac", lambda: load("chest_ct_cptac"), "inspiration", "train"),
    ("cip_ct64", lambda: load("chest_ct_cip")[0], "inspiration", "train"),
    ("cip_testinput", lambda: load("chest_ct_cip")[1], "inspiration", "train"),
    ("lidc_0314", lambda: load("chest_ct_lidc_0314"), "inspiration", "train"),
    ("lungdx_a0001", lambda: load("chest_ct_lungdx_a0001"), "inspiration", "train"),
)
# The patients whose breathing gives the motions, per dataset split: ("l2r", (mask split, case)) a
# Learn2Reg patient (lung masks and corrField keypoints), ("copd", case) a DIR-Lab COPD patient
# (masks and keypoints), ("dirlab4dct", case) a DIR-Lab 4D-CT patient (landmarks, no masks).
MOTIONS = {
    "test": (("l2r", ("train", 1)), ("l2r", ("test", 11)), ("l2r", ("test", 12)), ("copd", 1), ("copd", 2),
             ("dirlab4dct", 1), ("dirlab4dct", 6)),
    "train": (tuple(("l2r", ("train", c)) for c in (2, 3, 4, 5, 6, 7, 9, 10, 13, 14, 15, 16, 17, 18, 19))
              + tuple(("copd", c) for c in range(3, 11)) + tuple(("dirlab4dct", c) for c in (2, 3, 4, 5, 7, 8, 9))),
}


@dataclass
class Source:
    """A real CT ready to be sampled: image float32 HU `[z, y, x]` (anti-aliased for the grid),
    lung float32 0/1 on its own voxel grid, spacings and the lungs' bounding box in mm
    (voxel i of either array lies at i * spacing mm)."""

    name: str
    state: str
    image: np.ndarray
    spacing: np.ndarray
    lung: np.ndarray
    lung_spacing: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


@dataclass
class Motion:
    """A breathing motion from state `source` on a grid in its masks' frame: `ddf` float32
    `[D, H, W, 3]` (voxels) maps the other state's mask to the source state's; `origin` is voxel 0
    in mm, `lo`/`hi` the source mask's bounding box in mm, `target_lung` the other mask on the grid
    (None without masks). `points`: a landmark motion's source-state landmarks `[N, 3]` in mm of
    that frame, checked against a CT's lungs once mapped onto it (`make_pair`); else None."""

    name: str
    source: str
    ddf: np.ndarray
    origin: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    target_lung: np.ndarray | None
    stats: dict = field(default_factory=dict)
    points: np.ndarray | None = None


def _bbox_mm(mask: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.nonzero(mask > 0.5)
    return np.array([i.min() for i in idx]) * spacing, np.array([i.max() for i in idx]) * spacing


def _sample(volume: np.ndarray, spacing, points_mm: np.ndarray, order: int = 1, cval: float = 0.0,
            mode: str = "constant") -> np.ndarray:
    """`volume` (voxel i at i * spacing mm) at `points_mm` `[..., 3]`: float32 `[...]`."""
    coords = np.moveaxis(points_mm / np.asarray(spacing), -1, 0)
    return ndimage.map_coordinates(volume, coords, order=order, mode=mode, cval=cval, output=np.float32)


def _grid_mm(origin: np.ndarray, grid, spacing) -> np.ndarray:
    """The points `[D, H, W, 3]` (mm) of a grid of `grid` voxels of `spacing` starting at `origin`."""
    axes = [origin[i] + np.arange(grid[i]) * spacing[i] for i in range(3)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def _check_fits(lo: np.ndarray, hi: np.ndarray, name: str, grid, spacing) -> None:
    """Raise DataError naming `name` if a bounding box (mm) is longer than the grid's field of view."""
    extent = np.asarray(grid) * np.asarray(spacing)
    if np.any(hi - lo > extent):
        lungs, grid_mm = (" x ".join(f"{x:.0f}" for x in v) for v in (hi - lo, extent))
        raise DataError(f"{name}: the lungs ({lungs} mm, z, y, x) do not fit in the grid ({grid_mm} mm); "
                        "use a larger grid or spacing")


def segment_lungs(image: np.ndarray, spacing, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Lungs of a CT `image` `[z, y, x]` (HU): float32 0/1 mask on the CT strided to about 2 mm, and its spacing.

    Air (below -400 HU) inside the body (above -500 HU, largest component, holes filled slice by
    slice), its largest one or two components, closed and hole-filled. Raises DataError naming
    `name` if the result is not a plausible pair of lungs (0.5 to 12 litres).
    """
    step = np.maximum(1, np.round(2.0 / np.asarray(spacing))).astype(int)
    small = ndimage.gaussian_filter(image, np.where(step > 1, step / 2, 0))[:: step[0], :: step[1], :: step[2]]
    mask_spacing = step * np.asarray(spacing)
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    body = _largest(small > -500, 1)
    body = ndimage.binary_fill_holes(body, structure=in_plane)
    lung = _largest((small < -400) & body, 2)
    lung = ndimage.binary_fill_holes(ndimage.binary_closing(lung, iterations=2))
    litres = lung.sum() * np.prod(mask_spacing) / 1e6
    if not 0.5 <= litres <= 12:
        raise DataError(f"{name}: no lungs found (air inside the body: {litres:.2f} L, expected 0.5-12 L)")
    return lung.astype(np.float32), mask_spacing


def _largest(mask: np.ndarray, count: int) -> np.ndarray:
    """The `count` largest connected components of `mask` (those at least 10 % of the largest)."""
    labels = measure.label(mask, connectivity=1)
    sizes = np.bincount(labels.ravel())[1:]
    if sizes.size == 0:
        return np.zeros_like(mask)
    order = np.argsort(sizes)[::-1][:count]
    keep = [i + 1 for i in order if sizes[i] >= 0.1 * sizes[order[0]]]
    return np.isin(labels, keep)


def prepare_ct(volume: Volume, state: str, name: str, spacing=presets.LUNG_SPACING) -> Source:
    """A CT Volume (HU) at breathing `state` made ready to be sampled on grids of `spacing` mm.

    Its first label is taken as the lungs if it has labels, else they are segmented. Raises
    DataError naming `name` if its slices are more than `MAX_Z_SPACING` times the grid's z spacing apart.
    """
    s = np.asarray(volume.spacing, np.float64)
    if s[0] > MAX_Z_SPACING * spacing[0]:
        raise DataError(f"{name}: its slices are {s[0]:.2f} mm apart, too coarse along z for a grid of {spacing[0]:g} mm "
                        f"(at most {MAX_Z_SPACING:g} x {spacing[0]:g} mm); give a CT with thinner slices")
    image = np.asarray(volume.image, np.float32)
    if volume.labels is not None:
        lung, lung_spacing = volume.labels[..., 0].astype(np.float32), s
        if lung.sum() == 0:
            raise DataError(f"{name}: its lung mask is empty")
    else:
        lung, lung_spacing = segment_lungs(image, s, name)
    factor = np.asarray(spacing) / s
    image = ndimage.gaussian_filter(image, np.where(factor > 1, factor / 2, 0), mode="nearest")
    lo, hi = _bbox_mm(lung, lung_spacing)
    return Source(name, state, image, s, lung, lung_spacing, lo, hi)


def check_lungs(source: Source, where: str) -> tuple[float, float]:
    """The volume (litres) and mean density (HU) of a prepared CT's lungs; raises DataError naming
    `where` unless they are in `LUNG_LITRES` and `LUNG_HU`, as for an adult chest CT that holds
    both lungs (a head-and-neck CT shows only their apices, a mask off the lungs holds tissue)."""
    voxels = np.argwhere(source.lung > 0.5)
    litres = float(len(voxels) * np.prod(source.lung_spacing) / 1e6)
    hu = float(_sample(source.image, source.spacing, voxels * source.lung_spacing).mean())
    if not (LUNG_LITRES[0] <= litres <= LUNG_LITRES[1] and LUNG_HU[0] <= hu <= LUNG_HU[1]):
        raise DataError(f"{where}: no plausible lungs: {litres:.2f} L at a mean {hu:.0f} HU, expected "
                        f"{LUNG_LITRES[0]:g}-{LUNG_LITRES[1]:g} L at {LUNG_HU[0]:.0f} to {LUNG_HU[1]:.0f} HU; "
                        "give a chest CT in HU that holds both lungs")
    return litres, hu


def _field_of_view_cut(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """The slices `[z0, z1]` that both masks `[z, y, x]` cover: where a mask's end slice is wider than
    `CUT_FRACTION` of its widest, the scan's field of view cut the lungs there."""
    z0, z1 = 0, a.shape[0] - 1
    for mask in (a, b):
        area = mask.sum(axis=(1, 2))
        z = np.nonzero(area)[0]
        if area[z[0]] > CUT_FRACTION * area.max():
            z0 = max(z0, z[0])
        if area[z[-1]] > CUT_FRACTION * area.max():
            z1 = min(z1, z[-1])
    return int(z0), int(z1)


def _held_out_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (held out, fitted) of `n` point pairs: `HELD_OUT` of them, drawn by a seeded generator."""
    order = np.random.default_rng(0).permutation(n)
    held = max(1, round(HELD_OUT * n))
    return order[:held], order[held:]


def _point_error(ddf: np.ndarray, target: np.ndarray, source: np.ndarray, spacing) -> np.ndarray:
    """The distance in mm between `target + ddf(target)` and `source` (points `[N, 3]` in voxels of
    the DDF's grid, `ddf` `[D, H, W, 3]` voxels sampled trilinearly): `[N]`."""
    moved = target + np.stack([_sample(ddf[..., i], 1.0, target, mode="nearest") for i in range(3)], -1)
    return np.linalg.norm((moved - source) * np.asarray(spacing), axis=-1)


def _summary_mm(values: np.ndarray, prefix: str) -> dict:
    return {f"{prefix}_mean": round(float(values.mean()), 2), f"{prefix}_median": round(float(np.median(values)), 2),
            f"{prefix}_p90": round(float(np.percentile(values, 90)), 2)}


def estimate_motion(source_mask: Volume, target_mask: Volume, name: str, source: str,
                    grid=presets.LUNG_GRID, spacing=presets.LUNG_SPACING, pairs=None) -> Motion:
    """Register a patient's lung mask at breathing state `source` onto the one at the other state.

    Masks: Volumes on one voxel grid (labels `[..., 0]` used). Both are cut to their common field of
    view, sampled on a grid of `grid` voxels of `spacing` mm centred on their lungs, halved,
    and registered with `register.nonrigid` (`REGISTRATION`, with the first weight of
    `REGULARISER_WEIGHTS` whose displacement does not fold, `POINT_REGULARISER_WEIGHTS` with
    pairs); the DDF is resized to the grid.
    pairs: optional (source-state points, target-state points), `[N, 3]` voxels (z, y, x) of the
    masks' grid, row n the same piece of lung (corrField keypoints): the pairs within the kept
    slices drive the fit too (`POINT_WEIGHT`), except the `HELD_OUT` fraction, which measures it.
    `stats`: mask Dice before and after, displacement in mm inside the target lungs (mean, 95th
    percentile, max), the slices kept, the weight, the seconds; with points, their counts and the
    held-out pairs' error and initial distance in mm (mean, median, 90th percentile). Raises
    DataError, naming the motion, if a mask is empty, the masks' grids differ, the lungs do not fit
    in the grid, the motion folds, fewer than `INSIDE_FRACTION` of either state's points lie inside
    its mask, or the held-out error's mean exceeds `MAX_HELD_OUT_MM`.
    """
    start = time.perf_counter()
    s = np.asarray(source_mask.spacing, np.float64)
    a, b = source_mask.labels[..., 0] > 0, target_mask.labels[..., 0] > 0
    if a.shape != b.shape or not np.allclose(s, target_mask.spacing):
        raise DataError(f"motion {name}: the two masks must share one voxel grid, got {a.shape} at "
                        f"{tuple(s)} mm and {b.shape} at {target_mask.spacing} mm")
    if not (a.any() and b.any()):
        raise DataError(f"motion {name}: a lung mask is empty")
    z0, z1 = _field_of_view_cut(a, b)
    if pairs is not None:
        pairs = [np.asarray(p, np.float64) for p in pairs]
        other = "inspiration" if source == "expiration" else "expiration"
        for state, mask, p in ((source, a, pairs[0]), (other, b, pairs[1])):
            voxels = np.clip(np.round(p).astype(int), 0, np.asarray(a.shape) - 1)
            inside = float(mask[tuple(voxels.T)].mean())
            if inside < INSIDE_FRACTION:
                raise DataError(f"motion {name}: only {inside:.0%} of the {state} keypoints lie inside the {state} "
                                f"lung mask (at least {INSIDE_FRACTION:.0%} expected); are the keypoints' states "
                                "swapped, or on another grid than the masks?")
        # Pairs beyond the field-of-view cut would pull where the cut masks hold no lung.
        kept = np.all([(p[:, 0] >= z0) & (p[:, 0] <= z1) for p in pairs], axis=0)
        pairs = [p[kept] for p in pairs]
        if kept.sum() < 10:
            raise DataError(f"motion {name}: {kept.sum()} keypoint pairs within the slices both masks cover, "
                            "at least 10 needed")
    a, b = a.astype(np.float32), b.astype(np.float32)
    for mask in (a, b):
        mask[:z0], mask[z1 + 1:] = 0, 0
    lo = np.minimum(*(_bbox_mm(m, s)[0] for m in (a, b)))
    hi = np.maximum(*(_bbox_mm(m, s)[1] for m in (a, b)))
    _check_fits(lo, hi, f"motion {name}", grid, spacing)
    origin = (lo + hi) / 2 - (np.asarray(grid) - 1) / 2 * np.asarray(spacing)
    points = _grid_mm(origin, grid, spacing)
    moving, fixed = _sample(a, s, points), _sample(b, s, points)
    coarse = [spatial.downsample(x[None]).numpy()[0] for x in (moving, fixed)]
    point_options = {}
    if pairs is not None:  # as grid voxels, then as voxels of the halved grid
        source_points, target_points = ((p * s - origin) / np.asarray(spacing) for p in pairs)
        # a keypoint at the lungs' very edge may fall a fraction of a voxel outside the grid
        on_grid = np.all([(p >= 0) & (p <= np.asarray(grid) - 1) for p in (source_points, target_points)],
                         axis=(0, 2))
        source_points, target_points = source_points[on_grid], target_points[on_grid]
        held, fitted = _held_out_split(len(target_points))
        to_coarse = (np.asarray(coarse[0].shape) - 1) / (np.asarray(grid) - 1)
        point_options = dict(fixed_points=target_points[fitted] * to_coarse,
                             moving_points=source_points[fitted] * to_coarse, point_weight=POINT_WEIGHT)
    weights = REGULARISER_WEIGHTS if pairs is None else POINT_REGULARISER_WEIGHTS
    for weight in weights:
        try:
            result = register.nonrigid(coarse[0], coarse[1], moving_label=coarse[0], fixed_label=coarse[1],
                                       regulariser_weight=weight, **REGISTRATION, **point_options)
        except ValueError as err:  # points outside the grid
            raise DataError(f"motion {name}: {err}") from err
        ddf = spatial.resize_ddf(result.ddf, grid).numpy()[0]
        folding = metrics.folding_fraction(ddf)
        if folding == 0:
            break
    else:
        raise DataError(f"motion {name}: the registered displacement folds ({folding:.2e} of the voxels) "
                        f"with every regulariser weight in {weights}")
    warped = spatial.warp(moving[None], ddf[None]).numpy()[0]
    magnitude = np.linalg.norm(ddf * np.asarray(spacing), axis=-1)[fixed > 0.5]
    stats = dict(
        dice_before=round(metrics.dice(moving > 0.5, fixed > 0.5), 4),
        dice=round(metrics.dice(warped > 0.5, fixed > 0.5), 4),
        mm_mean=round(float(magnitude.mean()), 2),
        mm_p95=round(float(np.percentile(magnitude, 95)), 2),
        mm_max=round(float(magnitude.max()), 2),
        field_of_view_slices=[z0, z1],
        regulariser_weight=weight,
    )
    if pairs is not None:
        error = _point_error(ddf, target_points[held], source_points[held], spacing)
        initial = np.linalg.norm((target_points[held] - source_points[held]) * np.asarray(spacing), axis=-1)
        stats.update(points_fitted=len(fitted), points_held_out=len(held), **_summary_mm(error, "held_out_mm"),
                     **_summary_mm(initial, "initial_mm"))
        if error.mean() > MAX_HELD_OUT_MM:
            raise DataError(f"motion {name}: the fitted motion misses the held-out keypoints by {error.mean():.1f} mm "
                            f"on average (initially {initial.mean():.1f} mm; at most {MAX_HELD_OUT_MM:g} mm accepted)")
    stats["seconds"] = round(time.perf_counter() - start, 1)
    src_lo, src_hi = _bbox_mm(a, s)
    return Motion(name, source, ddf, origin, src_lo, src_hi, fixed > 0.5, stats)


def landmark_motion(source_points, target_points, landmark_spacing, name: str, source: str,
                    grid=presets.LUNG_GRID, spacing=presets.LUNG_SPACING) -> Motion:
    """A breathing motion from state `source` without masks: the thin-plate spline through landmark pairs.

    source_points, target_points: `[N, 3]` voxels (z, y, x) of a grid of `landmark_spacing` mm
    (z, y, x), row n one landmark at `source` and at the other state (DIR-Lab 4D-CT). The lungs'
    bounding box is the target landmarks' grown by `LANDMARK_MARGIN_MM`; the spline
    (`landmarks.tps_displacement`, fitted in mm) maps each grid point at the other state to its
    place at `source`. `stats`: the held-out error (`HELD_OUT` of the pairs left out of a
    second fit) and initial distance in mm, the displacement in mm inside the box's ellipsoid,
    the folded fraction, the seconds. Raises DataError naming the motion if the points are not
    usable pairs, the box does not fit in the grid, the spline folds, or the held-out error's
    mean exceeds `MAX_HELD_OUT_MM`.
    """
    start = time.perf_counter()
    s = np.asarray(landmark_spacing, np.float64)
    try:
        source_mm, target_mm = (landmarks._points(n, p) * s for n, p in (("source", source_points),
                                                                          ("target", target_points)))
        if source_mm.shape != target_mm.shape:
            raise ValueError(f"{len(source_mm)} and {len(target_mm)} landmarks do not pair up")
        held, fitted = _held_out_split(len(target_mm))
        predicted = target_mm[held] + landmarks.tps_displacement(target_mm[fitted], source_mm[fitted], target_mm[held])
    except ValueError as err:
        raise DataError(f"motion {name}: {err}") from err
    error = np.linalg.norm(predicted - source_mm[held], axis=-1)
    initial = np.linalg.norm(target_mm[held] - source_mm[held], axis=-1)
    if error.mean() > MAX_HELD_OUT_MM:
        raise DataError(f"motion {name}: a thin-plate spline through the other landmarks misses the held-out ones by "
                        f"{error.mean():.1f} mm on average (at most {MAX_HELD_OUT_MM:g} mm accepted)")
    margin = np.asarray(LANDMARK_MARGIN_MM)
    lo, hi = target_mm.min(axis=0) - margin, target_mm.max(axis=0) + margin
    _check_fits(lo, hi, f"motion {name}", grid, spacing)
    origin = (lo + hi) / 2 - (np.asarray(grid) - 1) / 2 * np.asarray(spacing)
    points = _grid_mm(origin, grid, spacing).reshape(-1, 3)
    ddf = (landmarks.tps_displacement(target_mm, source_mm, points) / np.asarray(spacing))
    ddf = ddf.reshape(*grid, 3).astype(np.float32)
    folding = metrics.folding_fraction(ddf)
    if folding > 0:
        raise DataError(f"motion {name}: the thin-plate spline through the landmarks folds ({folding:.2e} of the voxels)")
    in_lungs = np.sum(((points - (lo + hi) / 2) / ((hi - lo) / 2)) ** 2, axis=-1).reshape(grid) <= 1
    magnitude = np.linalg.norm(ddf * np.asarray(spacing), axis=-1)[in_lungs]
    stats = dict(points_fitted=len(fitted), points_held_out=len(held), **_summary_mm(error, "held_out_mm"),
                 **_summary_mm(initial, "initial_mm"), mm_mean=round(float(magnitude.mean()), 2),
                 mm_p95=round(float(np.percentile(magnitude, 95)), 2), folding_fraction=folding,
                 seconds=round(time.perf_counter() - start, 1))
    src_lo, src_hi = source_mm.min(axis=0) - margin, source_mm.max(axis=0) + margin
    return Motion(name, source, ddf, origin, src_lo, src_hi, None, stats, points=source_mm)


def breathing_motions(masks: Pair, name: str, states=("expiration", "inspiration"), grid=presets.LUNG_GRID,
                      spacing=presets.LUNG_SPACING, points=None) -> list[Motion]:
    """One patient's motions (`estimate_motion`) from its lung masks, `masks.moving` at
    expiration and `masks.fixed` at inspiration: one from each of `states` to the other,
    named `{name}_exp2ins` and `{name}_ins2exp`. points: optional keypoints (inspiration,
    expiration) `[N, 3]` voxels (z, y, x) on the masks' grid, as `data.read_keypoints` gives them."""
    volumes = {"expiration": masks.moving, "inspiration": masks.fixed}
    other = {"expiration": "inspiration", "inspiration": "expiration"}
    by_state = None if points is None else {"inspiration": points[0], "expiration": points[1]}
    return [estimate_motion(volumes[state], volumes[other[state]], f"{name}_{state[:3]}2{other[state][:3]}",
                            state, grid, spacing,
                            pairs=None if points is None else (by_state[state], by_state[other[state]]))
            for state in states]


def _jacobian(ddf: np.ndarray) -> np.ndarray:
    return spatial.jacobian_determinant(ddf[None]).numpy()[0]


def _invert(ddf: np.ndarray, name: str) -> tuple[np.ndarray, float]:
    """The inverse of a DDF `[D, H, W, 3]` (voxels) to 0.01 voxel (`spatial.invert_ddf`) and its
    largest residual (voxels); DataError naming the pair `name` if it does not converge."""
    try:
        inverse, residual = spatial.invert_ddf(ddf[None], tolerance=0.01)
    except ValueError as err:
        raise DataError(f"{name}: {err}") from err
    return inverse.numpy()[0], residual


def landmarks_inside(source: Source, motion: Motion) -> float:
    """The fraction of a landmark motion's source-state landmarks that fall inside the lungs of CT
    `source` once mapped onto it by the affine map between their lungs' bounding boxes (as
    `make_pair` carries the motion); 1.0 for a motion without landmarks."""
    if motion.points is None:
        return 1.0
    scale = (motion.hi - motion.lo) / np.maximum(source.hi - source.lo, 1e-6)
    return float(_sample(source.lung, source.lung_spacing, source.lo + (motion.points - motion.lo) / scale,
                         order=0).mean())


def make_pair(source: Source, motion: Motion, name: str, grid=presets.LUNG_GRID, spacing=presets.LUNG_SPACING,
              shift=(0.0, 0.0, 0.0)) -> tuple[Pair, dict]:
    """Carry `motion` to the CT `source` and build pair `name` on a grid centred on its lungs.

    The grid is moved by `shift` (in [-1, 1] per axis) times the margin around the lungs, at
    most `JITTER_MM`. Returns the Pair `name`, as `load_paired` reads it once written
    (images float32 `[D, H, W]` in HU rounded to integers, as stored; labels uint8 `[D, H, W, 1]`
    = (lung,); `ddf` float32 `[D, H, W, 3]`, voxels), and statistics. Raises DataError, naming
    the case, if the lungs do not fit in the grid or the carried motion folds."""
    if motion.source != source.state:
        raise ValueError(f"{name}: motion {motion.name} starts at {motion.source}, the CT is at {source.state}")
    grid, spacing = tuple(grid), np.asarray(spacing, np.float64)
    _check_fits(source.lo, source.hi, f"{name} (CT {source.name})", grid, spacing)
    extent = (np.asarray(grid) - 1) * spacing
    jitter = np.asarray(shift) * np.clip((extent - source.hi + source.lo) / 2 - spacing, 0, JITTER_MM)
    origin = (source.lo + source.hi) / 2 + jitter - extent / 2
    points = _grid_mm(origin, grid, spacing)
    scale = (motion.hi - motion.lo) / np.maximum(source.hi - source.lo, 1e-6)
    in_motion = (motion.lo + (points - source.lo) * scale - motion.origin) / spacing  # motion voxels
    if motion.points is not None:  # landmarks mapped onto the CT must lie in its lungs
        inside = landmarks_inside(source, motion)
        if inside < INSIDE_FRACTION:
            raise DataError(f"{name}: only {inside:.0%} of motion {motion.name}'s landmarks fall inside the lungs of "
                            f"CT {source.name} once mapped onto it (at least {INSIDE_FRACTION:.0%} expected); check "
                            "the landmark spacing and the CT's lung mask")
    ddf = np.stack([_sample(motion.ddf[..., i], 1.0, in_motion, mode="nearest") for i in range(3)], -1) / scale
    ddf = (np.round(ddf * 256) / 256).astype(np.float32)  # exact in float32, compresses well
    folding = metrics.folding_fraction(ddf)
    if folding > 0:
        raise DataError(f"{name}: motion {motion.name} folds on CT {source.name} ({folding:.2e} of the voxels)")
    real = _sample(source.image, source.spacing, points, cval=HU_AIR)
    real_lung = _sample(source.lung, source.lung_spacing, points) > 0.5
    warped_points = points + ddf * spacing
    warped = _sample(source.image, source.spacing, warped_points, cval=HU_AIR)
    weight = _sample(source.lung, source.lung_spacing, warped_points)
    density = (warped - HU_AIR) * (1 + weight * (_jacobian(ddf) - 1)) + HU_AIR  # mass preservation
    warped = np.minimum(density, np.maximum(warped, 50.0))  # never denser than soft tissue
    voxels = np.moveaxis(np.indices(grid, np.float32), 0, -1) + ddf
    warped_lung = _sample(real_lung.astype(np.float32), 1.0, voxels, order=0) > 0.5
    stats = dict(ct=source.name, ct_state=source.state, motion=motion.name,
                 jitter_mm=[round(float(j), 2) for j in jitter])
    if source.state == "expiration":  # the real CT is the moving image, the DDF is exact
        images, labels, u, residual = (real, warped), (real_lung, warped_lung), ddf, 0.0
    else:  # the real CT is the fixed image, the DDF is the motion's inverse
        u, residual = _invert(ddf, name)
        u = (np.round(u * 256) / 256).astype(np.float32)
        images, labels = (warped, real), (warped_lung, real_lung)
    magnitude = np.linalg.norm(u * spacing, axis=-1)[labels[1]]
    stats.update(real="moving" if source.state == "expiration" else "fixed",
                 inverse_residual_voxels=round(residual, 4),
                 mm_mean=round(float(magnitude.mean()), 2), mm_p95=round(float(np.percentile(magnitude, 95)), 2),
                 mm_max=round(float(magnitude.max()), 2),
                 moving_lung_litres=round(float(labels[0].sum() * np.prod(spacing) / 1e6), 3),
                 fixed_lung_litres=round(float(labels[1].sum() * np.prod(spacing) / 1e6), 3))
    if motion.target_lung is not None and motion.name.startswith(f"{source.name}_"):  # the CT's own motion
        real_target = _sample(motion.target_lung.astype(np.float32), 1.0, in_motion) > 0.5
        stats["fixed_label_dice_with_real_mask"] = round(metrics.dice(labels[1], real_target), 4)
    volumes = [Volume(np.round(image).astype(np.int16).astype(np.float32), tuple(float(s) for s in spacing),
                      lung.astype(np.uint8)[..., None], ("lung",), f"{name}/{role}")
               for image, lung, role in zip(images, labels, ("moving", "fixed"))]
    return Pair(*volumes, ddf=u, name=name), stats


def _digest(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
        for f in files:
            digest.update(f.read_bytes())
    return digest.hexdigest()


def build(out=None, splits=("train", "test"), grid=presets.LUNG_GRID, spacing=presets.LUNG_SPACING, seed: int = 0, ct=None,
          masks=None, ct_state: str = "inspiration", force: bool = False, progress: bool = True, keypoints=None,
          landmarks=None, landmark_spacing=None) -> Path:
    """Build the paired lung CT dataset (see the module docstring) and return its root folder.

    out: the root (default `data_dir() / "lung_ct"`, or `"lung_ct_custom"` with `ct`).
    splits: any of "train", "test"; each is built on its own, into a temporary folder that replaces
    `out / split` once the split is complete, and skipped when `build.json` says it was built
    with the same parameters (unless `force`). Other splits are left as they are. A split folder
    is replaced only if `build` made it (it holds `MARKER`) or it is empty.
    grid: (D, H, W) voxels; spacing: (z, y, x) mm; seed: the grid shifts.
    ct, masks, ct_state: a user's own chest CT (NIfTI or NRRD file, or DICOM folder) at breathing
    `ct_state`, and the paths of one patient's (expiration, inspiration) lung masks on one grid:
    the pair made from them is the split "test". keypoints: with masks, a corrField keypoint file
    on the masks' grid (`data.read_keypoints`: Learn2Reg `.csv`, COPD `.dat`; which columns are
    which state is told by the masks), fitted with them (`estimate_motion`). Instead of masks,
    landmarks: a DIR-Lab MATLAB file (`data.read_landmarks`) with landmark_spacing, its voxel
    size in mm in the file's order (y, x, z): the motion is their thin-plate spline (`landmark_motion`).
    Raises DataError if a split folder was not made here, or if an input is not usable (naming it).
    """
    grid, spacing = tuple(int(n) for n in grid), tuple(float(s) for s in spacing)
    params = dict(version=VERSION, grid=list(grid), spacing=list(spacing), seed=int(seed), jitter_mm=JITTER_MM,
                  cut_fraction=CUT_FRACTION, registration=REGISTRATION, regulariser_weights=REGULARISER_WEIGHTS)
    if keypoints is not None and masks is None:
        raise ValueError("keypoints go with masks: give masks=(expiration mask, inspiration mask) on the keypoints' grid")
    if masks is not None and landmarks is not None:
        raise ValueError("give masks (and keypoints) or landmarks, not both: each makes the motion")
    if (landmarks is None) != (landmark_spacing is None):
        raise ValueError("give landmarks with landmark_spacing, the voxel size of their grid in mm (y, x, z, the "
                         "file's order), or neither")
    if (ct is None) == (masks is not None or landmarks is not None):
        raise ValueError("give ct and masks (or landmarks) together (your chest CT and one patient's expiration and "
                         "inspiration lung masks or landmarks), or neither for the course's dataset")
    if ct is not None:
        if (masks is not None and len(masks) != 2) or ct_state not in ("expiration", "inspiration"):
            raise ValueError("with ct, give masks=(expiration mask, inspiration mask) and ct_state "
                             "'expiration' or 'inspiration'")
        if landmark_spacing is not None:
            landmark_spacing = tuple(float(v) for v in landmark_spacing)
            if len(landmark_spacing) != 3 or not all(np.isfinite(landmark_spacing)) or min(landmark_spacing) <= 0:
                raise ValueError(f"landmark_spacing must be 3 positive voxel sizes in mm (y, x, z), got {landmark_spacing}")
        inputs = [ct, *(masks or ()), *(p for p in (keypoints, landmarks) if p is not None)]
        missing = [str(p) for p in inputs if not Path(p).exists()]
        if missing:
            raise DataError(f"not found: {', '.join(missing)}")
        params.update(ct_state=ct_state, inputs=_digest(inputs))
        if keypoints is not None:
            params.update(point_weight=POINT_WEIGHT, point_regulariser_weights=POINT_REGULARISER_WEIGHTS,
                          held_out=HELD_OUT)
        if landmarks is not None:
            params.update(landmark_spacing=list(landmark_spacing), landmark_margin_mm=list(LANDMARK_MARGIN_MM))
        splits = ("test",)
    unknown = [split for split in splits if split not in MOTIONS]
    if unknown:
        raise ValueError(f"splits must be among {sorted(MOTIONS)}, got {unknown[0]!r}")
    params = json.loads(json.dumps(params))  # as build.json stores it
    root = Path(out) if out is not None else data_dir() / ("lung_ct" if ct is None else "lung_ct_custom")
    record_path = root / "build.json"
    record = _read_record(record_path)
    todo = [split for split in dict.fromkeys(splits) if force or not (root / split).is_dir()
            or record["splits"].get(split, {}).get("parameters") != params]
    for split in todo:
        _check_replaceable(root / split, split in record["splits"])
    root.mkdir(parents=True, exist_ok=True)
    for split in todo:
        user = None if ct is None else dict(ct=ct, ct_state=ct_state, masks=masks, keypoints=keypoints,
                                             landmarks=landmarks, landmark_spacing=landmark_spacing)
        record["splits"][split] = dict(parameters=params, **_build_split(root, split, grid, spacing, seed, user,
                                                                          progress))
        record["parameters"] = params
        write_atomic(record_path, json.dumps(record, indent=1))
    return root


def _read_record(path: Path) -> dict:
    """`build.json`: {"parameters": those of the last build, "splits": {split: {"parameters", "motions",
    "pairs"}}}, or an empty record. Splits recorded before they held their own parameters get the record's."""
    record = json.loads(path.read_text()) if path.exists() else {}
    splits = record.get("splits", {})
    for info in splits.values():
        info.setdefault("parameters", record.get("parameters"))
    return dict(parameters=record.get("parameters"), splits=splits)


def _check_replaceable(folder: Path, recorded: bool) -> None:
    """Raise DataError unless `build` may replace split `folder`: absent, empty, holding `MARKER`, or
    listed in build.json (`recorded`: a split built before markers)."""
    if not folder.exists():
        return
    if folder.is_dir() and (recorded or (folder / MARKER).is_file() or not any(folder.iterdir())):
        return
    raise DataError(f"{folder} was not made by `teachreg data build-lung` (it has no {MARKER} file), so it is "
                    "left as it is; give another output folder (--out DIR) or move it away")


def _build_split(root: Path, split: str, grid, spacing, seed: int, user, progress) -> dict:
    """Build one split into a temporary folder that then replaces `root / split`; return its statistics.

    user: None for the course's dataset, else `build`'s ct, ct_state, masks, keypoints, landmarks and
    landmark_spacing. Raises DataError naming the CT (its path, for a user's) if its lungs fail `check_lungs`."""
    cts, motions = _inputs(split, grid, spacing, user)
    n_pairs = len(cts) * len(motions)
    bar = tqdm(total=len(cts) + 2 * len(motions) + n_pairs, desc=f"lung CT {split}", disable=not progress)
    sources, estimated, skipped = _parts(cts, motions, spacing, bar, strict=user is not None)
    couples = [(s, m) for s in sources for m in estimated if m.source == s.state]
    if user is None:  # the course's splits: a landmark motion goes on the CTs whose lungs hold its landmarks
        inside = {(s.name, m.name): landmarks_inside(s, m) for s, m in couples}
        skipped |= {f"{s} + {m}": f"{f:.0%} of the landmarks in the CT's lungs" for (s, m), f in inside.items()
                    if f < INSIDE_FRACTION}
        couples = [(s, m) for s, m in couples if inside[s.name, m.name] >= INSIDE_FRACTION]
    work = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=root))
    try:
        tmp = work / split
        tmp.mkdir()  # with the umask's permissions, as the folders in it (mkdtemp's are 0700)
        pairs = {}
        for i, (source, motion) in enumerate(couples):
            case = f"case_{i + 1:03d}"
            key = [seed, *(hashlib.sha256(f"{split}/{source.name}/{motion.name}".encode()).digest()[:4])]
            shift = np.random.default_rng(key).uniform(-1, 1, 3)
            pair, stats = make_pair(source, motion, f"{split}/{case}", grid, spacing, shift)
            write_pair(pair, tmp, case)
            pairs[case] = stats
            bar.update()
        (tmp / MARKER).write_text("made by teachreg.lung.build, which may replace it; see ../build.json\n")
        if (root / split).exists():
            os.replace(root / split, work / "old")
        os.replace(tmp, root / split)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        bar.close()
    return dict(motions={m.name: m.stats for m in estimated}, pairs=pairs, **({"skipped": skipped} if skipped else {}))


def patient_name(kind: str, case) -> str:
    """The name of a `MOTIONS` patient, as its motions' names begin: l2r_case001, copd_01, dirlab4dct_1."""
    return {"l2r": lambda: f"l2r_case{case[1]:03d}", "copd": lambda: f"copd_{case:02d}",
            "dirlab4dct": lambda: f"dirlab4dct_{case}"}[kind]()


def patient_motions(kind: str, case, states=("expiration", "inspiration"), grid=presets.LUNG_GRID,
                    spacing=presets.LUNG_SPACING) -> list[Motion]:
    """A `MOTIONS` patient's motions from each of `states`, as the splits make them: fitted to its
    masks and keypoints (`breathing_motions`), or the thin-plate spline through its landmarks
    (`landmark_motion`). kind, case: as in `MOTIONS`, e.g. ("l2r", ("test", 11)), ("copd", 3)."""
    name = patient_name(kind, case)
    if kind == "l2r":
        mask_split, number = case
        return breathing_motions(load("lung_masks", case=number, split=mask_split), name, states, grid, spacing,
                                 load("lung_keypoints_l2r", case=number))
    if kind == "copd":
        masks, inspiration, expiration = load("lung_motion_copd", case=case)
        return breathing_motions(masks, name, states, grid, spacing, (inspiration, expiration))
    inspiration, expiration, landmark_spacing = load("lung_landmarks_dirlab4dct", case=case)
    by_state = {"inspiration": inspiration, "expiration": expiration}
    other = {"expiration": "inspiration", "inspiration": "expiration"}
    return [landmark_motion(by_state[state], by_state[other[state]], landmark_spacing,
                            f"{name}_{state[:3]}2{other[state][:3]}", state, grid, spacing) for state in states]


def _inputs(split: str, grid, spacing, user) -> tuple[list, list]:
    """A split's CTs, (name, loader, breathing state, name in errors), and motions, (name, function
    of the breathing states -> their Motions); user: as `_build_split`'s."""
    if user is not None:
        ct = user["ct"]
        return ([(Path(ct).name, lambda: read_volume(Path(ct)), user["ct_state"], str(ct))],
                [_user_motion(user, grid, spacing)])
    cts = [(name, loader, state, f"CT {name}") for name, loader, state, s in CTS if s == split]
    motions = [(patient_name(kind, case), lambda states, k=kind, c=case: patient_motions(k, c, states, grid, spacing))
               for kind, case in MOTIONS[split]]
    return cts, motions


def _parts(cts: list, motions: list, spacing, bar, strict: bool = True) -> tuple[list[Source], list[Motion], dict]:
    """The CTs `cts` prepared and checked (`prepare_ct`, `check_lungs`) and the `motions` from each of
    their breathing states, as `_inputs` lists them; `bar` advances by one per CT, two per motion.
    Unless `strict`, a patient whose motions cannot be fitted (DataError: they fold, miss the
    held-out keypoints...) is left out: the third value maps its name to the reason; DataError
    with every reason if no patient is left."""
    sources = []
    for name, loader, state, where in cts:
        sources.append(prepare_ct(loader(), state, name, spacing))
        check_lungs(sources[-1], where)
        bar.update()
    states = [state for state in ("expiration", "inspiration") if any(s.state == state for s in sources)]
    estimated, left_out = [], {}
    for patient, motions_of in motions:
        try:
            estimated += motions_of(states)
        except DataError as err:
            if strict:
                raise
            left_out[patient] = str(err)
        bar.update(2)
    if left_out and not estimated:
        raise DataError("no patient's motions could be fitted: " + "; ".join(left_out.values()))
    return sources, estimated, left_out


def split_parts(split: str, grid=presets.LUNG_GRID, spacing=presets.LUNG_SPACING,
                progress: bool = True) -> tuple[list[Source], list[Motion]]:
    """The course's split `split` ("train" or "test") in parts, as `build` makes its pairs from them:
    its CTs (`CTS`) prepared and checked, and its patients' motions (`MOTIONS`, estimated from their
    masks, on a grid of `grid` voxels of `spacing` mm) from each breathing state of those CTs.
    A patient whose motions cannot be fitted is left out with a warning naming it and the reason
    (as `build` records it). 11 minutes for "train" (6 CTs, 30 patients) on a 2-core CPU. Raises
    DataError as `build`."""
    cts, motions = _inputs(split, grid, spacing, None)
    with tqdm(total=len(cts) + 2 * len(motions), desc=f"lung CT {split} parts", disable=not progress) as bar:
        sources, estimated, left_out = _parts(cts, motions, spacing, bar, strict=False)
    for patient, reason in left_out.items():
        warnings.warn(f"lung {split} split: patient {patient} left out: {reason}", stacklevel=2)
    return sources, estimated


def _check_training(sources: list[Source], motions: list[Motion]) -> None:
    """Raise ValueError naming any CT or motion of the test split (`CTS`, `MOTIONS`, by name)."""
    test = {name for name, _, _, split in CTS if split == "test"} | {patient_name(*m) for m in MOTIONS["test"]}
    leaked = [f"CT {s.name}" for s in sources if s.name in test]
    leaked += [f"motion {m.name}" for m in motions if m.name.rsplit("_", 1)[0] in test]
    if leaked:
        raise ValueError(f"training pairs may use training CTs and motions only; {', '.join(leaked)} belong to "
                         "the test split (lung.CTS, lung.MOTIONS)")


def vary_motion(motion: Motion, rng: np.random.Generator, spacing=presets.LUNG_SPACING, amplitude=AMPLITUDE,
                perturbation_mm: float = PERTURBATION_MM) -> Motion:
    """A random variant of `motion` that does not fold: its DDF times a factor drawn uniformly in
    `amplitude`, plus a smooth random displacement.

    The displacement is white noise inside the motion's target lungs (`target_lung`; everywhere
    without masks), smoothed by a Gaussian of `PERTURBATION_SIGMA_MM`, each component alike, then
    scaled so that its largest length is drawn uniformly in [0, `perturbation_mm`] mm: it lies in
    the lungs mostly and fades out within a few sigma around them. spacing: the motion grid's voxel
    size (mm, z, y, x), that of the pairs. While the variant folds (`metrics.folding_fraction`),
    it is moved halfway back to the motion (factor halfway to 1, displacement halved), at most
    `FOLD_RETRIES` times, else DataError naming the motion. The variant: `ddf` float32
    `[D, H, W, 3]` voxels on the motion's grid, `target_lung` None (the varied target lungs are not
    known), `stats` the motion's name, the factor and the displacement's largest length (mm)."""
    spacing = np.asarray(spacing, np.float64)
    inside = np.ones(motion.ddf.shape[:3], bool) if motion.target_lung is None else motion.target_lung
    factor = rng.uniform(*amplitude)
    noise = rng.standard_normal((3, *inside.shape)) * inside
    field = np.stack([ndimage.gaussian_filter(n, PERTURBATION_SIGMA_MM / spacing) for n in noise], -1)  # mm
    largest = rng.uniform(0, perturbation_mm)
    field *= largest / max(float(np.linalg.norm(field, axis=-1).max()), 1e-12)
    for _ in range(FOLD_RETRIES + 1):
        ddf = (factor * motion.ddf + field / spacing).astype(np.float32)
        if metrics.folding_fraction(ddf) == 0:
            stats = dict(motion=motion.name, factor=round(float(factor), 3), perturbation_mm=round(float(largest), 2))
            return Motion(f"{motion.name}_x{factor:.2f}", motion.source, ddf, motion.origin, motion.lo, motion.hi,
                          None, stats, motion.points)
        factor, field, largest = (1 + factor) / 2, field / 2, largest / 2
    raise DataError(f"motion {motion.name}: its variants fold even {FOLD_RETRIES} times halfway back to it; "
                    "does the motion itself fold?")


def draw_pairs(sources: list[Source], motions: list[Motion], count: int, seed: int, epoch: int,
               grid=presets.LUNG_GRID, spacing=presets.LUNG_SPACING) -> list[Pair]:
    """`count` training pairs drawn afresh, pair i from (seed, epoch, i) alone (the same numbers give
    the same arrays).

    Each is a CT of `sources` with a motion of `motions` that starts at its breathing state, the
    couple drawn uniformly among all such whose landmarks, if any, fall in the CT's lungs
    (`landmarks_inside`, at least `INSIDE_FRACTION`), the motion varied
    (`vary_motion`) and carried to the CT on a grid of `grid` voxels of `spacing` mm shifted at
    random (`make_pair`): exact DDF `[D, H, W, 3]` (voxels), mass-preserving density change. Named
    `drawn/EEE_III` (epoch, i). sources, motions: those of the training split (`split_parts("train")`
    on the same grid). A draw that cannot be carried (`vary_motion` or `make_pair` raise DataError:
    it folds on the CT, or its inverse does not converge) is replaced by the next one from the same
    random stream, at most `FOLD_RETRIES` times in a row. Raises ValueError if any belongs to the
    test split (`CTS`, `MOTIONS`) or no motion starts at a CT's state; DataError after those retries."""
    _check_training(sources, motions)
    couples = [(s, m) for s in sources for m in motions
               if m.source == s.state and landmarks_inside(s, m) >= INSIDE_FRACTION]
    if not couples:
        raise ValueError(f"no motion starts at the breathing state of a CT ({sorted({s.state for s in sources})}) "
                         f"with its landmarks, if any, inside that CT's lungs (at least {INSIDE_FRACTION:.0%}); "
                         "give motions from the CTs' states")
    pairs = []
    for i in range(count):
        rng = np.random.default_rng([seed, epoch, i])
        for attempt in range(FOLD_RETRIES + 1):  # a draw that cannot be carried is drawn again
            source, motion = couples[rng.integers(len(couples))]
            try:
                varied = vary_motion(motion, rng, spacing)
                pair, _ = make_pair(source, varied, f"drawn/{epoch:03d}_{i:03d}", grid, spacing,
                                    rng.uniform(-1, 1, 3))
                break
            except DataError:
                if attempt == FOLD_RETRIES:
                    raise
        pairs.append(pair)
    return pairs


def _read_mask(path: Path) -> Volume:
    """A lung mask Volume (labels [..., 1], 1 where the file is > 0) read from `path`; DataError
    naming the file if it is empty."""
    volume = read_volume(path)
    volume.labels = (volume.image > 0)[..., None].astype(np.uint8)
    if not volume.labels.any():
        raise DataError(f"{path}: the lung mask is empty (no voxel > 0); give a mask with the lungs set to 1")
    return volume


def _user_motion(user: dict, grid, spacing):
    """(name, function of the breathing states -> their Motions) for a user's masks (and keypoints) or landmarks."""
    if user["landmarks"] is not None:
        path = Path(user["landmarks"])
        inspiration, expiration = read_landmarks(path)
        y, x, z = user["landmark_spacing"]
        by_state = {"inspiration": inspiration, "expiration": expiration}
        other = {"expiration": "inspiration", "inspiration": "expiration"}
        return "user_landmarks", lambda states: [
            landmark_motion(by_state[state], by_state[other[state]], (z, y, x),
                            f"user_landmarks_{state[:3]}2{other[state][:3]} ({path.name})", state, grid, spacing)
            for state in states]
    masks = Pair(*(_read_mask(Path(m)) for m in user["masks"]))
    points = None if user["keypoints"] is None else _read_user_keypoints(Path(user["keypoints"]),
                                                                          Path(user["masks"][0]), masks)
    return "user_masks", lambda states: breathing_motions(masks, "user_masks", states, grid, spacing, points)


def _read_user_keypoints(path: Path, expiration_mask: Path, masks: Pair) -> tuple[np.ndarray, np.ndarray]:
    """A corrField keypoint file on the masks' grid: (inspiration, expiration) `[N, 3]` voxels (z, y, x).

    Points are put on the masks' arrays with the NIfTI mask's affine (`data.read_keypoints`); the
    columns holding expiration are those more often inside the expiration mask (a point lies inside
    the lungs of its own state, and the expiration lungs are the smaller)."""
    nifti = expiration_mask.name.endswith((".nii", ".nii.gz"))
    stored = read_nifti(expiration_mask) if nifti else None
    inspiration, expiration = read_keypoints(path, affine=None if stored is None else stored[1],
                                             shape=None if stored is None else stored[0].shape)
    mask = masks.moving.labels[..., 0] > 0
    both = np.concatenate([inspiration, expiration])
    if len(both) == 0 or np.any(both < 0) or np.any(both > np.asarray(mask.shape) - 1):
        raise DataError(f"{path}: keypoints outside the masks' grid {list(mask.shape)} (z, y, x voxels); "
                        "give the keypoints of these masks")

    def inside(points):
        return mask[tuple(np.round(points).astype(int).T)].mean()
    return (expiration, inspiration) if inside(inspiration) > inside(expiration) else (inspiration, expiration)
