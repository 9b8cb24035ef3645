"""Thin-plate splines from point pairs (`teachreg.landmarks`) and the readers of keypoints and
landmarks (`teachreg.data.read_keypoints`, `read_landmarks`) on the mirrored files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from teachreg import data, landmarks, metrics, spatial

MIRROR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPACING = (2.5, 1.0, 1.5)  # mm per voxel (z, y, x), anisotropic on purpose
SHAPE = (24, 40, 32)
# Published mean initial error (mm) of the 300 DIR-Lab expert landmark pairs, cases 1-9.
DIRLAB_INITIAL_MM = (3.89, 4.34, 6.94, 9.83, 7.48, 10.89, 11.03, 14.99, 7.92)


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    if not MIRROR.is_dir():
        pytest.skip(f"no data mirror at {MIRROR}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEACHREG_DATA_MIRROR", str(MIRROR))
        mp.setenv("TEACHREG_DATA_DIR", str(tmp_path_factory.mktemp("teachreg-cache")))
        yield


def _grid_points(shape) -> np.ndarray:
    return np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).reshape(-1, 3).astype(float)


def _motion(points: np.ndarray) -> np.ndarray:
    """A smooth known displacement in voxels (z, y, x) at voxel points `[N, 3]`: a few mm."""
    mm = points * SPACING
    return np.stack([
        2.0 * np.sin(mm[:, 1] / 15) + 0.5,
        3.0 * np.cos(mm[:, 2] / 20) * np.sin(mm[:, 0] / 25),
        1.5 * np.sin((mm[:, 0] + mm[:, 1]) / 18),
    ], axis=-1) / SPACING


def _random_points(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(2, np.asarray(SHAPE) - 3, size=(n, 3))


def test_interpolates_exactly_at_the_control_points():
    fixed = _random_points(60, 0)
    moving = fixed + np.random.default_rng(1).normal(scale=2.0, size=fixed.shape)
    u = landmarks.tps_displacement(fixed, moving, fixed, SPACING)
    np.testing.assert_allclose(fixed + u, moving, atol=1e-3)
    on_voxels = np.rint(fixed)  # on the dense field, at voxel centres
    moving = on_voxels + (moving - fixed)
    ddf = landmarks.tps_ddf(on_voxels, moving, SHAPE, SPACING).numpy()[0]
    idx = on_voxels.astype(int)
    np.testing.assert_allclose(on_voxels + ddf[idx[:, 0], idx[:, 1], idx[:, 2]], moving, atol=1e-3)


def test_reproduces_an_affine_map_everywhere():
    fixed = _random_points(30, 2)
    matrix = np.array([[1.05, 0.1, 0.0], [-0.05, 0.95, 0.08], [0.02, 0.0, 1.1]])
    offset = np.array([1.0, -2.0, 3.0])
    to_moving = lambda p: ((p * SPACING) @ matrix + offset) / SPACING  # an affine in mm  # noqa: E731
    ddf = landmarks.tps_ddf(fixed, to_moving(fixed), SHAPE, SPACING).numpy()[0]
    grid = _grid_points(SHAPE)
    expected = (to_moving(grid) - grid).reshape(*SHAPE, 3)
    np.testing.assert_allclose(ddf, expected, atol=2e-3)


def test_fits_in_mm_so_anisotropic_spacing_is_right():
    """Voxel points with spacing s give the same spline as the same points in mm with spacing 1."""
    fixed = _random_points(40, 3)
    moving = fixed + _motion(fixed)
    query = _random_points(50, 4)
    in_voxels = landmarks.tps_displacement(fixed, moving, query, SPACING) * SPACING
    in_mm = landmarks.tps_displacement(fixed * SPACING, moving * SPACING, query * SPACING)
    np.testing.assert_allclose(in_voxels, in_mm, atol=1e-4)
    isotropic = landmarks.tps_displacement(fixed, moving, query) * SPACING  # fitted in voxels
    assert np.abs(isotropic - in_mm).max() > 0.05  # the kernel's distances differ: not the same spline


def test_recovers_a_smooth_motion_from_scattered_points():
    fixed = _random_points(300, 5)
    ddf = landmarks.tps_ddf(fixed, fixed + _motion(fixed), SHAPE, SPACING).numpy()[0]
    grid = _grid_points(SHAPE)
    error = np.linalg.norm((ddf.reshape(-1, 3) - _motion(grid)) * SPACING, axis=-1)
    size = np.linalg.norm(_motion(grid) * SPACING, axis=-1)
    interior = np.all((grid > 3) & (grid < np.asarray(SHAPE) - 4), axis=1)
    assert error[interior].mean() < 0.03 * size[interior].mean()
    assert error[interior].max() < 0.3  # mm, for a motion of a few mm
    assert metrics.folding_fraction(ddf) == 0


def test_warping_a_mask_with_the_spline_moves_it_like_the_known_motion():
    grid = _grid_points(SHAPE)
    centre, radii = np.array([12.0, 20.0, 16.0]) * SPACING, np.array([18.0, 12.0, 14.0])

    def ellipsoid(points):
        return (np.sum(((points * SPACING - centre) / radii) ** 2, axis=-1) <= 1).reshape(SHAPE)

    moving_mask = ellipsoid(grid).astype(np.float32)
    fixed_mask = ellipsoid(grid + _motion(grid))  # fixed(x) = moving(x + u(x)): the pull convention
    fixed = _random_points(200, 6)
    ddf = landmarks.tps_ddf(fixed, fixed + _motion(fixed), SHAPE, SPACING)
    warped = spatial.warp(moving_mask[None], ddf).numpy()[0] > 0.5
    true_ddf = _motion(grid).reshape(1, *SHAPE, 3).astype(np.float32)
    warped_true = spatial.warp(moving_mask[None], true_ddf).numpy()[0] > 0.5
    assert metrics.dice(warped, warped_true) > 0.99
    assert metrics.dice(warped, fixed_mask) > metrics.dice(warped_true, fixed_mask) - 0.005 > 0.97
    assert metrics.dice(moving_mask > 0.5, fixed_mask) < 0.9  # the motion matters


def test_coarse_evaluation_is_close_to_the_full_one():
    fixed = _random_points(200, 7)
    moving = fixed + _motion(fixed)
    full = landmarks.tps_ddf(fixed, moving, SHAPE, SPACING).numpy()
    coarse = landmarks.tps_ddf(fixed, moving, SHAPE, SPACING, step=2).numpy()
    assert full.shape == coarse.shape == (1, *SHAPE, 3)
    error = metrics.displacement_mm(coarse - full, SPACING)  # mm; largest at the spline's kinks (its points)
    assert error.mean() < 0.01 and error.max() < 0.25


def test_smoothness_approximates_and_tends_to_the_affine_fit():
    fixed = _random_points(80, 8)
    moving = fixed + _motion(fixed) + np.random.default_rng(9).normal(scale=0.5, size=fixed.shape)
    residual = [np.abs(fixed + landmarks.tps_displacement(fixed, moving, fixed, SPACING, s) - moving).max()
                for s in (0.0, 10.0)]
    assert residual[0] < 1e-3 < residual[1]
    ones = np.ones((len(fixed), 1))
    solution = np.linalg.lstsq(np.hstack([ones, fixed * SPACING]), moving * SPACING, rcond=None)[0]
    affine = np.hstack([ones, fixed * SPACING]) @ solution / SPACING
    stiff = fixed + landmarks.tps_displacement(fixed, moving, fixed, SPACING, 1e7)
    np.testing.assert_allclose(stiff, affine, atol=0.01)


def test_bad_points_are_refused():
    flat = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1], [0, 2, 2]], float)
    with pytest.raises(ValueError, match="not all in one plane"):
        landmarks.tps_ddf(flat, flat, SHAPE)
    with pytest.raises(ValueError, match="same shape"):
        landmarks.tps_ddf(_random_points(5, 0), _random_points(6, 0), SHAPE)


def test_held_out_error_is_seeded_and_measures_the_fit():
    fixed = _random_points(100, 10)
    moving = fixed + _motion(fixed)
    first = landmarks.held_out_error(fixed, moving, SPACING, seed=1)
    assert first == landmarks.held_out_error(fixed, moving, SPACING, seed=1)
    assert first != landmarks.held_out_error(fixed, moving, SPACING, seed=2)
    assert (first["fitted"], first["held_out"]) == (80, 20)
    assert first["mean"] < 0.2 * first["initial_mean"]
    assert first["median"] <= first["p90"]
    shift = landmarks.held_out_error(fixed, fixed + [1.0, -2.0, 0.5], SPACING)
    assert shift["mean"] < 1e-3
    assert shift["initial_mean"] == pytest.approx(np.linalg.norm(np.array([1.0, -2.0, 0.5]) * SPACING))


def _inside(mask: np.ndarray, points: np.ndarray) -> float:
    idx = np.clip(np.rint(points).astype(int), 0, np.asarray(mask.shape) - 1)
    return float(mask[idx[:, 0], idx[:, 1], idx[:, 2]].mean())


@pytest.mark.parametrize(("case", "split"), [(1, "train"), (17, "train"), (12, "test")])
def test_learn2reg_keypoints_lie_in_the_lungs_of_their_state(mirrored, case, split):
    inspiration, expiration = data.load("lung_keypoints_l2r", case=case)
    masks = data.load("lung_masks", case=case, split=split)
    insp_lung, exp_lung = masks.fixed.labels[..., 0] > 0, masks.moving.labels[..., 0] > 0
    assert inspiration.shape == expiration.shape and inspiration.shape[1] == 3 and 800 <= len(inspiration) <= 2400
    assert _inside(exp_lung, expiration) > 0.97 and _inside(insp_lung, inspiration) > 0.97
    assert _inside(exp_lung, inspiration) < 0.96  # the telling test: inspiration points leave the smaller lungs
    assert _inside(exp_lung, expiration) - _inside(exp_lung, inspiration) > 0.04


def test_learn2reg_dat_files_name_their_first_state(mirrored):
    path = data.fetch("lung_keypoints_l2r")["lung_motion/l2r_lung_keypoints.zip"]
    masks = data.load("lung_masks", case=3)
    exp_lung = masks.moving.labels[..., 0] > 0
    inspiration, expiration = data.read_keypoints(path, "l2r_lung_ct/keypoints/l2r_insp003.dat", first="inspiration")
    assert _inside(exp_lung, expiration) > 0.9 > 0.8 > _inside(exp_lung, inspiration)
    _, csv_expiration = data.load("lung_keypoints_l2r", case=3)
    _, dat_expiration = data.read_keypoints(path, "l2r_lung_ct/keypoints/l2r_exp003.dat")
    np.testing.assert_array_equal(np.unique(csv_expiration, axis=0), np.unique(dat_expiration, axis=0))


@pytest.mark.parametrize("case", [1, 4])
def test_copd_masks_and_keypoints_share_the_grid_and_states(mirrored, case):
    masks, inspiration, expiration = data.load("lung_motion_copd", case=case)
    insp_lung, exp_lung = masks.fixed.labels[..., 0] > 0, masks.moving.labels[..., 0] > 0
    assert masks.fixed.image.shape == (208, 192, 192) and masks.fixed.spacing == (1.75, 1.25, 1.75)
    assert 1.2 < insp_lung.sum() / exp_lung.sum() < 2.2  # COPD breath-hold scans: much larger at inspiration
    assert _inside(insp_lung, inspiration) > 0.99 and _inside(exp_lung, expiration) > 0.97
    assert _inside(exp_lung, inspiration) < 0.9


@pytest.mark.parametrize("case", range(1, 10))
def test_dirlab_expert_landmarks_give_the_published_initial_error(mirrored, case):
    paths = data.fetch("lung_landmarks_dirlab4dct")
    shape, spacing = data.DIRLAB_4DCT_GRIDS[case]
    inspiration, expiration = data.read_landmarks(paths[f"lung_motion/dirlab4dct/new_case{case}.mat"], original=True)
    assert inspiration.shape == expiration.shape == (300, 3)
    initial = np.linalg.norm((inspiration - expiration) * spacing, axis=-1).mean()
    assert initial == pytest.approx(DIRLAB_INITIAL_MM[case - 1], abs=0.05)
    refined, _ = data.read_landmarks(paths[f"lung_motion/dirlab4dct/new_case{case}.mat"])
    assert np.linalg.norm((refined - inspiration) * spacing, axis=-1).mean() < 1.0
    dense_insp, dense_exp, dense_spacing = data.load("lung_landmarks_dirlab4dct", case=case)
    assert dense_insp.shape == dense_exp.shape and len(dense_insp) >= 1000 and dense_spacing == spacing
    for points in (inspiration, expiration, dense_insp, dense_exp):
        assert np.all(points >= 0) and np.all(points <= np.asarray(shape) - 1)
