"""Training a `network.RegistrationNetwork` from a YAML config: `teachreg train CONFIG.yaml`.

The data are image pairs in DeepReg's paired layout, as `teachreg.lung` builds them:
`ROOT/SPLIT/{moving,fixed}_images/NAME.nii.gz`, `ROOT/SPLIT/{moving,fixed}_labels/NAME.nii.gz`
and `ROOT/SPLIT/ddfs/NAME.nii.gz`, the ground-truth DDF in voxels on the fixed grid (`fixed(x) =
moving(x + ddf(x))`); `teachreg.data.load_paired` reads them as `Pair` objects in (z, y, x) order.
With `data.draw` > 0, each epoch's pairs are instead drawn afresh from the training split's CTs and
motions (`teachreg.lung.draw_pairs`), and with `data.keep` > 1 each drawn pair stays in training
for that many epochs, augmented differently each time: drawing a lung CT pair takes about 2 s on
a 2-core CPU, a training step 0.2 to 0.5 s.

One epoch visits every training pair once, in an order drawn from (seed, epoch); each pair is
augmented by random affines (`spatial.random_affine`), by default two independent ones (as
DeepReg), one resampling the fixed side and one the moving side, which adds an affine motion
between them; with `independent: false` one affine moves both, which changes the pose but keeps
the motion. The ground-truth DDF is transformed to match exactly (see `augment`), so
augmentation is valid in every mode, supervised included. Optionally (see `make_dataset`) a
pair's field of view is cut along D, as in scans that miss part of the lungs, and its
intensities change by one random linear map, as between scanners. A network that averages its
images first (`model.downsample` > 1) is trained at the resolution it works at: each pair is
averaged likewise before augmentation, and the loss terms are computed there (a lung CT step took
0.21 s instead of 0.46 s on the full grid, on a 2-core CPU). After each epoch the
run writes a checkpoint (model, optimiser, epoch), TensorBoard scalars (`tensorboard --logdir
RUN/logs` shows them; `pip install "teachreg[train]"` installs TensorBoard) and a row of
`history.csv`; started again with the same output folder and config (`epochs` may grow) it
resumes from the latest checkpoint and gives the same result as an uninterrupted run. Mixed
precision is used on a GPU, and a `tf.distribute.MirroredStrategy` when there are several
(`batch_size` is per replica).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import numbers
import os
import shutil
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import yaml
from tensorflow.core.framework import summary_pb2
from tqdm import tqdm

from teachreg import data, device, files, losses, lung, network, objective, spatial

__all__ = [
    "DEFAULTS", "MODES", "CHOICES", "RESUMABLE", "load_config", "augment", "make_dataset",
    "train",
]

DEFAULTS = {
    "name": "model",  # the saved model is OUTPUT/NAME.weights.h5 + OUTPUT/NAME.json
    # root None: teachreg.data.data_dir() / "lung_ct"; draw > 0: each epoch, that many pairs drawn
    # afresh from the training CTs and motions (teachreg.lung.draw_pairs) instead of root/split's;
    # keep: each epoch trains on the pairs drawn in the last `keep` epochs (itself included)
    "data": {"root": None, "split": "train", "draw": 0, "keep": 1},
    # channels of the encoder levels; window (HU) mapped to [0, 1]; downsample: voxels averaged per
    # axis before the network; masks: the network also takes both lung masks (see network.RegistrationNetwork)
    "model": {"channels": [16, 32, 32], "window": list(network.WINDOW), "downsample": 1, "masks": False},
    "mode": "unsupervised",
    "weights": {},  # override the mode's weights, e.g. {label: 1.0}
    "image_loss": "lncc",
    "regulariser": "bending",
    "ddf_loss": "mse",
    "ddf_outside_weight": 1.0,  # < 1: the DDF loss weighs voxels away from the fixed label less (labels needed)
    "epochs": 10,
    "batch_size": 1,  # per replica
    "learning_rate": 1e-3,
    "schedule": "constant",  # or "cosine": decays to 1 % of learning_rate over all the epochs' steps
    # scale: random_affine's scale (0: off); independent: one affine per side (as DeepReg), else one
    # per pair; fov_cut: probability of cutting the field of view along D (see make_dataset);
    # intensity: relative size of a random linear intensity change (0: off)
    "augmentation": {"scale": 0.05, "independent": True, "fov_cut": 0.0, "intensity": 0.0},
    "init": None,  # a model saved by network.save (its stem or .json) to start from, e.g. to fine-tune; None: random
    "seed": 0,
    "output": "runs/model",
    "mixed_precision": "auto",  # auto: on a GPU only; or true / false
    "strategy": "auto",  # auto: MirroredStrategy with several GPUs; "default" or "mirrored"
}
"""Every config key with its default; a YAML config overrides some of them (nested dicts merge)."""

MODES = {
    "unsupervised": {"image": 1.0, "label": 0.0, "ddf": 0.0, "regulariser": 0.5},
    "weak": {"image": 0.0, "label": 1.0, "ddf": 0.0, "regulariser": 0.5},
    "combined": {"image": 1.0, "label": 1.0, "ddf": 0.0, "regulariser": 0.5},
    "supervised": {"image": 0.0, "label": 0.0, "ddf": 1.0, "regulariser": 0.0},
}
"""Each training mode's default loss weights (see `objective.registration_losses`); `weights` overrides them."""

CHOICES = {"mode": MODES, "image_loss": losses.IMAGE_LOSSES, "regulariser": losses.REGULARISERS,
           "ddf_loss": objective.DDF_LOSSES, "schedule": ("constant", "cosine"),
           "strategy": ("auto", "default", "mirrored")}
"""The names each naming config key accepts."""

RESUMABLE = ("epochs", "output")
"""The config keys that may differ from those of the checkpoints a run resumes (see `train`)."""


def load_config(config=None, **overrides) -> dict:
    """The full config: `DEFAULTS` updated by `config` (a YAML path or a dict), then by `overrides`.

    Every value is checked against its default's type (and `CHOICES`): a wrong key or value
    raises a `ValueError` naming it. Numbers written as `1e-3` (a string in YAML 1.1) become
    floats; the mode's weights are resolved into `"weights"`.
    """
    source = "the config"
    if isinstance(config, (str, Path)):
        source = str(config)
        try:
            config = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ValueError(f"{source} is not valid YAML: {err}") from None
    if not isinstance(config or {}, dict):
        raise ValueError(f"{source} must be a mapping of config keys to values (`key: value` lines, see "
                         f"teachreg.train.DEFAULTS), got a {type(config).__name__}.")
    merged = copy.deepcopy(DEFAULTS)
    for values in (config or {}, overrides):
        for key, value in values.items():
            if key not in DEFAULTS:
                raise ValueError(f"unknown config key {key!r}; known keys: {sorted(DEFAULTS)}.")
            if not isinstance(DEFAULTS[key], dict):
                merged[key] = _checked(key, value, DEFAULTS[key])
                continue
            if not isinstance(value or {}, dict):
                raise ValueError(f"{key} must be a mapping (`{key}: {{name: value, ...}}`), got {value!r}.")
            if key == "weights":
                unknown = set(value or {}) - set(objective.LOSS_TERMS)
                if unknown:
                    raise ValueError(f"unknown loss weight(s) {sorted(unknown)}; "
                                     f"the terms are {list(objective.LOSS_TERMS)}.")
                merged[key] = {k: _checked(f"weights.{k}", v, 0.0) for k, v in (value or {}).items()}
                continue
            unknown = set(value or {}) - set(DEFAULTS[key])
            if unknown:
                raise ValueError(f"unknown key(s) {sorted(unknown)} in {key!r}; known: {sorted(DEFAULTS[key])}.")
            merged[key].update({k: _checked(f"{key}.{k}", v, DEFAULTS[key][k]) for k, v in (value or {}).items()})
    merged["weights"] = {**MODES[merged["mode"]], **merged["weights"]}
    return merged


def _float(value) -> float | None:
    """`value` as a finite float, also from a string such as "1e-3" (YAML 1.1 reads it so); else None."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _checked(key: str, value, default):
    """`value` of the config key `key` ("model.channels" when nested), checked against `default`'s type; returns it.

    Floats come back as floats, lists as lists, paths as strings. Raises a `ValueError` naming
    the key, the value and what it must be.
    """
    if key in CHOICES:
        ok, expected = isinstance(value, str) and value in CHOICES[key], f"one of {sorted(CHOICES[key])}"
    elif key == "mixed_precision":
        ok, expected = isinstance(value, bool) or value == "auto", "true, false or 'auto'"
    elif isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        low = 1 if key in ("batch_size", "data.keep", "model.downsample") else 0
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low
        expected = f"an integer >= {low}"
        value = int(value) if ok else value
    elif isinstance(default, float):
        number = _float(value)
        if key == "learning_rate":
            ok, expected = number is not None and number > 0, "a number > 0"
        elif key == "augmentation.fov_cut":
            ok, expected = number is not None and 0 <= number <= 1, "a number in [0, 1] (a probability)"
        else:
            ok, expected = number is not None and number >= 0, "a number >= 0"
        value = number if ok else value
    elif key == "model.channels":
        ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(
            isinstance(c, numbers.Integral) and not isinstance(c, bool) and c >= 1 for c in value)
        expected = "a list of integers >= 1 (the channels of each encoder level)"
        value = [int(c) for c in value] if ok else value
    elif key == "model.window":
        window = [_float(v) for v in value] if isinstance(value, (list, tuple)) and len(value) == 2 else [None]
        ok, expected = None not in window and window[0] < window[1], "[low, high], two numbers with low < high"
        value = window if ok else value
    else:  # a name, a folder or a file; data.root and init may be null
        value = os.fspath(value) if isinstance(value, os.PathLike) else value
        ok = (isinstance(value, str) and value != "") or (default is None and value is None)
        expected = "a non-empty string" + (" or null" if default is None else "")
    if not ok:
        raise ValueError(f"{key} must be {expected}, got {value!r}.")
    return value


# --- data -------------------------------------------------------------------------------------


def _arrays(pair: data.Pair, keys) -> dict:
    """The arrays `keys` of `pair` that a training step takes: "moving", "fixed" (images `[D, H, W]`),
    "moving_label", "fixed_label" (uint8 `[D, H, W]`, `[D, H, W, L]` with several labels) and "ddf"
    (`[D, H, W, 3]`, voxels). Raises `teachreg.data.DataError` naming the pair if it lacks them."""
    arrays = {}
    for key in keys:
        if key == "ddf":
            if pair.ddf is None:
                raise data.DataError(f"pair {pair.name}: the ground-truth DDF is missing, but the config uses "
                                     "the DDF loss")
            arrays[key] = pair.ddf
            continue
        volume = pair.moving if key.startswith("moving") else pair.fixed
        if key in ("moving", "fixed"):
            arrays[key] = volume.image
        elif volume.labels is None:
            raise data.DataError(f"pair {pair.name}: labels are missing, but the config uses the label loss")
        else:
            arrays[key] = volume.labels[..., 0] if volume.labels.shape[-1] == 1 else volume.labels
    return arrays


def augment(sample: dict, fixed_affine, moving_affine) -> dict:
    """Resample one pair by two affines `[4, 3]` (fixed voxels -> original voxels), keeping it consistent.

    sample: "moving", "fixed" `[D, H, W]`, optionally "moving_label", "fixed_label" `[D, H, W]`
    and "ddf" `[D, H, W, 3]`. The new fixed image is `fixed(A x)` and the new moving image
    `moving(B y)` (A = `fixed_affine`, B = `moving_affine`; labels alike, zero outside). As
    `fixed(x) = moving(x + u(x))`, the new pair is related by `u'(x) = B^-1 (A x + u(A x)) - x`,
    the DDF returned. Images use edge padding outside the volume, labels zeros.
    """
    shape = sample["fixed"].shape
    grid = spatial.reference_grid(shape)
    at_fixed = spatial.warp_grid(grid, fixed_affine[None])  # A x, [1, D, H, W, 3]
    at_moving = spatial.warp_grid(grid, moving_affine[None])  # B y
    out = dict(sample)
    out["fixed"] = spatial.resample(sample["fixed"][None], at_fixed)[0]
    out["moving"] = spatial.resample(sample["moving"][None], at_moving)[0]
    if "fixed_label" in sample:
        out["fixed_label"] = spatial.resample(sample["fixed_label"][None], at_fixed, padding="zeros")[0]
        out["moving_label"] = spatial.resample(sample["moving_label"][None], at_moving, padding="zeros")[0]
    if "ddf" in sample:
        target = at_fixed[0] + spatial.resample(sample["ddf"][None], at_fixed)[0]  # A x + u(A x)
        out["ddf"] = spatial.warp_grid(target, spatial.invert_affine(moving_affine[None]))[0] - grid
    return out


def _averaged(arrays: dict, factor: int) -> dict:
    """`arrays` (as `_arrays` gives them) averaged over blocks of `factor` voxels per axis, as a
    `network.RegistrationNetwork` with `downsample=factor` averages its images: float32, the last
    voxels along an axis that fill no block dropped. Labels become the fraction of each block inside
    them; the DDF is also divided by `factor`, into voxels of the coarser grid."""
    if factor == 1:
        return arrays
    averaged = {}
    for key, array in arrays.items():
        array = np.asarray(array, np.float32)
        d, h, w = (n // factor for n in array.shape[:3])
        blocks = array[: d * factor, : h * factor, : w * factor].reshape(
            d, factor, h, factor, w, factor, *array.shape[3:])
        averaged[key] = blocks.mean(axis=(1, 3, 5)) / (factor if key == "ddf" else 1)
    return averaged


def make_dataset(pairs: list[data.Pair], keys, global_batch: int, epoch: int, seed: int, scale: float,
                 independent: bool = True, fov_cut: float = 0.0, intensity: float = 0.0,
                 window=network.WINDOW, downsample: int = 1) -> tf.data.Dataset:
    """One epoch of batches `{key: [global_batch, ...]}` (float32), order and augmentation drawn from (seed, epoch).

    pairs: Pairs, all of one shape; a batch holds their arrays `keys` ("moving", "fixed",
    "moving_label", "fixed_label", "ddf"; labels `[D, H, W]` where a pair has one). The last
    incomplete batch is dropped. With `downsample` > 1 every pair is first averaged over blocks of
    that many voxels per axis (`_averaged`: the DDF in voxels of the coarser grid), and all
    follows on that grid. Augmentation, applied in this order:
    - `scale`: `spatial.random_affine`'s scale (0: none); `independent`: a different affine for
      the fixed and the moving side, else the same one (see `augment`);
    - `fov_cut`: the probability that a pair's field of view is cut along D (the scanner's axis)
      to a slab of 40-80 % of the lungs' extent in the fixed label (the whole axis when `keys` hold
      no labels), as in scans that miss the lung base or apex: both images are set to `window[0]`
      (air) outside the slab and both labels to 0; the DDF is kept;
    - `intensity`: both images of a pair get one random linear change of intensity, `a * image + b`
      with `|a - 1| <= intensity` and `|b| <= intensity * (window[1] - window[0])`, as between scanners.
    """
    pairs = [_averaged(_arrays(pair, keys), downsample) for pair in pairs]
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(pairs))
    shape = pairs[0]["fixed"].shape
    if scale > 0:
        affines = spatial.random_affine(2 * len(order), scale, seed=int(rng.integers(2**31)), shape=shape).numpy()
        if not independent:
            affines[1::2] = affines[0::2]
    else:
        affines = np.tile(np.eye(4, 3, dtype=np.float32), (2 * len(order), 1, 1))
    slabs = np.tile(np.array([0, shape[0]], np.int32), (len(order), 1))
    for j, i in enumerate(order):
        if rng.random() < fov_cut:
            label = pairs[i].get("fixed_label")
            rows = np.flatnonzero(np.asarray(label).reshape(shape[0], -1).any(axis=1)) if label is not None else []
            low, high = (rows[0], rows[-1] + 1) if len(rows) else (0, shape[0])
            length = max(1, int(round(rng.uniform(0.4, 0.8) * (high - low))))
            first = int(rng.integers(low, high - length + 1))
            slabs[j] = first, first + length
    width = float(window[1]) - float(window[0])
    gains = (1 + rng.uniform(-intensity, intensity, len(order))).astype(np.float32)
    offsets = (rng.uniform(-intensity, intensity, len(order)) * width).astype(np.float32)

    def generate():
        for j, i in enumerate(order):
            yield {k: pairs[i][k] for k in keys}, affines[2 * j], affines[2 * j + 1], slabs[j], gains[j], offsets[j]

    # Arrays stay in their own dtype (int16 HU, uint8 labels) in memory and become float32 here.
    signature = ({k: tf.TensorSpec(np.shape(pairs[0][k]), tf.as_dtype(np.asarray(pairs[0][k]).dtype)) for k in keys},
                 tf.TensorSpec([4, 3], tf.float32), tf.TensorSpec([4, 3], tf.float32), tf.TensorSpec([2], tf.int32),
                 tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.float32))
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)

    def prepare(sample, fixed_affine, moving_affine, slab, gain, offset):
        sample = {k: tf.cast(v, tf.float32) for k, v in sample.items()}
        if scale > 0:
            sample = augment(sample, fixed_affine, moving_affine)
        depth = tf.range(shape[0])
        inside = tf.reshape((depth >= slab[0]) & (depth < slab[1]), [-1, 1, 1])
        for key in ("moving", "fixed"):
            sample[key] = tf.where(inside, gain * sample[key] + offset, float(window[0]))
        for key in ("moving_label", "fixed_label"):
            if key in sample:
                inside_label = tf.reshape(inside, [-1] + [1] * (sample[key].shape.rank - 1))
                sample[key] = tf.where(inside_label, sample[key], 0.0)
        return sample

    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(global_batch, drop_remainder=True).prefetch(1)


# --- training ---------------------------------------------------------------------------------


_SCALAR = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
"""TensorBoard's scalar metadata, so `tf.summary.write` logs scalars without the tensorboard package."""


def _epoch_pairs(config: dict, count: int, epoch: int) -> int:
    """How many pairs epoch `epoch` (from 0) trains on: `count` pairs on disk, or with `data.draw`
    the pairs drawn in the last `data.keep` epochs."""
    draw = config["data"]["draw"]
    return draw * min(config["data"]["keep"], epoch + 1) if draw else count


def _learning_rate(config: dict, count: int, global_batch: int):
    """The config's learning rate: a number, or a cosine decay over the steps of all the epochs.

    The decay is set by the epochs of this run: resuming with more epochs stretches it.
    """
    if config["schedule"] == "constant":
        return config["learning_rate"]
    steps = sum(_epoch_pairs(config, count, e) // global_batch for e in range(config["epochs"]))
    return keras.optimizers.schedules.CosineDecay(config["learning_rate"], steps, alpha=0.01)


def _strategy(choice: str) -> tf.distribute.Strategy:
    gpus = tf.config.list_physical_devices("GPU")
    if choice == "mirrored" or (choice == "auto" and len(gpus) > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


_AFRESH = "start afresh with --restart (train(resume=False)), which deletes its checkpoints, or choose another --output"


def _check_resumable(out: Path, config: dict) -> None:
    """Refuse to resume the checkpoints in `out` with a config that differs from theirs (`out/config.yaml`).

    Only the keys in `RESUMABLE` may differ.
    """
    try:
        saved = load_config(out / "config.yaml")
    except (OSError, ValueError) as err:
        raise ValueError(f"{out} holds checkpoints, but their config cannot be read ({err}); {_AFRESH}.") from None

    def flat(values: dict, prefix: str = "") -> dict:
        items = {}
        for key, value in values.items():
            items.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return items

    old, new = flat(saved), flat(config)
    changes = [f"{key} {old[key]!r} -> {new[key]!r}" for key in new if old[key] != new[key] and key not in RESUMABLE]
    if changes:
        raise ValueError(f"{out} holds the checkpoints of a run with another config ({out / 'config.yaml'}): "
                         f"{', '.join(changes)}; to resume it, use its config; else {_AFRESH}.")


def _check_finite(pairs: list[data.Pair], keys, where: str) -> None:
    """Raise a `ValueError` naming the first pair whose arrays `keys` hold NaN or infinity (`where`: their files).

    A pair that lacks a label or the DDF of `keys` raises `teachreg.data.DataError`."""
    for i, pair in enumerate(pairs):
        for key, array in _arrays(pair, keys).items():
            bad = np.size(array) - np.count_nonzero(np.isfinite(array))
            if bad:
                raise ValueError(f"training pair {pair.name or i!r}: {key!r} has {bad} non-finite value(s) "
                                 f"(NaN or inf){where}; replace them with finite values or leave the pair out.")


def _read_history(path: Path, last_epoch: int) -> list[dict]:
    """The rows of `history.csv` up to `last_epoch` (later rows belong to an interrupted run)."""
    if not path.exists():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [{k: int(v) if k == "epoch" else float(v) for k, v in row.items()} for row in csv.DictReader(f)]
        return [r for r in rows if r["epoch"] <= last_epoch]
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{path} cannot be read ({err}); {_AFRESH}.") from None


def _write_history(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    files.write_atomic(path, text.getvalue())


def train(config=None, output=None, epochs: int | None = None, resume: bool = True, progress: bool = True,
          pairs: list[data.Pair] | None = None) -> tuple[network.RegistrationNetwork, list[dict]]:
    """Train a `RegistrationNetwork` as `config` says (YAML path or dict, see `DEFAULTS`); returns (model, history).

    `output` and `epochs` override the config's. The output folder receives `config.yaml` (the
    full config used), `checkpoints/`, TensorBoard `logs/`, `history.csv` (one row per epoch:
    mean loss terms and seconds) and, at the end, `NAME.weights.h5` + `NAME.json` (`network.save`,
    with the config, device, total seconds and the history). With `resume`, training continues
    from the latest checkpoint in `output`, which must come from the same config but for
    `RESUMABLE` (else a `ValueError` says what differs); run with more `epochs` to train further.
    With drawn pairs, `motions.json` lists the CTs and each motion's fit (`Motion.stats`: mask Dice,
    held-out keypoint error, size in mm). Without `resume`, the checkpoints and history in `output`
    are deleted first. `pairs` (from
    `teachreg.data.load_paired`) skips reading the data from disk. Pairs with NaN or infinity raise a `ValueError`.
    With `data.draw` > 0 (and no `pairs`), every epoch draws that many pairs afresh from
    (seed, epoch) (`lung.draw_pairs`, on the default grid) from the training split's parts
    (`lung.split_parts("train")`, prepared once: 11 minutes on a 2-core CPU; then about 2 s per
    drawn pair), and trains on the pairs drawn in its last `data.keep` epochs; a resumed run
    draws the kept ones again. A model with `model.downsample` > 1 is trained on pairs averaged as
    it averages its images (`make_dataset`'s `downsample`) and saved to average them itself. A model
    with `model.masks` gets each pair's first labels (the lungs, augmented as the images) as inputs.
    """
    config = load_config(config, **({"output": str(output)} if output else {}),
                         **({"epochs": epochs} if epochs is not None else {}))
    out = Path(config["output"])
    resuming = resume and tf.train.latest_checkpoint(str(out / "checkpoints")) is not None
    if resuming:
        _check_resumable(out, config)
    weights = config["weights"]
    labels = (bool(weights["label"]) or (bool(weights["ddf"]) and config["ddf_outside_weight"] < 1)
              or config["model"]["masks"])
    keys = ["moving", "fixed"] + (["moving_label", "fixed_label"] if labels else []) + (["ddf"] if weights["ddf"] else [])
    draw, keep = config["data"]["draw"], config["data"]["keep"]
    if keep > 1 and not draw:
        raise ValueError(f"data.keep ({keep}) keeps drawn pairs for several epochs; set data.draw to draw them")
    if draw:
        if pairs is not None:
            raise ValueError("give training pairs or set data.draw to draw them, not both")
        sources, motions = lung.split_parts("train", progress=progress)
        out.mkdir(parents=True, exist_ok=True)  # what the pairs are drawn from: each motion's fit
        files.write_atomic(out / "motions.json", json.dumps(
            {"cts": [s.name for s in sources], "motions": {m.name: m.stats for m in motions}}, indent=1,
            default=lambda value: value.item()) + "\n")  # NumPy scalars
    else:
        where = ""
        if pairs is None:
            root, split = config["data"]["root"], config["data"]["split"]
            pairs = data.load_paired(root, split)
            where = f", in its files in {Path(root or data.data_dir() / 'lung_ct') / split}"
        _check_finite(pairs, keys, where)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        if (out / "checkpoints").exists():
            shutil.rmtree(out / "checkpoints")
        (out / "history.csv").unlink(missing_ok=True)
    files.write_atomic(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    keras.utils.set_random_seed(config["seed"])
    strategy = _strategy(config["strategy"])
    gpus = tf.config.list_physical_devices("GPU")
    mixed = bool(gpus) if config["mixed_precision"] == "auto" else bool(config["mixed_precision"])
    previous_policy = keras.mixed_precision.global_policy()
    global_batch = config["batch_size"] * strategy.num_replicas_in_sync
    count = draw or len(pairs)
    if count < global_batch:
        raise ValueError(f"{count} training pairs cannot fill one batch of {global_batch}.")
    try:
        if mixed:
            keras.mixed_precision.set_global_policy("mixed_float16")
        with strategy.scope():  # trained on pairs averaged as the network averages its images, if it does
            model = network.RegistrationNetwork(**{**config["model"], "downsample": 1})
            start_from = _initialise(model, config["init"])
            optimizer = keras.optimizers.Adam(_learning_rate(config, count, global_batch))
            if mixed:
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(model.trainable_variables)
            epoch_done = tf.Variable(0, dtype=tf.int64, trainable=False)
        # Keras 3 models are not tf.train trackables: their weights are checkpointed as a list.
        checkpoint = tf.train.Checkpoint(weights=list(model.weights), optimizer=optimizer, epoch=epoch_done)
        manager = tf.train.CheckpointManager(checkpoint, out / "checkpoints", max_to_keep=2)
        if resuming:
            checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        history = _read_history(out / "history.csv", int(epoch_done.numpy())) if resuming else []
        train_step = _train_step(model, optimizer, strategy, config)
        writer = tf.summary.create_file_writer(str(out / "logs" / "train"))
        drawn: dict[int, list[data.Pair]] = {}  # epoch -> its drawn pairs, while they are kept
        for epoch in range(int(epoch_done.numpy()), config["epochs"]):
            start = time.perf_counter()
            if draw:  # a resumed run draws again the kept pairs of the epochs before it: the same arrays
                drawn = {e: drawn.get(e) or lung.draw_pairs(sources, motions, draw, config["seed"], e)
                         for e in range(max(0, epoch - keep + 1), epoch + 1)}
                pairs = [pair for e in sorted(drawn) for pair in drawn[e]]
            steps = len(pairs) // global_batch
            dataset = make_dataset(pairs, keys, global_batch, epoch, config["seed"], **config["augmentation"],
                                   window=config["model"]["window"], downsample=config["model"]["downsample"])
            sums: dict[str, float] = {}
            bar = tqdm(strategy.experimental_distribute_dataset(dataset), total=steps, disable=not progress,
                       desc=f"epoch {epoch + 1}/{config['epochs']}", unit="step", leave=False)
            for batch in bar:
                terms = {k: float(v) for k, v in train_step(batch).items()}
                sums = {k: sums.get(k, 0.0) + v for k, v in terms.items()}
                bar.set_postfix(loss=f"{terms['total']:.4f}")
            row = {"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()}, "seconds": time.perf_counter() - start}
            history.append(row)
            with writer.as_default():
                for key in sums:
                    tf.summary.write(f"loss/{key}", tf.constant(row[key], tf.float32), step=epoch + 1, metadata=_SCALAR)
            epoch_done.assign(epoch + 1)
            manager.save(checkpoint_number=epoch + 1)
            _write_history(out / "history.csv", history)
            if progress:
                print(f"epoch {epoch + 1}/{config['epochs']}: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "seconds")) + f" ({row['seconds']:.0f} s)")
        writer.flush()
        trained, model = model, network.RegistrationNetwork(**config["model"])
        model.set_weights(trained.get_weights())
        network.save(model, out / config["name"], config=config, device=device.description(),
                     mixed_precision=mixed, replicas=strategy.num_replicas_in_sync, tensorflow=tf.__version__,
                     seconds=float(sum(r["seconds"] for r in history)), history=history,
                     **({"init": start_from} if start_from else {}))
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    return model, history


def _initialise(model: network.RegistrationNetwork, path) -> dict | None:
    """Copy the weights of the saved model at `path` (see `network.load`) into `model`; returns its record.

    The record (the saved JSON: config, device, seconds, history...) goes into the new model's
    JSON under "init", so a fine-tuned model keeps the history of the model it started from.
    """
    if not path:
        return None
    start = network.load(path)
    if start.channels != model.channels:
        raise ValueError(f"init {path}: its channels {list(start.channels)} differ from the config's "
                         f"{list(model.channels)}; set model.channels to match.")
    model.set_weights(start.get_weights())
    return start.info


def _first_label(labels: tf.Tensor) -> tf.Tensor:
    """The first label `[batch, D, H, W]` of a batch's labels (`[batch, D, H, W]` or `[batch, D, H, W, L]`)."""
    return labels if labels.shape.rank == 4 else labels[..., 0]


def _train_step(model, optimizer, strategy: tf.distribute.Strategy, config: dict):
    """A compiled training step: per-replica losses, summed gradients, one optimiser update; returns the mean terms."""
    options = {"weights": config["weights"], "image_loss": config["image_loss"], "regulariser": config["regulariser"],
               "ddf_kind": config["ddf_loss"], "ddf_outside": config["ddf_outside_weight"],
               "window": config["model"]["window"]}

    def replica_step(batch):
        with tf.GradientTape() as tape:
            masks = [_first_label(batch[k]) for k in ("moving_label", "fixed_label")] if model.masks else []
            ddf = model((batch["moving"], batch["fixed"], *masks), training=True)
            terms = objective.registration_losses(batch, ddf, **options)
            # Gradients are summed over replicas, so each replica's loss is divided by their number.
            scaled = optimizer.scale_loss(terms["total"] / strategy.num_replicas_in_sync)
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return terms

    @tf.function
    def step(batch):
        terms = strategy.run(replica_step, args=(batch,))
        return {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in terms.items()}

    return step
