"""Coordinate grids, affine transforms, resampling and warping with dense displacement fields.

Conventions used throughout `teachreg`:

- an image is `[batch, D, H, W]` or `[batch, D, H, W, C]`;
- a point, grid or coordinate array ends in an axis of 3 holding voxel coordinates in the order
  of the array axes (d, h, w); voxel `(i, j, k)` sits at coordinate `(i, j, k)`;
- a dense displacement field (DDF) is `[batch, D, H, W, 3]` in voxels and pulls: the warped image
  at `x` is the moving image at `x + ddf(x)` ("backward" warping, no holes);
- an affine is `[batch, 4, 3]` acting on row vectors, as in DeepReg: `[x, 1] @ affine`; the
  identity is `[[1,0,0], [0,1,0], [0,0,1], [0,0,0]]`.

Every function is differentiable with respect to images, DDFs and affine parameters, except
through nearest-neighbour interpolation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import record
from tensorflow.python.ops import control_flow_util

from teachreg import _validate
from teachreg.filters import gaussian_kernel1d, separable_filter

__all__ = [
    "reference_grid", "reference_grid_like", "warp_grid", "affine_to_ddf", "invert_affine",
    "affine_from_parameters", "random_affine", "affine_mm_to_voxels", "affine_voxels_to_mm",
    "resample", "inside", "warp", "compose_ddf", "invert_ddf", "svf_to_ddf", "spatial_gradient",
    "jacobian_determinant", "bspline_basis", "bspline_control_shape", "bspline_to_ddf", "linear_basis",
    "fit_bspline", "smooth", "resize", "downsample", "resize_ddf",
]

Shape3 = Sequence[int]


def reference_grid(shape: Shape3) -> tf.Tensor:
    """The voxel coordinates of a volume of `shape` (D, H, W): float32 `[D, H, W, 3]`."""
    return _grid(_shape3(shape))


def reference_grid_like(image: tf.Tensor) -> tf.Tensor:
    """The voxel coordinates `[D, H, W, 3]` of an image `[batch, D, H, W, ...]`, also inside `tf.function`."""
    return _grid(tf.shape(image)[1:4])


def _grid(shape) -> tf.Tensor:
    axes = [tf.range(shape[i], dtype=tf.float32) for i in range(3)]
    return tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)


def warp_grid(grid, affine) -> tf.Tensor:
    """Transform a grid `[D, H, W, 3]` (voxels) by affines `[batch, 4, 3]`: `[batch, D, H, W, 3]`."""
    grid = _validate.as_float_tensor("grid", grid, (4,), "[D, H, W, 3]", last_dim=3)
    affine = _affine(affine)
    homogeneous = tf.concat([grid, tf.ones_like(grid[..., :1])], axis=-1)
    return tf.einsum("dhwi,bij->bdhwj", homogeneous, affine)


def affine_to_ddf(affine, shape: Shape3) -> tf.Tensor:
    """The DDF `[batch, D, H, W, 3]` (voxels) of affines `[batch, 4, 3]` on a volume of `shape`."""
    grid = reference_grid(shape)
    return warp_grid(grid, affine) - grid[None]


def invert_affine(affine) -> tf.Tensor:
    """The inverse transforms of affines `[batch, 4, 3]`, also `[batch, 4, 3]`."""
    affine = _affine(affine)
    last_column = tf.tile(tf.constant([[[0.0], [0.0], [0.0], [1.0]]]), [tf.shape(affine)[0], 1, 1])
    return tf.linalg.inv(tf.concat([affine, last_column], axis=2))[:, :, :3]


def affine_from_parameters(
    rotations=(0.0, 0.0, 0.0),
    scales=(1.0, 1.0, 1.0),
    shears=(0.0, 0.0, 0.0),
    translations=(0.0, 0.0, 0.0),
    center=(0.0, 0.0, 0.0),
) -> tf.Tensor:
    """Build affines `[batch, 4, 3]` from parameters, each `[3]` or `[batch, 3]`.

    The transform maps a point `x` (voxels) to `R @ Sh @ S @ (x - center) + center + translations`:
    `rotations` are angles in degrees about the axes d, h and w (applied in that order), `scales`
    multiply each axis, `shears` are the (dh, dw, hw) entries of a unit upper-triangular matrix
    and `translations` are in voxels. Differentiable with respect to every parameter.
    """
    params = [tf.convert_to_tensor(p, tf.float32) for p in (rotations, scales, shears, translations, center)]
    batched = any(p.shape.rank == 2 for p in params)
    params = [p if p.shape.rank == 2 else p[None] for p in params]
    for name, p in zip(("rotations", "scales", "shears", "translations", "center"), params):
        if p.shape.rank != 2 or p.shape[-1] != 3:
            raise ValueError(f"{name} must have shape [3] or [batch, 3], got {tuple(p.shape)}.")
    rotations, scales, shears, translations, center = params
    angles = rotations * (np.pi / 180.0)
    cos, sin = tf.cos(angles), tf.sin(angles)
    zero, one = tf.zeros_like(cos[:, 0]), tf.ones_like(cos[:, 0])

    def matrix(rows):
        return tf.stack([tf.stack(r, axis=-1) for r in rows], axis=-2)

    rot_d = matrix([[one, zero, zero], [zero, cos[:, 0], -sin[:, 0]], [zero, sin[:, 0], cos[:, 0]]])
    rot_h = matrix([[cos[:, 1], zero, sin[:, 1]], [zero, one, zero], [-sin[:, 1], zero, cos[:, 1]]])
    rot_w = matrix([[cos[:, 2], -sin[:, 2], zero], [sin[:, 2], cos[:, 2], zero], [zero, zero, one]])
    shear = matrix([[one, shears[:, 0], shears[:, 1]], [zero, one, shears[:, 2]], [zero, zero, one]])
    linear = rot_w @ rot_h @ rot_d @ shear @ tf.linalg.diag(scales)
    offset = center + translations - tf.einsum("bij,bj->bi", linear, center)
    affine = tf.concat([tf.transpose(linear, [0, 2, 1]), offset[:, None, :]], axis=1)
    return affine if batched else affine[:1]


def random_affine(batch_size: int, scale: float, seed: int | None = None, shape: Shape3 | None = None) -> tf.Tensor:
    """Random affines `[batch_size, 4, 3]`, as DeepReg's `random_transform_generator`.

    Four corners of the cube [-1, 1]^3 are moved by multiplying each coordinate by a factor drawn
    uniformly from [1 - scale, 1], and the affine mapping the old corners onto the new ones is
    solved for. `scale` in [0, 1); 0 gives the identity. With `shape` (D, H, W) the cube spans the
    volume, so the transform acts about the volume's centre in voxel units; without it the affine
    acts on voxel coordinates directly, as in DeepReg. Seeded with `seed` (NumPy generator).
    """
    if not 0 <= scale < 1:
        raise ValueError(f"scale must be in [0, 1), got {scale}.")
    rng = np.random.default_rng(seed)
    old = np.array([[-1, -1, -1, 1], [-1, -1, 1, 1], [-1, 1, -1, 1], [1, -1, -1, 1]], np.float64)
    new = old[None, :, :3] * rng.uniform(1 - scale, 1, size=(batch_size, 4, 3))
    theta = np.stack([np.linalg.solve(old, n) for n in new])  # [batch, 4, 3] in the cube's frame
    if shape is not None:
        half = np.maximum((np.asarray(_shape3(shape), np.float64) - 1) / 2, 0.5)
        # voxel -> cube: (x - half) / half; cube -> voxel: y * half + half
        to_cube = np.vstack([np.diag(1 / half), -np.ones((1, 3))])
        to_cube = np.hstack([to_cube, np.eye(4)[:, 3:]])  # [4, 4] on row vectors
        theta = np.einsum("ij,bjk->bik", to_cube, theta) * half
        theta[:, 3] += half
    return tf.constant(theta, tf.float32)


def affine_mm_to_voxels(affine_mm, spacing) -> tf.Tensor:
    """An affine `[batch, 4, 3]` acting on mm, re-expressed on voxel indices, `[batch, 4, 3]`.

    `spacing`: 3 floats, mm per voxel along D, H and W. With row vectors, voxels -> mm -> the
    transform -> voxels: `diag(spacing, 1) @ affine_mm @ diag(1 / spacing)`.
    """
    spacing = np.asarray(spacing, np.float64)
    to_mm = np.diag(np.append(spacing, 1.0)).astype(np.float32)  # [x_vox, 1] @ to_mm = [x_mm, 1]
    to_voxels = np.diag(1.0 / spacing).astype(np.float32)  # x_mm @ to_voxels = x_vox
    return tf.constant(to_mm) @ _affine(affine_mm) @ tf.constant(to_voxels)


def affine_voxels_to_mm(affine_voxels, spacing) -> tf.Tensor:
    """The inverse of `affine_mm_to_voxels`: an affine `[batch, 4, 3]` on voxels, acting on mm.

    `spacing`: 3 floats, mm per voxel along D, H and W; `diag(1 / spacing, 1) @ affine @ diag(spacing)`.
    """
    spacing = np.asarray(spacing, np.float64)
    to_voxels = np.diag(np.append(1.0 / spacing, 1.0)).astype(np.float32)
    to_mm = np.diag(spacing).astype(np.float32)
    return tf.constant(to_voxels) @ _affine(affine_voxels) @ tf.constant(to_mm)


def resample(volume, coordinates, interpolation: str = "linear", padding: str = "border") -> tf.Tensor:
    """Sample `volume` at `coordinates` (voxels).

    volume: `[batch, D, H, W]` or `[batch, D, H, W, C]`; coordinates: `[batch, ..., 3]` (batch 1 is
    broadcast against the volume's batch). Returns `[batch, ...]`, with `C` last if the volume had
    channels. `interpolation` is "linear" (trilinear, differentiable in volume and coordinates) or
    "nearest" (keeps label values). Border handling, `padding`: "border" repeats the edge voxels
    for coordinates outside the volume; "zeros" treats the outside as 0, so linear interpolation
    fades to 0 over the first voxel outside.
    """
    has_channels = _rank(volume) == 5
    volume = _validate.image("volume", volume)
    coordinates = _validate.as_float_tensor("coordinates", coordinates, (2, 3, 4, 5, 6), "[batch, ..., 3]", last_dim=3)
    _check_options(interpolation, padding)
    coordinates = _match_batch(volume, coordinates)
    fn = _sample_linear if interpolation == "linear" else _sample_nearest
    out = _call(fn, volume, coordinates, padding == "zeros")
    return out if has_channels else out[..., 0]


def inside(coordinates, shape) -> tf.Tensor:
    """1 where `coordinates` `[..., 3]` (voxels) lie inside a volume of `shape` (D, H, W), else 0: `[...]` float32."""
    upper = tf.cast(shape, tf.float32) - 1.0
    return tf.cast(tf.reduce_all((coordinates >= 0.0) & (coordinates <= upper), axis=-1), tf.float32)


def warp(image, ddf, interpolation: str = "linear", padding: str = "border") -> tf.Tensor:
    """Warp `image` `[batch, D, H, W(, C)]` with `ddf` `[batch, D, H, W, 3]` (voxels).

    `warped(x) = image(x + ddf(x))`; the output has the DDF's spatial shape and the image's
    channels. See `resample` for `interpolation` and `padding`.
    """
    has_channels = _rank(image) == 5
    volume = _validate.image("image", image)
    if volume.shape[1:4].num_elements() == 0:
        raise ValueError(f"image must have at least 1 voxel along D, H and W, got shape {tuple(np.shape(image))}.")
    ddf = _match_batch(volume, _validate.ddf("ddf", ddf))
    _check_options(interpolation, padding)
    fn = _warp_linear if interpolation == "linear" else _warp_nearest
    out = _call(fn, volume, ddf, padding == "zeros")
    return out if has_channels else out[..., 0]


def compose_ddf(first, second) -> tf.Tensor:
    """The DDF `[batch, D, H, W, 3]` that warps like `first` followed by `second`.

    `warp(warp(image, first), second) == warp(image, compose_ddf(first, second))` up to
    interpolation: `second(x) + first(x + second(x))`.
    """
    first = _validate.ddf("first", first)
    second = _validate.ddf("second", second)
    return second + warp(first, second)


def invert_ddf(ddf, tolerance: float = 0.01) -> tuple[tf.Tensor, float]:
    """The inverse `v` `[batch, D, H, W, 3]` of a DDF `w` `[batch, D, H, W, 3]` (voxels), and its residual.

    `v(x) = -w(x + v(x))`, so that `compose_ddf(w, v)` is zero: warping with `w`, then with `v`,
    gives the image back. Newton's method from `v = -w`, at most 30 steps, stopping once the
    residual `|v + w(x + v(x))|` is below a tenth of `tolerance` everywhere. Returns `v` and the
    largest residual (voxels, over the batch); raises `ValueError` if it stays above `tolerance`
    (where `w` folds, it has no inverse).
    """
    w = _validate.ddf("ddf", ddf)
    gradient = spatial_gradient(w)  # d w_i / d x_j, [batch, D, H, W, 3, 3]
    flat_gradient = tf.reshape(gradient, tf.concat([tf.shape(w)[:-1], [9]], 0))  # warped as 9 channels
    v = -w
    for _ in range(30):
        residual = v + warp(w, v)
        worst = float(tf.reduce_max(tf.abs(residual)))
        if worst < tolerance / 10:
            break
        jacobian = tf.reshape(warp(flat_gradient, v), tf.shape(gradient)) + tf.eye(3)
        v = v - tf.linalg.solve(jacobian, residual[..., None])[..., 0]
    if worst > tolerance:
        raise ValueError(f"could not invert the DDF: residual {worst:.3f} voxel, above the tolerance "
                         f"{tolerance} (does it fold?)")
    return v, worst


def svf_to_ddf(svf, steps: int = 7) -> tf.Tensor:
    """Integrate a stationary velocity field `[batch, D, H, W, 3]` (voxels) by scaling and squaring.

    The field is divided by `2 ** steps` and composed with itself `steps` times, giving a DDF of
    the same shape whose transform is diffeomorphic when the field is smooth enough.
    """
    ddf = _validate.ddf("svf", svf) / (2.0**steps)
    for _ in range(steps):
        ddf = ddf + warp(ddf, ddf)
    return ddf


def spatial_gradient(field: tf.Tensor) -> tf.Tensor:
    """Finite-difference gradient of `field` `[batch, D, H, W, C]` along D, H, W (per voxel).

    Returns `[batch, D, H, W, C, 3]`: central differences inside, one-sided at the borders
    (as `numpy.gradient`). Each axis needs at least 2 voxels. Its own gradient (the operator's
    transpose) is written out: TensorFlow's pads every slice back to full size. The diffusion
    regulariser with its gradient on a 32x128x128 DDF (XLA, 2-core CPU): 16.7 ms instead of 19.6.
    """
    shape = tf.shape(field)
    for axis in (1, 2, 3):
        message = "the spatial gradient needs at least 2 voxels along each axis"
        if field.shape[axis] is None:  # only known when run: checked then, except under XLA (which ignores asserts, with a warning)
            if not control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
                tf.debugging.assert_greater_equal(shape[axis], 2, message=message)
        elif field.shape[axis] < 2:
            raise ValueError(f"{message}, got shape {tuple(field.shape)}.")

    @tf.custom_gradient
    def differences(field):
        def transposed(upstream):
            return tf.add_n([_difference_transposed(upstream[..., i], axis) for i, axis in enumerate((1, 2, 3))])

        return tf.stack([_difference(field, axis) for axis in (1, 2, 3)], axis=-1), transposed

    return differences(field)


def _part(x: tf.Tensor, axis: int, start: int | None, stop: int | None) -> tf.Tensor:
    """`x[..., start:stop, ...]` along `axis` of `[batch, D, H, W, C]` (Python bounds: negative from the end)."""
    return x[(slice(None),) * axis + (slice(start, stop),)]


def _difference(x: tf.Tensor, axis: int) -> tf.Tensor:
    """`x`'s finite differences along `axis`: one-sided at both ends, central between."""
    first = _part(x, axis, 1, 2) - _part(x, axis, 0, 1)
    inner = (_part(x, axis, 2, None) - _part(x, axis, 0, -2)) / 2
    last = _part(x, axis, -1, None) - _part(x, axis, -2, -1)
    return tf.concat([first, inner, last], axis=axis)


def _difference_transposed(y: tf.Tensor, axis: int) -> tf.Tensor:
    """The transpose of `_difference` along `axis` applied to `y` (same shape): with `w` = `y`
    halved inside, `x[j] = w[j - 1] - w[j + 1]` (0 beyond the ends), minus `w[0]` at the first
    voxel and plus `w[n - 1]` at the last (the one-sided differences)."""
    first, last = _part(y, axis, 0, 1), _part(y, axis, -1, None)
    inner = _part(y, axis, 1, -1) / 2
    w = tf.concat([first, inner, last], axis=axis)
    zero = tf.zeros_like(first)
    shifted = tf.concat([zero, _part(w, axis, 0, -1)], axis=axis) - tf.concat([_part(w, axis, 1, None), zero], axis=axis)
    return shifted + tf.concat([-first, tf.zeros_like(inner), last], axis=axis)


def jacobian_determinant(ddf) -> tf.Tensor:
    """The Jacobian determinant of `x -> x + ddf(x)`, `[batch, D, H, W]`, for a DDF `[batch, D, H, W, 3]`.

    Values below or at 0 mark folding; 1 is volume-preserving. Finite differences as in
    `spatial_gradient`, so an affine DDF gives exactly its matrix's determinant.
    """
    ddf = _validate.ddf("ddf", ddf)
    jacobian = spatial_gradient(ddf) + tf.eye(3)
    return tf.linalg.det(jacobian)


def bspline_basis(size: int, spacing: float, count: int) -> np.ndarray:
    """Cubic B-spline weights `[size, count]` of `count` control points spaced `spacing` voxels.

    Control point `k` sits at voxel `(k - 1) * spacing`, so the points start one spacing before
    the first voxel; `count = ceil((size - 1) / spacing) + 3` covers the axis.
    """
    t = np.arange(size)[:, None] / spacing + 1.0 - np.arange(count)[None, :]
    a = np.abs(t)
    return np.where(a < 1, 2 / 3 - a**2 + a**3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0)).astype(np.float32)


def bspline_control_shape(shape: Shape3, spacing) -> tuple[int, int, int]:
    """The control grid `(d, h, w)` covering a volume of `shape` with points `spacing` voxels apart (one or per axis)."""
    spacing = np.broadcast_to(np.asarray(spacing, np.float64), (3,))
    return tuple(int(np.ceil((n - 1) / max(s, 1e-6))) + 3 for n, s in zip(_shape3(shape), spacing))


def linear_basis(size: int, count: int) -> np.ndarray:
    """Linear interpolation weights `[size, count]` from `count` samples to `size`, corners aligned.

    Each row holds at most two weights, summing to 1. `resize` applies one along each axis;
    `bspline_to_ddf` accepts them too, as a separable trilinear resize.
    """
    position = np.arange(size) * ((count - 1) / max(size - 1, 1))  # in samples
    below = np.minimum(np.floor(position).astype(int), max(count - 2, 0))
    weights = np.zeros((size, count), np.float32)
    weights[np.arange(size), below] = 1.0 - (position - below)
    if count > 1:
        weights[np.arange(size), below + 1] = position - below
    return weights


def bspline_to_ddf(control_points, bases) -> tf.Tensor:
    """A DDF `[batch, D, H, W, 3]` from cubic B-spline control displacements `[batch, d, h, w, 3]`.

    `bases`: the three `bspline_basis` matrices `[D, d]`, `[H, h]`, `[W, w]`; displacements in the
    DDF's voxels. The field is smooth (twice continuously differentiable) by construction.
    Any separable basis works the same way: `linear_basis` matrices resize a field trilinearly.
    """
    return _separable(control_points, bases)


def _separable(x: tf.Tensor, bases) -> tf.Tensor:
    """`x` `[batch, d, h, w, C]` multiplied along d, h, w by the matrices `bases` `[D, d]`, `[H, h]`, `[W, w]`: `[batch, D, H, W, C]`."""
    x = tf.einsum("Dd,bdhwc->bDhwc", bases[0], x)
    x = tf.einsum("Hh,bDhwc->bDHwc", bases[1], x)
    return tf.einsum("Ww,bDHwc->bDHWc", bases[2], x)


def fit_bspline(ddf, bases) -> tf.Tensor:
    """Control displacements `[batch, d, h, w, 3]` whose B-spline (see `bspline_to_ddf`) best fits `ddf` (least squares)."""
    inverses = [tf.constant(np.linalg.pinv(np.asarray(b)), tf.float32) for b in bases]
    return bspline_to_ddf(_validate.ddf("ddf", ddf), inverses)


def smooth(image, sigma: float) -> tf.Tensor:
    """Gaussian smoothing of `image` `[batch, D, H, W(, C)]` with `sigma` in voxels (same shape).

    The kernel is truncated at 3 sigma; windows are cut at the volume border and renormalised
    (`filters.separable_filter`), so a constant image stays constant up to float32 round-off.
    """
    has_channels = _rank(image) == 5
    x = _validate.image("image", image)
    out = separable_filter(x, gaussian_kernel1d(sigma)) if sigma > 0 else x
    return out if has_channels else out[..., 0]


def resize(volume, shape: Shape3, interpolation: str = "linear") -> tf.Tensor:
    """Resample `volume` `[batch, D, H, W(, C)]` onto `shape`, corners aligned (first and last voxels kept).

    Linear: three matrix products with `linear_basis` matrices, one per axis, which need no
    compiling for each new pair of sizes (a compiled sampler took 0.2-0.5 s per size on a 2-core CPU).
    """
    _check_options(interpolation, "border")
    volume_t = _validate.image("volume", volume)
    if interpolation == "nearest":
        old = np.asarray(volume_t.shape[1:4], np.float32)
        new = np.asarray(_shape3(shape), np.float32)
        coordinates = reference_grid(shape) * ((old - 1) / np.maximum(new - 1, 1))
        return resample(volume, coordinates[None], interpolation=interpolation)
    bases = [tf.constant(linear_basis(n, int(o))) for n, o in zip(_shape3(shape), volume_t.shape[1:4])]
    out = _separable(volume_t, bases)
    return out if _rank(volume) == 5 else out[..., 0]


def downsample(image, factor: int = 2) -> tf.Tensor:
    """Smooth `image` `[batch, D, H, W(, C)]` (sigma = factor / 2 voxels) and resize it to `(n - 1) // factor + 1` per axis.

    A level of an image pyramid: intensities keep their units and a constant image stays
    constant, borders included (see `smooth`).
    """
    shape = [(int(n) - 1) // factor + 1 for n in image.shape[1:4]]
    return resize(smooth(image, factor / 2), shape)


def resize_ddf(ddf, shape: Shape3) -> tf.Tensor:
    """Resample a DDF `[batch, D, H, W, 3]` onto `shape`, rescaling its voxel displacements to the new grid.

    Used to carry a DDF between levels of a multi-resolution pyramid (corners aligned, as `resize`).
    """
    ddf = _validate.ddf("ddf", ddf)
    old = np.asarray(ddf.shape[1:4], np.float32)
    new = np.asarray(_shape3(shape), np.float32)
    return resize(ddf, shape) * ((new - 1) / np.maximum(old - 1, 1))


def _check_options(interpolation: str, padding: str) -> None:
    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}.")
    if padding not in ("border", "zeros"):
        raise ValueError(f"padding must be 'border' or 'zeros', got {padding!r}.")


def _match_batch(volume: tf.Tensor, coordinates: tf.Tensor) -> tf.Tensor:
    """Repeat coordinates of batch 1 to the volume's batch; refuse other mismatches."""
    batch_v, batch_c = volume.shape[0], coordinates.shape[0]
    if batch_v is None or batch_c is None or batch_v == batch_c or batch_v == 1:
        return coordinates
    if batch_c == 1:
        return tf.repeat(coordinates, batch_v, axis=0)
    raise ValueError(f"the image batch ({batch_v}) and the coordinates or DDF batch ({batch_c}) differ; use equal batches or 1.")


def _rank(value) -> int:
    return len(value.shape) if hasattr(value, "shape") else np.ndim(value)


def _shape3(shape: Shape3) -> tuple[int, int, int]:
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes (D, H, W), got {shape}.")
    return shape


def _affine(affine) -> tf.Tensor:
    affine = _validate.as_float_tensor("affine", affine, (3,), "[batch, 4, 3]", last_dim=3)
    if affine.shape[1] not in (None, 4):
        raise ValueError(f"affine must have shape [batch, 4, 3], got shape {tuple(affine.shape)}.")
    return affine


def _padded_and_indexed(volume: tf.Tensor, coordinates: tf.Tensor, zeros: bool):
    """Pad the volume by one voxel per side and map coordinates into it, clipped to stay inside."""
    mode = "CONSTANT" if zeros else "SYMMETRIC"
    padded = tf.pad(volume, [[0, 0], [1, 1], [1, 1], [1, 1], [0, 0]], mode=mode)
    size = tf.cast(tf.shape(padded)[1:4], tf.float32)
    coords = tf.clip_by_value(coordinates + 1.0, 0.0, size - 1.0)
    return padded, coords


def _batch_offsets(volume: tf.Tensor, coords: tf.Tensor, voxels_per_item: tf.Tensor) -> tf.Tensor:
    """Offsets into a flattened batch: 0 everywhere when the volume batch is 1 (broadcast)."""
    batch = tf.shape(coords)[0]
    offsets = tf.range(batch) * voxels_per_item * tf.cast(tf.shape(volume)[0] > 1, tf.int32)
    return tf.reshape(offsets, [-1, 1])


def _sample_linear(volume: tf.Tensor, coordinates: tf.Tensor, zeros: bool) -> tf.Tensor:
    padded, coords = _padded_and_indexed(volume, coordinates, zeros)
    out_shape = tf.shape(coords)[:-1]
    batch = tf.shape(coords)[0]
    coords = tf.reshape(coords, [batch, -1, 3])
    n = tf.shape(padded)[1:4]
    channels = tf.shape(padded)[4]
    lower = tf.clip_by_value(tf.floor(coords), 0.0, tf.cast(n - 2, tf.float32))
    frac = tf.reshape(coords - lower, [-1, 3])
    lower = tf.cast(lower, tf.int32)
    # All 8 corner values of each cell side by side, so one gather fetches a whole cell.
    cells = tf.concat(
        [padded[:, a : n[0] - 1 + a, b : n[1] - 1 + b, c : n[2] - 1 + c] for a in (0, 1) for b in (0, 1) for c in (0, 1)],
        axis=-1,
    )
    m = n - 1
    index = (lower[..., 0] * m[1] + lower[..., 1]) * m[2] + lower[..., 2]
    index += _batch_offsets(volume, coords, m[0] * m[1] * m[2])
    out = _interpolate_cells(tf.reshape(cells, [-1, 8, channels]), tf.reshape(index, [-1]), frac)
    return tf.reshape(out, tf.concat([out_shape, [channels]], axis=0))


def _interpolate_cells(cells: tf.Tensor, index: tf.Tensor, frac: tf.Tensor) -> tf.Tensor:
    """Trilinear interpolation inside the cells `[M, 8, C]` picked by `index` `[N]` at `frac` `[N, 3]`: `[N, C]`."""
    values = tf.gather(cells, index)  # [N, 8, C]
    w0, w1, w2 = (tf.stack([1 - frac[:, i], frac[:, i]], axis=-1) for i in range(3))
    weights = tf.reshape(w0[:, :, None, None] * w1[:, None, :, None] * w2[:, None, None, :], [-1, 8, 1])
    return tf.reduce_sum(values * weights, axis=1)


def _warp_linear(volume: tf.Tensor, ddf: tf.Tensor, zeros: bool) -> tf.Tensor:
    return _sample_linear(volume, _grid(tf.shape(ddf)[1:4])[None] + ddf, zeros)


def _warp_nearest(volume: tf.Tensor, ddf: tf.Tensor, zeros: bool) -> tf.Tensor:
    return _sample_nearest(volume, _grid(tf.shape(ddf)[1:4])[None] + ddf, zeros)


_COMPILED = {}


def _xla(fn, *key):
    """`fn` compiled with XLA once (per `key`), retraced only for new shapes."""
    if (fn, *key) not in _COMPILED:
        _COMPILED[(fn, *key)] = tf.function(fn, reduce_retracing=True, jit_compile=True, autograph=False)
    return _COMPILED[(fn, *key)]


def _call(fn, volume: tf.Tensor, where: tf.Tensor, zeros: bool) -> tf.Tensor:
    """`fn(volume, where, zeros)` (a sampler or a warp), compiled with XLA where that is faster.

    - Inside a caller's `tf.function(jit_compile=True)`: `fn` as it is, compiled with the caller
      (a compiled function nested there would be recompiled on every call).
    - Eagerly or inside a plain `tf.function` (a training step): `fn` compiled, which fuses its
      gathers and weights (about 8x faster than the same ops one by one, 128^3 on a 2-core CPU),
      and for a linear `fn` the gradient with respect to each input compiled on its own, so that
      the one nobody asks for (usually the image's) is not computed: the graph drops it, and
      eagerly it is skipped unless a tape watches that input. 5x faster forward + gradient.

    TensorFlow's own tests for the XLA context (`control_flow_util`) and for a watched tensor
    (`record`) are not public API.
    """
    eager = tf.executing_eagerly()
    if not eager and control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        return fn(volume, where, zeros)
    if fn not in (_sample_linear, _warp_linear):  # nearest: no gradient with respect to `where`
        return _xla(fn)(volume, where, zeros)
    # Eagerly, a gradient tape computes every gradient the function returns: ask only for those of
    # the inputs a tape watches (usually the DDF's, not the image's).
    asked = [not eager or record.should_record_backprop([x]) for x in (volume, where)]

    @tf.custom_gradient
    def call(volume, where):
        def gradient(upstream):
            return [_xla(_vector_jacobian, fn, i)(fn, i, volume, where, upstream, zeros) if asked[i] else None
                    for i in (0, 1)]

        # Unwatched inputs, so that the compiled call does not keep its intermediates for a gradient of its own.
        return _xla(fn)(tf.stop_gradient(volume), tf.stop_gradient(where), zeros), gradient

    return call(volume, where)


def _vector_jacobian(fn, index: int, volume: tf.Tensor, where: tf.Tensor, upstream: tf.Tensor, zeros: bool):
    """The gradient of `sum(upstream * fn(volume, where, zeros))` with respect to input `index` (0 or 1)."""
    inputs = [volume, where]
    with tf.GradientTape() as tape:
        tape.watch(inputs[index])
        out = fn(volume, where, zeros)
    return tape.gradient(out, inputs[index], output_gradients=upstream)


def _sample_nearest(volume: tf.Tensor, coordinates: tf.Tensor, zeros: bool) -> tf.Tensor:
    padded, coords = _padded_and_indexed(volume, coordinates, zeros)
    out_shape = tf.shape(coords)[:-1]
    batch = tf.shape(coords)[0]
    index3 = tf.cast(tf.floor(tf.reshape(coords, [batch, -1, 3]) + 0.5), tf.int32)  # ties go up
    n = tf.shape(padded)[1:4]
    channels = tf.shape(padded)[4]
    index = (index3[..., 0] * n[1] + index3[..., 1]) * n[2] + index3[..., 2]
    index += _batch_offsets(volume, coords, n[0] * n[1] * n[2])
    values = tf.gather(tf.reshape(padded, [-1, channels]), tf.reshape(index, [-1]))
    return tf.reshape(values, tf.concat([out_shape, [channels]], axis=0))
