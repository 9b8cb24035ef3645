"""Image, label and deformation losses for training and optimisation (TensorFlow, differentiable).

Naming rule: a `*_loss` is minimised; a score (`ncc`, `lncc`, `mutual_information`, `soft_dice`,
`hard_dice`, `jaccard`) is maximised, and its loss is `1 - score` (or `-score` for mutual
information).

Every function returns a float32 scalar: the mean over the batch of a per-sample value. Inputs may
be NumPy arrays or tensors; the first argument is the fixed image / target label, the second the
warped image / predicted label. Images are `[batch, D, H, W]` or `[batch, D, H, W, C]`, labels
`[batch, D, H, W]` or `[batch, D, H, W, L]` (L labels), DDFs `[batch, D, H, W, 3]`; all distances
and derivatives are in voxel units. The functions trace inside `tf.function(jit_compile=True)`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from teachreg import _validate, spatial
from teachreg.filters import box_kernel1d, gaussian_kernel1d, separable_filter

__all__ = [
    "CE_EPS",
    "EPS",
    "IMAGE_LOSSES",
    "NCC_EPS",
    "REGULARISERS",
    "bending_energy_loss",
    "cross_entropy_loss",
    "dice_loss",
    "gradient_l1_loss",
    "gradient_l2_loss",
    "hard_dice",
    "jaccard",
    "lncc",
    "lncc_loss",
    "mutual_information",
    "mutual_information_loss",
    "ncc",
    "ncc_loss",
    "soft_dice",
    "ssd_loss",
]

EPS = 1e-5
"""Stabiliser of the ratios below: absolute in Dice, Jaccard and the MI histograms (dimensionless);
in LNCC, `EPS**2` times the product of the two images' variances (relative to the data)."""

NCC_EPS = 1e-7
"""Relative resolution of the global NCC (about float32's): an image whose standard deviation is at
most `NCC_EPS` times the magnitude of its mean counts as constant, and its NCC is 0."""

CE_EPS = 1e-7
"""Predicted probabilities are clipped to [CE_EPS, 1 - CE_EPS] in the cross-entropy."""

_SPATIAL = (1, 2, 3)
_LABEL_SHAPE = "[batch, D, H, W] or [batch, D, H, W, L]"


def _images(fixed, warped) -> tuple[tf.Tensor, tf.Tensor]:
    fixed = _validate.image("fixed", fixed)
    warped = _validate.image("warped", warped)
    _validate.same_shape("fixed", fixed, "warped", warped)
    return fixed, warped


def _labels(y_true, y_pred) -> tuple[tf.Tensor, tf.Tensor]:
    tensors = []
    for name, value in (("y_true", y_true), ("y_pred", y_pred)):
        tensor = _validate.as_float_tensor(name, value, (4, 5), _LABEL_SHAPE)
        tensors.append(tensor[..., None] if tensor.shape.rank == 4 else tensor)
    _validate.same_shape("y_true", tensors[0], "y_pred", tensors[1])
    return tensors[0], tensors[1]


# --- image similarity -------------------------------------------------------------------------


def _mask(mask, like: tf.Tensor) -> tf.Tensor | None:
    """Voxel weights `[batch, D, H, W]` or `[batch, D, H, W, 1]` (0 ignores a voxel) as `[batch, D, H, W, 1]`.

    In the dtype of `like`, the image they weigh.
    """
    if mask is None:
        return None
    weights = _validate.as_float_tensor("mask", mask, (4, 5), "[batch, D, H, W] or [batch, D, H, W, 1]")
    weights = weights[..., None] if weights.shape.rank == 4 else weights
    if not weights.shape[:4].is_compatible_with(like.shape[:4]) or weights.shape[4] not in (None, 1):
        raise ValueError(f"mask must have shape [batch, D, H, W] matching the images {tuple(like.shape[:4])}, got {tuple(weights.shape)}.")
    return tf.cast(weights, like.dtype)


def _mean(x: tf.Tensor, weights: tf.Tensor | None, axis=None, keepdims: bool = False) -> tf.Tensor:
    """Mean of `x` over `axis`, weighted per voxel by `weights` `[batch, D, H, W, 1]` when given."""
    if weights is None:
        return tf.reduce_mean(x, axis=axis, keepdims=keepdims)
    weights = tf.broadcast_to(weights, tf.shape(x))
    total = tf.reduce_sum(weights, axis=axis, keepdims=keepdims)
    return tf.reduce_sum(x * weights, axis=axis, keepdims=keepdims) / tf.maximum(total, EPS)



def ssd_loss(fixed, warped, mask=None) -> tf.Tensor:
    """Sum of squared differences, as a mean: mean over voxels and channels of `(fixed - warped)**2`.

    A loss (minimised; 0 for identical images), in squared intensity units. Every image loss
    takes an optional `mask` `[batch, D, H, W]` of voxel weights (0 leaves a voxel out), for
    example the voxels whose sample falls inside the moving image.
    """
    fixed, warped = _images(fixed, warped)
    return _mean(tf.math.squared_difference(fixed, warped), _mask(mask, fixed))


def ncc(fixed, warped, mask=None) -> tf.Tensor:
    """Global normalised cross-correlation, a score in [-1, 1] (maximised).

    Computed per sample and channel over all voxels, in float64, `cov(f, w) / sqrt(var(f) var(w))`,
    then averaged over channels and the batch. `ncc(x, a * x + b) = 1` for `a > 0`, -1 for
    `a < 0`, on any intensity range. No absolute epsilon: an image whose standard deviation is at
    most `NCC_EPS` times the magnitude of its mean (constant to float32 round-off) gives 0, with
    a zero gradient.
    """
    fixed, warped = _images(fixed, warped)
    f, w = tf.cast(fixed, tf.float64), tf.cast(warped, tf.float64)
    weights = _mask(mask, f)
    mean_f = _mean(f, weights, axis=_SPATIAL, keepdims=True)
    mean_w = _mean(w, weights, axis=_SPATIAL, keepdims=True)
    f, w = f - mean_f, w - mean_w
    cov = _mean(f * w, weights, axis=_SPATIAL)
    var_f = _mean(f * f, weights, axis=_SPATIAL)
    var_w = _mean(w * w, weights, axis=_SPATIAL)
    varies = (var_f > tf.square(NCC_EPS * mean_f[:, 0, 0, 0])) & (var_w > tf.square(NCC_EPS * mean_w[:, 0, 0, 0]))
    score = tf.where(varies, cov * tf.math.rsqrt(tf.where(varies, var_f * var_w, 1.0)), 0.0)
    return tf.cast(tf.reduce_mean(score), tf.float32)


def ncc_loss(fixed, warped, mask=None) -> tf.Tensor:
    """`1 - ncc(fixed, warped, mask)`, a loss in [0, 2] (minimised)."""
    return 1.0 - ncc(fixed, warped, mask=mask)


def _window(kernel_size: int, kernel: str) -> np.ndarray:
    if kernel == "box":
        return box_kernel1d(kernel_size)
    if kernel == "gaussian":
        if kernel_size <= 0:
            raise ValueError(f"kernel_size must be positive, got {kernel_size}.")
        return gaussian_kernel1d(kernel_size / 6.0)
    raise ValueError(f"kernel must be 'box' or 'gaussian', got {kernel!r}.")


def lncc(fixed, warped, kernel_size: int = 9, kernel: str = "box", mask=None) -> tf.Tensor:
    """Local normalised cross-correlation, a score in [0, 1] (maximised), as DeepReg / VoxelMorph.

    Around each voxel, with normalised window weights `k`: `cross**2 / (var_f * var_w + EPS**2 *
    V_f * V_w)`, where `cross`, `var_f` and `var_w` are the window means of `(f - mean_f)(w -
    mean_w)`, `(f - mean_f)**2` and `(w - mean_w)**2` (in squared intensity units), and `V_f`,
    `V_w` the variances of the whole images per sample and channel: the stabiliser is relative
    to the data, so the value does not depend on the intensity range or offset (raw HU or MR
    give the same as rescaled images). The value is averaged over voxels, channels and the
    batch. Windows are cut at the volume border and renormalised, so border windows are exact
    averages over the voxels inside. The window sums are taken in float64: in float32 the
    variance of a flat window (air, a zero background) is round-off, not 0. Flat windows give
    0, and so does a constant image.

    `kernel` is "box" (`kernel_size` odd, in voxels) or "gaussian" (sigma = `kernel_size / 6`
    voxels, truncated at 3 sigma, so the window spans about `kernel_size` voxels).
    """
    fixed, warped = _images(fixed, warped)
    taps = _window(kernel_size, kernel)
    # Centring each image (LNCC does not change) makes the local variances below cancel less;
    # in float64 the mean of a constant image is exact, so it centres to 0.
    f, w = (tf.cast(x, tf.float64) for x in (fixed, warped))
    f = f - tf.reduce_mean(f, axis=_SPATIAL, keepdims=True)
    w = w - tf.reduce_mean(w, axis=_SPATIAL, keepdims=True)
    var_whole_f, var_whole_w = (tf.reduce_mean(x * x, axis=_SPATIAL, keepdims=True) for x in (f, w))
    # Two filtering passes, each over images stacked along the channel axis: I and I*I, which a
    # registration does not differentiate, apart from J, J*J and I*J, so that the gradient filters
    # 3 channels, not 5 (1.8 times faster with its gradient).
    mean_f, mean_ff = tf.split(separable_filter(tf.concat([f, f * f], axis=-1), taps), 2, axis=-1)
    mean_w, mean_ww, mean_fw = tf.split(separable_filter(tf.concat([w, w * w, f * w], axis=-1), taps), 3, axis=-1)
    cross = mean_fw - mean_f * mean_w
    var_f = tf.maximum(mean_ff - mean_f * mean_f, 0.0)
    var_w = tf.maximum(mean_ww - mean_w * mean_w, 0.0)
    denominator = var_f * var_w + EPS**2 * var_whole_f * var_whole_w  # 0 only for a constant image, whose cross is 0
    score = tf.where(denominator > 0, cross * cross / tf.where(denominator > 0, denominator, 1.0), 0.0)
    return tf.cast(_mean(score, _mask(mask, score)), tf.float32)


def lncc_loss(fixed, warped, kernel_size: int = 9, kernel: str = "box", mask=None) -> tf.Tensor:
    """`1 - lncc(fixed, warped, kernel_size, kernel, mask)`, a loss in [0, 1] (minimised)."""
    return 1.0 - lncc(fixed, warped, kernel_size=kernel_size, kernel=kernel, mask=mask)


def mutual_information(fixed, warped, bins: int = 23, sigma_ratio: float = 0.5, mask=None) -> tf.Tensor:
    """Mutual information in nats, a score >= 0 (maximised), as DeepReg's GlobalMutualInformation.

    Each image is rescaled to [0, 1] by its own minimum and maximum per sample over the voxels
    that count (not differentiated through), whatever its intensity range: the range divides
    with no epsilon, and a constant image falls in the first bin, giving 0 with a finite
    gradient. Then every voxel (channels counted as voxels) spreads over `bins` equally spaced
    bin centres with Gaussian Parzen weights of sigma `sigma_ratio` times the bin spacing,
    normalised to sum to 1. From the joint histogram `p_ab` and its marginals:
    `sum p_ab log((p_ab + EPS) / (p_a p_b + EPS))`. With a `mask`, voxels count in the
    histograms with its weights.
    """
    fixed, warped = _images(fixed, warped)
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}.")
    centres = tf.linspace(0.0, 1.0, bins)
    sigma = sigma_ratio / (bins - 1)
    batch = tf.shape(fixed)[0]

    weights = _mask(mask, fixed)
    if weights is None:
        counts = tf.ones([batch, tf.size(fixed) // batch, 1])
    else:  # channels count as voxels, each with its voxel's weight
        counts = tf.reshape(tf.broadcast_to(weights, tf.shape(fixed)), [batch, -1, 1])

    def parzen(image):  # [batch, voxels, bins], rows summing to 1
        x = tf.reshape(image, [batch, -1, 1])
        counted = counts > 0  # the range comes from the voxels that count
        low = tf.stop_gradient(tf.reduce_min(tf.where(counted, x, np.inf), axis=1, keepdims=True))
        high = tf.stop_gradient(tf.reduce_max(tf.where(counted, x, -np.inf), axis=1, keepdims=True))
        span = tf.where(high > low, high - low, 1.0)  # any positive value for a constant image
        x = tf.clip_by_value((x - low) / span, 0.0, 1.0)  # clips uncounted voxels only
        weights = tf.exp(-tf.square(x - centres) / (2.0 * sigma**2))
        return weights / tf.reduce_sum(weights, axis=-1, keepdims=True)

    w_a, w_b = parzen(fixed), parzen(warped)
    total = tf.maximum(tf.reduce_sum(counts, axis=1, keepdims=True), EPS)
    p_ab = tf.matmul(w_a * counts / total, w_b, transpose_a=True)  # [batch, bins, bins]
    p_a = tf.reduce_sum(w_a * counts / total, axis=1)
    p_b = tf.reduce_sum(w_b * counts / total, axis=1)
    p_a_p_b = p_a[:, :, None] * p_b[:, None, :]
    return tf.reduce_mean(tf.reduce_sum(p_ab * tf.math.log((p_ab + EPS) / (p_a_p_b + EPS)), axis=[1, 2]))


def mutual_information_loss(fixed, warped, bins: int = 23, sigma_ratio: float = 0.5, mask=None) -> tf.Tensor:
    """`-mutual_information(fixed, warped, bins, sigma_ratio, mask)`, a loss in nats (minimised)."""
    return -mutual_information(fixed, warped, bins=bins, sigma_ratio=sigma_ratio, mask=mask)


IMAGE_LOSSES = {"ssd": ssd_loss, "ncc": ncc_loss, "lncc": lncc_loss, "mi": mutual_information_loss}
"""Image losses by short name, each called as `loss(fixed, warped, mask=None)` and minimised
(`REGULARISERS`, at the end of the module, names the deformation regularisers alike)."""


# --- labels -----------------------------------------------------------------------------------


def _overlaps(y_true: tf.Tensor, y_pred: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Per sample and label `[batch, L]`: `sum(t * p)` and `sum(t) + sum(p)` over voxels."""
    intersection = tf.reduce_sum(y_true * y_pred, axis=_SPATIAL)
    total = tf.reduce_sum(y_true, axis=_SPATIAL) + tf.reduce_sum(y_pred, axis=_SPATIAL)
    return intersection, total


def soft_dice(y_true, y_pred) -> tf.Tensor:
    """Soft Dice score in [0, 1] (maximised) of labels or probabilities in [0, 1].

    Per sample and label `(2 sum(t p) + EPS) / (sum(t) + sum(p) + EPS)` over voxels, so two empty
    masks score 1; then averaged over labels and the batch.
    """
    intersection, total = _overlaps(*_labels(y_true, y_pred))
    return tf.reduce_mean((2.0 * intersection + EPS) / (total + EPS))


def hard_dice(y_true, y_pred, threshold: float = 0.5) -> tf.Tensor:
    """Dice score in [0, 1] (maximised) after binarising both inputs with `>= threshold`.

    Averaged over labels and the batch as `soft_dice`. Not differentiable (no gradient): for
    evaluation and monitoring.
    """
    y_true, y_pred = _labels(y_true, y_pred)
    return soft_dice(tf.cast(y_true >= threshold, tf.float32), tf.cast(y_pred >= threshold, tf.float32))


def jaccard(y_true, y_pred) -> tf.Tensor:
    """Soft Jaccard index (intersection over union) in [0, 1] (maximised).

    Per sample and label `(sum(t p) + EPS) / (sum(t) + sum(p) - sum(t p) + EPS)`, so two empty
    masks score 1; then averaged over labels and the batch.
    """
    intersection, total = _overlaps(*_labels(y_true, y_pred))
    return tf.reduce_mean((intersection + EPS) / (total - intersection + EPS))


def dice_loss(y_true, y_pred) -> tf.Tensor:
    """`1 - soft_dice(y_true, y_pred)`, a loss in [0, 1] (minimised)."""
    return 1.0 - soft_dice(y_true, y_pred)


def cross_entropy_loss(y_true, y_pred) -> tf.Tensor:
    """Binary cross-entropy in nats (minimised), each label treated as its own binary problem.

    `-(t log p + (1 - t) log(1 - p))` with `p` clipped to [CE_EPS, 1 - CE_EPS], averaged over
    voxels, labels and the batch. `y_pred` holds probabilities, not logits.
    """
    y_true, y_pred = _labels(y_true, y_pred)
    p = tf.clip_by_value(y_pred, CE_EPS, 1.0 - CE_EPS)
    return -tf.reduce_mean(y_true * tf.math.log(p) + (1.0 - y_true) * tf.math.log(1.0 - p))


# --- deformation regularisers -----------------------------------------------------------------


def bending_energy_loss(ddf) -> tf.Tensor:
    """Bending energy of a DDF `[batch, D, H, W, 3]` (voxels), a loss >= 0 (minimised).

    Per voxel and displacement component, `u_dd**2 + u_hh**2 + u_ww**2 + 2 (u_dh**2 + u_dw**2 +
    u_hw**2)` (as DeepReg's BendingEnergy), averaged over the interior voxels (one voxel off each
    face), the 3 components and the batch. Second differences on the 3-voxel stencil,
    `u[i+1] - 2 u[i] + u[i-1]` and `(u[i+1, j+1] - u[i+1, j-1] - u[i-1, j+1] + u[i-1, j-1]) / 4`,
    so an affine DDF gives 0. In voxel units (1 / voxel**2). Each axis needs at least 3 voxels.
    Its gradient applies each stencil's transpose, written out: TensorFlow's pads every slice back
    to full size (value and gradient on a 32x128x128 DDF, XLA, 2-core CPU: 10.8 ms instead of 28.8).
    """
    ddf = _validate.ddf("ddf", ddf)
    if any(n is not None and n < 3 for n in ddf.shape[1:4]):
        raise ValueError(f"ddf must have at least 3 voxels along D, H and W, got shape {tuple(ddf.shape)}.")
    unit = np.eye(3, dtype=int)
    # (weight of the squared term, the stencil's {offset: coefficient}), offsets (d, h, w) in {-1, 0, 1}
    stencils = [(1.0, {tuple(unit[a]): 1.0, (0, 0, 0): -2.0, tuple(-unit[a]): 1.0}) for a in range(3)]
    stencils += [(0.125, {tuple(unit[a] + unit[b]): 1.0, tuple(unit[a] - unit[b]): -1.0,  # 2 * (mixed / 4)**2
                          tuple(unit[b] - unit[a]): -1.0, tuple(-unit[a] - unit[b]): 1.0})
                 for a, b in ((0, 1), (0, 2), (1, 2))]

    @tf.custom_gradient
    def energy(u):
        full = tf.shape(u)
        size = tf.concat([[-1], full[1:4] - 2, [-1]], axis=0)
        terms = [tf.add_n([c * tf.slice(u, [0, *(1 + np.array(o)), 0], size) for o, c in stencil.items()])
                 for _, stencil in stencils]
        value = tf.reduce_mean(tf.add_n([weight * tf.square(t) for (weight, _), t in zip(stencils, terms)]))

        def gradient(upstream):  # 2 / N * sum of weight * stencil transposed (term)
            scale = upstream * 2.0 / tf.cast(tf.size(terms[0]), u.dtype)
            parts = []
            for (weight, stencil), t in zip(stencils, terms):
                padded = tf.pad(weight * t, [[0, 0], [2, 2], [2, 2], [2, 2], [0, 0]])  # interior -> full + 2
                parts += [c * tf.slice(padded, [0, *(1 - np.array(o)), 0], full) for o, c in stencil.items()]
            return scale * tf.add_n(parts)

        return value, gradient

    return energy(ddf)


def gradient_l1_loss(ddf) -> tf.Tensor:
    """L1 gradient norm of a DDF `[batch, D, H, W, 3]` (voxels), a loss >= 0 (minimised).

    Per voxel and displacement component, `|u_d| + |u_h| + |u_w|` (as DeepReg's GradientNorm),
    averaged over voxels, the 3 components and the batch; derivatives from
    `spatial.spatial_gradient` (central inside, one-sided at the border). Dimensionless (voxel / voxel).
    """
    gradient = spatial.spatial_gradient(_validate.ddf("ddf", ddf))  # [batch, D, H, W, 3, 3]
    return 3.0 * tf.reduce_mean(tf.abs(gradient))


def gradient_l2_loss(ddf) -> tf.Tensor:
    """Squared L2 gradient norm of a DDF `[batch, D, H, W, 3]` (voxels), a loss >= 0 (minimised).

    Per voxel and displacement component, `u_d**2 + u_h**2 + u_w**2` (as DeepReg's GradientNorm),
    averaged as `gradient_l1_loss`. Dimensionless (voxel / voxel).
    """
    gradient = spatial.spatial_gradient(_validate.ddf("ddf", ddf))
    return 3.0 * tf.reduce_mean(tf.square(gradient))


REGULARISERS = {"bending": bending_energy_loss, "l2": gradient_l2_loss, "l1": gradient_l1_loss}
"""Deformation regularisers by short name, each called as `regulariser(ddf)` and minimised."""
