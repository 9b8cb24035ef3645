"""Input checks shared by the public functions: clear `ValueError` messages instead of TensorFlow errors."""

from __future__ import annotations

import math
import numbers

import numpy as np
import tensorflow as tf


def as_float_tensor(name: str, value, ranks: tuple[int, ...], expected: str, last_dim: int | None = None) -> tf.Tensor:
    """Return `value` as a float32 tensor after checking rank, dtype, last dimension and finiteness.

    `name` is the argument's name and `expected` its expected shape, both quoted in the error.
    Finiteness is checked only on eager values (not while tracing a `tf.function`).
    """
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        value = np.asarray(value)
        dtype = value.dtype
    dtype = tf.as_dtype(dtype)
    if not (dtype.is_floating or dtype.is_integer or dtype.is_bool):
        raise ValueError(f"{name} must hold real numbers, got dtype {dtype.name}; expected shape {expected}.")
    tensor = tf.cast(value, tf.float32) if dtype != tf.float32 else tf.convert_to_tensor(value)
    shape = tensor.shape
    if shape.rank not in ranks:
        raise ValueError(
            f"{name} must have rank {' or '.join(map(str, ranks))} with shape {expected}, "
            f"got shape {tuple(shape)}."
        )
    if last_dim is not None and shape[-1] is not None and shape[-1] != last_dim:
        raise ValueError(f"{name} must have shape {expected} (last axis {last_dim}), got shape {tuple(shape)}.")
    if tf.executing_eagerly() and not bool(tf.reduce_all(tf.math.is_finite(tensor))):
        raise ValueError(f"{name} contains NaN or infinite values; expected finite numbers with shape {expected}.")
    return tensor


def image(name: str, value) -> tf.Tensor:
    """An image `[batch, D, H, W]` or `[batch, D, H, W, C]`, returned as float32 `[batch, D, H, W, C]`."""
    tensor = as_float_tensor(name, value, (4, 5), "[batch, D, H, W] or [batch, D, H, W, C]")
    return tensor[..., None] if tensor.shape.rank == 4 else tensor


def ddf(name: str, value) -> tf.Tensor:
    """A dense displacement field `[batch, D, H, W, 3]` in voxels, as float32."""
    return as_float_tensor(name, value, (5,), "[batch, D, H, W, 3]", last_dim=3)


def same_shape(name_a: str, a: tf.Tensor, name_b: str, b: tf.Tensor) -> None:
    """Raise a `ValueError` when two tensors' static shapes differ."""
    if not a.shape.is_compatible_with(b.shape):
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")


def whole_number(name: str, value, minimum: int) -> None:
    """Raise a `ValueError` naming option `name` unless `value` is an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}.")


def real_number(name: str, value, minimum: float, strict: bool = False) -> None:
    """Raise a `ValueError` naming option `name` unless `value` is a finite number >= `minimum` (> when `strict`)."""
    valid = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if not valid or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {minimum:g}, got {value!r}.")
