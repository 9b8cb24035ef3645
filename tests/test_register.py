"""The classical optimisers recover known transforms."""

import numpy as np
import pytest

from teachreg import register, spatial


def blobs(shape=(24, 32, 32), seed=0):
    """A smooth synthetic volume: a few Gaussian blobs of different sizes and intensities."""
    rng = np.random.default_rng(seed)
    grid = spatial.reference_grid(shape).numpy()
    volume = np.zeros(shape, np.float32)
    for _ in range(24):
        centre = rng.uniform(0.1, 0.9, 3) * np.asarray(shape)
        width = rng.uniform(1.5, 4.0)
        volume += rng.uniform(0.5, 1.0) * np.exp(-np.sum((grid - centre) ** 2, axis=-1) / (2 * width**2))
    return volume


@pytest.mark.parametrize("seed", [1, 2])
def test_affine_recovers_a_known_random_affine(seed):
    fixed = blobs(seed=seed)
    transform = spatial.random_affine(1, 0.15, seed=seed, shape=fixed.shape)
    moving = spatial.warp(fixed[None], spatial.affine_to_ddf(transform, fixed.shape)).numpy()[0]
    true_ddf = spatial.affine_to_ddf(spatial.invert_affine(transform), fixed.shape).numpy()
    result = register.affine(moving, fixed, steps=(100, 100, 60))
    error = np.linalg.norm(result.ddf.numpy() - true_ddf, axis=-1).mean()
    initial = np.linalg.norm(true_ddf, axis=-1).mean()
    assert initial > 1.5
    assert error < 0.15, f"mean displacement error {error:.3f} voxels (initial {initial:.2f})"
    assert result.history[-1] < result.history[0]
    assert len(result.history) == 260 and result.seconds > 0
    np.testing.assert_allclose(result.warp(moving), spatial.warp(moving[None], result.ddf).numpy()[0])


def test_result_warp_keeps_the_callers_layout():
    fixed = blobs(shape=(8, 10, 12))
    result = register.affine(fixed, fixed, levels=1, steps=5)
    assert result.warp(fixed).shape == (8, 10, 12)
    assert result.warp(fixed[None]).shape == (1, 8, 10, 12)
    assert result.warp(np.stack([fixed, fixed], -1)).shape == (8, 10, 12, 2)
    with pytest.raises(ValueError, match="shape"):
        result.warp(np.zeros((3, 4, 5)))


@pytest.mark.parametrize(
    "kwargs,match",
    [({"loss": "nope"}, "loss must be one of"), ({"steps": (1, 2)}, "steps must be"), ({}, "same shape")],
)
def test_affine_rejects_bad_arguments(kwargs, match):
    fixed = blobs(shape=(8, 10, 12))
    moving = fixed if kwargs else fixed[:, :, :10]
    with pytest.raises(ValueError, match=match):
        register.affine(moving, fixed, **kwargs)
