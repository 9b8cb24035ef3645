"""Classical registration by optimisation: the transform is fitted to one image pair with Adam.

`affine(moving, fixed)` fits 12 affine parameters. Every optimiser returns a `Result` whose `ddf`
maps the fixed grid into the moving image, so `result.warp(moving)` resembles `fixed`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from teachreg import _validate, losses, spatial

Callback = Callable[[int, int, float], None]
"""Called as `callback(level, step, loss)` after every optimisation step (for live plots)."""


@dataclass
class Result:
    """The outcome of a registration.

    ddf: `[1, D, H, W, 3]` in voxels on the fixed grid; `warped(x) = moving(x + ddf(x))`.
    history: the loss after every step, all levels in order; `levels` gives each step's level.
    seconds: wall time of the optimisation (without loading data).
    affine: `[1, 4, 3]` for affine registration (fixed voxels -> moving voxels), else None.
    """

    ddf: tf.Tensor
    history: list[float] = field(default_factory=list)
    levels: list[int] = field(default_factory=list)
    seconds: float = 0.0
    affine: tf.Tensor | None = None

    def warp(self, volume, interpolation: str = "linear") -> np.ndarray:
        """Warp a moving image or label `[D, H, W]`, `[D, H, W, C]` or `[1, D, H, W(, C)]`; same rank back."""
        volume = np.asarray(volume)
        grid_shape = tuple(self.ddf.shape[1:4])
        if volume.shape[:3] == grid_shape and volume.ndim in (3, 4):
            batched = False
        elif volume.shape[1:4] == grid_shape and volume.shape[0] == 1 and volume.ndim in (4, 5):
            batched = True
        else:
            raise ValueError(f"volume must have shape {list(grid_shape)} (+ channels, optional batch 1), got {volume.shape}.")
        x = volume if batched else volume[None]
        out = spatial.warp(x.astype(np.float32), self.ddf, interpolation=interpolation).numpy()
        return out if batched else out[0]


def intensity_window(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> tuple[float, float]:
    """The `low` and `high` percentiles of `image`: the range that `_pair` maps to [0, 1]."""
    lo, hi = np.percentile(image, [low, high])
    return float(lo), float(max(hi, lo + 1e-6))


def affine(
    moving,
    fixed,
    loss: str = "ssd",
    learning_rate: float = 0.01,
    levels: int = 3,
    steps: int | tuple[int, ...] = (150, 100, 50),
    smoothing: float = 0.0,
    callback: Callback | None = None,
) -> Result:
    """Fit an affine transform mapping `fixed` voxels to `moving` voxels by Adam.

    moving, fixed: `[D, H, W]` or `[1, D, H, W]` of one shape, any intensity range: both are
    mapped by one linear map that takes the fixed image's 1st and 99th percentiles to 0 and 1
    (one map, so that SSD still compares like with like). `loss`: a name in `losses.IMAGE_LOSSES` ("ssd", "ncc", "lncc",
    "mi"). The 12 parameters act in a frame centred on the fixed image and scaled to its
    half-size, so a rotation, a scaling and a translation move the image's corners alike and
    Adam treats them evenly; the same parameters carry from a coarse pyramid level to the next.
    The loss counts only the fixed voxels whose sample lies inside the moving image: outside it
    there is nothing to compare, and the repeated border would pull the fit.
    `levels` pyramid levels (each halving the grid), coarse to fine, with `steps` Adam steps each
    (the learning rate decays to 1 % of `learning_rate` within each level); the coarse levels
    are smoothed by the downsampling, and `smoothing` adds a Gaussian of that sigma (voxels) at
    every level, 0 by default because smoothing the finest level biases the fit. Returns a `Result` with `.affine` and `.ddf`.
    """
    moving_t, fixed_t = _pair(moving, fixed)
    loss_fn = _image_loss(loss)
    steps = _per_level(steps, levels)
    shape = fixed_t.shape[1:4]
    matrix = tf.Variable(tf.eye(3), name="matrix")
    translation = tf.Variable(tf.zeros(3), name="translation")

    def to_affine(half: np.ndarray) -> tf.Tensor:
        """The `[1, 4, 3]` affine on the voxels of a grid of half-size `half` (its centre)."""
        # x -> half + half * (matrix @ ((x - half) / half) + translation), in row-vector form
        linear = tf.linalg.diag(1 / half) @ tf.transpose(matrix) @ tf.linalg.diag(half)
        offset = half + half * translation - tf.linalg.matvec(tf.transpose(linear), half)
        return tf.concat([linear, offset[None]], axis=0)[None]

    @tf.function(jit_compile=True)
    def loss_and_grads(moving_l, fixed_l, half):
        # Images come in as arguments, not captured constants, so XLA does not try to fold them.
        with tf.GradientTape() as tape:
            grid = spatial.reference_grid_like(fixed_l)
            coordinates = spatial.warp_grid(grid, to_affine(half))
            warped = spatial.resample(moving_l, coordinates)
            value = loss_fn(fixed_l, warped, mask=spatial.inside(coordinates, tf.shape(moving_l)[1:4]))
        return value, tape.gradient(value, [matrix, translation])

    result = Result(ddf=tf.zeros([1, *shape, 3]))
    start = time.perf_counter()
    for level, (moving_l, fixed_l) in enumerate(_pyramid(moving_t, fixed_t, levels, smoothing)):
        half = tf.constant(_half_size(fixed_l))
        optimizer = keras.optimizers.Adam(_decaying(learning_rate, steps[level]))
        for step in range(steps[level]):
            value, grads = loss_and_grads(moving_l, fixed_l, half)
            optimizer.apply(grads, [matrix, translation])
            result.history.append(float(value))
            result.levels.append(level)
            if callback is not None:
                callback(level, step, float(value))
    result.seconds = time.perf_counter() - start
    result.affine = to_affine(_half_size(fixed_t))
    result.ddf = spatial.affine_to_ddf(result.affine, shape)
    return result


def _half_size(image: tf.Tensor) -> np.ndarray:
    return (np.asarray(image.shape[1:4], np.float32) - 1) / 2


def _pair(moving, fixed) -> tuple[tf.Tensor, tf.Tensor]:
    """Validate a moving and a fixed image of one shape; return both as `[1, D, H, W, 1]` float32, windowed alike."""
    arrays = {}
    for name, image in (("moving", moving), ("fixed", fixed)):
        array = np.asarray(image, np.float32)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[0] != 1:
            raise ValueError(f"{name} must have shape [D, H, W] or [1, D, H, W], got shape {array.shape}.")
        arrays[name] = _validate.image(name, array)
    _validate.same_shape("moving", arrays["moving"], "fixed", arrays["fixed"])
    lo, hi = intensity_window(arrays["fixed"].numpy())
    return (arrays["moving"] - lo) / (hi - lo), (arrays["fixed"] - lo) / (hi - lo)


def _image_loss(name: str):
    if name not in losses.IMAGE_LOSSES:
        raise ValueError(f"loss must be one of {sorted(losses.IMAGE_LOSSES)}, got {name!r}.")
    return losses.IMAGE_LOSSES[name]


def _per_level(steps: int | tuple[int, ...], levels: int) -> tuple[int, ...]:
    steps = (steps,) * levels if isinstance(steps, int) else tuple(steps)
    if len(steps) != levels:
        raise ValueError(f"steps must be one number or one per level ({levels}), got {steps}.")
    return steps


def _pyramid(moving: tf.Tensor, fixed: tf.Tensor, levels: int, smoothing: float):
    """Yield (moving, fixed) from the coarsest level to the original images, smoothed by `smoothing` (voxels)."""
    pairs = [(moving, fixed)]
    for _ in range(levels - 1):
        m, f = pairs[-1]
        pairs.append((spatial.downsample(m), spatial.downsample(f)))
    for m, f in reversed(pairs):
        yield spatial.smooth(m, smoothing), spatial.smooth(f, smoothing)


def _decaying(learning_rate: float, steps: int):
    """A cosine decay from `learning_rate` to 1 % of it over `steps`."""
    return keras.optimizers.schedules.CosineDecay(learning_rate, max(steps, 1), alpha=0.01)
