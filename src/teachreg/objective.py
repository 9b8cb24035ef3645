"""The training objective of `network.RegistrationNetwork`: image, label, DDF and regulariser terms.

Conventions as in `teachreg.network`: images `[batch, D, H, W]` (units of the network's window,
HU for CT), labels `[batch, D, H, W(, L)]` in [0, 1], DDFs `[batch, D, H, W, 3]` in voxels on the
fixed grid, pulling: `warped(x) = moving(x + ddf(x))`. Every term is a float32 scalar, minimised.
"""

from __future__ import annotations

import tensorflow as tf

from teachreg import losses, spatial
from teachreg.network import WINDOW, normalise

__all__ = ["DDF_LOSSES", "LOSS_TERMS", "ddf_loss", "region_weights", "registration_losses"]

LOSS_TERMS = ("image", "label", "ddf", "regulariser")
"""The terms of the training objective, each with its own weight (see `registration_losses`)."""

DDF_LOSSES = ("mse", "epe")
"""The kinds of `ddf_loss`."""


def ddf_loss(ddf_true, ddf, kind: str = "mse", weights=None) -> tf.Tensor:
    """Distance between a predicted and a ground-truth DDF `[batch, D, H, W, 3]` (voxels), minimised.

    "mse": mean over voxels and batch of the squared displacement error (voxels**2); "epe": mean
    end-point error, the Euclidean length of the error (voxels), as the TRE but in voxels.
    `weights` `[batch, D, H, W]`: a weighted mean over the voxels instead.
    """
    squared = tf.reduce_sum(tf.square(tf.cast(ddf, tf.float32) - ddf_true), axis=-1)
    if kind == "mse":
        error = squared
    elif kind == "epe":
        error = tf.sqrt(squared + 1e-6)
    else:
        raise ValueError(f"ddf loss must be 'mse' or 'epe', got {kind!r}.")
    if weights is None:
        return tf.reduce_mean(error)
    return tf.reduce_sum(error * weights) / tf.maximum(tf.reduce_sum(weights), 1e-6)


def region_weights(label, outside: float, margin: int = 2) -> tf.Tensor:
    """Voxel weights `[batch, D, H, W]`: 1 within `margin` voxels of `label` `[batch, D, H, W(, L)]` (any label), `outside` elsewhere."""
    label = tf.cast(label, tf.float32)
    label = tf.reduce_max(label, axis=-1) if label.shape.rank == 5 else label
    near = tf.nn.max_pool3d(label[..., None], 2 * margin + 1, 1, "SAME")[..., 0]
    return outside + (1.0 - outside) * tf.cast(near > 0.5, tf.float32)


def registration_losses(batch: dict, ddf, weights: dict, image_loss: str = "lncc", regulariser: str = "bending",
                        ddf_kind: str = "mse", ddf_outside: float = 1.0, window=WINDOW) -> dict:
    """The terms of the training objective and their weighted sum, `"total"` (float32 scalars).

    batch: "moving", "fixed" `[batch, D, H, W]` (units of `window`), and as the weights need them
    "moving_label", "fixed_label" `[batch, D, H, W(, L)]` in [0, 1] and "ddf" `[batch, D, H, W, 3]`
    (the ground truth, voxels). ddf: the prediction `[batch, D, H, W, 3]`. A term with weight 0 is
    not computed:
    - "image": `losses.IMAGE_LOSSES[image_loss](fixed, warped moving)` on normalised images;
    - "label": `losses.dice_loss(fixed_label, warped moving_label)` (trilinear warp, soft labels);
    - "ddf": `ddf_loss(ddf_true, ddf, ddf_kind)` against the ground truth (supervised); with
      `ddf_outside` < 1, voxels farther than 2 voxels from the fixed label weigh `ddf_outside`
      (`region_weights`): the displacement of uniform air or soft tissue cannot be seen in the images;
    - "regulariser": `losses.REGULARISERS[regulariser](ddf)` ("bending", "l2", "l1").
    """
    ddf = tf.cast(ddf, tf.float32)
    terms = {}
    if weights.get("image", 0):
        warped = spatial.warp(normalise(batch["moving"], window), ddf)
        terms["image"] = losses.IMAGE_LOSSES[image_loss](normalise(batch["fixed"], window), warped)
    if weights.get("label", 0):
        warped_label = spatial.warp(batch["moving_label"], ddf, padding="zeros")
        terms["label"] = losses.dice_loss(batch["fixed_label"], warped_label)
    if weights.get("ddf", 0):
        region = region_weights(batch["fixed_label"], ddf_outside) if ddf_outside < 1 else None
        terms["ddf"] = ddf_loss(batch["ddf"], ddf, ddf_kind, region)
    if weights.get("regulariser", 0):
        terms["regulariser"] = losses.REGULARISERS[regulariser](ddf)
    terms["total"] = tf.add_n([float(weights[name]) * value for name, value in terms.items()])
    return terms
