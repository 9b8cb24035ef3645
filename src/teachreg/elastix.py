"""elastix, the classical reference: register a pair with its default parameter maps.

Needs the optional package `itk-elastix` (`pip install "teachreg[elastix]"`). `available()` tells
whether it is installed; `register` returns a `teachreg.register.Result`, so elastix's output is
measured with the same Dice, folding and warping code as ours.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from teachreg import _validate
from teachreg.register import Result

__all__ = ["INSTALL_HINT", "MAPS", "STORED", "available", "register", "stored_results"]

INSTALL_HINT = 'itk-elastix is not installed: `pip install "teachreg[elastix]"` (or `pip install itk-elastix`).'


MAPS = ("translation", "rigid", "affine", "bspline", "spline", "groupwise")
"""The names of elastix's default parameter maps."""


def available() -> bool:
    """Whether `itk-elastix` can be imported."""
    try:
        import itk  # noqa: F401

        return hasattr(itk, "elastix_registration_method")
    except ImportError:
        return False


def register(moving, fixed, maps: tuple[str, ...] = ("bspline",), spacing=(1.0, 1.0, 1.0)) -> Result:
    """Register `moving` to `fixed` (`[D, H, W]` arrays, spacing in mm, (z, y, x)) with elastix.

    `maps`: names of elastix's default parameter maps (`MAPS`), run in order. Returns a Result
    whose `ddf` `[1, D, H, W, 3]` is in voxels on the fixed grid, converted from transformix's
    deformation field (mm, (x, y, z) order), and whose `seconds` is elastix's wall time (without
    computing the field).
    """
    if not available():
        raise ImportError(INSTALL_HINT)
    import itk

    unknown = [m for m in maps if m not in MAPS]
    if unknown or not maps:
        raise ValueError(f"maps must name elastix's default maps {MAPS}, got {tuple(maps)}.")
    if np.shape(moving) != np.shape(fixed):
        raise ValueError(f"moving {np.shape(moving)} and fixed {np.shape(fixed)} must have one shape.")
    images = []
    for name, array in (("fixed", fixed), ("moving", moving)):
        array = np.asarray(array, np.float32)
        if array.ndim != 3:
            raise ValueError(f"{name} must have shape [D, H, W], got {array.shape}.")
        _validate.image(name, array[None])  # finite values
        image = itk.image_from_array(np.ascontiguousarray(array))
        image.SetSpacing([float(s) for s in spacing[::-1]])  # itk wants (x, y, z)
        images.append(image)
    fixed_image, moving_image = images

    parameters = itk.ParameterObject.New()
    for name in maps:
        parameters.AddParameterMap(parameters.GetDefaultParameterMap(name))
    start = time.perf_counter()
    _, transform = itk.elastix_registration_method(
        fixed_image, moving_image, parameter_object=parameters, log_to_console=False
    )
    seconds = time.perf_counter() - start
    # transformix writes deformationField.nii into the working directory: keep it out of the user's.
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        try:
            field = np.asarray(itk.transformix_deformation_field(moving_image, transform))
        finally:
            os.chdir(cwd)
    ddf = field[..., ::-1] / np.asarray(spacing, np.float32)  # (x, y, z) mm -> (z, y, x) voxels
    return Result(ddf=tf.constant(ddf[None], tf.float32), seconds=seconds)


STORED = Path(__file__).with_name("elastix_prostate.json")
"""elastix's figures on the prostate pair, written by `benchmarks/bench.py --store-elastix`."""


def stored_results() -> dict[str, dict]:
    """elastix's stored figures on the course's prostate pair, for where it is not installed.

    Returns {"bspline": {"dice", "folding", "seconds"}, "affine then bspline": {...}}; the file
    also says when, where and with which itk-elastix they were measured (key "measured").
    """
    stored = json.loads(STORED.read_text(encoding="utf-8"))
    return {name: row for name, row in stored.items() if name != "measured"}
