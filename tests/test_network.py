"""The registration network, its training loop and the shipped pretrained model, on tiny volumes."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
import yaml

from teachreg import cli, data, evaluate, metrics, network, objective, presets, register, spatial, train

SHAPE = (12, 8, 10)  # (z, y, x), deliberately not a multiple of 8
SMALL = {"channels": [4, 8]}


def _write(path: Path, array: np.ndarray, spacing=(3.5, 2.5, 3.5)) -> None:
    """Write a (z, y, x, ...) array as NIfTI stored (x, y, z, ...), as `data.write_pair` does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = np.swapaxes(array, 0, 2)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(stored), np.diag([*spacing[::-1], 1.0])), str(path))


def _pair(seed: int, shape=SHAPE) -> data.Pair:
    """A synthetic CT-like pair: a dark ellipsoid (lung) in soft tissue, moved by a smooth DDF along z."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    centre = np.array(shape) / 2 + rng.uniform(-1, 1, 3)
    radius = sum(((g - c) / (n / 3)) ** 2 for g, c, n in zip((z, y, x), centre, shape))
    label = (radius < 1).astype(np.float32)
    moving = np.where(label > 0, -800.0, 40.0).astype(np.float32) + rng.normal(0, 20, shape).astype(np.float32)
    ddf = np.zeros((*shape, 3), np.float32)
    ddf[..., 0] = rng.uniform(1, 2) * np.sin(np.pi * z / shape[0])
    ddf[..., 2] = 0.5 * np.cos(np.pi * y / shape[1])
    fixed = spatial.warp(moving[None], ddf[None]).numpy()[0]
    fixed_label = spatial.warp(label[None], ddf[None], interpolation="nearest").numpy()[0]
    name = f"case_{seed:03d}"
    volumes = [data.Volume(image, (3.5, 2.5, 3.5), mask.astype(np.uint8)[..., None], ("lung",), f"{name}/{role}")
               for image, mask, role in ((moving, label, "moving"), (fixed, fixed_label, "fixed"))]
    return data.Pair(*volumes, ddf=ddf, name=name)


def _write_dataset(root: Path, count: int = 2, split: str = "train") -> list[data.Pair]:
    pairs = [_pair(i) for i in range(count)]
    for pair in pairs:
        name = pair.name + ".nii.gz"
        for array, folder in ((pair.moving.image, "moving_images"), (pair.fixed.image, "fixed_images"),
                              (pair.ddf[..., ::-1], "ddfs"), (pair.moving.labels[..., 0], "moving_labels"),
                              (pair.fixed.labels[..., 0], "fixed_labels")):
            _write(root / split / folder / name, array)
    return pairs


def _batch(pair: data.Pair) -> dict:
    arrays = train._arrays(pair, ("moving", "fixed", "moving_label", "fixed_label", "ddf"))
    return {k: tf.constant(np.asarray(a, np.float32)[None]) for k, a in arrays.items()}


def test_output_shapes_and_padding():
    model = network.RegistrationNetwork(**SMALL)
    moving = np.random.default_rng(0).uniform(-1000, 500, (2, *SHAPE)).astype(np.float32)
    assert model((moving, moving)).shape == (2, *SHAPE, 3)
    assert model.predict_ddf(moving, moving).shape == (2, *SHAPE, 3)
    assert model.predict_ddf(moving[0], moving[0]).shape == (1, *SHAPE, 3)
    with pytest.raises(ValueError, match="same shape|batch, D, H, W"):
        model.predict_ddf(moving, moving[:, :-1])


def test_untrained_network_predicts_the_identity():
    model = network.RegistrationNetwork(**SMALL)
    pair = _pair(0)
    ddf = model.predict_ddf(pair.moving.image, pair.fixed.image)
    assert np.array_equal(ddf, np.zeros_like(ddf))
    np.testing.assert_allclose(spatial.warp(pair.moving.image[None], ddf).numpy()[0], pair.moving.image, atol=1e-4)


def test_upsample2_is_trilinear_with_half_pixel_centres():
    x = tf.reshape(tf.range(3, dtype=tf.float32), [1, 3, 1, 1, 1])
    up = network.upsample2(x)[0, :, 0, 0, 0].numpy()
    np.testing.assert_allclose(up, [0.0, 0.25, 0.75, 1.25, 1.75, 2.0])
    constant = network.upsample2(tf.ones([1, 2, 3, 4, 3]))
    assert constant.shape == (1, 4, 6, 8, 3) and np.allclose(constant, 1.0)


def test_a_downsampling_network_works_on_averaged_images_and_scales_its_ddf_back():
    model = network.RegistrationNetwork(**SMALL, downsample=2)
    assert model.multiple == 8
    moving = np.random.default_rng(0).uniform(-1000, 500, (1, *SHAPE)).astype(np.float32)
    assert model.predict_ddf(moving, moving).shape == (1, *SHAPE, 3)
    # A constant displacement of c voxels on the averaged grid is 2c voxels on the input grid.
    c = np.array([0.5, -1.0, 0.25], np.float32)
    model.heads[0].bias.assign(c)
    np.testing.assert_allclose(model.predict_ddf(moving, moving), np.broadcast_to(2 * c, (1, *SHAPE, 3)), atol=1e-6)
    # Averaging is what the network sees: a pair equal on every 2x2x2 block predicts as its average.
    rng = np.random.default_rng(1)
    for weight in model.weights:
        weight.assign(rng.normal(0, 0.05, weight.shape).astype(np.float32))
    blocks = rng.uniform(-900, 400, (1, 6, 4, 5)).astype(np.float32)  # inside the window: no clipping
    coarse = np.repeat(np.repeat(np.repeat(blocks, 2, 1), 2, 2), 2, 3)  # SHAPE, constant on blocks
    noise = rng.normal(0, 1, coarse.shape).astype(np.float32)
    noise -= noise.reshape(1, 6, 2, 4, 2, 5, 2).mean(axis=(2, 4, 6)).repeat(2, 1).repeat(2, 2).repeat(2, 3)
    np.testing.assert_allclose(model.predict_ddf(coarse + noise, coarse), model.predict_ddf(coarse, coarse), atol=1e-4)
    with pytest.raises(ValueError, match="downsample must be 1, 2 or 4"):
        network.RegistrationNetwork(**SMALL, downsample=3)


def test_a_downsampling_network_is_trained_on_pairs_averaged_as_it_averages_its_images(tmp_path):
    # Averaging a linear ramp gives the ramp at the block centres; the DDF also counts coarser voxels.
    z = np.arange(8, dtype=np.float32)[:, None, None] * np.ones((8, 6, 4), np.float32)
    arrays = {"fixed": z, "fixed_label": (z >= 4).astype(np.uint8), "ddf": np.stack([z, 2 * z, -z], -1)}
    averaged = train._averaged(arrays, 2)
    np.testing.assert_allclose(averaged["fixed"][:, 0, 0], [0.5, 2.5, 4.5, 6.5])
    np.testing.assert_allclose(averaged["fixed_label"][:, 0, 0], [0, 0, 1, 1])
    np.testing.assert_allclose(averaged["ddf"][:, 0, 0], np.stack([[0.5, 2.5, 4.5, 6.5]] * 3, -1) * [1, 2, -1] / 2)
    assert train._averaged(arrays, 1) is arrays
    # The saved model averages its own images: it predicts on the full grid what it learnt on the coarse one.
    _write_dataset(tmp_path / "data", count=2)
    config = {"name": "coarse", "data": {"root": str(tmp_path / "data")}, "model": {**SMALL, "downsample": 2},
              "mode": "supervised", "epochs": 1}
    model, _ = train.train(config, output=tmp_path / "run", progress=False)
    saved = network.load(tmp_path / "run" / "coarse")
    assert model.downsample == saved.downsample == 2
    pair = _pair(0, shape=(16, 8, 16))
    twin = network.RegistrationNetwork(**SMALL)  # the same weights without averaging, on averaged images
    twin.set_weights(saved.get_weights())
    small = train._averaged({"moving": pair.moving.image, "fixed": pair.fixed.image}, 2)
    coarse = twin.predict_ddf(small["moving"], small["fixed"])
    assert np.abs(coarse).max() > 1e-3  # trained away from the zero start
    np.testing.assert_allclose(saved.predict_ddf(pair.moving.image, pair.fixed.image),
                               2 * network.upsample2(tf.constant(coarse)).numpy(), atol=1e-5)


def test_a_network_with_masks_takes_them_as_two_more_channels_and_is_trained_and_saved_with_them(tmp_path):
    _write_dataset(tmp_path / "data", count=2)
    config = {"name": "masked", "data": {"root": str(tmp_path / "data")}, "model": {**SMALL, "masks": True},
              "mode": "supervised", "epochs": 3, "augmentation": {"scale": 0.0}}
    model, history = train.train(config, output=tmp_path / "run", progress=False)
    assert history[-1]["total"] < history[0]["total"]
    saved = network.load(tmp_path / "run" / "masked")
    assert saved.masks and saved.downs[0].kernel.shape[-2] == 4  # moving, fixed, moving mask, fixed mask
    pair = _pair(0)
    masks = (pair.moving.labels[..., 0], pair.fixed.labels[..., 0])
    ddf = saved.predict_ddf(pair.moving.image, pair.fixed.image, masks=masks)
    np.testing.assert_array_equal(ddf, model.predict_ddf(pair.moving.image, pair.fixed.image, masks=masks))
    # The masks are inputs: the same images with the fixed mask moved predict another DDF.
    moved = (masks[0], np.roll(masks[1], 2, axis=0))
    assert np.abs(saved.predict_ddf(pair.moving.image, pair.fixed.image, masks=moved) - ddf).max() > 1e-4
    with pytest.raises(ValueError, match="takes the lung masks of both images"):
        saved.predict_ddf(pair.moving.image, pair.fixed.image)
    with pytest.raises(ValueError, match="takes no masks"):
        network.RegistrationNetwork(**SMALL).predict_ddf(pair.moving.image, pair.fixed.image, masks=masks)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        saved.predict_ddf(pair.moving.image, pair.fixed.image, masks=(masks[0] * 255, masks[1]))


def test_a_training_step_lowers_the_loss():
    # Every term at once (image, label, ground-truth DDF, regulariser): one trace covers all modes' terms.
    config = train.load_config({"mode": "combined", "weights": {"ddf": 1.0}, "ddf_outside_weight": 0.1, "model": SMALL,
                                "learning_rate": 1e-3})
    model = network.RegistrationNetwork(**SMALL)
    import keras

    optimizer = keras.optimizers.Adam(config["learning_rate"])
    step = train._train_step(model, optimizer, tf.distribute.get_strategy(), config)
    batch = _batch(_pair(1))
    before = float(step(batch)["total"])  # the loss before the first update
    after = float(step(batch)["total"])
    assert after < before


def test_ddf_loss_and_its_region_weights():
    truth = np.zeros((1, 6, 6, 6, 3), np.float32)
    predicted = truth.copy()
    predicted[0, 0, 0, 0] = [3.0, 4.0, 0.0]  # one voxel off by 5
    assert float(objective.ddf_loss(truth, predicted, "epe")) == pytest.approx(5 / 216, abs=2e-3)  # sqrt(e**2 + 1e-6)
    assert float(objective.ddf_loss(truth, predicted, "mse")) == pytest.approx(25 / 216)
    label = np.zeros((1, 6, 6, 6), np.float32)
    label[0, 5, 5, 5] = 1
    weights = objective.region_weights(label, outside=0.1, margin=1).numpy()
    assert weights[0, 4:, 4:, 4:].min() == 1 and weights[0, :4].max() == pytest.approx(0.1)
    assert float(objective.ddf_loss(truth, predicted, "epe", weights)) == pytest.approx(0.5 / weights.sum(), abs=2e-3)


def test_saved_and_reloaded_model_predicts_the_same_ddf(tmp_path):
    model = network.RegistrationNetwork(**SMALL, downsample=2)
    rng = np.random.default_rng(0)
    for weight in model.weights:
        weight.assign(rng.normal(0, 0.05, weight.shape).astype(np.float32))
    pair = _pair(2)
    ddf = model.predict_ddf(pair.moving.image, pair.fixed.image)
    assert np.abs(ddf).max() > 0
    info = network.save(model, tmp_path / "model", note="test")
    again = network.load(info)
    np.testing.assert_array_equal(again.predict_ddf(pair.moving.image, pair.fixed.image), ddf)
    assert again.info["note"] == "test" and again.channels == model.channels and again.downsample == 2


def test_load_refuses_weights_with_a_wrong_checksum(tmp_path, monkeypatch):
    network.save(network.RegistrationNetwork(**SMALL), tmp_path / "lung_ct")
    weights = tmp_path / "lung_ct.weights.h5"
    weights.write_bytes(weights.read_bytes() + b"\0")
    monkeypatch.setattr(network, "weights_folder", lambda: tmp_path)
    with pytest.raises(network.ChecksumMismatchError, match="SHA-256"):
        network.load_pretrained("lung_ct")
    with pytest.raises(ValueError, match="unknown pretrained model"):
        network.load_pretrained("brain_mr")


def test_shipped_pretrained_model_loads():
    folder = Path(str(network.weights_folder()))
    if not (folder / "lung_ct.json").exists():
        pytest.skip("no pretrained lung_ct weights shipped yet")
    model = network.load_pretrained("lung_ct")
    assert (folder / "lung_ct.weights.h5").stat().st_size <= 10 * 2**20
    moving = np.full((1, 16, 16, 16), -500.0, np.float32)
    assert model.predict_ddf(moving, moving).shape == (1, 16, 16, 16, 3)
    assert {"config", "device", "history", "sha256"} <= set(model.info)


def test_shipped_lung_ct_model_records_the_configs_in_the_repository():
    info = network.load_pretrained("lung_ct").info
    configs = Path(__file__).resolve().parents[1] / "configs"
    stages = ((info, "lung_ct.yaml"), (info["init"], "lung_ct_stage2.yaml"),
              (info["init"]["init"], "lung_ct_stage1.yaml"))
    for record, name in stages:
        expected = train.load_config(configs / name)
        trained = train.load_config(record["config"])
        for key in ("output", "init"):  # where the run wrote and read its models
            expected.pop(key), trained.pop(key)
        assert trained == expected, name
        assert len(record["history"]) == expected["epochs"]


def test_load_paired_gives_zyx_arrays_and_components(tmp_path):
    (written,) = _write_dataset(tmp_path, count=1)
    (read,) = data.load_paired(tmp_path, "train")
    for role in ("moving", "fixed"):
        got, want = getattr(read, role), getattr(written, role)
        np.testing.assert_allclose(got.image, want.image, atol=1e-5)
        np.testing.assert_array_equal(got.labels, want.labels)
        assert got.spacing == (3.5, 2.5, 3.5)
    np.testing.assert_allclose(read.ddf, written.ddf, atol=1e-5)
    assert read.name == "case_000"


def test_augmentation_keeps_the_pair_and_its_ddf_consistent():
    pair = _pair(3, shape=(24, 20, 20))
    # A smooth image, so that interpolation differences stay small.
    moving = spatial.smooth(pair.moving.image[None], 1.5).numpy()[0]
    fixed = spatial.warp(moving[None], pair.ddf[None]).numpy()[0]
    affines = spatial.random_affine(2, 0.15, seed=0, shape=fixed.shape)
    sample = {"moving": tf.constant(moving), "fixed": tf.constant(fixed), "ddf": tf.constant(pair.ddf)}
    out = train.augment(sample, affines[0], affines[1])
    rewarped = spatial.warp(out["moving"][None], out["ddf"][None])[0]
    inner = (slice(3, -3),) * 3  # away from the borders, where edge padding differs
    error = tf.abs(rewarped - out["fixed"]).numpy()[inner].mean()
    unregistered = tf.abs(out["moving"] - out["fixed"]).numpy()[inner].mean()
    assert error < 0.1 * unregistered
    assert not np.allclose(out["ddf"], pair.ddf, atol=0.5)  # the affines did change the DDF


def test_field_of_view_cut_blanks_a_slab_of_the_lungs_in_images_and_labels():
    pairs = [_pair(i, shape=(24, 12, 12)) for i in range(6)]
    keys = ["moving", "fixed", "moving_label", "fixed_label", "ddf"]
    batches = list(train.make_dataset(pairs, keys, 1, epoch=0, seed=0, scale=0.0, fov_cut=1.0))
    order = np.random.default_rng([0, 0]).permutation(len(pairs))
    for batch, i in zip(batches, order):
        rows = np.flatnonzero(pairs[i].fixed.labels.any(axis=(1, 2, 3)))
        kept = np.flatnonzero((batch["fixed"][0].numpy() != network.WINDOW[0]).any(axis=(1, 2)))
        assert kept.size and np.all(np.diff(kept) == 1)  # one slab
        assert rows[0] <= kept[0] and kept[-1] <= rows[-1]  # inside the lungs' extent
        assert 0.4 * rows.size - 1 <= kept.size <= 0.8 * rows.size + 1
        outside = np.ones(24, bool)
        outside[kept[0] : kept[-1] + 1] = False
        for key in ("moving", "fixed"):
            np.testing.assert_array_equal(batch[key][0].numpy()[outside], network.WINDOW[0])
            np.testing.assert_array_equal(batch[key][0].numpy()[~outside], getattr(pairs[i], key).image[~outside])
        for key in ("moving_label", "fixed_label"):
            assert not batch[key][0].numpy()[outside].any()
        np.testing.assert_array_equal(batch["ddf"][0].numpy(), pairs[i].ddf)  # the truth is kept


def test_intensity_augmentation_is_one_linear_change_per_pair():
    pairs = [_pair(i) for i in range(4)]
    plain = list(train.make_dataset(pairs, ["moving", "fixed"], 1, epoch=1, seed=3, scale=0.0))
    changed = list(train.make_dataset(pairs, ["moving", "fixed"], 1, epoch=1, seed=3, scale=0.0, intensity=0.1))
    gains = []
    for before, after in zip(plain, changed):
        x = np.concatenate([before[k].numpy().ravel() for k in ("moving", "fixed")])
        y = np.concatenate([after[k].numpy().ravel() for k in ("moving", "fixed")])
        gain, offset = np.polyfit(x, y, 1)  # both images of the pair: one line
        np.testing.assert_allclose(y, gain * x + offset, atol=0.05)
        assert abs(gain - 1) <= 0.1 + 1e-5 and abs(offset) <= 0.1 * (network.WINDOW[1] - network.WINDOW[0]) + 1e-3
        gains.append(gain)
    assert np.ptp(gains) > 1e-3  # the change differs between pairs


def test_config_rejects_unknown_keys_and_resolves_mode_weights():
    with pytest.raises(ValueError, match="unknown config key"):
        train.load_config({"epoch": 3})
    with pytest.raises(ValueError, match="unknown loss weight"):
        train.load_config({"weights": {"dice": 1.0}})
    config = train.load_config({"mode": "supervised", "weights": {"label": 0.5}})
    assert config["weights"] == {"image": 0.0, "label": 0.5, "ddf": 1.0, "regulariser": 0.0}


def test_the_coarse_lung_config_trains_a_network_with_masks_on_averaged_drawn_pairs():
    config = train.load_config(Path(__file__).resolve().parents[1] / "configs" / "lung_ct_coarse.yaml")
    assert config["model"]["downsample"] == 2 and config["data"]["draw"] > 0 and config["data"]["keep"] > 1
    assert config["model"]["masks"]
    assert config["init"] is None and config["output"] == "runs/lung_ct_coarse"


def test_train_command_checkpoints_and_resumes(tmp_path):
    _write_dataset(tmp_path / "data", count=2)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "name": "tiny", "data": {"root": str(tmp_path / "data")}, "model": SMALL, "mode": "supervised",
        "weights": {"label": 1.0, "image": 0.5, "regulariser": 0.1}, "augmentation": {"scale": 0.1}}))
    out = tmp_path / "run"
    assert cli.main(["train", str(config), "--output", str(out), "--epochs", "1", "--quiet"]) == 0
    assert (out / "checkpoints" / "ckpt-1.index").exists()
    assert list((out / "logs" / "train").glob("events.out.tfevents.*"))
    assert cli.main(["train", str(config), "--output", str(out), "--epochs", "2", "--quiet"]) == 0
    with open(out / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    resumed = network.load(out / "tiny")
    assert len(resumed.info["history"]) == 2
    # An uninterrupted run of two epochs ends with the same weights.
    straight, _ = train.train(config, output=tmp_path / "straight", epochs=2, progress=False)
    for a, b in zip(resumed.weights, straight.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_training_can_start_from_a_saved_model(tmp_path):
    pairs = [_pair(i) for i in range(2)]
    start = network.RegistrationNetwork(**SMALL)
    for weight in start.weights:  # non-zero everywhere, so that copying is visible
        weight.assign(np.full(weight.shape, 0.01, np.float32))
    network.save(start, tmp_path / "start", note="stage 1")
    config = {"model": SMALL, "mode": "supervised", "init": str(tmp_path / "start"), "epochs": 0}
    model, _ = train.train(config, output=tmp_path / "run", progress=False, pairs=pairs)
    for a, b in zip(model.weights, start.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert network.load(tmp_path / "run" / "model").info["init"]["note"] == "stage 1"
    with pytest.raises(ValueError, match="channels"):
        train.train({**config, "model": {"channels": [4, 4]}}, output=tmp_path / "other", progress=False, pairs=pairs)


def test_train_command_reports_a_missing_dataset(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(f"data: {{root: {tmp_path / 'nowhere'}}}\n")
    assert cli.main(["train", str(config), "--output", str(tmp_path / "run"), "--quiet"]) == 1
    assert "no pairs" in capsys.readouterr().err


def test_evaluate_reports_accuracy_and_speed():
    model = network.RegistrationNetwork(**SMALL)
    pairs = [_pair(4), _pair(5)]
    result = evaluate.evaluate(model, pairs)
    mean = result["mean"]
    assert len(result["pairs"]) == 2
    assert mean["tre_mm"] == pytest.approx(mean["initial_mm"])  # the untrained network does not move
    assert mean["tre_ratio"] == pytest.approx(1.0)
    assert mean["dice_after"] == pytest.approx(mean["dice_before"])
    assert mean["folding"] == 0.0 and mean["seconds"] > 0


def test_evaluate_without_a_true_ddf_reports_dice_and_folding_only():
    model = network.RegistrationNetwork(**SMALL)
    pairs = [dataclasses.replace(_pair(i), ddf=None) for i in (6, 7)]
    mean = evaluate.evaluate(model, pairs)["mean"]
    assert "tre_mm" not in mean and "tre_ratio" not in mean
    assert mean["dice_after"] == pytest.approx(mean["dice_before"]) and mean["folding"] == 0.0


def test_evaluate_compares_the_classical_optimiser_on_the_first_pairs():
    model = network.RegistrationNetwork(**SMALL)
    pairs = [_pair(8, shape=(16, 16, 16)), _pair(9, shape=(16, 16, 16))]
    options = {**presets.LUNG_CLASSICAL, "grid_spacing": 4, "levels": 2, "steps": (40, 40)}
    rows = evaluate.evaluate(model, pairs, classical=1, classical_options=options)["pairs"]
    assert rows[0]["classical_tre_mm"] < 0.8 * rows[0]["initial_mm"] and rows[0]["classical_seconds"] > 0
    assert rows[0]["classical_dice_after"] > rows[0]["classical_dice_before"]
    assert not any(key.startswith("classical") for key in rows[1])


def test_network_then_optimiser_refines_the_network_s_ddf():
    pair = _pair(10, shape=(16, 16, 16))

    class HalfWay:  # a network that finds half of the true motion
        def predict_ddf(self, moving, fixed):
            return 0.5 * pair.ddf[None]

    options = {**presets.LUNG_CLASSICAL, "grid_spacing": 4, "levels": 2}
    result = evaluate.network_then_optimiser(HalfWay(), pair.moving.image, pair.fixed.image, steps=(20, 20),
                                             options=options)
    start = evaluate.accuracy(0.5 * pair.ddf, pair)
    refined = evaluate.accuracy(result.ddf.numpy(), pair)
    assert start["tre_mm"] == pytest.approx(0.5 * start["initial_mm"], rel=1e-5)
    assert refined["tre_mm"] < 0.8 * start["tre_mm"] and result.seconds > 0
    assert len(result.history) == 40  # the steps asked for, no more


def test_align_masks_recovers_a_known_scaling_and_shift():
    fixed = np.zeros((30, 32, 44), bool)
    fixed[8:20, 10:22, 6:30] = True
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in fixed.shape], indexing="ij")
    scale, shift = np.array([0.75, 1.0, 1.25]), np.array([2.0, -3.0, 1.5])
    # the moving mask: the fixed box moved so that fixed voxel x lies at scale * x + shift
    lo, hi = np.array([8, 10, 6]) * scale + shift, np.array([19, 21, 29]) * scale + shift
    moving = np.all([(g >= a - 1e-9) & (g <= b + 1e-9) for g, a, b in zip((z, y, x), lo, hi)], axis=0)
    result = register.align_masks(moving, fixed)
    found = result.affine.numpy()[0]
    # the moving box holds whole voxels only, so its spread is that of a slightly other box
    np.testing.assert_allclose(np.diag(found[:3]), scale, atol=0.06)
    centre = np.array([13.5, 15.5, 17.5])  # the fixed box's
    np.testing.assert_allclose(centre @ found[:3] + found[3], centre * scale + shift, atol=0.5)  # half a voxel
    warped = result.warp(moving.astype(np.float32), padding="zeros") > 0.5
    assert metrics.dice(warped, fixed) > 0.95
    with pytest.raises(ValueError, match="moving_mask must be a binary"):
        register.align_masks(np.zeros((4, 4, 4)), fixed)


def test_network_then_optimiser_aligns_the_masks_first():
    pair = _pair(11, shape=(16, 16, 16))

    class Still:  # a network that finds no motion: the result is the masks' alignment alone
        masks = False

        def predict_ddf(self, moving, fixed, masks=None):
            return np.zeros((1, *np.shape(fixed), 3), np.float32)

    masks = (pair.moving.labels[..., 0], pair.fixed.labels[..., 0])
    result = evaluate.network_then_optimiser(Still(), pair.moving.image, pair.fixed.image, steps=(0,), masks=masks)
    np.testing.assert_allclose(result.ddf.numpy(), register.align_masks(*masks).ddf.numpy(), atol=1e-5)
    assert evaluate.accuracy(result.ddf.numpy(), pair)["tre_mm"] < evaluate.accuracy(np.zeros_like(pair.ddf), pair)["tre_mm"]


# --- reliability of training ---


def _tiny_config(path: Path, data: Path, **settings) -> Path:
    """A small training config at `path` (JSON is YAML) on the dataset at `data`, updated by `settings`."""
    path.write_text(json.dumps({"name": "tiny", "data": {"root": str(data)}, "model": SMALL, "mode": "supervised",
                                "augmentation": {"scale": 0.0}, **settings}))
    return path


def test_resuming_refuses_another_config_and_restart_always_works(tmp_path, capsys):
    _write_dataset(tmp_path / "data", count=2)
    first = _tiny_config(tmp_path / "first.yaml", tmp_path / "data")
    other = _tiny_config(tmp_path / "other.yaml", tmp_path / "data", mode="unsupervised", learning_rate=1e-4,
                         name="other")
    out = tmp_path / "run"
    run = ["--output", str(out), "--epochs", "1", "--quiet"]
    assert cli.main(["train", str(first), *run]) == 0
    saved = (out / "config.yaml").read_text()
    capsys.readouterr()
    assert cli.main(["train", str(other), *run]) == 1
    err = capsys.readouterr().err
    assert err.startswith("teachreg: error:") and "Traceback" not in err
    for fragment in ("mode", "'supervised'", "'unsupervised'", "learning_rate", "name", "--restart", "--output"):
        assert fragment in err
    assert (out / "config.yaml").read_text() == saved  # nothing was overwritten
    assert not (out / "other.json").exists()
    wider = _tiny_config(tmp_path / "wider.yaml", tmp_path / "data", model={"channels": [4, 4]})
    assert cli.main(["train", str(wider), *run]) == 1
    assert "model.channels" in capsys.readouterr().err and (out / "config.yaml").read_text() == saved
    # --restart starts afresh whatever the folder holds: another run's checkpoints, a corrupt history.
    assert cli.main(["train", str(other), *run, "--restart"]) == 0
    with open(out / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1"] and "ddf" not in rows[0] and rows[0]["image"]
    assert network.load(out / "other").info["config"]["mode"] == "unsupervised"
    (out / "history.csv").write_text("epoch,total\n1,\n2,oops\n")
    assert cli.main(["train", str(first), *run, "--restart"]) == 0
    assert network.load(out / "tiny").info["config"]["mode"] == "supervised"
    assert cli.main(["train", str(first), "--output", str(out), "--epochs", "2", "--quiet"]) == 0
    assert len(network.load(out / "tiny").info["history"]) == 2


def test_config_and_history_are_replaced_atomically(tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = {"model": SMALL, "epochs": 1, "augmentation": {"scale": 0.0}}
    train.train(config, output=out, progress=False, pairs=[_pair(0)])
    replace = os.replace
    for name in ("config.yaml", "history.csv"):
        before = (out / name).read_bytes()

        def interrupted(source, target):
            if Path(target).name == name:
                raise KeyboardInterrupt  # as if killed just before the swap
            replace(source, target)

        monkeypatch.setattr(train.os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train.train({**config, "epochs": 3}, output=out, progress=False, pairs=[_pair(0)])
        assert (out / name).read_bytes() == before


def test_training_refuses_pairs_with_non_finite_values(tmp_path, capsys):
    pairs = [_pair(0), _pair(1)]
    pairs[1].moving.image[2, 3, 4] = np.nan
    with pytest.raises(ValueError, match=r"pair 'case_001'.*'moving'.*1 non-finite"):
        train.train({"model": SMALL}, output=tmp_path / "given", progress=False, pairs=pairs)
    _write_dataset(tmp_path / "data", count=2)
    ddf = tmp_path / "data" / "train" / "ddfs" / "case_000.nii.gz"
    image = nib.load(str(ddf))
    broken = np.asarray(image.dataobj).copy()
    broken[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(broken, image.affine), str(ddf))
    config = _tiny_config(tmp_path / "config.yaml", tmp_path / "data")
    assert cli.main(["train", str(config), "--output", str(tmp_path / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "pair 'case_000'" in err and "'ddf'" in err and str(tmp_path / "data" / "train") in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("text, expected", [
    ("mixed_precision: 'false'\n", "mixed_precision must be true, false or 'auto', got 'false'"),
    ("epochs: '3'\n", "epochs must be an integer >= 0, got '3'"),
    ("batch_size: 0\n", "batch_size must be an integer >= 1, got 0"),
    ("image_loss: foo\n", "image_loss must be one of ['lncc', 'mi', 'ncc', 'ssd'], got 'foo'"),
    ("learning_rate: fast\n", "learning_rate must be a number > 0, got 'fast'"),
    ("augmentation: {independent: 'no'}\n", "augmentation.independent must be true or false, got 'no'"),
    ("model: {channels: [4, 0]}\n",
     "model.channels must be a list of integers >= 1 (the channels of each encoder level), got [4, 0]"),
    ("epochs: [3\n", "is not valid YAML"),
    ("- epochs: 3\n", "must be a mapping of config keys to values"),
])
def test_train_command_reports_a_wrong_config_value(tmp_path, capsys, text, expected):
    config = tmp_path / "config.yaml"
    config.write_text(f"data: {{root: {tmp_path / 'nowhere'}}}\n" + text if text[0] != "-" else text)
    assert cli.main(["train", str(config), "--output", str(tmp_path / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("teachreg: error:") and "Traceback" not in err
    assert expected in err


def test_config_converts_float_strings_and_checks_types():
    config = train.load_config(yaml.safe_load("learning_rate: 1e-3\naugmentation: {scale: 5e-2}\n"))
    assert config["learning_rate"] == 0.001 and config["augmentation"]["scale"] == 0.05
    assert train.load_config({"mixed_precision": False})["mixed_precision"] is False
    assert train.load_config({"model": {"window": (-1000, 500)}})["model"]["window"] == [-1000.0, 500.0]
    with pytest.raises(ValueError, match="weights.label must be a number >= 0, got 'x'"):
        train.load_config({"weights": {"label": "x"}})
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got True"):
        train.load_config({"seed": True})
