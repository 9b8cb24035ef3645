"""Separable 3-D filters (box and Gaussian), shared by smoothing and local image losses."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

__all__ = ["box_kernel1d", "gaussian_kernel1d", "separable_filter"]


def gaussian_kernel1d(sigma: float, truncate: float = 3.0) -> np.ndarray:
    """A normalised 1-D Gaussian of standard deviation `sigma` voxels, `2 * ceil(truncate * sigma) + 1` taps."""
    radius = max(1, int(np.ceil(truncate * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def box_kernel1d(size: int) -> np.ndarray:
    """A 1-D box of `size` taps (odd), each 1 / size."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd number of voxels, got {size}.")
    return np.full(size, 1.0 / size, dtype=np.float32)


def separable_filter(volume: tf.Tensor, kernel: np.ndarray) -> tf.Tensor:
    """Filter each channel of `volume` [batch, D, H, W, C] with `kernel` along D, H and W, zero padding.

    Returns a tensor of the same shape. Written as weighted sums of shifted slices, which XLA
    fuses; compiled 3-D convolutions are many times slower on a CPU.
    """
    radius = len(kernel) // 2
    x = volume
    for axis in (1, 2, 3):
        paddings = [[0, 0]] * 5
        paddings[axis] = [radius, radius]
        padded = tf.pad(x, paddings)
        size = tf.shape(x)
        begin = tf.one_hot(axis, 5, dtype=tf.int32)
        x = tf.add_n([float(w) * tf.slice(padded, begin * i, size) for i, w in enumerate(kernel)])
    return x
