"""`teachreg register` and `teachreg warp` (teachreg.scans) on files: a known shift, and chapter 4's pair."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from teachreg import data, io, network, presets
from teachreg.cli import main

SHIFT = np.array([3.0, -2.0, 1.5])  # mm, x, y, z: the moving image is the fixed one moved by SHIFT


def _blobs(grid: sitk.Image, shift) -> sitk.Image:
    """Three Gaussian blobs (mm coordinates), moved by `shift`, sampled on `grid`."""
    z, y, x = np.meshgrid(*[np.arange(n, dtype=float) for n in grid.GetSize()[::-1]], indexing="ij")
    index = np.stack([x, y, z], axis=-1)
    points = np.asarray(grid.GetOrigin()) + (index * grid.GetSpacing()) @ np.reshape(grid.GetDirection(), (3, 3)).T
    points -= shift
    array = sum(np.exp(-np.sum((points - centre) ** 2, axis=-1) / (2 * width**2))
                for centre, width in (((20, 18, 16), 6), ((34, 30, 22), 5), ((28, 16, 30), 4)))
    image = sitk.GetImageFromArray((1000 * array).astype(np.float32))
    image.CopyInformation(grid)
    return image


@pytest.fixture(scope="module")
def shifted_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    fixed_grid = sitk.Image([28, 24, 22], sitk.sitkUInt8)
    fixed_grid.SetSpacing((1.8, 2.0, 2.2))
    moving_grid = sitk.Image([30, 26, 18], sitk.sitkUInt8)  # another grid: the moving image is resampled
    moving_grid.SetSpacing((1.7, 1.9, 2.6))
    moving_grid.SetOrigin((-1.0, 1.0, -2.0))
    for name, grid, shift in (("fixed", fixed_grid, 0), ("moving", moving_grid, SHIFT)):
        image = _blobs(grid, shift)
        io.write_image(folder / f"{name}.nii.gz", image)
        io.write_image(folder / f"{name}_label.nii.gz", sitk.Cast(image > 300, sitk.sitkUInt8))
    return folder


def test_register_recovers_a_known_shift_and_warp_applies_it(shifted_pair, tmp_path, capsys):
    p = shifted_pair
    args = ["register", str(p / "moving.nii.gz"), str(p / "fixed.nii.gz"), "--out", str(tmp_path / "out"),
            "--moving-label", str(p / "moving_label.nii.gz"), "--fixed-label", str(p / "fixed_label.nii.gz"), "--quiet"]
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["dice_after"] > max(0.9, report["dice_before"] + 0.1)
    assert report["folded_fraction"] == 0 and report["method"] == "bspline" and report["seconds"] > 0
    assert sorted(report["outputs"]) == sorted(["warped.nii.gz", "ddf.nii.gz", "warped_label.nii.gz", "report.json"])

    _, field = io.load_ddf(tmp_path / "out" / "ddf.nii.gz")
    fixed = io.read_image(p / "fixed.nii.gz")
    assert field.GetSize() == fixed.GetSize() and field.GetSpacing() == fixed.GetSpacing()
    displacement = sitk.GetArrayFromImage(field)  # mm, x, y, z
    blob = sitk.GetArrayFromImage(fixed) > 300
    np.testing.assert_allclose(displacement[blob].mean(axis=0), SHIFT, atol=0.3)

    # teachreg warp: the same field applied to the moving image gives the warped image of register
    assert main(["warp", str(tmp_path / "out" / "ddf.nii.gz"), str(p / "moving.nii.gz"),
                 "--out", str(tmp_path / "warped.nii.gz")]) == 0
    np.testing.assert_allclose(sitk.GetArrayFromImage(io.read_image(tmp_path / "warped.nii.gz")),
                               sitk.GetArrayFromImage(io.read_image(tmp_path / "out" / "warped.nii.gz")), atol=1e-3)
    point = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint((10, 9, 8)))
    (tmp_path / "points.csv").write_text(f"x,y,z\n{point[0]},{point[1]},{point[2]}\n")
    assert main(["warp", str(tmp_path / "out" / "ddf.nii.gz"), "--points", str(tmp_path / "points.csv"),
                 "--out", str(tmp_path / "moved.csv")]) == 0
    moved = np.loadtxt(tmp_path / "moved.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(moved, point + SHIFT, atol=0.5)  # a fixed point maps to its moving match

    # nothing is overwritten without --force; usage errors
    before = (tmp_path / "out" / "report.json").read_text()
    capsys.readouterr()
    assert main(args) == 1
    assert "already holds results (warped.nii.gz, ddf.nii.gz" in capsys.readouterr().err
    assert (tmp_path / "out" / "report.json").read_text() == before
    assert main(["warp", str(tmp_path / "out" / "ddf.nii.gz"), str(p / "moving.nii.gz"),
                 "--out", str(tmp_path / "warped.nii.gz")]) == 1
    assert "exists; give another file, or --force" in capsys.readouterr().err
    assert main(["warp", str(tmp_path / "out" / "ddf.nii.gz"), "--out", str(tmp_path / "x.nii.gz")]) == 2
    assert main(args[:-3] + ["--force", "--quiet"]) == 1
    assert "give both labels" in capsys.readouterr().err


def test_register_refuses_bad_input(shifted_pair, tmp_path, capsys):
    p = shifted_pair
    (tmp_path / "notes.txt").write_text("not an image")
    run = ["register", str(p / "moving.nii.gz"), str(tmp_path / "notes.txt"), "--out", str(tmp_path / "out"), "--quiet"]
    assert main(run) == 1
    assert "is not an image that SimpleITK can read" in capsys.readouterr().err
    assert main(run[:2] + [str(p / "fixed.nii.gz")] + run[3:] + ["--method", "elastix"]) == 1
    assert "method must be one of bspline, ddf, svf, demons, network, got 'elastix'" in capsys.readouterr().err
    assert main(run[:2] + [str(p / "fixed.nii.gz")] + run[3:] + ["--moving-label", str(p / "fixed_label.nii.gz"),
                                                                  "--fixed-label", str(p / "fixed_label.nii.gz")]) == 1
    assert "lies on another grid than its image" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_demons_method_recovers_the_shift_without_folding(shifted_pair, tmp_path):
    p = shifted_pair
    assert main(["register", str(p / "moving.nii.gz"), str(p / "fixed.nii.gz"), "--out", str(tmp_path),
                 "--moving-label", str(p / "moving_label.nii.gz"), "--fixed-label", str(p / "fixed_label.nii.gz"),
                 "--method", "demons", "--no-affine", "--quiet"]) == 0  # demons alone
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["method"] == "demons" and report["folded_fraction"] == 0
    assert report["dice_after"] > max(0.9, report["dice_before"] + 0.1)
    _, field = io.load_ddf(tmp_path / "ddf.nii.gz")
    blob = sitk.GetArrayFromImage(io.read_image(p / "fixed.nii.gz")) > 300
    np.testing.assert_allclose(sitk.GetArrayFromImage(field)[blob].mean(axis=0), SHIFT, atol=0.5)


def test_the_network_method_writes_a_field_on_the_fixed_grid(shifted_pair, tmp_path):
    p = shifted_pair
    assert main(["register", str(p / "moving.nii.gz"), str(p / "fixed.nii.gz"), "--out", str(tmp_path),
                 "--method", "network", "--no-affine", "--quiet"]) == 0
    ddf, field = io.load_ddf(tmp_path / "ddf.nii.gz")
    assert ddf.shape == (1, 22, 24, 28, 3) and np.isfinite(ddf).all()


def test_the_network_method_gives_a_network_that_takes_masks_the_lungs_it_finds(shifted_pair, tmp_path, monkeypatch,
                                                                                 capsys):
    mirror = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not mirror.is_dir():
        pytest.skip(f"no data mirror at {mirror}")
    monkeypatch.setenv("TEACHREG_DATA_MIRROR", str(mirror))
    monkeypatch.setenv("TEACHREG_DATA_DIR", str(tmp_path / "cache"))
    ct = data.fetch("chest_ct_cip")["chest_ct/cip/ct-64.nrrd"]
    model = network.RegistrationNetwork(channels=[4], masks=True)
    given = []

    def predict_ddf(moving, fixed, masks=None):
        given.append(masks)
        return network.RegistrationNetwork.predict_ddf(model, moving, fixed, masks=masks)

    monkeypatch.setattr(model, "predict_ddf", predict_ddf)
    monkeypatch.setattr(network, "load_pretrained", lambda name="lung_ct": model)
    assert main(["register", str(ct), str(ct), "--out", str(tmp_path / "out"), "--method", "network", "--no-affine",
                 "--quiet"]) == 0
    (masks,) = given
    litres = [float(m.sum()) * np.prod(presets.LUNG_SPACING) / 1e6 for m in masks]
    assert masks[0].shape == (1, *presets.LUNG_GRID) and 2 < litres[0] == litres[1] < 8  # both lungs of an adult
    # Three blobs hold no lungs: the run stops with a message, before writing anything.
    p = shifted_pair
    assert main(["register", str(p / "moving.nii.gz"), str(p / "fixed.nii.gz"), "--out", str(tmp_path / "blobs"),
                 "--method", "network", "--quiet"]) == 1
    assert "the moving scan: no lungs found" in capsys.readouterr().err
    assert not (tmp_path / "blobs").exists()


def _chapter4_results() -> dict:
    notebook = json.loads((Path(__file__).parents[1] / "book" / "ch04_nonrigid.ipynb").read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code" and "dice_ddf_bending" in "".join(cell["source"]):
            return json.loads("".join(cell["outputs"][0]["text"]))
    raise AssertionError("chapter 4's results cell not found")


def test_register_reproduces_chapter_4_on_the_prostate_pair_as_nifti(tmp_path):
    """Chapter 4's B-spline registration (presets.PROSTATE_NONRIGID, no affine step) from NIfTI files.

    Takes about 40 s on a 2-core CPU.
    """
    if not data.is_cached("prostate_mr") and not os.environ.get("TEACHREG_DATA_MIRROR"):
        pytest.skip("prostate_mr is neither cached nor in a mirror (TEACHREG_DATA_MIRROR)")
    pair = data.load("prostate_mr")
    for role, volume in (("moving", pair.moving), ("fixed", pair.fixed)):
        image = sitk.GetImageFromArray(volume.image)
        image.SetSpacing(volume.spacing[::-1])
        io.write_image(tmp_path / f"{role}.nii.gz", image)
        io.write_image(tmp_path / f"{role}_gland.nii.gz", volume.labels[..., 0], image)
    assert main(["register", str(tmp_path / "moving.nii.gz"), str(tmp_path / "fixed.nii.gz"), "--out",
                 str(tmp_path / "out"), "--no-affine", "--quiet", "--moving-label", str(tmp_path / "moving_gland.nii.gz"),
                 "--fixed-label", str(tmp_path / "fixed_gland.nii.gz")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    chapter = _chapter4_results()
    assert round(report["dice_before"], 4) == chapter["dice_before"]
    assert report["dice_after"] == pytest.approx(chapter["dice_after"], abs=0.01)
    assert report["folded_fraction"] < 0.001


def test_register_warns_when_the_field_folds(shifted_pair, tmp_path, capsys, monkeypatch):
    from teachreg import scans

    def folding(*args, **kwargs):
        return {"folded_fraction": 0.0223, "seconds": 1.0, "outputs": ["ddf.nii.gz"]}

    monkeypatch.setattr(scans, "register_files", folding)
    p = shifted_pair
    assert main(["register", str(p / "moving.nii.gz"), str(p / "fixed.nii.gz"), "--out", str(tmp_path), "--quiet"]) == 0
    assert "warning: the field folds 2.23 % of the voxels" in capsys.readouterr().err
    assert main(["register", str(p / "moving.nii.gz"), str(p / "fixed.nii.gz"), "--out", str(tmp_path), "--quiet",
                 "--method", "svf"]) == 0
    assert "warning" not in capsys.readouterr().err  # svf folds only by discretisation: no advice to give
