"""Separable 3-D filters (box and Gaussian), shared by smoothing and local image losses."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


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

    Returns a tensor of the same shape. Channels are filtered independently.
    """
    shape = tf.shape(volume)
    channels = volume.shape[-1]
    # Move channels into the batch so one single-channel conv3d serves any number of channels.
    x = tf.transpose(volume, [0, 4, 1, 2, 3])
    x = tf.reshape(x, [-1, shape[1], shape[2], shape[3], 1])
    k = tf.constant(kernel, tf.float32)
    n = int(kernel.shape[0])
    for axis_shape in ([n, 1, 1, 1, 1], [1, n, 1, 1, 1], [1, 1, n, 1, 1]):
        x = tf.nn.conv3d(x, tf.reshape(k, axis_shape), strides=[1] * 5, padding="SAME")
    x = tf.reshape(x, [shape[0], channels if channels is not None else shape[4], shape[1], shape[2], shape[3]])
    return tf.transpose(x, [0, 2, 3, 4, 1])
