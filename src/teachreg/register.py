"""Classical registration by optimisation: the transform is fitted to one image pair with Adam.

- `affine(moving, fixed)` fits 12 affine parameters;
- `nonrigid(moving, fixed)` fits a dense deformation ("ddf": a displacement per voxel, "bspline":
  B-spline control points, "svf": a stationary velocity field), coarse to fine on an image
  pyramid, optionally driven by labels too and started from an affine `Result`;
- `demons(moving, fixed)`: Thirion's demons, additive or diffeomorphic, coarse to fine.

All return a `Result`: its `ddf` `[1, D, H, W, 3]` (voxels, on the fixed grid) maps the fixed grid
into the moving image, so `result.warp(moving)` resembles `fixed`; it also holds the loss history
and the time taken.
"""

from __future__ import annotations

import functools
import math
import numbers
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from teachreg import _validate, losses, spatial

__all__ = ["Callback", "Result", "affine", "align_masks", "demons", "intensity_window", "nonrigid"]

Callback = Callable[[int, int, float], None]
"""Called as `callback(level, step, loss)` after every optimisation step (for live plots)."""


@dataclass
class Result:
    """The outcome of a registration.

    ddf: `[1, D, H, W, 3]` in voxels on the fixed grid; `warped(x) = moving(x + ddf(x))`.
    history: the loss after every step, all levels in order; `levels` gives each step's level.
    seconds: wall time of the optimisation (without loading data, and without the callback's time).
    affine: `[1, 4, 3]` for affine registration (fixed voxels -> moving voxels), else None.
    """

    ddf: tf.Tensor
    history: list[float] = field(default_factory=list)
    levels: list[int] = field(default_factory=list)
    seconds: float = 0.0
    affine: tf.Tensor | None = None

    def warp(self, volume, interpolation: str = "linear", padding: str = "border") -> np.ndarray:
        """Warp a moving image or label `[D, H, W]`, `[D, H, W, C]` or `[1, D, H, W(, C)]`; same rank back.

        `interpolation` and `padding` as in `spatial.resample` ("zeros" keeps labels that touch the
        moving image's border from spreading).
        """
        volume = np.asarray(volume)
        grid_shape = tuple(self.ddf.shape[1:4])
        if volume.shape[:3] == grid_shape and volume.ndim in (3, 4):
            batched = False
        elif volume.shape[1:4] == grid_shape and volume.shape[0] == 1 and volume.ndim in (4, 5):
            batched = True
        else:
            raise ValueError(f"volume must have shape {list(grid_shape)} (+ channels, optional batch 1), got {volume.shape}.")
        x = volume if batched else volume[None]
        out = spatial.warp(x.astype(np.float32), self.ddf, interpolation=interpolation, padding=padding).numpy()
        return out if batched else out[0]

    def warp_label(self, label, threshold: float = 0.5, padding: str = "border") -> np.ndarray:
        """Warp a label `[D, H, W]` or `[D, H, W, L]` (binary or soft, in [0, 1]) to a boolean mask.

        Linear interpolation, then `>= threshold`: the warped mask that `metrics.dice` scores.
        `padding` as in `warp` ("zeros": a label touching the moving image's border does not
        spread outside it). Same shape back.
        """
        return self.warp(label, padding=padding) >= threshold


def intensity_window(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> tuple[float, float]:
    """The `low` and `high` percentiles of `image`: the range that `_pair` maps to [0, 1].

    Falls back to the minimum and maximum when the percentiles coincide (a sparse label, say).
    """
    lo, hi = np.percentile(image, [low, high])
    if hi <= lo:
        lo, hi = np.min(image), np.max(image)
    return float(lo), float(max(hi, lo + 1e-6))


def align_masks(moving_mask, fixed_mask) -> Result:
    """The scaling and shift along each axis that matches two masks' centres and spreads, in closed form.

    moving_mask, fixed_mask: binary `[D, H, W]` (shapes may differ), e.g. the lungs at two breathing
    states. Along each axis, the fixed voxel x maps to c_m + (x - c_f) s_m / s_f, where c is the
    mask's centre and s the standard deviation of its voxels' coordinates (voxels), so that the
    warped moving mask has the fixed one's centre and spread. No optimisation: the start that
    Learn2Reg lung methods take from the masks given at test time. Returns a `Result` with `affine`
    `[1, 4, 3]` (fixed voxels -> moving voxels) and its `ddf` `[1, D, H, W, 3]` on the fixed grid.
    """
    start = time.perf_counter()
    masks = [np.asarray(m) > 0 for m in (moving_mask, fixed_mask)]
    for name, mask in zip(("moving_mask", "fixed_mask"), masks):
        if mask.ndim != 3 or mask.sum() < 2:
            raise ValueError(f"{name} must be a binary [D, H, W] mask with at least 2 voxels set, got shape "
                             f"{mask.shape} with {int(mask.sum())} set")
    (moving_at, fixed_at) = (np.argwhere(m).astype(np.float64) for m in masks)
    scale = moving_at.std(axis=0) / np.maximum(fixed_at.std(axis=0), 1e-12)
    matrix = np.zeros((4, 3))
    matrix[:3] = np.diag(scale)
    matrix[3] = moving_at.mean(axis=0) - fixed_at.mean(axis=0) * scale
    affine_t = tf.constant(matrix[None], tf.float32)
    ddf = spatial.affine_to_ddf(affine_t, masks[1].shape)
    return Result(ddf=ddf, affine=affine_t, seconds=time.perf_counter() - start)


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
    (one cosine decay of the learning rate, from `learning_rate` to 1 % of it, across all the
    levels: a finer level goes on from where the coarser one stopped); the coarse levels
    are smoothed by the downsampling, and `smoothing` adds a Gaussian of that sigma (voxels) at
    every level, 0 by default because smoothing the finest level biases the fit. Returns a `Result` with `.affine` and `.ddf`.
    """
    _validate.whole_number("levels", levels, 1)
    steps = _per_level(steps, levels)
    _validate.real_number("learning_rate", learning_rate, 0, strict=True)
    _validate.real_number("smoothing", smoothing, 0)
    moving_t, fixed_t = _pair(moving, fixed, levels, coarsest=2)  # the affine frame needs 2 voxels per axis
    _image_loss(loss)  # checks the name
    shape = fixed_t.shape[1:4]
    matrix = tf.Variable(tf.eye(3), name="matrix")
    translation = tf.Variable(tf.zeros(3), name="translation")
    fit_step = _affine_step(loss)

    result = Result(ddf=tf.zeros([1, *shape, 3]))
    # One Adam and one decaying rate across all levels: a finer level goes on from where the
    # coarser one stopped, with its moment estimates, instead of jumping at the full rate.
    rate = _decaying(learning_rate, sum(steps))
    moments = [tf.Variable(tf.zeros_like(v)) for v in (matrix, matrix, translation, translation)]
    count = 0
    start, paused = time.perf_counter(), 0.0
    for level, (moving_l, fixed_l) in enumerate(_pyramid(moving_t, fixed_t, levels, smoothing)):
        half = tf.constant(_half_size(fixed_l))
        for step in range(steps[level]):
            args = (matrix, translation, (*moments, tf.constant(count + 1, tf.float32), tf.constant(rate(count), tf.float32)),
                    moving_l, fixed_l, half)
            if not result.history:
                _trace_once(fit_step, args)
            value = float(fit_step(*args))
            count += 1
            result.history.append(value)
            result.levels.append(level)
            paused += _notify(callback, level, step, value)
    result.seconds = time.perf_counter() - start - paused
    result.affine = _centred_affine(matrix, translation, _half_size(fixed_t))
    result.ddf = spatial.affine_to_ddf(result.affine, shape)
    return result


def _centred_affine(matrix, translation, half) -> tf.Tensor:
    """The `[1, 4, 3]` affine on the voxels of a grid of half-size `half` (its centre, voxels).

    `matrix` `[3, 3]` and `translation` `[3]` act in the frame centred on the grid and scaled to
    its half-size: x -> half + half * (matrix @ ((x - half) / half) + translation).
    """
    linear = tf.linalg.diag(1 / half) @ tf.transpose(matrix) @ tf.linalg.diag(half)
    offset = half + half * translation - tf.linalg.matvec(tf.transpose(linear), half)
    return tf.concat([linear, offset[None]], axis=0)[None]


@functools.cache
def _affine_step(loss: str):
    """One Adam step on the affine objective, compiled by XLA: returns the objective before the step.

    Updates the `tf.Variable`s `matrix` and `translation` and Adam's moments in `adam` = (the
    matrix's first and second moments, the translation's, the step's number from 1, its
    learning rate) in place, as `_nonrigid_step` does. One function per loss, kept for the
    session: a later registration with the same loss and image size reuses the compiled code.
    All levels and calls share one trace (`_trace_once`).
    """
    loss_fn = losses.IMAGE_LOSSES[loss]

    @tf.function(jit_compile=True, autograph=False)
    def step(matrix, translation, adam, moving, fixed, half):
        # Images come in as arguments, not captured constants, so XLA does not try to fold them.
        with tf.GradientTape() as tape:
            tape.watch([matrix, translation])
            grid = spatial.reference_grid_like(fixed)
            coordinates = spatial.warp_grid(grid, _centred_affine(matrix, translation, half))
            warped = spatial.resample(moving, coordinates)
            value = loss_fn(fixed, warped, mask=spatial.inside(coordinates, tf.shape(moving)[1:4]))
        grads = tape.gradient(value, [matrix, translation])
        *moments, count, rate = adam
        _adam_update(matrix, grads[0], *moments[:2], count, rate)
        _adam_update(translation, grads[1], *moments[2:], count, rate)
        return value

    return step


def _notify(callback: Callback | None, level: int, step: int, value: float) -> float:
    """Call `callback` (if any) and return the seconds it took, which `Result.seconds` leaves out."""
    if callback is None:
        return 0.0
    before = time.perf_counter()
    callback(level, step, value)
    return time.perf_counter() - before


def _trace_once(step, args) -> None:
    """Trace the compiled `step` for `args` with their sizes left free, unless it has been already.

    XLA still compiles `step` for each image size, but all pyramid levels, and later calls with
    images of any size, share this trace instead of tracing again (a nonrigid step: about 0.6 s a
    level on the prostate pair, 2-core CPU). Tensors keep their first (batch) and last (channel)
    sizes, matrices (the bases `[D, d]`) keep none, vectors and scalars all; variables and other
    values are passed as they are (a variable's shape may be declared free, `_size_free_variable`).
    """

    def free(value):
        if isinstance(value, tf.Variable) or not isinstance(value, tf.Tensor) or value.shape.rank < 2:
            return value
        rank = value.shape.rank
        shape = [None, None] if rank == 2 else [value.shape[0], *[None] * (rank - 2), value.shape[-1]]
        return tf.TensorSpec(shape, value.dtype)

    step.get_concrete_function(*tf.nest.map_structure(free, args))


def _compile_ahead(step, make_args, levels: list[int], device: str) -> tuple[threading.Thread, threading.Event]:
    """Call the compiled `step` once for each of `levels` in a background thread, to compile it for them.

    XLA compiles a step on its first call with each image size, so a pyramid compiles each finer
    level when it gets there. Started at the registration's first step, the thread compiles the
    finer levels while the coarser ones run: a session's first registration of the prostate pair
    9.1-10.4 s to 7.9-8.3 s on a 2-core CPU. `make_args(level)` gives a level's arguments with
    throwaway variables, made one level at a time, so the registration's own results do not
    change. The calls run on `device` (a thread does not inherit the caller's `tf.device`).
    Returns the thread and an event that stops it before its next call. Errors are left to the
    registration's own call of the step, which raises them.
    """
    stop = threading.Event()

    def compile_all():
        try:
            with tf.device(device):
                for level in levels:
                    if stop.is_set():
                        return
                    step(*make_args(level))
        except Exception:  # the registration's own call of the step raises it
            return

    thread = threading.Thread(target=compile_all, daemon=True)
    thread.start()
    return thread, stop


def _half_size(image: tf.Tensor) -> np.ndarray:
    return (np.asarray(image.shape[1:4], np.float32) - 1) / 2


def _pair(moving, fixed, levels: int, coarsest: int, window: str = "shared",
          constant_ok: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
    """Validate a moving and a fixed image of one shape; return both as `[1, D, H, W, 1]` float32 in about [0, 1].

    The images must keep `coarsest` voxels per axis at the coarsest of `levels` pyramid levels,
    and neither may be constant, unless `constant_ok` (labels drive the fit).

    window "shared": both mapped by the fixed image's 1st-99th percentile window (same scanner
    and contrast; SSD stays meaningful); "each": each by its own window, clipped to [0, 1]
    (different subjects or scanners, whose intensity ranges differ).
    """
    arrays = {}
    for name, image in (("moving", moving), ("fixed", fixed)):
        array = np.asarray(image, np.float32)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[0] != 1:
            raise ValueError(f"{name} must have shape [D, H, W] or [1, D, H, W], got shape {array.shape}.")
        arrays[name] = _validate.image(name, array)
    _validate.same_shape("moving", arrays["moving"], "fixed", arrays["fixed"])
    shape = tuple(arrays["fixed"].shape[1:4])
    minimum = (coarsest - 1) * 2 ** (levels - 1) + 1  # spatial.downsample keeps (n - 1) // 2 + 1 voxels
    if min(shape) < minimum:
        raise ValueError(
            f"moving and fixed must have at least {minimum} voxels along D, H and W for levels={levels} (each level "
            f"halves the grid, and the coarsest needs {coarsest} voxels per axis), got shape {shape}; use fewer "
            "levels or a larger image.")
    if not constant_ok:
        for name, tensor in arrays.items():
            values = tensor.numpy()
            if np.all(values == values.flat[0]):
                raise ValueError(
                    f"{name} is constant (every voxel is {values.flat[0]:g}), so the image loss has nothing to match; "
                    "check that it loaded correctly, or register by labels (nonrigid with moving_label, "
                    "fixed_label and label_weight > 0).")
    if window == "shared":
        lo, hi = intensity_window(arrays["fixed"].numpy())
        return (arrays["moving"] - lo) / (hi - lo), (arrays["fixed"] - lo) / (hi - lo)
    out = []
    for name in ("moving", "fixed"):
        lo, hi = intensity_window(arrays[name].numpy())
        out.append(tf.clip_by_value((arrays[name] - lo) / (hi - lo), 0.0, 1.0))
    return out[0], out[1]


def _image_loss(name: str):
    if name not in losses.IMAGE_LOSSES:
        raise ValueError(f"loss must be one of {sorted(losses.IMAGE_LOSSES)}, got {name!r}.")
    return losses.IMAGE_LOSSES[name]


def _per_level(steps: int | tuple[int, ...], levels: int) -> tuple[int, ...]:
    given = steps
    steps = (steps,) * levels if np.ndim(steps) == 0 else tuple(steps)
    if len(steps) != levels:
        raise ValueError(f"steps must be one number or one per level ({levels}), got {steps}.")
    if any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0 for n in steps) or sum(steps) == 0:
        raise ValueError(f"steps must be whole numbers >= 0 (one, or one per level), at least one positive, got {given!r}.")
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


def demons(
    moving,
    fixed,
    levels: int = 3,
    steps: int | tuple[int, ...] = (30, 30, 30),
    field_sigma: float = 1.5,
    update_sigma: float = 0.0,
    diffeomorphic: bool = False,
    gradient: str | None = None,
    max_step: float = 0.5,
    window: str = "each",
    callback: Callback | None = None,
) -> Result:
    """Thirion's demons: a dense deformation mapping `fixed` voxels into `moving`, coarse to fine.

    moving, fixed: `[D, H, W]` or `[1, D, H, W]` of one shape. Demons compare intensities
    directly, so the scans should share a contrast: `window="each"` maps each to [0, 1] by its own
    1st-99th percentile window, clipped (as `nonrigid`: two subjects or scanners), "shared" maps
    both by the fixed image's window (as `affine`: one scanner, where a deformation changes the
    percentiles but not the intensities). What demons optimise: the sum of squared differences (SSD)
    between `fixed` and the warped `moving`, by a gradient-like step with a per-voxel adaptive
    step size. At each voxel the update is `u = d * g / (|g|^2 + d^2 / (4 max_step^2))`, with
    `d = fixed - warped` the intensity difference and `g` an image gradient: the optical-flow
    step, normalised by the intensity difference so that no voxel moves more than `max_step`
    (voxels) per step, Thirion's "Maxwell's demons" (1998). The field is then smoothed by a
    Gaussian of `field_sigma` voxels ("diffusion-like" regularisation; 0 turns it off), and,
    with `update_sigma` > 0, the update is smoothed first ("fluid-like").
    `diffeomorphic=False`: the update is added to the field (ITK's `DemonsRegistrationFilter`);
    `True`: it is exponentiated by scaling and squaring and composed with the field, so that the
    transform stays invertible (diffeomorphic demons, Vercauteren et al. 2009; ITK's
    `DiffeomorphicDemonsRegistrationFilter`). `gradient`: "fixed" (Thirion's, the fixed image's
    gradient), "symmetric" (the mean of the fixed and the warped moving gradients: the ESM
    step, which lowers SSD faster), or None: "fixed" for additive and "symmetric" for
    diffeomorphic demons, as ITK's filters. Steps are skipped where `|d| < 0.001` or where the
    sample lies outside the moving image.
    `levels` pyramid levels (each halving the grid), coarse to fine, `steps` per level (one
    number or one per level); each level starts from the previous level's field. One step is
    compiled by XLA once per option set and grid size and kept for the session.
    Returns a `Result`: `ddf` `[1, D, H, W, 3]` (voxels, on the fixed grid; pulls as every
    teachreg DDF), `history` the mean squared intensity difference (of the windowed images,
    over the voxels sampled inside the moving image) before each step, `levels`, `seconds`.
    `callback(level, step, msd)` as in `nonrigid`.
    """
    _validate.whole_number("levels", levels, 1)
    steps = _per_level(steps, levels)
    _validate.real_number("field_sigma", field_sigma, 0)
    _validate.real_number("update_sigma", update_sigma, 0)
    _validate.real_number("max_step", max_step, 0, strict=True)
    if not isinstance(diffeomorphic, (bool, np.bool_)):
        raise ValueError(f"diffeomorphic must be True or False, got {diffeomorphic!r}.")
    if gradient not in (None, "fixed", "symmetric"):
        raise ValueError(f"gradient must be 'fixed', 'symmetric' or None, got {gradient!r}.")
    gradient = gradient or ("symmetric" if diffeomorphic else "fixed")
    if window not in ("each", "shared"):
        raise ValueError(f"window must be 'each' or 'shared', got {window!r}.")
    moving_t, fixed_t = _pair(moving, fixed, levels, coarsest=2, window=window)
    pyramid = list(_pyramid(moving_t, fixed_t, levels, 0.0))
    step_fn = _demons_step(bool(diffeomorphic), gradient, float(field_sigma), float(update_sigma), float(max_step))
    result = Result(ddf=tf.zeros([1, *fixed_t.shape[1:4], 3]))
    ddf = None
    start, paused = time.perf_counter(), 0.0
    for level, (moving_l, fixed_l) in enumerate(pyramid):
        level_shape = tuple(fixed_l.shape[1:4])
        ddf = tf.zeros([1, *level_shape, 3]) if ddf is None else spatial.resize_ddf(ddf, level_shape)
        fixed_gradient = spatial.spatial_gradient(fixed_l)[..., 0, :]  # [1, D, H, W, 3], once per level
        for step in range(steps[level]):
            if not result.history:
                _trace_once(step_fn, (ddf, moving_l, fixed_l, fixed_gradient))
            ddf, msd = step_fn(ddf, moving_l, fixed_l, fixed_gradient)
            value = float(msd)
            result.history.append(value)
            result.levels.append(level)
            paused += _notify(callback, level, step, value)
    result.seconds = time.perf_counter() - start - paused
    result.ddf = ddf
    return result


@functools.cache
def _demons_step(diffeomorphic: bool, gradient: str, field_sigma: float, update_sigma: float, max_step: float):
    """One demons step `(ddf, moving, fixed, fixed_gradient) -> (new ddf, mean squared difference)`, by XLA.

    One function per option set, kept for the session, traced once (`_trace_once`); XLA compiles it once per grid size.
    Images `[1, D, H, W, 1]`, DDF and the fixed image's gradient `[1, D, H, W, 3]` (voxels of that grid).
    """
    # The exponential of an update of at most max_step voxels: ITK's rule for the number of squarings.
    squarings = max(1, math.ceil(2 + math.log2(max_step)))

    @tf.function(jit_compile=True, autograph=False)
    def step(ddf, moving, fixed, fixed_gradient):
        grid = spatial.reference_grid_like(fixed)[None]
        warped = spatial.resample(moving, grid + ddf)
        inside = spatial.inside(grid + ddf, tf.shape(moving)[1:4])[..., None]
        difference = fixed - warped
        msd = tf.reduce_sum(tf.square(difference) * inside) / tf.maximum(tf.reduce_sum(inside), 1.0)
        g = fixed_gradient
        if gradient == "symmetric":
            g = 0.5 * (g + spatial.spatial_gradient(warped)[..., 0, :])
        denominator = tf.reduce_sum(tf.square(g), axis=-1, keepdims=True) + tf.square(difference) / (4 * max_step**2)
        active = (tf.abs(difference) >= 1e-3) & (denominator > 1e-9)
        update = tf.where(active, difference * g / tf.where(active, denominator, 1.0), 0.0) * inside
        if update_sigma > 0:
            update = spatial.smooth(update, update_sigma)
        if diffeomorphic:
            ddf = spatial.compose_ddf(ddf, spatial.svf_to_ddf(update, steps=squarings))
        else:
            ddf = ddf + update
        if field_sigma > 0:
            ddf = spatial.smooth(ddf, field_sigma)
        return ddf, msd

    return step


def nonrigid(
    moving,
    fixed,
    loss: str = "lncc",
    regulariser: str = "l2",
    regulariser_weight: float = 0.1,
    transform: str = "bspline",
    grid_spacing: float = 16.0,
    moving_label=None,
    fixed_label=None,
    label_weight: float = 0.0,
    fixed_points=None,
    moving_points=None,
    point_weight: float = 0.0,
    initial: Result | None = None,
    learning_rate: float = 0.5,
    levels: int = 3,
    steps: int | tuple[int, ...] = (100, 100, 100),
    tolerance: float = 0.0,
    crop: float | None = None,
    crop_levels: int = 1,
    seed: int = 0,
    callback: Callback | None = None,
) -> Result:
    """Fit a dense deformation mapping `fixed` voxels into `moving` by Adam.

    moving, fixed: `[D, H, W]` or `[1, D, H, W]` of one shape, of two subjects or scanners: each is
    mapped to [0, 1] by its own 1st-99th percentile window.
    The objective is `loss(fixed, warped)` (a name in `losses.IMAGE_LOSSES`, counted only where
    the sample lies inside the moving image) `+ regulariser_weight * regulariser(ddf)` (a name in
    `losses.REGULARISERS`, in voxel units of each level) `+ label_weight * dice_loss(fixed_label,
    warped moving_label)` when labels `[D, H, W]` or `[D, H, W, L]` in [0, 1] are given
    `+ point_weight * mean_i |f_i + ddf(f_i) - m_i|^2` when corresponding points `fixed_points` and
    `moving_points` `[N, 3]` (voxels, z, y, x, on the fixed and moving grids, inside them) are given:
    feature-based registration. The squared distance is in voxels of the given grid, the DDF
    (including `initial`) sampled trilinearly at the fixed points; every level scales the points to its grid.
    `transform`: "ddf" (a free displacement per voxel, the tutorial's parameterisation), "bspline"
    (cubic B-spline control points every `grid_spacing` >= 1 voxels of the finest level) or "svf"
    (a stationary velocity field, integrated by scaling and squaring: diffeomorphic; as VoxelMorph,
    it is integrated on a grid of every other voxel and then resized, 3x faster than per voxel).
    `initial`: a `Result` (e.g. from `affine`) applied first; the returned DDF includes it.
    `levels` pyramid levels with `steps` Adam steps each, the learning rate (voxels of each level
    per step) decaying to 1 % within a level; a level stops early when the loss improved by less
    than `tolerance` (relative) over its last 20 steps (0 disables the rule).
    `crop`: each step of the `crop_levels` finest levels fits the objective on a random box `crop`
    times the level's image along each axis (at least 3 voxels), drawn with `seed`: a stochastic
    estimate of the loss, as elastix fits random voxel samples, at a fraction of a full step's cost. None
    chooses 0.5 for "bspline" without points and 1 (the whole image) otherwise: a free DDF or
    SVF, or points anywhere in the image, need the whole grid at every step.

    The defaults (LNCC, a B-spline control point every 16 voxels, the diffusion regulariser
    with weight 0.1, 3 levels of 100 steps, `crop` 0.5) match elastix's default B-spline map on
    chapter 4's prostate pair in Dice, fold almost nowhere and, once compiled, take about half
    its time (`make bench`).
    The tutorial's DDF is `transform="ddf", regulariser="bending", regulariser_weight=1.0,
    learning_rate=0.1`.
    """
    if transform not in ("ddf", "bspline", "svf"):
        raise ValueError(f"transform must be 'ddf', 'bspline' or 'svf', got {transform!r}.")
    if crop is None:
        crop = 0.5 if transform == "bspline" and fixed_points is None else 1.0
    _validate.real_number("crop", crop, 0, strict=True)
    _validate.whole_number("seed", seed, 0)
    if crop > 1 or (crop < 1 and (transform != "bspline" or fixed_points is not None)):
        raise ValueError(f"crop must be in (0, 1], and below 1 only for transform='bspline' without points, got "
                         f"{crop!r} with transform={transform!r}; leave crop=None to choose automatically.")
    if regulariser not in losses.REGULARISERS:
        raise ValueError(f"regulariser must be one of {sorted(losses.REGULARISERS)}, got {regulariser!r}.")
    _image_loss(loss)  # checks the name
    if (moving_label is None) != (fixed_label is None):
        raise ValueError("give both moving_label and fixed_label, or neither.")
    if (moving_points is None) != (fixed_points is None) or (fixed_points is None and point_weight != 0):
        raise ValueError("give both fixed_points and moving_points, or neither (and then no point_weight).")
    _validate.whole_number("levels", levels, 1)
    _validate.whole_number("crop_levels", crop_levels, 1)
    if crop_levels > levels:
        raise ValueError(f"crop_levels must be at most levels ({levels}), got {crop_levels}.")
    steps = _per_level(steps, levels)
    _validate.real_number("learning_rate", learning_rate, 0, strict=True)
    _validate.real_number("grid_spacing", grid_spacing, 1)  # voxels; finer control grids only cost memory
    for name, value in (("regulariser_weight", regulariser_weight), ("label_weight", label_weight),
                        ("point_weight", point_weight), ("tolerance", tolerance)):
        _validate.real_number(name, value, 0)
    # The bending energy needs 3 voxels per axis, the gradient regularisers 2.
    moving_t, fixed_t = _pair(moving, fixed, levels, coarsest=3 if regulariser == "bending" else 2, window="each",
                              constant_ok=(moving_label is not None and label_weight > 0) or point_weight > 0)
    shape = tuple(fixed_t.shape[1:4])
    labels = None if moving_label is None else _label_pair(moving_label, fixed_label, shape)
    points = None if fixed_points is None else _point_pair(fixed_points, moving_points, shape)
    initial_ddf = None
    if initial is not None:  # register the affinely pre-warped image, compose at the end
        initial_ddf = _validate.ddf("initial.ddf", initial.ddf)
        if tuple(initial_ddf.shape) != (1, *shape, 3):
            raise ValueError(f"initial.ddf must have shape {[1, *shape, 3]} (the fixed image's grid), "
                             f"got {tuple(initial_ddf.shape)}.")
        moving_t = spatial.warp(moving_t, initial_ddf)
        if labels is not None:
            labels = (spatial.warp(labels[0], initial_ddf), labels[1])

    pyramid = list(_pyramid(moving_t, fixed_t, levels, 0.0))
    # Without labels the images stand in for them; the label term is then left out of the objective.
    label_pyramid = list(_pyramid(*labels, levels, 0.0)) if labels is not None else pyramid
    weights = tf.constant(regulariser_weight, tf.float32), tf.constant(label_weight, tf.float32)
    fit_step = _nonrigid_step(loss, regulariser, transform, labels is not None, points is not None)
    level_shapes = [np.asarray(fixed_l.shape[1:4]) for _, fixed_l in pyramid]
    boxes = [n if level < levels - crop_levels else np.clip(np.ceil(crop * n), 3, n).astype(int)
             for level, n in enumerate(level_shapes)]  # the finest `crop_levels` fit a random box per step
    level_points = [None] * levels
    if points is not None:  # the fixed points on each level's grid; moved points are compared in the given grid
        for level, level_shape in enumerate(level_shapes):
            scale = (np.asarray(shape) - 1) / np.maximum(level_shape - 1, 1)
            level_points[level] = (tf.constant(points[0][None] / scale, tf.float32),
                                   tf.constant(points[1][None], tf.float32), tf.constant(scale, tf.float32),
                                   initial_ddf, tf.constant(point_weight, tf.float32))

    def level_start(level, params, ddf):
        # The B-spline control grid is refined with the images, as elastix does: at the coarsest
        # level its points are 2 ** (levels - 1) times grid_spacing apart (finest-level voxels).
        params, bases = _level_start(transform, params, ddf, tuple(level_shapes[level]), shape,
                                     grid_spacing * 2 ** (levels - 1 - level))
        moments = [tf.Variable(tf.zeros_like(params), shape=params.shape) for _ in range(2)]  # Adam's
        return params, bases, moments

    def step_args(level, params, bases, moments, number, rate, corner):
        """The step's arguments: Adam's step `number` (from 1) at learning rate `rate`, on the box from voxel `corner`."""
        (moving_l, fixed_l), (mlabel_l, flabel_l) = pyramid[level], label_pyramid[level]
        window = (slice(None), *(slice(c, c + n) for c, n in zip(corner, boxes[level])))
        box_bases = None if bases is None else [b[w] for b, w in zip(bases, window[1:])]
        adam = (*moments, tf.constant(number, tf.float32), tf.constant(rate, tf.float32))
        return (params, adam, box_bases, moving_l, fixed_l[window], mlabel_l, flabel_l[window], *weights,
                level_points[level], tf.constant(corner, tf.float32))

    def throwaway_args(level):  # the arguments of a level's first step, with variables of its own
        return step_args(level, *level_start(level, None, None), 1, 0.0, np.zeros(3, int))

    params = ddf = ahead = None
    rng = np.random.default_rng(seed)
    result = Result(ddf=tf.zeros([1, *shape, 3]))
    start, paused = time.perf_counter(), 0.0
    try:
        for level in range(levels):
            params, bases, moments = level_start(level, params, ddf)
            rate = _decaying(learning_rate, steps[level])
            recent: list[float] = []
            for step in range(steps[level]):
                corner = rng.integers(0, level_shapes[level] - boxes[level] + 1)  # the box's first voxel
                args = step_args(level, params, bases, moments, step + 1, rate(step), corner)
                if ahead is None:  # the first step: trace, and compile the finer levels while this one runs
                    _trace_once(fit_step, args)
                    ahead = _compile_ahead(fit_step, throwaway_args, [k for k in range(level + 1, levels) if steps[k] > 0],
                                           moving_t.device)
                value = float(fit_step(*args))
                result.history.append(value)
                result.levels.append(level)
                recent.append(value)
                paused += _notify(callback, level, step, value)
                if tolerance > 0 and len(recent) > 20 and recent[-21] - value < tolerance * abs(recent[-21]):
                    break
            ddf = _to_ddf(transform, params, bases)
    finally:  # also when interrupted: no compiling left running behind the caller's back
        if ahead is not None:
            ahead[1].set()
            ahead[0].join()
    result.seconds = time.perf_counter() - start - paused
    ddf = ddf if tuple(ddf.shape[1:4]) == shape else spatial.resize_ddf(ddf, shape)
    result.ddf = ddf if initial_ddf is None else spatial.compose_ddf(initial_ddf, ddf)
    return result


def _level_start(transform: str, params, ddf, level_shape: tuple[int, int, int], shape: tuple[int, int, int],
                 grid_spacing: float) -> tuple[tf.Variable, list[tf.Tensor] | None]:
    """One pyramid level's parameters to optimise, started from the previous level's, and their bases.

    params, ddf: the previous (coarser) level's parameters and its DDF (voxels of that level), or
    None at the coarsest level, which starts from zero. level_shape: this level's grid (D, H, W);
    shape: the finest level's. grid_spacing: B-spline only, the control points' spacing at this
    level in voxels of the finest level.
    Returns (params, bases): for "ddf", a `tf.Variable` `[1, D, H, W, 3]` (a displacement per voxel,
    resized from the previous level's) and None; for "svf", velocities every other voxel
    `[1, d, h, w, 3]` (resized from the previous level's) and the three `spatial.linear_basis`
    matrices `[D, d]`, `[H, h]`, `[W, w]` that resize their integral to the level; for "bspline",
    control points `[1, d, h, w, 3]` (fitted to the previous DDF) and the three
    `spatial.bspline_basis` matrices, all as tensors.
    """
    if transform == "ddf":
        start = tf.zeros([1, *level_shape, 3]) if params is None else spatial.resize_ddf(params, level_shape)
        return _size_free_variable(start), None
    if transform == "svf":  # every other voxel (at least 2 per axis, as many as the level has if fewer)
        velocity_shape = [min(n, max(2, (n - 1) // 2 + 1)) for n in level_shape]
        start = tf.zeros([1, *velocity_shape, 3]) if params is None else spatial.resize_ddf(params, velocity_shape)
        return _size_free_variable(start), [tf.constant(spatial.linear_basis(n, c)) for n, c in zip(level_shape, velocity_shape)]
    scale = (np.asarray(level_shape, np.float32) - 1) / np.maximum(np.asarray(shape, np.float32) - 1, 1)
    spacing = grid_spacing * scale  # in voxels of this level
    control_shape = spatial.bspline_control_shape(level_shape, spacing)
    bases = [spatial.bspline_basis(n, s, c) for n, s, c in zip(level_shape, spacing, control_shape)]
    start = (tf.zeros([1, *control_shape, 3]) if ddf is None
             else spatial.fit_bspline(spatial.resize_ddf(ddf, level_shape), bases))
    return _size_free_variable(start), [tf.constant(b) for b in bases]


def _size_free_variable(value) -> tf.Variable:
    """A `tf.Variable` holding `value` `[1, D, H, W, 3]` whose D, H, W a compiled step may not assume (see `_trace_once`)."""
    return tf.Variable(value, shape=[1, None, None, None, 3])


def _to_ddf(transform: str, params, bases=None) -> tf.Tensor:
    """The DDF `[1, D, H, W, 3]` at the current level from the optimised parameters (`bases`: B-spline and SVF, see `_level_start`)."""
    if transform == "bspline":
        return spatial.bspline_to_ddf(params, bases)
    if transform == "svf":  # integrated on the velocities' grid, then resized to the level's (voxels rescaled)
        sizes = tf.cast(tf.stack([tf.shape(b) for b in bases]), tf.float32)  # [3, 2]: (level, velocity grid) per axis
        scale = (sizes[:, 0] - 1) / tf.maximum(sizes[:, 1] - 1, 1)
        return spatial.bspline_to_ddf(spatial.svf_to_ddf(params, steps=5), bases) * scale
    return tf.convert_to_tensor(params)


@functools.cache
def _nonrigid_step(loss: str, regulariser: str, transform: str, use_labels: bool, use_points: bool = False):
    """One Adam step on the nonrigid objective, compiled by XLA: returns the objective before the step.

    The step updates the `tf.Variable` `params` and Adam's moments in `adam` = (first moment,
    second moment, the step's number from 1, its learning rate) in place, as Keras's Adam does:
    done inside the compiled step it costs almost nothing, done apart it took a quarter of the time.
    One function per combination of options, kept for the session: a later registration with
    the same options and image size reuses the compiled code instead of compiling it again, and
    all levels and calls share one trace (`_trace_once`).
    With `use_points`, `points` is (fixed points `[1, N, 3]` in this level's voxels, moving points
    `[1, N, 3]` and level-to-given-grid `scale` `[3]`, the initial DDF `[1, D, H, W, 3]` on the
    given grid or None, the weight), else None. `fixed` and `fixed_label` may be a box of this
    level's images starting at voxel `corner` `[3]`, and `bases` then the box's rows: the
    objective is taken over the box.
    Traced without autograph, as every compiled step here: their Python branches and loops
    depend on options, not on tensors, and converting them cost about 1.5 s of a first call.
    """
    loss_fn, regulariser_fn = losses.IMAGE_LOSSES[loss], losses.REGULARISERS[regulariser]

    @tf.function(jit_compile=True, autograph=False)
    def step(params, adam, bases, moving, fixed, moving_label, fixed_label, regulariser_weight, label_weight,
             points, corner):
        with tf.GradientTape() as tape:
            tape.watch(params)
            ddf = _to_ddf(transform, params, bases)
            grid = spatial.reference_grid_like(fixed)[None] + corner
            warped = spatial.resample(moving, grid + ddf)
            value = loss_fn(fixed, warped, mask=spatial.inside(grid + ddf, tf.shape(moving)[1:4]))
            value += regulariser_weight * regulariser_fn(ddf)
            if use_labels:
                value += label_weight * losses.dice_loss(fixed_label, spatial.resample(moving_label, grid + ddf))
            if use_points:
                fixed_points, moving_points, scale, initial, point_weight = points
                moved = (fixed_points + spatial.resample(ddf, fixed_points)) * scale  # voxels of the given grid
                if initial is not None:
                    moved += spatial.resample(initial, moved)
                value += point_weight * tf.reduce_mean(tf.reduce_sum(tf.square(moved - moving_points), axis=-1))
        _adam_update(params, tape.gradient(value, params), *adam)
        return value

    return step


def _adam_update(params: tf.Variable, grads, first: tf.Variable, second: tf.Variable, count, rate,
                 beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7) -> None:
    """Adam's update of `params` with `grads` (Keras's defaults and arithmetic): `first` and
    `second` are the moments, `count` the step's number from 1 and `rate` its learning rate."""
    alpha = rate * tf.sqrt(1.0 - beta_2**count) / (1.0 - beta_1**count)
    first.assign_add((grads - first) * (1.0 - beta_1))
    second.assign_add((tf.square(grads) - second) * (1.0 - beta_2))
    params.assign_sub(first * alpha / (tf.sqrt(second) + epsilon))


def _label_pair(moving_label, fixed_label, shape) -> tuple[tf.Tensor, tf.Tensor]:
    """Labels `[D, H, W]`, `[D, H, W, L]` or with batch 1, as float32 `[1, D, H, W, L]`."""
    out = []
    for name, label in (("moving_label", moving_label), ("fixed_label", fixed_label)):
        array = np.asarray(label, np.float32)
        if array.shape[:3] == shape:
            array = array[None]
        if array.shape[1:4] != shape or array.ndim not in (4, 5):
            raise ValueError(f"{name} must have shape {list(shape)} or {list(shape)} + [L], got {array.shape}.")
        out.append(_validate.image(name, array))
        low, high = array.min(), array.max()
        if low < -1e-4 or high > 1 + 1e-4:  # the margin lets interpolated masks (1.0000001) through
            raise ValueError(f"{name} must hold values in [0, 1] (a mask or probabilities), got values from {low:g} to "
                             f"{high:g}; rescale it (divide a 0/255 mask by 255).")
    return out[0], out[1]


def _point_pair(fixed_points, moving_points, shape) -> tuple[np.ndarray, np.ndarray]:
    """Corresponding points `[N, 3]` (voxels, z, y, x) inside a grid of `shape`, as float64 arrays."""
    out = []
    for name, value in (("fixed_points", fixed_points), ("moving_points", moving_points)):
        array = np.asarray(value, np.float64)
        if array.ndim != 2 or array.shape[1] != 3 or len(array) == 0:
            raise ValueError(f"{name} must be voxel coordinates [N, 3] (z, y, x), N >= 1, got shape {array.shape}.")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contains NaN or infinite values; expected voxel coordinates [N, 3].")
        outside = np.nonzero(np.any((array < 0) | (array > np.asarray(shape) - 1), axis=1))[0]
        if outside.size:
            raise ValueError(f"{name}: {outside.size} of {len(array)} points lie outside the grid {list(shape)} "
                             f"(voxels 0 to size - 1), e.g. point {outside[0]} at {array[outside[0]].round(2).tolist()}.")
        out.append(array)
    if len(out[0]) != len(out[1]):
        raise ValueError(f"fixed_points and moving_points must pair up: got {len(out[0])} and {len(out[1])} points.")
    return out[0], out[1]
