"""teachreg.io: images with their header, and fields that SimpleITK applies exactly as teachreg does.

The images are anisotropic and rotated (not axis-aligned), so that every part of the conversion
(voxel order, spacing, direction, origin) matters.
"""

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from teachreg import io, scans, spatial

MARGIN = 3  # voxels from the borders where interpolation at the edges may differ


def _rotated_image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.3, 0.8, 2.1))
    image.SetOrigin((-40.0, 25.5, 112.0))
    rotation = sitk.Euler3DTransform((0, 0, 0), 0.3, -0.2, 0.5)
    image.SetDirection(rotation.GetMatrix())
    return image


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    array = ndimage.gaussian_filter(rng.normal(size=(18, 26, 22)), 2.0).astype(np.float32)
    return _rotated_image(1000 * array)


@pytest.fixture(scope="module")
def ddf():
    rng = np.random.default_rng(1)
    return (3 * ndimage.gaussian_filter(rng.normal(size=(18, 26, 22, 3)), (3, 3, 3, 0))).astype(np.float32)[None]


def _interior(ddf: np.ndarray) -> np.ndarray:
    """Voxels at least MARGIN from the grid's borders whose sample lies MARGIN inside the moving image."""
    shape = np.array(ddf.shape[1:4])
    sample = spatial.reference_grid(shape).numpy() + ddf[0]
    inside = np.all((sample >= MARGIN) & (sample <= shape - 1 - MARGIN), axis=-1)
    inside[:MARGIN], inside[-MARGIN:], inside[:, :MARGIN], inside[:, -MARGIN:] = False, False, False, False
    inside[:, :, :MARGIN], inside[:, :, -MARGIN:] = False, False
    assert inside.sum() > 500
    return inside


def test_a_teachreg_field_applied_by_simpleitk_warps_as_teachreg(volume, ddf, tmp_path):
    io.save_ddf(tmp_path / "ddf.nii.gz", ddf, volume)
    field = sitk.ReadImage(str(tmp_path / "ddf.nii.gz"), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    array = sitk.GetArrayFromImage(volume)
    by_sitk = sitk.GetArrayFromImage(sitk.Resample(volume, volume, transform, sitk.sitkLinear, 0.0))
    by_teachreg = spatial.warp(array[None], ddf).numpy()[0]
    inside = _interior(ddf)
    error = np.abs(by_sitk - by_teachreg)[inside].max()
    assert error < 1e-3 * np.ptp(array)

    labels = np.digitize(array, np.percentile(array, [30, 60, 85])).astype(np.uint8)  # 4 regions
    label_map = sitk.GetImageFromArray(labels)
    label_map.CopyInformation(volume)
    by_sitk = sitk.GetArrayFromImage(sitk.Resample(label_map, volume, transform, sitk.sitkNearestNeighbor, 0))
    by_teachreg = spatial.warp(labels[None], ddf, interpolation="nearest").numpy()[0]
    np.testing.assert_array_equal(by_sitk[inside], by_teachreg[inside])


def test_a_field_simpleitk_computes_loads_and_warps_the_same(volume, tmp_path):
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.05, 0.04, -0.02, -0.03, 0.96, 0.05, 0.02, -0.04, 1.02))
    affine.SetTranslation((2.5, -1.5, 3.0))
    affine.SetCenter(volume.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in volume.GetSize()]))
    field = sitk.TransformToDisplacementField(affine, sitk.sitkVectorFloat64, volume.GetSize(), volume.GetOrigin(),
                                              volume.GetSpacing(), volume.GetDirection())
    sitk.WriteImage(field, str(tmp_path / "affine.mha"))

    ddf, loaded = io.load_ddf(tmp_path / "affine.mha")
    assert ddf.shape == (1, *volume.GetSize()[::-1], 3) and loaded.GetDirection() == volume.GetDirection()
    by_sitk = sitk.GetArrayFromImage(sitk.Resample(volume, volume, affine, sitk.sitkLinear, 0.0))
    array = sitk.GetArrayFromImage(volume)
    by_teachreg = spatial.warp(array[None], ddf).numpy()[0]
    inside = _interior(ddf)
    assert np.abs(by_sitk - by_teachreg)[inside].max() < 1e-3 * np.ptp(array)

    points = np.array([volume.TransformContinuousIndexToPhysicalPoint(v) for v in ([5.2, 7.7, 4.1], [12.5, 3.3, 9.0])])
    expected = [affine.TransformPoint(p) for p in points]
    np.testing.assert_allclose(scans.warp_points(tmp_path / "affine.mha", points), expected, atol=1e-3)


def test_conversions_round_trip_and_match_simpleitk_geometry(volume, ddf):
    np.testing.assert_allclose(io.ddf_from_mm(io.ddf_to_mm(ddf, volume), volume), ddf, atol=1e-5)
    voxel = np.array([3.0, 10.5, 7.25])  # z, y, x
    point = volume.TransformContinuousIndexToPhysicalPoint(voxel[::-1].tolist())
    np.testing.assert_allclose(io.voxel_coordinates(point, volume), voxel, atol=1e-4)
    other = sitk.Image(volume)
    other.SetOrigin((-30.0, 20.0, 100.0))
    other.SetSpacing((1.0, 1.0, 1.5))
    affine = io.voxel_affine(other, volume)
    expected = other.TransformPhysicalPointToContinuousIndex(point)[::-1]
    np.testing.assert_allclose(np.append(voxel, 1) @ affine, expected, atol=1e-4)


def test_images_keep_their_header(volume, tmp_path):
    for name in ("a.nii.gz", "a.nrrd", "a.mha"):
        io.write_image(tmp_path / name, sitk.GetArrayFromImage(volume), volume)
        back = io.read_image(tmp_path / name)
        assert back.GetSize() == volume.GetSize()
        np.testing.assert_allclose(back.GetSpacing(), volume.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(back.GetOrigin(), volume.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(back.GetDirection(), volume.GetDirection(), atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mha", "a.nii.gz", "a.nrrd"]  # no temporary files


def test_bad_input_gets_a_clear_message(volume, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="is not an image that SimpleITK can read"):
        io.read_image(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.read_image(tmp_path / "missing.nii.gz")
    sitk.WriteImage(sitk.Image(10, 12, sitk.sitkFloat32), str(tmp_path / "slice.nii.gz"))
    with pytest.raises(ValueError, match="2-D image of size 10x12"):
        io.read_image(tmp_path / "slice.nii.gz")
    nrrd.write(str(tmp_path / "bare.nrrd"), np.zeros((6, 7, 8), np.float32))
    with pytest.raises(ValueError, match="gives no voxel size"):
        io.read_image(tmp_path / "bare.nrrd")
    (tmp_path / "bare.mha").write_bytes(b"NDims = 3\nDimSize = 4 5 6\nElementType = MET_FLOAT\n"
                                        b"ElementDataFile = LOCAL\n" + np.zeros(120, np.float32).tobytes())
    with pytest.raises(ValueError, match="gives no voxel size"):
        io.read_image(tmp_path / "bare.mha")

    array = sitk.GetArrayFromImage(volume)
    io.write_image(tmp_path / "regions.nii.gz", np.digitize(array, [0, np.median(array[array > 0])]).astype(np.uint8), volume)
    with pytest.raises(ValueError, match="is not a binary mask: it holds 3 values"):
        io.read_label(tmp_path / "regions.nii.gz")
    io.write_image(tmp_path / "mask.nii.gz", 255 * (array > 0).astype(np.uint8), volume)
    assert set(np.unique(sitk.GetArrayViewFromImage(io.read_label(tmp_path / "mask.nii.gz", like=volume)))) == {0, 1}
    with pytest.raises(ValueError, match="lies on another grid than its image"):
        io.read_label(tmp_path / "mask.nii.gz", like=sitk.Image(5, 5, 5, sitk.sitkFloat32))

    with pytest.raises(ValueError, match=r"but the reference grid needs \[18, 26, 22, 3\]"):
        io.save_ddf(tmp_path / "ddf.nii.gz", np.zeros((1, 18, 26, 21, 3)), volume)
    with pytest.raises(ValueError, match="reference must be the fixed image as a SimpleITK image"):
        io.save_ddf(tmp_path / "ddf.nii.gz", np.zeros((1, 18, 26, 22, 3)), array)
    with pytest.raises(ValueError, match="an array has no spacing"):
        io.write_image(tmp_path / "b.nii.gz", array)
    with pytest.raises(ValueError, match="writes two files"):
        io.write_image(tmp_path / "b.mhd", volume)
    with pytest.raises(ValueError, match="is not a 3-D displacement field"):
        io.load_ddf(tmp_path / "regions.nii.gz")
