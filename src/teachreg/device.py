"""Where TensorFlow runs: the GPU(s) it uses or the CPU, in words for logs and saved models."""

from __future__ import annotations

import os
import platform

import tensorflow as tf

__all__ = ["description"]


def description() -> str:
    """The GPU(s) TensorFlow uses, by name (`"GPU: NAME, ..."`), or the CPU and its core count (`"CPU: MACHINE, N cores"`)."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
        return f"GPU: {', '.join(names)}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU: {platform.machine()}, {cores} cores"
