"""Tests of teachreg.lung: a tiny build (one CT, one motion, a coarse grid), its ground truth,
determinism and cache, the split, bad inputs, writing and reading DeepReg's paired layout
(teachreg.data.paired), and training pairs drawn afresh (on phantoms).

Real data come from the mirror at ../shared/data (relative to the repository root); without it the
tests that need data are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from teachreg import cli, data, lung, metrics, spatial
from teachreg.data import paired
from teachreg.data.loaders import read_volume

ROOT = Path(__file__).resolve().parents[1]
MIRROR = ROOT.parent / "shared" / "data"
TINY = ["--grid", "52", "50", "48", "--spacing", "7", "5", "7"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Paths of one CT (CIP ct-64, NRRD) and one Learn2Reg mask pair (case 12), copied from the mirror."""
    if not MIRROR.is_dir():
        pytest.skip(f"no data mirror at {MIRROR}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEACHREG_DATA_MIRROR", str(MIRROR))
        mp.setenv("TEACHREG_DATA_DIR", str(tmp_path_factory.mktemp("cache")))
        ct = data.fetch("chest_ct_cip")["chest_ct/cip/ct-64.nrrd"]
        masks = data.fetch("lung_masks")
    pair = [masks[f"lung_masks/test/{kind}_labels/case_012.nii.gz"] for kind in ("moving", "fixed")]
    return str(ct), [str(p) for p in pair]


def _build(out: Path, inputs, state: str) -> Path:
    ct, masks = inputs
    assert cli.main(["data", "build-lung", "--out", str(out), "--ct", ct, "--masks", *masks,
                     "--ct-state", state, *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, inputs):
    """The tiny builds, one per breathing state of the CT."""
    return {state: _build(tmp_path_factory.mktemp(state), inputs, state) for state in ("inspiration", "expiration")}


@pytest.mark.parametrize("state", ["inspiration", "expiration"])
def test_ground_truth_maps_moving_onto_fixed(tiny, state):
    (pair,) = data.load_paired(tiny[state], "test")
    moving, fixed, ddf = pair.moving, pair.fixed, pair.ddf
    assert moving.image.shape == fixed.image.shape == (52, 50, 48) and ddf.shape == (52, 50, 48, 3)
    assert moving.spacing == fixed.spacing == (7.0, 5.0, 7.0)
    assert moving.labels.dtype == np.uint8 and ddf.dtype == np.float32
    assert metrics.folding_fraction(ddf) == 0
    warped = spatial.warp(moving.image[None], ddf[None]).numpy()[0]
    # Inside the lungs the density was scaled by the volume change: undo it.
    lungs = fixed.labels[..., 0] > 0
    jacobian = spatial.jacobian_determinant(ddf[None]).numpy()[0]
    model = np.where(lungs, (warped - lung.HU_AIR) * jacobian + lung.HU_AIR, warped)
    away = ndimage.binary_erosion(lungs, iterations=1) | ~ndimage.binary_dilation(lungs, iterations=1)
    error = np.abs(model - fixed.image)[away].mean()
    unregistered = np.abs(moving.image - fixed.image)[away].mean()
    assert error < 0.25 * unregistered, (error, unregistered)
    warped_lungs = spatial.warp(moving.labels[None].astype(np.float32), ddf[None], interpolation="nearest")
    dice = metrics.dice(warped_lungs.numpy()[0, ..., 0] > 0.5, lungs)
    assert dice > (0.999 if state == "expiration" else 0.9)  # exact when the real CT is the moving image
    assert dice > metrics.dice(moving.labels[..., 0] > 0, lungs)


def test_build_record(tiny):
    record = json.loads((tiny["inspiration"] / "build.json").read_text())
    assert record["parameters"]["grid"] == [52, 50, 48] and record["parameters"]["seed"] == 0
    (stats,) = record["splits"]["test"]["pairs"].values()
    assert stats["ct"] == "ct-64.nrrd" and stats["real"] == "fixed" and stats["motion"] == "user_masks_ins2exp"
    assert stats["inverse_residual_voxels"] <= 0.01 and stats["mm_mean"] > 0
    (motion,) = record["splits"]["test"]["motions"].values()
    assert motion["dice"] > motion["dice_before"]


def test_same_seed_gives_identical_files_and_rebuilds_are_cached(tmp_path, tiny, inputs):
    ct, masks = inputs
    again = lung.build(out=tmp_path, ct=ct, masks=masks, ct_state="inspiration", grid=(52, 50, 48),
                       spacing=(7.0, 5.0, 7.0), progress=False)
    files = sorted(p.relative_to(again) for p in again.rglob("*.nii.gz"))
    assert len(files) == 5
    for name in files:
        assert (again / name).read_bytes() == (tiny["inspiration"] / name).read_bytes(), name
    stamp = (again / files[0]).stat().st_mtime_ns
    lung.build(out=tmp_path, ct=ct, masks=masks, ct_state="inspiration", grid=(52, 50, 48),
               spacing=(7.0, 5.0, 7.0), progress=False)
    assert (again / files[0]).stat().st_mtime_ns == stamp  # cached: not rewritten


def test_train_and_test_share_no_patient_and_no_motion():
    cts = {split: {name for name, _, _, s in lung.CTS if s == split} for split in ("train", "test")}
    assert not cts["train"] & cts["test"] and "l2r_case001" in cts["test"]
    motions = {split: {lung.patient_name(*m) for m in lung.MOTIONS[split]} for split in ("train", "test")}
    assert not motions["train"] & motions["test"]
    kinds = {kind: sum(k == kind for k, _ in lung.MOTIONS["test"]) for kind in ("l2r", "copd", "dirlab4dct")}
    assert "l2r_case001" in motions["test"] and kinds == {"l2r": 3, "copd": 2, "dirlab4dct": 2}
    cases = {split: {(kind, case[1] if kind == "l2r" else case) for kind, case in lung.MOTIONS[split]}
             for split in ("train", "test")}
    assert not cases["train"] & cases["test"]  # a Learn2Reg case is one patient whatever its mask split
    patients = {name for name, _, _, _ in lung.CTS}
    assert len(patients) == len(lung.CTS)


def _phantom(name: str = "phantom") -> lung.Source:
    """A 40^3 CT of 2 mm voxels (soft tissue) with a lung box of 36 x 36 x 36 mm in its middle."""
    image = np.zeros((40, 40, 40), np.float32)
    image[11:29, 11:29, 11:29] = -800
    volume = data.Volume(image, (2.0, 2.0, 2.0), (image < -500)[..., None].astype(np.uint8), ("lung",), name)
    return lung.prepare_ct(volume, "expiration", name, spacing=(2.0, 2.0, 2.0))


def _motion(ddf: np.ndarray, source: lung.Source) -> lung.Motion:
    grid = ddf.shape[:3]
    origin = (source.lo + source.hi) / 2 - (np.asarray(grid) - 1) / 2 * 2.0
    return lung.Motion("folding_motion", "expiration", ddf, origin, source.lo, source.hi,
                       np.zeros(grid, bool))


def test_bad_inputs_name_the_case():
    water = data.Volume(np.zeros((30, 40, 40), np.float32), (5.0, 5.0, 5.0), None, (), "water")
    with pytest.raises(data.DataError, match="water_phantom: no lungs found"):
        lung.prepare_ct(water, "inspiration", "water_phantom")
    source = _phantom()
    z = np.arange(30, dtype=np.float32)[:, None, None]
    folding = np.zeros((30, 30, 30, 3), np.float32)
    folding[..., 0] = -2 * (z - 14.5)  # z -> 29 - z: a mirror, folded everywhere
    with pytest.raises(data.DataError, match="test/case_007: motion folding_motion folds on CT phantom"):
        lung.make_pair(source, _motion(folding, source), "test/case_007", grid=(30, 30, 30), spacing=(2, 2, 2))
    with pytest.raises(data.DataError, match=r"test/case_008 \(CT phantom\): the lungs .* do not fit in the grid"):
        lung.make_pair(source, _motion(np.zeros((30, 30, 30, 3), np.float32), source), "test/case_008",
                       grid=(10, 10, 10), spacing=(2, 2, 2))


def test_a_made_pair_is_the_pair_read_back_once_written(tmp_path):
    source = _phantom()
    made, _ = lung.make_pair(source, _motion(np.zeros((30, 30, 30, 3), np.float32), source), "test/case_001",
                             grid=(30, 30, 30), spacing=(2, 2, 2))
    data.write_pair(made, tmp_path / "test", "case_001")
    (read,) = data.load_paired(tmp_path, "test")
    assert read.name == "case_001" and made.name == "test/case_001"
    for got, want in ((read.moving, made.moving), (read.fixed, made.fixed)):
        assert got.spacing == want.spacing == (2.0, 2.0, 2.0) and got.label_names == want.label_names
        assert got.image.dtype == want.image.dtype == np.float32 and got.labels.shape == (30, 30, 30, 1)
        np.testing.assert_array_equal(got.image, want.image)
        np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(read.ddf, made.ddf)


def test_a_written_ddf_pairs_each_component_with_its_stored_axis(tmp_path):
    # Files are stored (x, y, z) as DeepReg and nibabel read them: the components must follow.
    shape = (4, 5, 6)
    ddf = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
    ddf *= np.array([1.0, 10.0, 100.0], np.float32)  # z, 10 y, 100 x: each component names its axis
    volume = data.Volume(np.zeros(shape, np.float32), (1.0, 1.0, 1.0), None, (), "v")
    data.write_pair(data.Pair(volume, volume, ddf=ddf, name="case"), tmp_path / "test", "case_001")
    stored = np.asarray(nib.load(tmp_path / "test" / "ddfs" / "case_001.nii.gz").dataobj)
    assert stored.shape == (6, 5, 4, 3)
    x, y, z = np.meshgrid(*[np.arange(n) for n in stored.shape[:3]], indexing="ij")
    np.testing.assert_array_equal(stored, np.stack([100.0 * x, 10.0 * y, z], -1))
    np.testing.assert_array_equal(data.load_paired(tmp_path, "test")[0].ddf, ddf)


def test_reads_learn2reg_in_deepreg_layout(tmp_path, inputs):
    """DeepReg's paired_ct_lung download: masks as they are, images rescaled and saved without an affine."""
    _, masks = inputs
    for role, path in zip(("moving", "fixed"), masks):
        for kind in ("images", "labels"):
            (tmp_path / "test" / f"{role}_{kind}").mkdir(parents=True)
        stored = nib.load(path)
        nib.save(stored, tmp_path / "test" / f"{role}_labels" / "case_012.nii.gz")
        image = np.asarray(stored.dataobj, np.float32) * 255.0
        nib.save(nib.Nifti1Image(image, affine=None), tmp_path / "test" / f"{role}_images" / "case_012.nii.gz")
    (pair,) = data.load_paired(tmp_path, "test")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEACHREG_DATA_MIRROR", str(MIRROR))
        mp.setenv("TEACHREG_DATA_DIR", str(Path(masks[0]).parents[3]))
        expected = data.load("lung_masks", case=12, split="test")
    assert pair.name == "case_012" and pair.ddf is None
    for got, want in ((pair.moving, expected.moving), (pair.fixed, expected.fixed)):
        assert got.spacing == want.spacing == (1.75, 1.25, 1.75)
        np.testing.assert_array_equal(got.labels, want.labels)
        np.testing.assert_array_equal(got.image, want.image * 255.0)


def test_missing_pairs_say_how_to_build(tmp_path):
    with pytest.raises(data.DataError, match="build-lung"):
        data.load_paired(tmp_path, "test")


# --- reliability ---


def _cli_build(out: Path, ct, masks, *extra: str) -> int:
    return cli.main(["data", "build-lung", "--out", str(out), "--ct", str(ct), "--masks", *map(str, masks),
                     *TINY, *extra])


def _files(folder: Path) -> dict:
    """The bytes of every file under `folder`, keyed by relative path."""
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_refuses_to_replace_a_split_folder_it_did_not_make(tmp_path, inputs, capsys):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "mine.py").write_text("keep")
    assert _cli_build(tmp_path, *inputs) == 1
    assert (tmp_path / "test" / "mine.py").read_text() == "keep"
    assert _files(tmp_path / "test") == {Path("mine.py"): b"keep"}
    error = capsys.readouterr().err
    assert f"{tmp_path / 'test'} was not made by" in error and "--out" in error


@pytest.fixture
def small_dataset(monkeypatch, inputs):
    """`build`'s own dataset made small: CIP ct-64 (lungs segmented) with Learn2Reg case 12's motion,
    in each split."""
    ct, masks = inputs
    monkeypatch.setenv("TEACHREG_DATA_MIRROR", str(MIRROR))
    monkeypatch.setenv("TEACHREG_DATA_DIR", str(Path(masks[0]).parents[3]))
    monkeypatch.setattr(lung, "CTS", tuple((f"ct64_{split}", lambda: read_volume(Path(ct)), "inspiration",
                                            split) for split in ("train", "test")))
    monkeypatch.setattr(lung, "MOTIONS", {split: (("l2r", ("test", 12)),) for split in ("train", "test")})


def test_other_parameters_rebuild_only_the_splits_asked_for(tmp_path, small_dataset):
    small = dict(grid=(52, 50, 48), spacing=(7.0, 5.0, 7.0), progress=False)
    lung.build(tmp_path, seed=0, **small)
    train, test = _files(tmp_path / "train"), _files(tmp_path / "test")
    assert Path(".teachreg-split") in train and len(train) == 6

    lung.build(tmp_path, splits=("test",), seed=1, **small)
    assert _files(tmp_path / "train") == train  # not asked for: untouched
    rebuilt = _files(tmp_path / "test")
    assert rebuilt.keys() == test.keys() and rebuilt != test  # other grid shifts
    record = json.loads((tmp_path / "build.json").read_text())
    assert record["splits"]["train"]["parameters"]["seed"] == 0 and record["splits"]["test"]["parameters"]["seed"] == 1
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "train").rglob("*")}
    lung.build(tmp_path, splits=("train",), seed=0, **small)  # still valid at its own parameters: skipped
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "train").rglob("*")} == stamps

    with pytest.raises(data.DataError, match="do not fit in the grid"):
        lung.build(tmp_path, splits=("test",), seed=2, grid=(10, 50, 48), spacing=(7.0, 5.0, 7.0), progress=False)
    assert _files(tmp_path / "test") == rebuilt and _files(tmp_path / "train") == train
    assert json.loads((tmp_path / "build.json").read_text()) == record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build.json", "test", "train"]  # no temporary left

    lung.build(tmp_path, splits=("test",), seed=0, force=True, **small)  # its own split: replaced
    assert _files(tmp_path / "test") == test and _files(tmp_path / "train") == train


def test_refuses_a_ct_without_plausible_lungs(tmp_path, inputs, capsys):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEACHREG_DATA_MIRROR", str(MIRROR))
        mp.setenv("TEACHREG_DATA_DIR", str(Path(inputs[1][0]).parents[3]))
        head = data.load("hnct")
    path = tmp_path / "head_and_neck.nii.gz"
    paired._write_nifti(path, head.image.astype(np.int16), head.spacing)
    assert _cli_build(tmp_path / "out", path, inputs[1]) == 1
    error = capsys.readouterr().err
    assert f"{path}: no plausible lungs" in error and "0.9" in error and "chest CT" in error
    assert not (tmp_path / "out" / "test").exists()


@pytest.mark.parametrize("name", [name for name, _, _, _ in lung.CTS])
def test_the_builders_chest_cts_have_plausible_lungs(inputs, name):
    (loader, state) = next((loader, state) for n, loader, state, _ in lung.CTS if n == name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEACHREG_DATA_MIRROR", str(MIRROR))
        mp.setenv("TEACHREG_DATA_DIR", str(Path(inputs[1][0]).parents[3]))
        source = lung.prepare_ct(loader(), state, name)
    litres, hu = lung.check_lungs(source, name)
    assert lung.LUNG_LITRES[0] < litres < lung.LUNG_LITRES[1] and lung.LUNG_HU[0] < hu < lung.LUNG_HU[1]


@pytest.mark.parametrize("which", ["ct", "mask"])
def test_non_finite_inputs_are_refused(tmp_path, inputs, capsys, which):
    ct, masks = Path(inputs[0]), [Path(m) for m in inputs[1]]
    if which == "ct":
        volume = read_volume(ct)
        volume.image[40, 30, 30] = np.nan
        bad = ct = tmp_path / "ct_with_nan.nii.gz"
        paired._write_nifti(bad, volume.image, volume.spacing)
    else:
        stored = nib.load(masks[0])
        array = np.asarray(stored.dataobj, np.float32)
        array[90, 90, 100] = np.inf
        bad = masks[0] = tmp_path / "mask_with_inf.nii.gz"
        nib.save(nib.Nifti1Image(array, stored.affine), bad)
    assert _cli_build(tmp_path / "out", ct, masks) == 1
    assert f"{bad}: 1 voxel is not finite" in capsys.readouterr().err
    assert not (tmp_path / "out" / "test").exists()


@pytest.mark.parametrize("given", [["--masks", "exp.nii.gz", "insp.nii.gz"], ["--ct", "ct.nii.gz"]])
def test_ct_and_masks_go_together(tmp_path, monkeypatch, capsys, given):
    def build(**kwargs):
        raise AssertionError(f"build called with {kwargs}")

    monkeypatch.setattr(lung, "build", build)
    assert cli.main(["data", "build-lung", "--out", str(tmp_path / "out"), *given]) == 2
    error = capsys.readouterr().err
    assert f"{given[0]} needs {'--ct' if given[0] == '--masks' else '--masks'}" in error
    assert not (tmp_path / "out").exists()


def test_split_folders_follow_the_umask(tmp_path, inputs):
    previous = os.umask(0o002)
    try:
        lung.build(tmp_path, ct=inputs[0], masks=inputs[1], grid=(52, 50, 48), spacing=(7.0, 5.0, 7.0),
                   progress=False)
    finally:
        os.umask(previous)
    for folder in (tmp_path / "test", tmp_path / "test" / "ddfs"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o775, folder
    assert stat.S_IMODE((tmp_path / "test" / "ddfs" / "case_001.nii.gz").stat().st_mode) == 0o664


def test_a_cache_built_before_split_markers_is_still_used(tmp_path, tiny, inputs):
    """build.json as written before splits held their own parameters, and no marker: still this build's."""
    shutil.copytree(tiny["inspiration"], tmp_path, dirs_exist_ok=True)
    (tmp_path / "test" / ".teachreg-split").unlink()
    record = json.loads((tmp_path / "build.json").read_text())
    del record["splits"]["test"]["parameters"]
    (tmp_path / "build.json").write_text(json.dumps(record))
    files = _files(tmp_path / "test")
    small = dict(ct=inputs[0], masks=inputs[1], grid=(52, 50, 48), spacing=(7.0, 5.0, 7.0), progress=False)
    lung.build(tmp_path, **small)  # same parameters: skipped
    assert _files(tmp_path / "test") == files
    lung.build(tmp_path, seed=1, **small)  # other parameters: replaced
    rebuilt = _files(tmp_path / "test")
    assert Path(".teachreg-split") in rebuilt and rebuilt != files


def test_an_empty_user_mask_is_named(tmp_path):
    path = tmp_path / "empty_exp.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), path)
    with pytest.raises(lung.DataError, match="empty_exp.nii.gz: the lung mask is empty"):
        lung._read_mask(path)


# --- motions fitted to masks and points ---


def _spinning_lungs(n_points: int = 400):
    """Masks (source = expiration, target = inspiration) of a spheroid lung, 4 mm voxels, and points.

    The known motion u (voxels, target grid -> source grid) stretches z by 10 % and turns the lung by
    0.3 rad about its z axis: the turn leaves the masks unchanged (round in y, x), so only points see it.
    Returns the two mask Volumes, (source points, target points) `[N, 3]` voxels, and u at the target points."""
    shape, s = (40, 32, 32), 4.0
    centre = (np.asarray(shape) - 1) / 2
    def u(x):  # x [..., 3] voxels -> displacement [..., 3]
        d = x - centre
        c, n = np.cos(0.3), np.sin(0.3)
        turned = np.stack([0.9 * d[..., 0], c * d[..., 1] - n * d[..., 2], n * d[..., 1] + c * d[..., 2]], -1)
        return turned - d
    def inside(x):
        d = (x - centre) * s
        return (d[..., 0] / 55) ** 2 + (d[..., 1] ** 2 + d[..., 2] ** 2) / 40**2 <= 1
    grid = np.moveaxis(np.indices(shape, np.float64), 0, -1)
    source, target = inside(grid), inside(grid + u(grid))
    rng = np.random.default_rng(1)
    candidates = rng.uniform(0, np.asarray(shape) - 1, (20 * n_points, 3))
    target_points = candidates[inside(candidates + u(candidates)) & inside(candidates)][:n_points]
    masks = [data.Volume(m.astype(np.float32), (s, s, s), m[..., None].astype(np.uint8), ("lung",), name)
             for m, name in ((source, "exp"), (target, "insp"))]
    return masks, (target_points + u(target_points), target_points)


def test_the_motion_fit_recovers_a_known_motion_from_masks_and_points():
    masks, points = _spinning_lungs()
    options = dict(grid=(32, 28, 28), spacing=(6.0, 6.0, 6.0))
    combined = lung.estimate_motion(*masks, "spin", "expiration", pairs=points, **options)
    alone = lung.estimate_motion(*masks, "spin", "expiration", **options)
    held, _ = lung._held_out_split(len(points[1]))
    errors = {}
    for name, motion in (("combined", combined), ("masks", alone)):
        on_grid = [(p * 4.0 - motion.origin) / 6.0 for p in points]
        errors[name] = lung._point_error(motion.ddf, on_grid[1][held], on_grid[0][held], 6.0).mean()
    assert combined.stats["held_out_mm_mean"] == pytest.approx(errors["combined"], abs=0.01)
    assert combined.stats["dice"] >= 0.93 and combined.stats["points_held_out"] == len(held)
    assert errors["combined"] < 0.4 * errors["masks"], errors
    assert errors["combined"] < 0.3 * combined.stats["initial_mm_mean"], (errors, combined.stats)


def test_motion_inputs_are_checked_naming_the_case():
    masks, (source_points, target_points) = _spinning_lungs(100)
    with pytest.raises(data.DataError, match=r"motion spin: only \d+% of the inspiration keypoints lie inside"):
        lung.estimate_motion(*masks, "spin", "expiration", pairs=(source_points, target_points + [0, 15, 0]),
                             grid=(32, 28, 28), spacing=(6.0, 6.0, 6.0))
    coarse = data.Volume(np.zeros((20, 40, 40), np.float32), (8.0, 1.0, 1.0), None, (), "a0002")
    with pytest.raises(data.DataError, match="a0002: its slices are 8.00 mm apart, too coarse along z"):
        lung.prepare_ct(coarse, "inspiration", "a0002")
    source = _phantom()
    steady = np.random.default_rng(0).uniform(-10, 10, (50, 3)) + (source.lo + source.hi) / 2
    motion = lung.landmark_motion(steady / 2, steady / 2 + 0.5, (2.0, 2.0, 2.0), "dirlab_9", "expiration",
                                  grid=(50, 50, 50), spacing=(2.0, 2.0, 2.0))
    assert motion.stats["held_out_mm_mean"] < 0.01 and motion.stats["folding_fraction"] == 0
    motion.points = motion.points + 30.0  # landmarks that the mapping puts beside the CT's lungs
    with pytest.raises(data.DataError, match="test/case_009: only 0% of motion dirlab_9's landmarks fall inside"):
        lung.make_pair(source, motion, "test/case_009", grid=(30, 30, 30), spacing=(2, 2, 2))


@pytest.mark.parametrize("given, message", [
    (["--ct", "ct.nii.gz", "--keypoints", "kp.csv"], "--keypoints needs --masks EXP INSP"),
    (["--ct", "ct.nii.gz", "--landmarks", "lm.mat"], "--landmarks FILE.mat needs --landmark-spacing"),
    (["--ct", "ct.nii.gz", "--landmarks", "lm.mat", "--landmark-spacing", "1", "1", "0"], "3 positive voxel sizes"),
    (["--ct", "ct.nii.gz", "--masks", "e.nii.gz", "i.nii.gz", "--landmarks", "lm.mat", "--landmark-spacing", "1", "1",
      "2.5"], "--masks (with --keypoints) or --landmarks, not both"),
    (["--landmarks", "lm.mat", "--landmark-spacing", "1", "1", "2.5"], "--landmarks needs --ct"),
])
def test_motion_flags_refuse_bad_combinations(tmp_path, monkeypatch, capsys, given, message):
    monkeypatch.setattr(lung, "build", lambda **kwargs: pytest.fail(f"build called with {kwargs}"))
    assert cli.main(["data", "build-lung", "--out", str(tmp_path / "out"), *given]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_landmark_spacing_takes_three_numbers(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "build-lung", "--ct", "ct", "--landmarks", "lm.mat", "--landmark-spacing", "1", "2.5"])
    assert exit_info.value.code == 2 and "--landmark-spacing: expected 3 arguments" in capsys.readouterr().err


def test_a_landmark_file_without_its_variables_is_named(tmp_path, inputs, capsys):
    import scipy.io

    bad = tmp_path / "landmarks.mat"
    scipy.io.savemat(bad, {"points": np.ones((5, 3))})
    assert cli.main(["data", "build-lung", "--out", str(tmp_path / "out"), "--ct", inputs[0], "--landmarks", str(bad),
                     "--landmark-spacing", "1", "1", "2.5", *TINY]) == 1
    assert f"{bad}: expected variables landmark_EE and landmark_EI" in capsys.readouterr().err
    assert not (tmp_path / "out" / "test").exists()


# --- training pairs drawn afresh ---

SMALL_GRID = dict(grid=(30, 30, 30), spacing=(2.0, 2.0, 2.0))


def _textured(state: str, name: str = "phantom") -> lung.Source:
    """A 48^3 CT of 2 mm voxels at breathing `state`: a lung box of 36 mm (-800 HU) in soft tissue
    (40 HU), both with a smooth texture (+-40 HU), so that interpolation errs little."""
    z, y, x = np.meshgrid(*[np.arange(48.0)] * 3, indexing="ij")
    lungs = np.all([np.abs(g - 23.5) < 9 for g in (z, y, x)], axis=0)
    image = np.where(lungs, -800.0, 40.0) + 20 * (np.sin(z / 3) + np.cos(y / 4) * np.sin(x / 5))
    volume = data.Volume(image.astype(np.float32), (2.0, 2.0, 2.0), lungs[..., None].astype(np.uint8), ("lung",), name)
    return lung.prepare_ct(volume, state, name, spacing=(2.0, 2.0, 2.0))


def _breathing(source: lung.Source, name: str, stretch: float = 0.2) -> lung.Motion:
    """A motion from `source`'s state on a 30^3 grid of 2 mm centred on its lungs: z scaled about their
    centre (the lungs are larger at inspiration) and a 2 mm shift along y; its target lungs a box."""
    grid = (30, 30, 30)
    centre = (np.asarray(grid) - 1) / 2
    ddf = np.zeros((*grid, 3), np.float32)
    ddf[..., 0] = (stretch if source.state == "inspiration" else -stretch) * (np.arange(30) - centre[0])[:, None, None]
    ddf[..., 1] = 1.0
    lungs = np.all(np.abs(np.moveaxis(np.indices(grid), 0, -1) - centre) < 9, axis=-1)
    return lung.Motion(name, source.state, ddf, (source.lo + source.hi) / 2 - centre * 2.0, source.lo, source.hi, lungs)


def _parts() -> tuple[list[lung.Source], list[lung.Motion]]:
    """Two training-like CTs, one per breathing state, and a motion from each state."""
    sources = [_textured("expiration", "phantom_exp"), _textured("inspiration", "phantom_ins")]
    return sources, [_breathing(s, f"phantom_{s.state[:3]}") for s in sources]


@pytest.mark.parametrize("state", ["expiration", "inspiration"])
def test_drawn_pairs_carry_an_exact_ground_truth(state):
    sources, motions = _parts()
    (pair,) = lung.draw_pairs([s for s in sources if s.state == state], motions, 1, seed=0, epoch=3, **SMALL_GRID)
    moving, fixed, ddf = pair.moving, pair.fixed, pair.ddf
    assert pair.name == "drawn/003_000" and ddf.shape == (30, 30, 30, 3) and metrics.folding_fraction(ddf) == 0
    warped = spatial.warp(moving.image[None], ddf[None]).numpy()[0]
    # make_pair scales the density in the lungs by the volume change (mass preservation): undo it.
    lungs = fixed.labels[..., 0] > 0
    jacobian = spatial.jacobian_determinant(ddf[None]).numpy()[0]
    model = np.where(lungs, (warped - lung.HU_AIR) * jacobian + lung.HU_AIR, warped)
    # Compared 2 voxels or more from the lungs' boundary (trilinear interpolation mixes across it)
    # and from the grid's faces (where x + ddf(x) may leave the grid).
    cube, inner = np.ones((3, 3, 3), bool), np.zeros_like(lungs)
    inner[4:-4, 4:-4, 4:-4] = True
    away = (ndimage.binary_erosion(lungs, cube, iterations=2) | ~ndimage.binary_dilation(lungs, cube, iterations=2)) & inner
    error = np.abs(model - fixed.image)[away]  # interpolation and rounding to whole HU only
    unregistered = np.abs(moving.image - fixed.image)[away].mean()
    assert error.mean() < 0.5 and error.max() < 2.5 and unregistered > 5, (error.mean(), error.max(), unregistered)
    warped_lungs = spatial.warp(moving.labels[None].astype(np.float32), ddf[None], interpolation="nearest").numpy()[0]
    differ = (warped_lungs[..., 0] > 0.5) != lungs
    if state == "expiration":  # the real CT is the moving image: its labels map exactly
        assert not differ.any()
    else:  # two nearest-neighbour samplings: the boundary may move by a voxel
        boundary = ndimage.binary_dilation(lungs, cube) & ~ndimage.binary_erosion(lungs, cube)
        assert not (differ & ~boundary).any() and differ.mean() < 0.01


def test_drawn_pairs_depend_on_the_seed_and_epoch_only():
    sources, motions = _parts()
    first = lung.draw_pairs(sources, motions, 3, seed=5, epoch=0, **SMALL_GRID)
    again = lung.draw_pairs(sources, motions, 2, seed=5, epoch=0, **SMALL_GRID)  # pair i: (seed, epoch, i) alone
    for a, b in zip(first, again):
        for x, y in ((a.moving.image, b.moving.image), (a.fixed.image, b.fixed.image), (a.ddf, b.ddf),
                     (a.moving.labels, b.moving.labels), (a.fixed.labels, b.fixed.labels)):
            np.testing.assert_array_equal(x, y)
    later = lung.draw_pairs(sources, motions, 3, seed=5, epoch=1, **SMALL_GRID)
    other = lung.draw_pairs(sources, motions, 3, seed=6, epoch=0, **SMALL_GRID)
    ddfs = [p.ddf for p in first + later + other]
    assert all(not np.array_equal(a, b) for i, a in enumerate(ddfs) for b in ddfs[i + 1:])  # never the same pair


def test_varied_motions_never_fold_and_stay_in_their_ranges():
    source = _textured("expiration")
    motion = _breathing(source, "phantom_exp2ins")
    spacing = 6.0  # mm: the 30-voxel grid then spans several perturbation sigmas, to see it fade out
    for seed in range(20):
        varied = lung.vary_motion(motion, np.random.default_rng(seed), spacing=(spacing,) * 3)
        assert metrics.folding_fraction(varied.ddf) == 0 and varied.source == motion.source
        factor, largest = varied.stats["factor"], varied.stats["perturbation_mm"]
        assert lung.AMPLITUDE[0] <= factor <= lung.AMPLITUDE[1] and 0 <= largest <= lung.PERTURBATION_MM
        perturbation = np.linalg.norm((varied.ddf - factor * motion.ddf) * spacing, axis=-1)  # mm
        assert perturbation.max() == pytest.approx(largest, abs=0.01)
        assert perturbation[motion.target_lung].mean() > perturbation[~motion.target_lung].mean()  # in the lungs mostly
    steep = _breathing(source, "phantom_steep", stretch=0.8)  # scaled by 1.25 or more, it folds
    for seed in range(5):
        varied = lung.vary_motion(steep, np.random.default_rng(seed), spacing=(spacing,) * 3, amplitude=(1.3, 1.5))
        assert metrics.folding_fraction(varied.ddf) == 0 and 1 < varied.stats["factor"] < 1.25
    folded = _breathing(source, "phantom_folded", stretch=1.2)  # folds as it is
    with pytest.raises(data.DataError, match=f"motion phantom_folded: its variants fold even {lung.FOLD_RETRIES} times"):
        lung.vary_motion(folded, np.random.default_rng(0), spacing=(spacing,) * 3)


@pytest.mark.parametrize("ct, motion", [("l2r_case001", "phantom_exp"), ("itkelastix", "phantom_exp"),
                                        ("phantom_exp", "l2r_case011_exp2ins"), ("phantom_exp", "l2r_case001_exp2ins")])
def test_drawn_pairs_refuse_the_test_splits_cts_and_motions(ct, motion):
    source = _textured("expiration", ct)
    leaked = ct if ct != "phantom_exp" else motion
    with pytest.raises(ValueError, match=f"{leaked} belong to the test split"):
        lung.draw_pairs([source], [_breathing(source, motion)], 1, seed=0, epoch=0, **SMALL_GRID)


def test_drawn_pairs_need_a_motion_from_a_cts_state():
    sources, motions = _parts()
    with pytest.raises(ValueError, match="no motion starts at the breathing state of a CT"):
        lung.draw_pairs(sources[:1], motions[1:], 1, seed=0, epoch=0, **SMALL_GRID)


def test_drawn_pairs_skip_landmark_motions_whose_landmarks_miss_the_ct_lungs():
    sources, motions = _parts()
    source, motion = sources[0], motions[0]
    inside = dataclasses.replace(motion, name="phantom_inside", points=(source.lo + source.hi)[None] / 2)
    outside = dataclasses.replace(motion, name="phantom_outside", points=source.lo[None] - 20.0)
    assert lung.landmarks_inside(source, inside) == 1.0 and lung.landmarks_inside(source, outside) == 0.0
    with pytest.raises(data.DataError, match="phantom_outside's landmarks fall inside the lungs"):
        lung.make_pair(source, outside, "refused", **SMALL_GRID)
    pairs = lung.draw_pairs([source], [outside, inside], 4, seed=0, epoch=0, **SMALL_GRID)
    assert len(pairs) == 4  # all with the motion whose landmarks lie in the lungs
    with pytest.raises(ValueError, match="no motion starts at the breathing state of a CT"):
        lung.draw_pairs([source], [outside], 1, seed=0, epoch=0, **SMALL_GRID)


def test_a_drawn_pair_that_cannot_be_carried_is_drawn_again(monkeypatch):
    sources, motions = _parts()
    make_pair, calls = lung.make_pair, []

    def failing_once(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 1:
            raise data.DataError(f"{args[2]}: could not invert the DDF")
        return make_pair(*args, **kwargs)

    monkeypatch.setattr(lung, "make_pair", failing_once)
    (pair,) = lung.draw_pairs(sources[:1], motions, 1, seed=0, epoch=0, **SMALL_GRID)
    assert calls == ["drawn/000_000", "drawn/000_000"] and pair.name == "drawn/000_000"
    calls.clear()  # the same failure again: the same stream gives the same redraw
    again = lung.draw_pairs(sources[:1], motions, 1, seed=0, epoch=0, **SMALL_GRID)[0]
    np.testing.assert_array_equal(again.ddf, pair.ddf)

    def failing(*args, **kwargs):
        raise data.DataError("never carried")

    monkeypatch.setattr(lung, "make_pair", failing)
    with pytest.raises(data.DataError, match="never carried"):
        lung.draw_pairs(sources[:1], motions, 1, seed=0, epoch=0, **SMALL_GRID)


def test_build_leaves_out_motions_that_cannot_be_fitted_or_miss_a_cts_lungs(tmp_path, monkeypatch):
    source = _textured("expiration", "phantom_exp")
    motion = _breathing(source, "phantom_exp")
    inside = dataclasses.replace(motion, name="inside_exp2ins", points=(source.lo + source.hi)[None] / 2)
    outside = dataclasses.replace(motion, name="outside_exp2ins", points=source.lo[None] - 20.0)
    volume = data.Volume(source.image, tuple(source.spacing), (source.lung[..., None] > 0.5).astype(np.uint8), ("lung",),
                         "phantom")

    def unfit(states):
        raise data.DataError("motion broken_exp2ins: it folds")

    monkeypatch.setattr(lung, "_inputs", lambda split, grid, spacing, user: (
        [("phantom_exp", lambda: volume, "expiration", "CT phantom_exp")],
        [("inside", lambda states: [inside]), ("outside", lambda states: [outside]), ("broken", unfit)]))
    monkeypatch.setattr(lung, "check_lungs", lambda source, where: (1.0, -800.0))
    lung.build(tmp_path, splits=("test",), progress=False, **SMALL_GRID)
    record = json.loads((tmp_path / "build.json").read_text())["splits"]["test"]
    assert list(record["pairs"]) == ["case_001"] and record["pairs"]["case_001"]["motion"] == "inside_exp2ins"
    assert record["skipped"] == {"broken": "motion broken_exp2ins: it folds",
                                 "phantom_exp + outside_exp2ins": "0% of the landmarks in the CT's lungs"}
    with pytest.warns(UserWarning, match="patient broken left out: motion broken_exp2ins: it folds"):
        sources, motions = lung.split_parts("train", progress=False, **SMALL_GRID)
    assert [m.name for m in motions] == ["inside_exp2ins", "outside_exp2ins"]


def _drawing_on_small_grids(monkeypatch) -> tuple[list[lung.Source], list[lung.Motion], object, list[int]]:
    """`_parts()` as the training split, and `lung.draw_pairs` on `SMALL_GRID`: (sources, motions,
    the patched draw_pairs, the epochs it was called for, in order)."""
    sources, motions = _parts()
    draw_pairs, drawn = lung.draw_pairs, []

    def draw_small(sources, motions, count, seed, epoch):
        drawn.append(epoch)
        return draw_pairs(sources, motions, count, seed, epoch, **SMALL_GRID)

    monkeypatch.setattr(lung, "split_parts", lambda split, progress: {"train": (sources, motions)}[split])
    monkeypatch.setattr(lung, "draw_pairs", draw_small)
    return sources, motions, draw_small, drawn


def test_training_on_pairs_drawn_every_epoch(tmp_path, monkeypatch):
    from teachreg import train

    sources, motions, draw_small, drawn = _drawing_on_small_grids(monkeypatch)
    config = {"model": {"channels": [4, 8]}, "mode": "supervised", "data": {"draw": 2}, "epochs": 2,
              "augmentation": {"scale": 0.05, "fov_cut": 0.5, "intensity": 0.1}}
    _, history = train.train(config, output=tmp_path / "run", progress=False)
    assert drawn == [0, 1] and len(history) == 2 and all(np.isfinite(row["total"]) for row in history)
    record = json.loads((tmp_path / "run" / "motions.json").read_text())
    assert record["cts"] == ["phantom_exp", "phantom_ins"] and list(record["motions"]) == ["phantom_exp", "phantom_ins"]
    with pytest.raises(ValueError, match="not both"):
        train.train(config, output=tmp_path / "given", progress=False, pairs=draw_small(sources, motions, 1, 0, 0))
    with pytest.raises(ValueError, match="data.draw must be an integer >= 0"):
        train.load_config({"data": {"draw": -1}})


def test_drawn_pairs_kept_for_several_epochs_are_drawn_again_on_resuming(tmp_path, monkeypatch):
    from teachreg import train

    _, _, _, drawn = _drawing_on_small_grids(monkeypatch)
    config = {"model": {"channels": [4, 8], "downsample": 2}, "mode": "supervised", "data": {"draw": 1, "keep": 2},
              "epochs": 3}
    straight, _ = train.train(config, output=tmp_path / "straight", progress=False)
    assert drawn == [0, 1, 2]  # each epoch draws once; epochs 2 and 3 also train on the pair drawn before
    assert train._learning_rate({**config, "schedule": "cosine", "epochs": 3, "learning_rate": 1.0},
                                1, 1).decay_steps == 1 + 2 + 2
    drawn.clear()
    train.train({**config, "epochs": 2}, output=tmp_path / "resumed", progress=False)
    resumed, _ = train.train(config, output=tmp_path / "resumed", progress=False)
    assert drawn == [0, 1, 1, 2]  # resumed, it draws again the pair its epoch keeps from the one before
    for a, b in zip(resumed.weights, straight.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(ValueError, match="data.keep .* set data.draw"):
        train.train({"data": {"keep": 2}}, output=tmp_path / "undrawn", progress=False)
    with pytest.raises(ValueError, match="data.keep must be an integer >= 1"):
        train.load_config({"data": {"keep": 0}})
