"""teachreg.elastix: elastix's output comes back as a DDF in teachreg's conventions.

Skipped where the optional package itk-elastix is not installed.
"""

import numpy as np
import pytest

from teachreg import elastix, metrics, spatial

pytestmark = pytest.mark.skipif(not elastix.available(), reason=elastix.INSTALL_HINT)


def blobs(shape, centres):
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), axis=-1)
    return sum(np.exp(-np.sum((grid - c) ** 2, axis=-1) / 18.0) for c in centres).astype(np.float32)


def test_a_known_shift_comes_back_in_voxels_in_zyx_order():
    # the moving image is the fixed one moved by (2, -3, 1.5) voxels, with anisotropic spacing:
    # fixed(x) = moving(x - shift), so the DDF must be -shift everywhere (units: voxels, not mm)
    shape, shift = (24, 40, 36), np.array([2.0, -3.0, 1.5])
    centres = [np.array(c, np.float32) for c in ((12, 14, 12), (10, 26, 22), (15, 20, 26))]
    fixed = blobs(shape, centres)
    moving = blobs(shape, [c - shift for c in centres])
    result = elastix.register(moving, fixed, maps=("translation",), spacing=(3.0, 1.0, 1.5))
    centre = result.ddf.numpy()[0, 8:16, 12:28, 12:24]
    assert np.allclose(centre, -shift, atol=0.1), centre.mean(axis=(0, 1, 2))
    assert metrics.folding_fraction(result.ddf) == 0
    warped = spatial.warp(moving[None], result.ddf).numpy()[0]
    assert np.abs(warped - fixed)[4:-4, 8:-8, 8:-8].max() < 0.1
    assert result.seconds > 0


def test_shapes_must_match():
    with pytest.raises(ValueError, match="one shape"):
        elastix.register(np.zeros((8, 8, 8)), np.zeros((8, 8, 9)))


def test_unknown_map_names_are_refused():
    with pytest.raises(ValueError, match="translation"):
        elastix.register(np.zeros((8, 8, 8)), np.zeros((8, 8, 8)), maps=("bsplines",))


def test_stored_results_name_both_maps():
    stored = elastix.stored_results()
    assert set(stored) == {"bspline", "affine then bspline"}
    for row in stored.values():
        assert 0 < row["dice"] <= 1 and 0 <= row["folding"] <= 1 and row["seconds"] > 0
