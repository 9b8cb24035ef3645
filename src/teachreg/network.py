"""Learning-based registration: a network that predicts the DDF of an image pair in one forward pass.

`RegistrationNetwork` is a small encoder-decoder in the spirit of DeepReg's LocalNet: the moving
and fixed images, stacked as two channels, go down three times by strided convolutions and back
up; every decoder level (and the bottleneck) emits a DDF, and the DDFs are upsampled and summed,
coarse to fine. The network works at half resolution or coarser (`downsample` averages the
images first) and the summed DDF is upsampled (trilinearly) to the input grid: lung motion is
smooth, and it keeps inference well under a second per 104x96x96 pair on a 2-core CPU. The DDF
heads start at zero, so an untrained network predicts the identity warp. Its training objective is in `teachreg.objective`, its evaluation beside the
classical optimiser in `teachreg.evaluate`.

Conventions as in `teachreg.spatial`: images `[batch, D, H, W]` (here in Hounsfield units), DDFs
`[batch, D, H, W, 3]` in voxels on the fixed grid with components along (D, H, W), pulling:
`warped(x) = moving(x + ddf(x))`.

>>> model = load_pretrained("lung_ct")
>>> ddf = model.predict_ddf(moving, fixed)  # [batch, D, H, W, 3], voxels
>>> warped = spatial.warp(moving, ddf)      # [batch, D, H, W]
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from teachreg import files

__all__ = [
    "WINDOW", "PRETRAINED", "ChecksumMismatchError", "normalise", "upsample2",
    "RegistrationNetwork", "save", "load", "load_pretrained", "weights_folder",
]

WINDOW = (-1000.0, 500.0)
"""The CT window (HU) that `normalise` maps to [0, 1]: air to dense soft tissue, clipped."""

PRETRAINED = {"lung_ct": "lung_ct"}
"""Pretrained models shipped in `teachreg/weights/`: name -> file stem (`.weights.h5` + `.json`)."""


class ChecksumMismatchError(RuntimeError):
    """A shipped weights file does not match the SHA-256 recorded beside it."""


def normalise(image, window=WINDOW) -> tf.Tensor:
    """Map intensities `[...]` linearly from `window` (low, high) to [0, 1], clipped; float32, same shape.

    The network, its training losses and `predict_ddf` all see images through this one function.
    """
    low, high = float(window[0]), float(window[1])
    image = tf.cast(image, tf.float32)
    return tf.clip_by_value((image - low) / (high - low), 0.0, 1.0)


def upsample2(field: tf.Tensor) -> tf.Tensor:
    """Trilinear upsampling by 2 of `field` `[batch, D, H, W, C]` to `[batch, 2D, 2H, 2W, C]`.

    Voxel centres as in `tf.image.resize` (half-pixel): new voxel `2k` lies at `k - 1/4` and `2k + 1`
    at `k + 1/4` of the old grid, so each new value is `3/4` of its old voxel plus `1/4` of the
    neighbour on its side (the edge voxel repeated). Values are not rescaled.
    """
    x = field
    for axis in (1, 2, 3):
        n = tf.shape(x)[axis]
        before = tf.concat([tf.gather(x, [0], axis=axis), tf.gather(x, tf.range(n - 1), axis=axis)], axis=axis)
        after = tf.concat([tf.gather(x, tf.range(1, n), axis=axis), tf.gather(x, [n - 1], axis=axis)], axis=axis)
        pair = tf.stack([0.75 * x + 0.25 * before, 0.75 * x + 0.25 * after], axis=axis + 1)
        x = tf.reshape(pair, tf.tensor_scatter_nd_update(tf.shape(x), [[axis]], [2 * n]))
    return x


@keras.saving.register_keras_serializable(package="teachreg")
class RegistrationNetwork(keras.Model):
    """A LocalNet-like DDF network: `model((moving, fixed))` -> DDF `[batch, D, H, W, 3]` (voxels).

    moving, fixed: `[batch, D, H, W]` in the units of `window` (HU for CT), any size: they are
    normalised by `normalise(image, window)`. With `masks`, the network also takes the two images'
    masks (the lungs, in [0, 1]): `model((moving, fixed, moving_mask, fixed_mask))`, two more input
    channels. All inputs are padded (mirrored) to a multiple of
    `downsample * 2 ** len(channels)` voxels per axis and averaged over blocks of `downsample`
    voxels per axis (1, 2 or 4); the DDF is upsampled back and cropped. `channels`: the feature
    channels of the encoder levels at 1/2, 1/4, 1/8 ... of that averaged resolution. All
    convolutions are 3x3x3 with leaky ReLUs and no normalisation layers (batches are small).
    The last layer of each DDF head is zero-initialised, so an untrained network predicts 0.
    """

    def __init__(self, channels=(16, 32, 32), window=WINDOW, downsample=1, masks=False, **kwargs):
        super().__init__(**kwargs)
        self.channels = tuple(int(c) for c in channels)
        self.window = (float(window[0]), float(window[1]))
        self.downsample = int(downsample)
        self.masks = bool(masks)
        if not self.channels:
            raise ValueError("channels must list at least one level.")
        if self.downsample not in (1, 2, 4):
            raise ValueError(f"downsample must be 1, 2 or 4 (voxels averaged per axis), got {downsample!r}.")

        def conv(filters, name, strides=1):
            return keras.layers.Conv3D(filters, 3, strides=strides, padding="same", name=name)

        self.downs = [conv(c, f"down{i}", strides=2) for i, c in enumerate(self.channels)]
        self.encoders = [conv(c, f"encode{i}") for i, c in enumerate(self.channels)]
        self.decoders = [conv(c, f"decode{i}") for i, c in enumerate(self.channels[:-1])]
        # DDF heads in float32 even under mixed precision: displacements need the precision.
        self.heads = [
            keras.layers.Conv3D(3, 3, padding="same", kernel_initializer="zeros", bias_initializer="zeros",
                                dtype="float32", name=f"ddf{i}")
            for i in range(len(self.channels))
        ]
        self.activation = keras.layers.LeakyReLU(0.2)
        self.upsample = keras.layers.UpSampling3D(2)
        self.build(None)

    def build(self, input_shape=None):
        """Create every weight (their shapes do not depend on the image size)."""
        previous = 4 if self.masks else 2
        for i, c in enumerate(self.channels):
            self.downs[i].build((None, None, None, None, previous))
            self.encoders[i].build((None, None, None, None, c))
            previous = c
        for i, c in enumerate(self.channels[:-1]):
            self.decoders[i].build((None, None, None, None, self.channels[i + 1] + c))
        for i, c in enumerate(self.channels):
            self.heads[i].build((None, None, None, None, c))
        self.built = True

    @property
    def multiple(self) -> int:
        """Each input axis is padded to a multiple of this many voxels."""
        return self.downsample * 2 ** len(self.channels)

    def call(self, inputs, training=False):
        moving, fixed, *masks = inputs
        if len(masks) != (2 if self.masks else 0):
            raise ValueError(f"this network takes {'(moving, fixed, moving_mask, fixed_mask)' if self.masks else '(moving, fixed)'}"
                             f", got {len(inputs)} inputs.")
        x = tf.stack([normalise(moving, self.window), normalise(fixed, self.window)]
                     + [tf.clip_by_value(tf.cast(m, tf.float32), 0.0, 1.0) for m in masks], axis=-1)
        shape = tf.shape(x)[1:4]
        padded = (shape + self.multiple - 1) // self.multiple * self.multiple
        pad = padded - shape
        x = tf.pad(x, [[0, 0], [0, pad[0]], [0, pad[1]], [0, pad[2]], [0, 0]], mode="SYMMETRIC")
        if self.downsample > 1:
            x = tf.nn.avg_pool3d(x, self.downsample, self.downsample, "VALID")
        x = tf.cast(x, self.compute_dtype)
        skips = []
        for down, encode in zip(self.downs, self.encoders):
            x = self.activation(encode(self.activation(down(x))))
            skips.append(x)
        ddf = self.heads[-1](x)
        for i in reversed(range(len(self.decoders))):
            x = self.activation(self.decoders[i](tf.concat([self.upsample(x), skips[i]], axis=-1)))
            ddf = upsample2(ddf) + self.heads[i](x)
        ddf = upsample2(ddf)
        for _ in range(self.downsample.bit_length() - 1):  # back to the input grid: twice as many voxels each time
            ddf = 2.0 * upsample2(ddf)
        return ddf[:, : shape[0], : shape[1], : shape[2]]

    def get_config(self):
        return {**super().get_config(), "channels": list(self.channels), "window": list(self.window),
                "downsample": self.downsample, "masks": self.masks}

    def predict_ddf(self, moving, fixed, batch_size: int = 1, masks=None) -> np.ndarray:
        """The DDF `[batch, D, H, W, 3]` (voxels, float32 NumPy) mapping each fixed image into its moving one.

        moving, fixed: arrays `[batch, D, H, W]` (or one pair `[D, H, W]`, giving batch 1) in the
        units of `window` (HU for CT); normalised as in training. Runs `batch_size` pairs at a time.
        masks: (moving mask, fixed mask), arrays of the images' shape, 1 inside the lungs and 0
        outside; required by a network made with `masks=True`, refused by others.
        """
        moving, fixed = (np.asarray(a, np.float32) for a in (moving, fixed))
        if (masks is not None) != self.masks:
            raise ValueError("this network takes the lung masks of both images: predict_ddf(moving, fixed, masks="
                             "(moving_mask, fixed_mask)), 1 inside the lungs, 0 outside (teachreg.lung.segment_lungs "
                             "finds them in a CT)" if self.masks else
                             "this network takes no masks: call predict_ddf(moving, fixed)")
        masks = [] if masks is None else [np.asarray(m, np.float32) for m in masks]
        if len(masks) not in (0, 2):
            raise ValueError(f"masks must be (moving mask, fixed mask), got {len(masks)} arrays.")
        if moving.ndim == 3:
            moving, fixed, masks = moving[None], fixed[None], [m[None] for m in masks]
        if moving.ndim != 4 or moving.shape != fixed.shape:
            raise ValueError(f"moving and fixed must both have shape [batch, D, H, W], got {moving.shape} and {fixed.shape}.")
        if any(m.shape != moving.shape for m in masks):
            raise ValueError(f"the masks must have the images' shape {moving.shape}, got {[m.shape for m in masks]}.")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
        minimum = self.multiple // 2  # `call` mirrors each axis up to a multiple; a mirror adds at most n voxels
        if min(moving.shape[1:]) < minimum:
            raise ValueError(f"moving and fixed must have at least {minimum} voxels along D, H and W for this network "
                             f"(it pads each axis by mirroring to a multiple of {self.multiple}), got shape {moving.shape}.")
        for name, array in (("moving", moving), ("fixed", fixed)):
            if not np.isfinite(array).all():
                raise ValueError(f"{name} contains NaN or infinite values; expected finite intensities (HU for CT), shape [batch, D, H, W].")
        for name, mask in zip(("moving mask", "fixed mask"), masks):
            if not (np.isfinite(mask).all() and mask.min() >= 0 and mask.max() <= 1):
                raise ValueError(f"the {name} must hold values in [0, 1] (1 inside the lungs), got values in "
                                 f"[{np.nanmin(mask):g}, {np.nanmax(mask):g}].")
        if not hasattr(self, "_predict"):
            spec = tf.TensorSpec([None, None, None, None], tf.float32)
            inputs = 4 if self.masks else 2
            self._predict = tf.function(lambda *arrays: self(arrays), input_signature=[spec] * inputs)
        arrays = [moving, fixed, *masks]
        return np.concatenate([
            self._predict(*(a[i : i + batch_size] for a in arrays)).numpy()
            for i in range(0, len(moving), batch_size)
        ])


# --- saving and the pretrained models ---------------------------------------------------------


def save(model: RegistrationNetwork, path, **metadata) -> Path:
    """Save `model` as `PATH.weights.h5` plus `PATH.json` (its config, the weights' SHA-256, `metadata`).

    `path` is the stem, e.g. `out/lung_ct`. Returns the JSON's path. `load(path)` reads both back.
    """
    stem = Path(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = stem.with_name(stem.name + ".weights.h5")
    model.save_weights(weights)
    info = {"weights": weights.name, "sha256": files.sha256(weights), "model": {"channels": list(model.channels),
            "window": list(model.window), "downsample": model.downsample, "masks": model.masks}, **metadata}
    target = stem.with_name(stem.name + ".json")
    files.write_atomic(target, json.dumps(info, indent=1) + "\n")
    return target


def load(path) -> RegistrationNetwork:
    """Load a model saved by `save` from its stem `path` (or its `.json`), checking the weights' SHA-256.

    Raises `ChecksumMismatchError` when the weights file differs from the digest in the JSON.
    """
    stem = Path(str(path).removesuffix(".json"))
    info = json.loads(stem.with_name(stem.name + ".json").read_text(encoding="utf-8"))
    weights = stem.with_name(info["weights"])
    actual = files.sha256(weights)
    if actual != info["sha256"]:
        raise ChecksumMismatchError(
            f"{weights} has SHA-256 {actual}, but {stem.name}.json records {info['sha256']}: the weights "
            "file is corrupt or was replaced. Reinstall teachreg (or re-run the training) to restore it.")
    model = RegistrationNetwork(**info["model"])
    model.load_weights(weights)
    model.info = info
    return model


def load_pretrained(name: str = "lung_ct") -> RegistrationNetwork:
    """A pretrained `RegistrationNetwork` shipped with teachreg, its weights' SHA-256 checked.

    "lung_ct": trained on the train pairs of the lung CT dataset (`teachreg.lung`), CT in HU
    on 104x96x96 grids of (3.5, 2.5, 3.5) mm, in two stages: `teachreg train
    configs/lung_ct_stage1.yaml`, then `teachreg train configs/lung_ct.yaml`, which fine-tunes it.
    `model.info` holds the training config, command, device, time, per-epoch history and the
    evaluation on the test pairs measured after training (`teachreg/weights/lung_ct.json`), and
    under "init" the same record of stage 1.
    Use `model.predict_ddf(moving, fixed)`.
    """
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; available: {sorted(PRETRAINED)}.")
    with resources.as_file(weights_folder()) as folder:
        return load(Path(folder) / f"{PRETRAINED[name]}.json")


def weights_folder():
    """The folder of the shipped weights, `teachreg/weights/` inside the installed package."""
    return resources.files("teachreg") / "weights"
