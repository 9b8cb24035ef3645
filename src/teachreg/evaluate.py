"""Accuracy and speed of a registration network, beside the classical optimiser of `teachreg.register`,
and the two together (`network_then_optimiser`).

Pairs are `teachreg.data.Pair` objects: moving and fixed Volumes (images `[D, H, W]` in HU, the lungs as
their first label, spacing in mm per voxel along D, H, W from the fixed one), optionally the true
`ddf` `[D, H, W, 3]` (voxels on the fixed grid, pulling), and a name.
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from teachreg import metrics, presets, register, spatial
from teachreg.data import Pair
from teachreg.network import RegistrationNetwork

__all__ = ["evaluate", "accuracy", "lung_masks", "network_then_optimiser"]


def evaluate(model: RegistrationNetwork, pairs: list[Pair], classical: int = 0,
             classical_options=presets.LUNG_CLASSICAL) -> dict:
    """Accuracy and speed of `model` on `pairs`; a dict of per-pair figures and their means.

    pairs: Pairs with labels (the true `ddf` is optional: real pairs have none). Per pair, its
    name (or its index), the figures of `accuracy` and `seconds`, the wall time of `predict_ddf`
    for the pair (after one warm-up call); a network that takes masks gets the pair's (`lung_masks`).
    The means add `tre_ratio`, mean TRE over mean initial displacement, when the truth is known.
    With `classical` > 0, the first `classical` pairs are also registered by `register.nonrigid`
    (`classical_options`, by default `presets.LUNG_CLASSICAL`; images only, no labels): keys
    `classical_*`; `classical_seconds` is timed after a warm-up run that compiles the optimiser's
    steps, as `seconds` is after the network's first call.
    """
    rows = []
    predict = lambda pair: model.predict_ddf(pair.moving.image, pair.fixed.image,  # noqa: E731
                                             masks=lung_masks(pair) if model.masks else None)
    predict(pairs[0])  # warm-up: trace the function once
    if classical > 0:  # one step per level compiles every level (see register.nonrigid)
        register.nonrigid(pairs[0].moving.image, pairs[0].fixed.image, **{**classical_options, "steps": 1})
    for i, pair in enumerate(pairs):
        start = time.perf_counter()
        ddf = predict(pair)
        row = {"name": pair.name or str(i), "seconds": time.perf_counter() - start}
        row.update(accuracy(ddf, pair))
        if i < classical:
            result = register.nonrigid(pair.moving.image, pair.fixed.image, **classical_options)
            row.update({f"classical_{k}": v for k, v in accuracy(result.ddf.numpy(), pair).items()})
            row["classical_seconds"] = result.seconds
        rows.append(row)
    keys = [k for k in rows[0] if k != "name"]
    mean = {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}
    if "tre_mm" in mean:
        mean["tre_ratio"] = mean["tre_mm"] / mean["initial_mm"]
    return {"pairs": rows, "mean": mean}


def lung_masks(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """The lungs of a pair (its volumes' first labels): (moving mask, fixed mask), float32 0/1 `[D, H, W]`."""
    return tuple((volume.labels[..., 0] > 0.5).astype(np.float32) for volume in (pair.moving, pair.fixed))


def network_then_optimiser(model: RegistrationNetwork, moving, fixed, steps=presets.LUNG_REFINE_STEPS,
                           options=presets.LUNG_CLASSICAL, masks=None) -> register.Result:
    """Old and new together: the network's DDF, refined by a short run of the classical optimiser.

    moving, fixed: images `[D, H, W]` in the network's units (HU for the lung CT model).
    masks: optional (moving mask, fixed mask), binary `[D, H, W]` (the lungs, given at test time as
    in Learn2Reg): the moving image is first aligned to the fixed one by `register.align_masks`
    and the network predicts the rest, composed with that start; a network that takes masks
    (`RegistrationNetwork(masks=True)`) gets the aligned moving mask and the fixed one. `register.nonrigid` (`options`,
    by default `presets.LUNG_CLASSICAL`) then starts from the network's DDF (`initial`) for
    `steps` steps per level (by default `presets.LUNG_REFINE_STEPS`; all zeros: no refinement).
    Returns a `register.Result` (`ddf` `[1, D, H, W, 3]` voxels) whose `seconds` cover it all.
    """
    start = time.perf_counter()
    moving = np.asarray(moving, np.float32)
    if masks is None:
        ddf = tf.constant(model.predict_ddf(moving, fixed))
    else:
        aligned = register.align_masks(*masks).ddf
        moving_mask = spatial.warp(np.asarray(masks[0], np.float32)[None], aligned, padding="zeros").numpy()[0]
        rest = model.predict_ddf(spatial.warp(moving[None], aligned).numpy()[0], fixed,
                                 masks=((moving_mask >= 0.5).astype(np.float32), masks[1]) if model.masks else None)
        ddf = spatial.compose_ddf(aligned, rest)
    result = register.Result(ddf=ddf)
    if any(steps):
        result = register.nonrigid(moving, fixed, initial=result, **{**options, "steps": tuple(steps)})
    result.seconds = time.perf_counter() - start
    return result


def accuracy(ddf, pair: Pair) -> dict:
    """Dice before and after, folding and, where `pair` has a true `ddf`, the TRE of one predicted DDF.

    ddf: `[D, H, W, 3]` or `[1, D, H, W, 3]` (voxels); pair: its volumes' first labels are the
    masks (binary `[D, H, W]`), the fixed volume's spacing gives mm per voxel along D, H, W.
    - `dice_before` / `dice_after`: Dice of the fixed mask with the moving mask unwarped / warped
      (trilinear, thresholded at 0.5);
    - `folding`: fraction of voxels where the Jacobian determinant of the map is <= 0;
    - `initial_mm` / `tre_mm`: mean displacement error in mm of the identity / of `ddf` against the
      true DDF, over the fixed lung mask; `initial_all_mm` / `tre_all_mm`: over the whole volume.
    """
    ddf = np.asarray(ddf, np.float32)
    ddf = ddf.reshape(ddf.shape[-4:])
    spacing = np.asarray(pair.fixed.spacing, np.float64)
    mask = pair.fixed.labels[..., 0] > 0.5
    moving_mask = pair.moving.labels[..., 0] > 0.5
    warped = spatial.warp(moving_mask[None].astype(np.float32), ddf[None], padding="zeros").numpy()[0] >= 0.5
    row = {"dice_before": metrics.dice(moving_mask, mask), "dice_after": metrics.dice(warped, mask),
           "folding": metrics.folding_fraction(ddf)}
    if pair.ddf is not None:
        truth = np.asarray(pair.ddf, np.float32)
        zero = np.zeros_like(truth)
        row.update({
            "initial_mm": metrics.target_registration_error(zero, truth, spacing, mask=mask),
            "tre_mm": metrics.target_registration_error(ddf, truth, spacing, mask=mask),
            "initial_all_mm": metrics.target_registration_error(zero, truth, spacing),
            "tre_all_mm": metrics.target_registration_error(ddf, truth, spacing),
        })
    return row
