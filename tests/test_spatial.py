"""Analytic tests of grids, affines, resampling and DDF operations."""

import numpy as np
import pytest
import tensorflow as tf
from scipy.ndimage import correlate1d, map_coordinates

from teachreg import spatial
from teachreg.filters import gaussian_kernel1d

RNG = np.random.default_rng(0)


def smooth_volume(shape, seed=0):
    """A smooth random volume in [0, 1], so interpolation errors are small and meaningful."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=shape).astype(np.float32)
    return spatial.smooth(x[None], 1.5).numpy()[0]


def test_reference_grid_holds_voxel_indices():
    grid = spatial.reference_grid((2, 3, 4)).numpy()
    assert grid.shape == (2, 3, 4, 3)
    assert np.array_equal(grid[1, 2, 3], [1, 2, 3])
    assert np.array_equal(grid[0, 1, 0], [0, 1, 0])


def test_identity_warp_returns_input():
    image = RNG.uniform(size=(2, 6, 7, 8)).astype(np.float32)
    out = spatial.warp(image, np.zeros((2, 6, 7, 8, 3), np.float32)).numpy()
    np.testing.assert_allclose(out, image, atol=1e-6)
    affine_out = spatial.resample(image, spatial.warp_grid(spatial.reference_grid((6, 7, 8)), np.tile(np.eye(4, 3, dtype=np.float32), (2, 1, 1))))
    np.testing.assert_allclose(affine_out.numpy(), image, atol=1e-6)


@pytest.mark.parametrize("shift", [(1, 0, 0), (0, -2, 1), (2, 1, -3)])
def test_integer_translation_shifts_the_array(shift):
    image = RNG.uniform(size=(1, 10, 11, 12)).astype(np.float32)
    ddf = np.broadcast_to(np.asarray(shift, np.float32), (1, 10, 11, 12, 3))
    out = spatial.warp(image, ddf).numpy()[0]
    expected = np.roll(image[0], [-s for s in shift], axis=(0, 1, 2))
    interior = tuple(slice(3, -3) for _ in range(3))
    np.testing.assert_allclose(out[interior], expected[interior], atol=1e-6)


@pytest.mark.parametrize("padding,mode", [("border", "nearest"), ("zeros", "constant")])
def test_linear_resampling_matches_scipy(padding, mode):
    volume = smooth_volume((12, 13, 14))
    coords = RNG.uniform(-2, 15, size=(5, 6, 7, 3)).astype(np.float32)
    ours = spatial.resample(volume[None], coords[None], padding=padding).numpy()[0]
    theirs = map_coordinates(volume, np.moveaxis(coords, -1, 0), order=1, mode=mode, cval=0.0)
    if padding == "zeros":  # scipy's 'constant' mode is 0 beyond the last voxel, ours fades over one voxel
        inside = np.all((coords >= 0) & (coords <= np.array([11, 12, 13])), axis=-1)
        ours, theirs = ours[inside], theirs[inside]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_resampling_with_channels_and_batch():
    volume = RNG.uniform(size=(2, 5, 6, 7, 3)).astype(np.float32)
    coords = RNG.uniform(0, 4, size=(2, 4, 4, 4, 3)).astype(np.float32)
    out = spatial.resample(volume, coords).numpy()
    assert out.shape == (2, 4, 4, 4, 3)
    for b in range(2):
        for c in range(3):
            ref = map_coordinates(volume[b, ..., c], np.moveaxis(coords[b], -1, 0), order=1)
            np.testing.assert_allclose(out[b, ..., c], ref, atol=1e-5)


def test_nearest_keeps_label_values():
    labels = RNG.integers(0, 4, size=(1, 8, 9, 10)).astype(np.float32)
    ddf = RNG.uniform(-3, 3, size=(1, 8, 9, 10, 3)).astype(np.float32)
    out = spatial.warp(labels, ddf, interpolation="nearest").numpy()
    assert set(np.unique(out)) <= {0.0, 1.0, 2.0, 3.0}
    coords = np.moveaxis(spatial.reference_grid((8, 9, 10)).numpy() + ddf[0], -1, 0)
    np.testing.assert_array_equal(out[0], map_coordinates(labels[0], coords, order=0, mode="nearest"))


def test_gradients_match_finite_differences():
    volume = tf.constant(smooth_volume((8, 8, 8))[None], tf.float32)
    ddf = tf.constant(RNG.uniform(-1.5, 1.5, size=(1, 8, 8, 8, 3)).astype(np.float32))
    weights = tf.constant(RNG.normal(size=(1, 8, 8, 8)).astype(np.float32))

    def loss(v, d):
        return tf.reduce_sum(spatial.warp(v, d) * weights)

    with tf.GradientTape(persistent=True) as tape:
        tape.watch([volume, ddf])
        value = loss(volume, ddf)
    grad_ddf, grad_volume = tape.gradient(value, ddf), tape.gradient(value, volume)
    eps = 1e-2
    for index in [(0, 3, 4, 2, 0), (0, 5, 1, 6, 1), (0, 2, 2, 2, 2)]:
        step = np.zeros(ddf.shape, np.float32)
        step[index] = eps
        numeric = (loss(volume, ddf + step) - loss(volume, ddf - step)) / (2 * eps)
        np.testing.assert_allclose(grad_ddf.numpy()[index], numeric.numpy(), rtol=2e-2, atol=2e-3)
    for index in [(0, 3, 3, 3), (0, 0, 7, 4)]:
        step = np.zeros(volume.shape, np.float32)
        step[index] = 1.0
        numeric = loss(volume + step, ddf) - loss(volume, ddf)  # the warp is linear in the volume
        np.testing.assert_allclose(grad_volume.numpy()[index], numeric.numpy(), rtol=1e-3, atol=1e-3)


def test_affine_gradient_matches_finite_differences():
    volume = tf.constant(smooth_volume((10, 10, 10))[None])
    fixed = tf.constant(smooth_volume((10, 10, 10), seed=1)[None])
    grid = spatial.reference_grid((10, 10, 10))
    params = tf.constant([[5.0, -3.0, 2.0]])

    def loss(rotations):
        affine = spatial.affine_from_parameters(rotations=rotations, center=(4.5, 4.5, 4.5))
        return tf.reduce_mean((spatial.resample(volume, spatial.warp_grid(grid, affine)) - fixed) ** 2)

    with tf.GradientTape() as tape:
        tape.watch(params)
        value = loss(params)
    grad = tape.gradient(value, params).numpy()
    for i in range(3):
        step = np.zeros((1, 3), np.float32)
        step[0, i] = 0.05
        numeric = (loss(params + step) - loss(params - step)) / 0.1
        np.testing.assert_allclose(grad[0, i], numeric.numpy(), rtol=5e-2, atol=1e-5)


def test_affine_parameters_compose_as_documented():
    affine = spatial.affine_from_parameters(
        rotations=(0.0, 0.0, 90.0), scales=(2.0, 1.0, 1.0), translations=(1.0, 2.0, 3.0), center=(1.0, 1.0, 1.0)
    ).numpy()[0]
    point = np.array([2.0, 1.0, 1.0])
    # scale axis 0 by 2 about the centre: (3, 1, 1); rotate 90 degrees about w: (d, h) -> (-h, d) about the centre
    expected = np.array([1.0, 3.0, 1.0]) + np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(np.append(point, 1) @ affine, expected, atol=1e-5)


def test_random_affine_is_seeded_and_centred():
    a = spatial.random_affine(3, 0.2, seed=7, shape=(37, 128, 128)).numpy()
    b = spatial.random_affine(3, 0.2, seed=7, shape=(37, 128, 128)).numpy()
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 4, 3)
    assert not np.allclose(a, spatial.random_affine(3, 0.2, seed=8, shape=(37, 128, 128)).numpy())
    np.testing.assert_allclose(spatial.random_affine(2, 0.0, seed=1).numpy(), np.tile(np.eye(4, 3), (2, 1, 1)), atol=1e-6)
    # each coordinate of the cube's corners shrinks by at most 20 %, so the volume's corners move at most 20 % of the half-size
    half = (np.array([37, 128, 128]) - 1) / 2
    corner = np.append(2 * half, 1)
    assert np.all(np.abs(corner @ a[0] - corner[:3]) <= 0.2 * 2 * half + 1e-3)


def test_inverse_affine_undoes_the_transform():
    affine = spatial.random_affine(2, 0.3, seed=3, shape=(20, 30, 40))
    inverse = spatial.invert_affine(affine).numpy()
    points = np.hstack([RNG.uniform(0, 40, size=(10, 3)), np.ones((10, 1))])
    for b in range(2):
        there = np.hstack([points @ affine.numpy()[b], np.ones((10, 1))])
        np.testing.assert_allclose(there @ inverse[b], points[:, :3], atol=1e-3)


@pytest.mark.parametrize("compiled", [False, True])
def test_spatial_gradient_is_numpy_s_and_its_gradient_is_its_transpose(compiled):
    """Values against numpy.gradient; the hand-written gradient against the transpose of the
    operator's matrix, built column by column in float64, with 2, 3 and 5 voxels along the axes."""
    shape = (1, 2, 3, 5, 2)
    field = np.random.default_rng(5).normal(size=shape)
    expected = np.stack(np.gradient(field, axis=(1, 2, 3)), axis=-1)
    np.testing.assert_allclose(spatial.spatial_gradient(tf.constant(field)).numpy(), expected, atol=1e-12)
    size = int(np.prod(shape))
    columns = [spatial.spatial_gradient(tf.constant(np.eye(size)[i].reshape(shape))).numpy().ravel() for i in range(size)]
    matrix = np.stack(columns, axis=1)
    upstream = np.random.default_rng(6).normal(size=(*shape, 3))

    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(tf.constant(upstream) * spatial.spatial_gradient(x))
        return tape.gradient(total, x)

    got = (tf.function(gradient, jit_compile=True) if compiled else gradient)(tf.constant(field))
    np.testing.assert_allclose(got.numpy().ravel(), matrix.T @ upstream.ravel(), rtol=1e-12, atol=1e-12)


def test_jacobian_of_affine_ddf_is_its_determinant():
    matrix = np.array([[1.1, 0.2, 0.0], [0.05, 0.9, 0.1], [0.0, -0.1, 1.2]], np.float32)
    affine = np.vstack([matrix.T, [1.0, -2.0, 0.5]])[None].astype(np.float32)
    ddf = spatial.affine_to_ddf(affine, (6, 7, 8))
    det = spatial.jacobian_determinant(ddf).numpy()
    np.testing.assert_allclose(det, np.linalg.det(matrix), rtol=1e-4)


def test_scaling_and_squaring_of_constant_field_is_translation():
    svf = np.broadcast_to(np.array([1.5, -0.5, 2.0], np.float32), (1, 12, 12, 12, 3))
    ddf = spatial.svf_to_ddf(svf).numpy()
    np.testing.assert_allclose(ddf, svf, atol=1e-5)


def test_scaling_and_squaring_inverts_with_negated_field():
    grid = spatial.reference_grid((16, 16, 16)).numpy()
    svf = 2.0 * np.sin(grid / 5.0)[None].astype(np.float32)
    forward, backward = spatial.svf_to_ddf(svf), spatial.svf_to_ddf(-svf)
    roundtrip = spatial.compose_ddf(forward, backward).numpy()
    interior = (0, slice(3, -3), slice(3, -3), slice(3, -3))
    assert np.abs(roundtrip[interior]).max() < 0.1
    assert spatial.jacobian_determinant(forward).numpy().min() > 0


def test_compose_matches_sequential_warps():
    image = smooth_volume((14, 14, 14))[None]
    grid = spatial.reference_grid((14, 14, 14)).numpy()
    first = (0.8 * np.sin(grid / 4.0))[None].astype(np.float32)
    second = (0.6 * np.cos(grid / 3.0))[None].astype(np.float32)
    sequential = spatial.warp(spatial.warp(image, first), second).numpy()
    composed = spatial.warp(image, spatial.compose_ddf(first, second)).numpy()
    interior = (0, slice(3, -3), slice(3, -3), slice(3, -3))
    np.testing.assert_allclose(composed[interior], sequential[interior], atol=0.02)


def test_invert_ddf_of_a_smooth_field_composes_to_zero():
    grid = spatial.reference_grid((24, 20, 22)).numpy()
    phase = 2 * np.pi * grid / 32
    ddf = 2.0 * np.stack([np.sin(phase[..., 1]), np.cos(phase[..., 2]), np.sin(phase[..., 0])], -1)  # 2 voxels
    inverse, residual = spatial.invert_ddf(ddf[None].astype(np.float32), tolerance=0.01)
    roundtrip = spatial.compose_ddf(ddf[None].astype(np.float32), inverse).numpy()
    assert residual == pytest.approx(np.abs(roundtrip).max()) and residual < 0.01
    assert np.abs(inverse.numpy() + ddf).max() > 0.1  # not simply the negated field


def test_invert_ddf_of_an_affine_is_the_inverse_affine():
    shape = (20, 24, 22)
    affine = spatial.affine_from_parameters(rotations=(0.0, 5.0, 0.0), scales=(1.05, 0.97, 1.0),
                                            translations=(0.5, -0.3, 0.2), center=(9.5, 11.5, 10.5))
    inverse, _ = spatial.invert_ddf(spatial.affine_to_ddf(affine, shape))
    expected = spatial.affine_to_ddf(spatial.invert_affine(affine), shape).numpy()
    interior = (0, slice(3, -3), slice(3, -3), slice(3, -3))  # where both maps stay inside the volume
    np.testing.assert_allclose(inverse.numpy()[interior], expected[interior], atol=1e-3)


def test_invert_ddf_refuses_a_folding_field():
    ddf = np.zeros((1, 12, 12, 12, 3), np.float32)
    ddf[0, :, :, :, 0] = -3.0 * np.arange(12)[:, None, None]  # reverses the z axis: no inverse
    with pytest.raises(ValueError, match="could not invert the DDF"):
        spatial.invert_ddf(ddf)


def test_resize_ddf_keeps_physical_displacement():
    # an affine DDF resampled to a finer grid is the same affine expressed in finer voxels
    affine = spatial.affine_from_parameters(rotations=(0.0, 10.0, 0.0), center=(4.0, 4.0, 4.0))
    coarse = spatial.affine_to_ddf(affine, (9, 9, 9))
    fine = spatial.resize_ddf(coarse, (17, 17, 17)).numpy()
    expected = spatial.affine_from_parameters(rotations=(0.0, 10.0, 0.0), center=(8.0, 8.0, 8.0))
    np.testing.assert_allclose(fine, spatial.affine_to_ddf(expected, (17, 17, 17)).numpy(), atol=1e-4)


@pytest.mark.parametrize("shape,coarse", [((9, 12, 2), (5, 6, 1)), ((17, 8, 5), (9, 8, 2))])
def test_linear_basis_resizes_as_the_trilinear_sampler(shape, coarse):
    # the separable matrices (`resize`, and the SVF's integration grid -> level) give what the
    # trilinear sampler gives at the corners-aligned positions, and reproduce an affine field exactly
    field = np.random.default_rng(0).normal(size=(1, *coarse, 3)).astype(np.float32)
    bases = [spatial.linear_basis(n, c) for n, c in zip(shape, coarse)]
    positions = spatial.reference_grid(shape).numpy() * ((np.array(coarse) - 1) / np.maximum(np.array(shape) - 1, 1))
    sampled = spatial.resample(field, positions[None]).numpy()
    np.testing.assert_allclose(spatial.bspline_to_ddf(field, bases).numpy(), sampled, atol=1e-5)
    np.testing.assert_allclose(spatial.resize(field, shape).numpy(), sampled, atol=1e-5)
    np.testing.assert_allclose(spatial.resize(field[..., 0], shape).numpy(), sampled[..., 0], atol=1e-5)
    for basis in bases:
        np.testing.assert_allclose(basis.sum(axis=1), 1.0, rtol=1e-6)
        assert np.all(basis >= 0) and np.all(np.count_nonzero(basis, axis=1) <= 2)
    if min(coarse) == 1:  # a single sample is copied, not interpolated
        return
    affine = spatial.affine_from_parameters(rotations=(0.0, 10.0, 0.0), scales=(1.1, 1.0, 0.9), center=(2.0, 3.0, 1.0))
    resized = spatial.bspline_to_ddf(spatial.affine_to_ddf(affine, coarse), bases).numpy()
    scale = [(n - 1) / (c - 1) for n, c in zip(shape, coarse)]  # fine voxels per coarse voxel
    coarse_grid = spatial.reference_grid(shape).numpy() / scale  # the fine voxels' positions in coarse voxels
    expected = (np.concatenate([coarse_grid, np.ones((*shape, 1))], -1) @ affine.numpy()[0]) - coarse_grid
    np.testing.assert_allclose(resized[0], expected, atol=1e-4)


def test_downsample_halves_the_grid_and_keeps_constants():
    image = np.full((1, 37, 128, 128), 3.0, np.float32)
    small = spatial.downsample(image).numpy()
    assert small.shape == (1, 19, 64, 64)
    np.testing.assert_allclose(small[:, 2:-2, 2:-2, 2:-2], 3.0, rtol=1e-5)


@pytest.mark.parametrize("level", [3.0, -1000.0, 1e4])
@pytest.mark.parametrize("shape", [(9, 20, 33), (2, 3, 17)])
def test_smooth_downsample_and_resize_keep_a_constant_up_to_the_borders(level, shape):
    # Zero padding darkened the borders of coarse pyramid levels; windows are renormalised instead,
    # even where the kernel is wider than the volume (sigma 4 on 2 voxels).
    image = np.full((1, *shape), level, np.float32)
    outputs = [spatial.smooth(image, sigma).numpy() for sigma in (0.5, 1.0, 4.0)]
    outputs += [spatial.downsample(image, factor).numpy() for factor in (2, 3)]
    outputs += [spatial.downsample(spatial.downsample(image)).numpy(), spatial.resize(image, (5, 6, 7)).numpy()]
    outputs += [spatial.smooth(np.repeat(image[..., None], 2, axis=-1), 1.5).numpy()]
    for out in outputs:
        np.testing.assert_allclose(out, level, rtol=1e-6)


def test_smooth_is_a_gaussian_convolution_renormalised_at_the_border():
    x = RNG.uniform(-1000, 500, size=(2, 7, 9, 11, 2)).astype(np.float32)
    kernel = gaussian_kernel1d(1.3).astype(np.float64)
    expected = x.astype(np.float64)
    for axis in (1, 2, 3):  # the weights of the voxels inside each window, renormalised to sum to 1
        weights = correlate1d(np.ones_like(expected), kernel, axis=axis, mode="constant")
        expected = correlate1d(expected, kernel, axis=axis, mode="constant") / weights
    np.testing.assert_allclose(spatial.smooth(x, 1.3).numpy(), expected, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(spatial.smooth(x[..., 0], 1.3).numpy(), expected[..., 0], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize(
    "call,argument",
    [
        (lambda: spatial.warp(np.zeros((4, 5, 6)), np.zeros((1, 4, 5, 6, 3))), "image"),
        (lambda: spatial.warp(np.zeros((1, 4, 5, 6)), np.zeros((1, 4, 5, 6, 2))), "ddf"),
        (lambda: spatial.warp(np.zeros((1, 4, 5, 6)), np.full((1, 4, 5, 6, 3), np.nan)), "ddf"),
        (lambda: spatial.warp(np.array([[[["a"]]]]), np.zeros((1, 1, 1, 1, 3))), "image"),
        (lambda: spatial.resample(np.zeros((1, 4, 5, 6)), np.zeros((1, 4, 2))), "coordinates"),
        (lambda: spatial.warp_grid(np.zeros((4, 5, 6, 3)), np.zeros((1, 3, 3))), "affine"),
        (lambda: spatial.jacobian_determinant(np.zeros((4, 5, 6, 3))), "ddf"),
        (lambda: spatial.resample(np.full((1, 2, 2, 2), np.inf), np.zeros((1, 1, 1, 1, 3))), "volume"),
    ],
)
def test_bad_input_names_the_argument_and_shape(call, argument):
    with pytest.raises(ValueError, match=rf"{argument}.*\[") as info:
        call()
    assert "shape" in str(info.value)


# --- the three ways a warp is called ---


def _warp_and_gradients(image, ddf, padding):
    with tf.GradientTape() as tape:
        tape.watch([image, ddf])
        value = tf.reduce_sum(spatial.warp(image, ddf, padding=padding) ** 2)
    return (value, *tape.gradient(value, [image, ddf]))


def _resample_and_gradients(volume, coordinates, padding):
    with tf.GradientTape() as tape:
        tape.watch([volume, coordinates])
        value = tf.reduce_sum(spatial.resample(volume, coordinates, padding=padding) ** 2)
    return (value, *tape.gradient(value, [volume, coordinates]))


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_warp_is_the_same_eagerly_in_a_graph_and_under_xla(padding):
    # In a plain graph the gradients are compiled functions of their own: compare them, and the
    # eager call's, with the image's, against XLA's own differentiation of the whole call.
    image = tf.constant(smooth_volume((9, 10, 11))[None])
    ddf = tf.constant(RNG.uniform(-2, 2, size=(1, 9, 10, 11, 3)).astype(np.float32))
    coordinates = tf.constant(RNG.uniform(-2, 12, size=(2, 5, 7, 3)).astype(np.float32))  # batch 2 against 1
    for fn, inputs in ((_warp_and_gradients, (image, ddf)), (_resample_and_gradients, (image, coordinates))):
        compiled = tf.function(fn, jit_compile=True)(*inputs, padding)
        for called in (fn(*inputs, padding), tf.function(fn)(*inputs, padding)):
            for a, b in zip(compiled, called):
                np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-5)


def test_an_eager_gradient_is_computed_only_for_the_inputs_a_tape_watches(monkeypatch):
    # A registration watches its DDF, not its image: the image's gradient (a scatter) is skipped.
    image = tf.constant(smooth_volume((9, 10, 11))[None])
    ddf = tf.Variable(RNG.uniform(-2, 2, size=(1, 9, 10, 11, 3)).astype(np.float32))
    _, image_gradient, ddf_gradient = _warp_and_gradients(image, tf.convert_to_tensor(ddf), "border")
    asked = []
    compiled = spatial._xla
    monkeypatch.setattr(spatial, "_xla", lambda fn, *key: asked.append(key) or compiled(fn, *key))
    with tf.GradientTape() as tape:  # watches the variable by itself
        value = tf.reduce_sum(spatial.warp(image, ddf) ** 2)
    np.testing.assert_allclose(tape.gradient(value, ddf).numpy(), ddf_gradient.numpy(), rtol=1e-5, atol=1e-5)
    assert (spatial._warp_linear, 1) in asked and (spatial._warp_linear, 0) not in asked
    asked.clear()
    field = tf.convert_to_tensor(ddf)  # read outside the tape, which would watch the variable
    with tf.GradientTape() as tape:
        tape.watch(image)
        value = tf.reduce_sum(spatial.warp(image, field) ** 2)
    np.testing.assert_allclose(tape.gradient(value, image).numpy(), image_gradient.numpy(), rtol=1e-5, atol=1e-5)
    assert (spatial._warp_linear, 0) in asked and (spatial._warp_linear, 1) not in asked


def _compiled_calls(jit_compile: bool) -> list:
    """The XLA-compiled function calls in the graph of a caller's `tf.function` that warps."""
    spec = tf.TensorSpec([1, 8, 8, 8], tf.float32), tf.TensorSpec([1, 8, 8, 8, 3], tf.float32)
    graph = tf.function(spatial.warp, jit_compile=jit_compile).get_concrete_function(*spec).graph
    calls = [op for op in graph.get_operations() if op.type in ("PartitionedCall", "StatefulPartitionedCall")]
    return [op for op in calls if op.node_def.attr["_XlaMustCompile"].b]


def test_warp_is_compiled_inside_a_plain_graph_and_left_to_an_xla_caller():
    # Inside a training step's plain tf.function the gathers run fused by XLA (about 7x faster);
    # inside a caller that XLA compiles, a nested compiled call would be recompiled on every call.
    assert len(_compiled_calls(jit_compile=False)) == 1
    assert _compiled_calls(jit_compile=True) == []


# --- bad input ---


def test_warp_refuses_an_image_without_voxels():
    # An empty image reached XLA and failed a C++ RET_CHECK in the mirror padding.
    with pytest.raises(ValueError, match=r"^image must have at least 1 voxel along D, H and W, got shape \(1, 0, 4, 4\)"):
        spatial.warp(np.zeros((1, 0, 4, 4), np.float32), np.zeros((1, 0, 4, 4, 3), np.float32))


# --- mm and voxels ---


def test_affine_mm_to_voxels_of_a_known_scaling_and_round_trip():
    spacing = (3.0, 2.0, 0.5)
    # in mm: scale by 2 about the origin, then shift by (6, 4, 1) mm
    affine_mm = np.array([[[2, 0, 0], [0, 2, 0], [0, 0, 2], [6, 4, 1]]], np.float32)
    in_voxels = spatial.affine_mm_to_voxels(affine_mm, spacing).numpy()
    # a scaling is the same in voxels; the shift becomes (2, 2, 2) voxels
    expected = np.array([[[2, 0, 0], [0, 2, 0], [0, 0, 2], [2, 2, 2]]], np.float32)
    np.testing.assert_allclose(in_voxels, expected, atol=1e-6)
    point = np.array([1.0, 2.0, 3.0])  # voxels; in mm (3, 4, 1.5)
    moved_mm = np.append(point * spacing, 1) @ affine_mm[0]
    np.testing.assert_allclose(np.append(point, 1) @ in_voxels[0], moved_mm / spacing, rtol=1e-6)
    rotation = spatial.affine_from_parameters(rotations=(20.0, 0.0, 10.0), translations=(5.0, -3.0, 2.0),
                                              center=(60.0, 250.0, 250.0))
    back = spatial.affine_voxels_to_mm(spatial.affine_mm_to_voxels(rotation, spacing), spacing)
    np.testing.assert_allclose(back.numpy(), rotation.numpy(), atol=1e-4)


def test_result_warp_label_thresholds_the_linear_warp():
    from teachreg.register import Result

    label = np.zeros((6, 8, 8), np.float32)
    label[2:4, 2:5, 3:6] = 1  # columns 3 to 5
    shift = Result(ddf=tf.constant(np.broadcast_to([0.0, 0.0, 1.5], (1, 6, 8, 8, 3)), tf.float32))

    def columns(first, last):
        out = np.zeros(label.shape, bool)
        out[2:4, 2:5, first:last + 1] = True
        return out

    # column k reads x = k + 1.5: 1 for k = 2, 3; 0.5 for k = 1, 4 (half in, half out)
    mask = shift.warp_label(label)
    assert mask.dtype == bool and mask.shape == label.shape
    np.testing.assert_array_equal(mask, columns(1, 4))
    np.testing.assert_array_equal(shift.warp_label(label, threshold=0.9), columns(2, 3))
    np.testing.assert_array_equal(shift.warp_label(np.stack([label, label], -1))[..., 1], columns(1, 4))
    # a label on the last column: border padding repeats it beyond the image, zeros padding does not
    edge = np.zeros_like(label)
    edge[..., -1] = 1
    assert shift.warp_label(edge)[..., -1].all()
    assert not shift.warp_label(edge, padding="zeros")[..., -1].any()
