"""Analytic tests of the evaluation metrics: Dice, Hausdorff distance, target registration error and folding."""

import re

import numpy as np
import pytest
from scipy import ndimage

from teachreg import metrics, spatial

RNG = np.random.default_rng(0)
SHAPE = (6, 7, 8)


def raises(*fragments):
    return pytest.raises(ValueError, match=".*".join(re.escape(f) for f in fragments))


# --- Dice -------------------------------------------------------------------------------------


def test_dice_of_identical_empty_and_disjoint_masks():
    mask = RNG.uniform(size=SHAPE) > 0.5
    assert metrics.dice(mask, mask) == 1.0
    assert metrics.dice(mask.astype(np.uint8), mask.astype(np.float32)) == 1.0
    assert metrics.dice(np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)) == 1.0
    assert metrics.dice(mask, ~mask) == 0.0
    assert isinstance(metrics.dice(mask, mask), float)


def test_dice_known_value():
    a = np.zeros(SHAPE, bool)
    b = np.zeros(SHAPE, bool)
    a[0, 0, :2] = True
    b[0, 0, 1:4] = True  # |A| = 2, |B| = 3, |A & B| = 1
    assert metrics.dice(a, b) == pytest.approx(2 / 5)
    assert metrics.dice(a[None], b[None]) == pytest.approx(2 / 5)


def test_dice_rejects_bad_inputs():
    mask = RNG.uniform(size=SHAPE) > 0.5
    with raises("mask_a and mask_b", "same shape"):
        metrics.dice(mask, mask[:-1])
    with raises("mask_b", "binary", "[..., D, H, W]"):
        metrics.dice(mask, RNG.uniform(size=SHAPE))
    with raises("mask_a", "rank", "[..., D, H, W]"):
        metrics.dice(mask[0], mask[0])
    with raises("mask_b", "NaN", "[..., D, H, W]"):
        metrics.dice(mask, np.where(mask, np.nan, 0.0))


# --- target registration error ----------------------------------------------------------------


def test_tre_of_a_constant_error_uses_the_spacing():
    ddf = np.broadcast_to(np.float32([1, 2, 3]), (*SHAPE, 3))
    zero = np.zeros((*SHAPE, 3), np.float32)
    spacing = (2.0, 1.0, 0.5)
    expected = np.sqrt(2.0**2 + 2.0**2 + 1.5**2)
    assert metrics.target_registration_error(ddf, zero, spacing) == pytest.approx(expected)
    assert metrics.target_registration_error(ddf[None], zero[None], spacing) == pytest.approx(expected)
    assert metrics.target_registration_error(ddf, ddf, spacing) == 0.0


def test_tre_inside_a_mask():
    ddf = np.zeros((*SHAPE, 3), np.float32)
    ddf[:3, ..., 0] = 4.0  # 4 voxels of error in the first half along D
    mask = np.zeros(SHAPE, bool)
    mask[:3] = True
    truth = np.zeros_like(ddf)
    assert metrics.target_registration_error(ddf, truth, (0.5, 1, 1), mask=mask) == pytest.approx(2.0)
    assert metrics.target_registration_error(ddf, truth, (0.5, 1, 1), mask=~mask) == 0.0
    assert metrics.target_registration_error(ddf, truth, (0.5, 1, 1)) == pytest.approx(1.0)


def test_tre_rejects_bad_inputs():
    ddf = np.zeros((*SHAPE, 3), np.float32)
    with raises("ddf and ddf_true", "same shape"):
        metrics.target_registration_error(ddf, ddf[:-1], (1, 1, 1))
    with raises("ddf_true", "[D, H, W, 3] or [1, D, H, W, 3]"):
        metrics.target_registration_error(ddf, ddf[..., :2], (1, 1, 1))
    with raises("ddf", "batch of 1"):
        metrics.target_registration_error(np.stack([ddf, ddf]), ddf, (1, 1, 1))
    with raises("ddf", "NaN"):
        metrics.target_registration_error(np.full_like(ddf, np.inf), ddf, (1, 1, 1))
    with raises("spacing", "3 positive"):
        metrics.target_registration_error(ddf, ddf, (1, 1))
    with raises("spacing", "3 positive"):
        metrics.target_registration_error(ddf, ddf, (1, 0, 1))
    with raises("mask", "[D, H, W]"):
        metrics.target_registration_error(ddf, ddf, (1, 1, 1), mask=np.ones((*SHAPE, 1), bool))
    with raises("mask", "same shape"):
        metrics.target_registration_error(ddf, ddf, (1, 1, 1), mask=np.ones((6, 7, 9), bool))
    with raises("mask selects no voxel"):
        metrics.target_registration_error(ddf, ddf, (1, 1, 1), mask=np.zeros(SHAPE, bool))


def test_landmark_error_of_an_affine_ddf_between_voxels():
    affine = spatial.random_affine(1, 0.3, seed=1, shape=SHAPE)
    ddf = spatial.affine_to_ddf(affine, SHAPE).numpy()
    fixed = RNG.uniform(0, np.array(SHAPE) - 1, size=(5, 3)).astype(np.float32)
    mapped = np.concatenate([fixed, np.ones((5, 1), np.float32)], axis=1) @ affine.numpy()[0]
    # Trilinear interpolation of an affine DDF is exact, so the mapped points match.
    np.testing.assert_allclose(metrics.landmark_error(fixed, mapped, ddf, (1, 1, 1)), 0.0, atol=1e-4)
    spacing = (1.5, 2.0, 0.5)
    errors = metrics.landmark_error(fixed, mapped + np.float32([1, 0, 2]), ddf[0], spacing)
    assert errors.shape == (5,)
    np.testing.assert_allclose(errors, np.sqrt(1.5**2 + 1.0**2), atol=1e-4)


def test_landmark_error_rejects_bad_inputs():
    ddf = np.zeros((*SHAPE, 3), np.float32)
    points = np.zeros((4, 3), np.float32)
    with raises("fixed_points", "[N, 3]"):
        metrics.landmark_error(points[:, :2], points[:, :2], ddf, (1, 1, 1))
    with raises("fixed_points and moving_points", "same shape"):
        metrics.landmark_error(points, points[:3], ddf, (1, 1, 1))
    with raises("moving_points", "NaN", "[N, 3]"):
        metrics.landmark_error(points, np.full_like(points, np.nan), ddf, (1, 1, 1))
    with raises("ddf", "[D, H, W, 3] or [1, D, H, W, 3]"):
        metrics.landmark_error(points, points, ddf[..., 0], (1, 1, 1))


# --- folding ----------------------------------------------------------------------------------


def test_folding_fraction():
    zero = np.zeros((*SHAPE, 3), np.float32)
    assert metrics.folding_fraction(zero) == 0.0
    grid = spatial.reference_grid(SHAPE).numpy()
    flip = zero.copy()
    flip[..., 2] = -2 * grid[..., 2]  # x -> -x along W: determinant -1 everywhere
    assert metrics.folding_fraction(flip) == 1.0
    squash = zero.copy()
    squash[..., 0] = -grid[..., 0]  # everything onto one plane: determinant 0 counts as folded
    assert metrics.folding_fraction(squash[None]) == 1.0
    half = zero.copy()
    half[..., :4, 2] = flip[..., :4, 2]  # u_w = 0, -2, -4, -6, 0, ...: du_w/dw = -2, -2, -2, 2, 3, 0, ...
    assert metrics.folding_fraction(half) == pytest.approx(3 / 8)  # columns 0 to 2 of 8 fold
    assert metrics.folding_fraction(np.stack([half, zero])) == pytest.approx(3 / 16)


def test_folding_fraction_rejects_bad_inputs():
    with raises("ddf", "[D, H, W, 3] or [batch, D, H, W, 3]"):
        metrics.folding_fraction(np.zeros((*SHAPE, 2)))
    with raises("ddf", "NaN"):
        metrics.folding_fraction(np.full((*SHAPE, 3), np.nan))


# --- displacement in mm ------------------------------------------------------------------------


def test_displacement_mm_of_known_fields():
    spacing = (3.0, 2.0, 0.5)
    ddf = np.zeros((*SHAPE, 3), np.float32)
    ddf[..., 0] = 1.0  # one voxel along D: 3 mm
    np.testing.assert_allclose(metrics.displacement_mm(ddf, spacing), 3.0)
    ddf[..., 1:] = [2.0, 8.0]  # (3, 4, 4) mm
    lengths = metrics.displacement_mm(ddf[None], spacing)
    assert lengths.shape == SHAPE
    np.testing.assert_allclose(lengths, np.sqrt(9 + 16 + 16))
    # the error map of a DDF against the truth, whose mean is the target registration error
    truth = RNG.normal(size=(*SHAPE, 3))
    error = metrics.displacement_mm(ddf - truth, spacing)
    assert error.mean() == pytest.approx(metrics.target_registration_error(ddf, truth, spacing), rel=1e-5)
    with raises("spacing"):
        metrics.displacement_mm(ddf, (1.0, 1.0))
    with raises("ddf", "[D, H, W, 3]"):
        metrics.displacement_mm(ddf[..., :2], spacing)


# --- Hausdorff distance ---


def _cube(shape, low, high):
    mask = np.zeros(shape, bool)
    mask[low[0]:high[0], low[1]:high[1], low[2]:high[2]] = True
    return mask


def test_hausdorff_distance_of_a_shifted_cube_is_the_shift_in_mm():
    a = _cube((24, 20, 20), (5, 5, 5), (15, 15, 15))
    b = _cube((24, 20, 20), (8, 5, 5), (18, 15, 15))  # 3 voxels of 2 mm further along D
    spacing = (2.0, 1.0, 1.0)
    assert metrics.hausdorff_distance(a, b, spacing, percentile=100) == pytest.approx(6.0)
    assert metrics.hausdorff_distance(b, a, spacing, percentile=100) == pytest.approx(6.0)
    assert 0 < metrics.hausdorff_distance(a, b, spacing) <= 6.0
    assert metrics.hausdorff_distance(a, a, spacing) == 0.0


def test_hausdorff_distance_matches_all_pairs_of_surface_points():
    # Random smooth blobs on an anisotropic grid, against the definition computed point by point.
    rng = np.random.default_rng(3)
    a, b = (ndimage.gaussian_filter(rng.standard_normal((14, 16, 12)), 2.0) > 0.05 for _ in range(2))
    spacing = np.array([2.5, 0.8, 1.2])
    surfaces = [np.argwhere(m & ~ndimage.binary_erosion(m, border_value=0)) * spacing for m in (a, b)]
    distances = np.linalg.norm(surfaces[0][:, None] - surfaces[1][None], axis=-1)
    for percentile in (50, 95, 100):
        expected = max(np.percentile(distances.min(axis=1), percentile),
                       np.percentile(distances.min(axis=0), percentile))
        assert metrics.hausdorff_distance(a, b, spacing, percentile) == pytest.approx(expected, rel=1e-9)


def test_hausdorff_distance_refuses_empty_masks_and_bad_percentiles():
    a = _cube((8, 8, 8), (2, 2, 2), (5, 5, 5))
    with pytest.raises(ValueError, match="mask_b has 0"):
        metrics.hausdorff_distance(a, np.zeros_like(a), (1, 1, 1))
    with pytest.raises(ValueError, match="percentile must be in"):
        metrics.hausdorff_distance(a, a, (1, 1, 1), percentile=101)
