"""The classical optimisers recover known transforms."""

import re
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from teachreg import losses, metrics, network, register, spatial


def blobs(shape=(24, 32, 32), seed=0):
    """A smooth synthetic volume: a few Gaussian blobs of different sizes and intensities."""
    rng = np.random.default_rng(seed)
    grid = spatial.reference_grid(shape).numpy()
    volume = np.zeros(shape, np.float32)
    for _ in range(24):
        centre = rng.uniform(0.1, 0.9, 3) * np.asarray(shape)
        width = rng.uniform(1.5, 4.0)
        volume += rng.uniform(0.5, 1.0) * np.exp(-np.sum((grid - centre) ** 2, axis=-1) / (2 * width**2))
    return volume


@pytest.mark.parametrize("seed", [1, 2])
def test_affine_recovers_a_known_random_affine(seed):
    fixed = blobs(seed=seed)
    transform = spatial.random_affine(1, 0.15, seed=seed, shape=fixed.shape)
    moving = spatial.warp(fixed[None], spatial.affine_to_ddf(transform, fixed.shape)).numpy()[0]
    true_ddf = spatial.affine_to_ddf(spatial.invert_affine(transform), fixed.shape).numpy()
    result = register.affine(moving, fixed, steps=(100, 100, 60))
    error = np.linalg.norm(result.ddf.numpy() - true_ddf, axis=-1).mean()
    initial = np.linalg.norm(true_ddf, axis=-1).mean()
    assert initial > 1.5
    assert error < 0.15, f"mean displacement error {error:.3f} voxels (initial {initial:.2f})"
    assert result.history[-1] < result.history[0]
    assert len(result.history) == 260 and result.seconds > 0
    np.testing.assert_allclose(result.warp(moving), spatial.warp(moving[None], result.ddf).numpy()[0])


def test_result_warp_keeps_the_callers_layout():
    fixed = blobs(shape=(8, 10, 12))
    result = register.affine(fixed, fixed, levels=1, steps=5)
    assert result.warp(fixed).shape == (8, 10, 12)
    assert result.warp(fixed[None]).shape == (1, 8, 10, 12)
    assert result.warp(np.stack([fixed, fixed], -1)).shape == (8, 10, 12, 2)
    with pytest.raises(ValueError, match="shape"):
        result.warp(np.zeros((3, 4, 5)))


def test_affine_calls_of_one_size_share_compiled_steps_but_not_their_images():
    # The compiled objective is kept between calls (one per loss); each call still fits its own pair.
    fixed = blobs(shape=(16, 16, 16), seed=9)
    for shift in (1.5, -1.5):  # moving(x) = fixed(x + shift), so the DDF that undoes it is -shift
        moving = spatial.warp(fixed[None], np.full((1, 16, 16, 16, 3), [0.0, shift, 0.0], np.float32)).numpy()[0]
        first, again = (register.affine(moving, fixed, levels=2, steps=40, learning_rate=0.05) for _ in range(2))
        np.testing.assert_array_equal(first.affine.numpy(), again.affine.numpy())
        recovered = first.ddf.numpy()[0, 8, 8, 8]
        np.testing.assert_allclose(recovered, [0.0, -shift, 0.0], atol=0.25)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"loss": "nope"}, "loss must be one of"), ({"steps": (1, 2)}, "steps must be"), ({}, "same shape")],
)
def test_affine_rejects_bad_arguments(kwargs, match):
    fixed = blobs(shape=(8, 10, 12))
    moving = fixed if kwargs else fixed[:, :, :10]
    with pytest.raises(ValueError, match=match):
        register.affine(moving, fixed, **kwargs)


def smooth_ddf(shape, amplitude, seed):
    """A smooth random DDF `[1, D, H, W, 3]` (voxels) with mean magnitude about `amplitude`."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(1, *shape, 3)).astype(np.float32)
    field = spatial.smooth(noise, 4.0).numpy()
    return (field * amplitude / np.linalg.norm(field, axis=-1).mean()).astype(np.float32)


@pytest.mark.parametrize("transform,crop,crop_levels",
                         [("ddf", None, 1), ("bspline", None, 1), ("bspline", None, 2), ("bspline", 1.0, 1), ("svf", None, 1)])
def test_nonrigid_recovers_a_known_smooth_deformation(transform, crop, crop_levels):
    # bspline with crop None fits random half-size boxes at the `crop_levels` finest levels; 1.0 the whole image
    moving = blobs(seed=3)
    true_ddf = smooth_ddf(moving.shape, 1.5, seed=4)
    fixed = spatial.warp(moving[None], true_ddf).numpy()[0]
    kwargs = {"bspline": {"grid_spacing": 4.0, "learning_rate": 0.05}}.get(transform, {"learning_rate": 0.1})
    result = register.nonrigid(moving, fixed, transform=transform, regulariser="bending", regulariser_weight=0.1,
                               steps=(100, 100, 60), crop=crop, crop_levels=crop_levels, **kwargs)
    error = np.linalg.norm(result.ddf.numpy() - true_ddf, axis=-1)[0]
    structure = spatial.smooth(np.abs(fixed - fixed.mean())[None], 1.0).numpy()[0] > 0.05  # where there is something to match
    sampled = (spatial.reference_grid(moving.shape).numpy() + true_ddf[0]).round()  # voxel of moving each one pulls from
    structure &= np.all((sampled >= 1) & (sampled <= np.array(moving.shape) - 2), axis=-1)  # inside it, not past its edge
    assert error[structure].mean() < 0.5 * np.linalg.norm(true_ddf, axis=-1)[0][structure].mean()
    assert error[structure].mean() < 0.8, f"{transform}: error {error[structure].mean():.2f} voxels"


def test_label_term_drives_label_overlap_up():
    moving = blobs(seed=5)
    true_ddf = smooth_ddf(moving.shape, 2.0, seed=6)
    moving_label = (moving > np.percentile(moving, 90)).astype(np.float32)
    fixed_label = spatial.warp(moving_label[None], true_ddf, interpolation="nearest").numpy()[0]
    flat = np.full_like(moving, 0.5)  # no image information at all: only the labels can drive it
    result = register.nonrigid(flat, flat, moving_label=moving_label, fixed_label=fixed_label, label_weight=1.0,
                               transform="ddf", regulariser="bending", regulariser_weight=1.0, learning_rate=0.1,
                               steps=(60, 60, 40))
    before = metrics.dice(moving_label > 0.5, fixed_label > 0.5)
    after = metrics.dice(result.warp(moving_label) >= 0.5, fixed_label > 0.5)
    assert after > before + 0.1, f"Dice {before:.3f} -> {after:.3f}"


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(crop=0.5, transform="ddf"), "below 1 only for transform='bspline'"), (dict(crop=1.5), r"in \(0, 1\]"),
     (dict(crop=0.0), "crop must be a finite number > 0"), (dict(seed=-1), "seed must be a whole number >= 0"),
     (dict(crop_levels=0), "crop_levels must be a whole number >= 1"), (dict(crop_levels=2), r"at most levels \(1\)")],
)
def test_nonrigid_refuses_bad_crops_and_seeds(kwargs, match):
    image = blobs(shape=(12, 12, 12))
    with pytest.raises(ValueError, match=match):
        register.nonrigid(image, image, levels=1, steps=1, **kwargs)


@pytest.mark.parametrize("transform", ["bspline", "svf", "ddf"])
def test_a_multilevel_registration_traces_its_step_once_and_compiles_it_once_per_level(transform):
    # All levels (each its own image size, the finest level's box, the SVF's velocity grid) share
    # one trace of the compiled step, and later calls, of this image size or another, reuse it.
    moving = blobs(shape=(10, 13, 14), seed=9)
    fixed = spatial.warp(moving[None], smooth_ddf(moving.shape, 1.0, seed=10)).numpy()[0]
    register._nonrigid_step.cache_clear()  # a fresh step, not one an earlier test traced
    step = register._nonrigid_step("ssd", "l1", transform, False, False)
    options = dict(loss="ssd", regulariser="l1", transform=transform, grid_spacing=4.0, levels=3, steps=5)
    # XLA compiles the step once per distinct set of input shapes: one per level, none more on a
    # second call. The calls of the background compiling thread are counted too, so its throwaway
    # arguments have the shapes of the real ones.
    shapes = set()

    def spy(*args):
        shapes.add(tuple(tuple(tf.convert_to_tensor(x).shape) for x in tf.nest.flatten(args)
                         if isinstance(x, (tf.Tensor, tf.Variable))))
        return step(*args)

    spy.get_concrete_function = step.get_concrete_function
    before = step.experimental_get_tracing_count()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(register, "_nonrigid_step", lambda *key: spy)
        first = register.nonrigid(moving, fixed, **options)
        assert step.experimental_get_tracing_count() - before == 1
        register.nonrigid(moving, fixed, **options, seed=1)
        assert len(shapes) == 3
    register.nonrigid(moving[1:, 2:], fixed[1:, 2:], **options)
    assert step.experimental_get_tracing_count() - before == 1
    # The shared trace computes what a trace per size computes.
    separate = tf.function(step.python_function, jit_compile=True, autograph=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(register, "_nonrigid_step", lambda *options: separate)
        patch.setattr(register, "_trace_once", lambda step, args: None)
        again = register.nonrigid(moving, fixed, **options)
    assert separate.experimental_get_tracing_count() == 3
    np.testing.assert_allclose(again.ddf.numpy(), first.ddf.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [8, (0, 6, 6), (6, 0, 6)])
def test_compiling_the_finer_levels_ahead_leaves_the_result_unchanged(steps):
    # The background thread calls the step on throwaway variables only: the registration is the
    # same, to the bit, as one that compiles each level when it gets there (on a CPU).
    moving = blobs(shape=(12, 13, 14), seed=3)
    fixed = spatial.warp(moving[None], smooth_ddf(moving.shape, 1.0, seed=4)).numpy()[0]
    labels = dict(moving_label=(moving > 0.5).astype(np.float32), fixed_label=(fixed > 0.5).astype(np.float32),
                  label_weight=0.5)
    options = dict(grid_spacing=4.0, levels=3, steps=steps, **labels)
    with tf.device("/CPU:0"):
        ahead = register.nonrigid(moving, fixed, **options)
        compile_ahead = register._compile_ahead
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(register, "_compile_ahead",
                          lambda step, make_args, levels, device: compile_ahead(step, make_args, [], device))
            each_level = register.nonrigid(moving, fixed, **options)
    np.testing.assert_array_equal(ahead.ddf.numpy(), each_level.ddf.numpy())
    assert ahead.history == each_level.history


def test_a_registration_stopped_by_its_callback_leaves_no_compiling_behind():
    # The background thread is stopped and joined however the registration ends.
    moving = blobs(shape=(12, 13, 14), seed=5)
    fixed = spatial.warp(moving[None], smooth_ddf(moving.shape, 1.0, seed=6)).numpy()[0]
    before = threading.active_count()

    def stop(level, step, value):
        raise RuntimeError("stopped by the callback")

    with pytest.raises(RuntimeError, match="stopped by the callback"):
        register.nonrigid(moving, fixed, grid_spacing=4.0, levels=3, steps=4, callback=stop)
    assert threading.active_count() == before


def test_affine_and_demons_trace_their_steps_once():
    moving = blobs(shape=(10, 13, 14), seed=9)
    fixed = spatial.warp(moving[None], smooth_ddf(moving.shape, 1.0, seed=10)).numpy()[0]
    for builder, key, run in ((register._affine_step, ("ssd",), lambda m, f: register.affine(m, f, loss="ssd", levels=3, steps=3)),
                              (register._demons_step, (False, "fixed", 1.5, 0.0, 0.5), lambda m, f: register.demons(m, f, steps=3))):
        builder.cache_clear()  # a fresh step, not one an earlier test traced; the runs below share it
        step = builder(*key)
        run(moving, fixed)
        run(moving[1:, 2:], fixed[1:, 2:])
        assert step.experimental_get_tracing_count() == 1


def test_the_compiled_adam_update_is_keras_adam():
    # The nonrigid step updates its parameters inside the compiled function: the same steps as Keras's Adam.
    rng = np.random.default_rng(3)
    start = rng.normal(size=(2, 5, 3)).astype(np.float32)
    ours, theirs = tf.Variable(start), tf.Variable(start)
    moments = [tf.Variable(tf.zeros_like(start)) for _ in range(2)]
    schedule = register._decaying(0.3, 12)
    optimizer = keras.optimizers.Adam(schedule)
    for step in range(12):
        grads = tf.constant(rng.normal(size=start.shape).astype(np.float32))
        register._adam_update(ours, grads, *moments, tf.constant(step + 1.0), schedule(step))
        optimizer.apply([grads], [theirs])
    assert not np.allclose(ours.numpy(), start, atol=0.1)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-6)


def test_nonrigid_calls_of_one_size_share_compiled_steps_but_not_their_arguments():
    # The compiled objective is kept between calls; the images and weights must still be each call's own.
    moving = blobs(shape=(16, 16, 16), seed=7)
    fixed = spatial.warp(moving[None], smooth_ddf(moving.shape, 1.5, seed=8)).numpy()[0]
    options = dict(transform="bspline", grid_spacing=4.0, levels=2, steps=15)
    first, again = (register.nonrigid(moving, fixed, **options) for _ in range(2))
    np.testing.assert_array_equal(first.ddf.numpy(), again.ddf.numpy())
    stiffer = register.nonrigid(moving, fixed, regulariser_weight=100.0, **options)
    swapped = register.nonrigid(fixed, moving, **options)
    assert losses.bending_energy_loss(stiffer.ddf) < 0.5 * losses.bending_energy_loss(first.ddf)  # the weight counted
    assert not np.allclose(swapped.ddf.numpy(), first.ddf.numpy(), atol=0.1)


# --- bad input ---


@pytest.mark.parametrize("constant", ["moving", "fixed"])
def test_affine_refuses_a_constant_image(constant):
    # An all-zero fixed image used to give a 2.15x scaling at a loss of 3e16, without a word.
    images = {"moving": blobs(shape=(8, 10, 12)), "fixed": blobs(shape=(8, 10, 12), seed=1)}
    images[constant] = np.zeros((8, 10, 12), np.float32)
    with pytest.raises(ValueError, match=f"^{constant} is constant \\(every voxel is 0\\)"):
        register.affine(images["moving"], images["fixed"], levels=1, steps=5)


def test_nonrigid_refuses_a_constant_image_unless_labels_drive_it():
    image, flat = blobs(shape=(8, 10, 12)), np.full((8, 10, 12), 0.5, np.float32)
    with pytest.raises(ValueError, match=r"^fixed is constant \(every voxel is 0\.5\).*label_weight"):
        register.nonrigid(image, flat, levels=1, steps=2)
    label = (image > np.median(image)).astype(np.float32)
    result = register.nonrigid(flat, flat, moving_label=label, fixed_label=label, label_weight=1.0, levels=1, steps=2)
    assert len(result.history) == 2


def test_nonrigid_refuses_an_initial_transform_of_another_grid_or_with_nan():
    image = blobs(shape=(8, 10, 12))
    with pytest.raises(ValueError, match=r"^initial\.ddf must have shape \[1, 8, 10, 12, 3\].*got \(1, 4, 5, 6, 3\)"):
        register.nonrigid(image, image, initial=register.Result(ddf=np.zeros((1, 4, 5, 6, 3), np.float32)), levels=1, steps=2)
    ddf = np.zeros((1, 8, 10, 12, 3), np.float32)
    ddf[0, 1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"^initial\.ddf contains NaN"):
        register.nonrigid(image, image, initial=register.Result(ddf=ddf), levels=1, steps=2)


@pytest.mark.parametrize("scaled", ["moving_label", "fixed_label"])
def test_nonrigid_refuses_labels_outside_0_1(scaled):
    # 0/255 masks gave a label loss of -253.
    image = blobs(shape=(8, 10, 12))
    mask = (image > np.median(image)).astype(np.float32)
    labels = {"moving_label": mask, "fixed_label": mask, scaled: 255 * mask}
    with pytest.raises(ValueError, match=rf"^{scaled} must hold values in \[0, 1\].*got values from 0 to 255"):
        register.nonrigid(image, image, label_weight=1.0, levels=1, steps=2, **labels)
    labels[scaled] = mask * np.float32(1.0000001)  # an interpolated mask's rounding is let through
    assert len(register.nonrigid(image, image, label_weight=1.0, levels=1, steps=2, **labels).history) == 2


@pytest.mark.parametrize(
    "function,option,value",
    [
        (register.affine, "learning_rate", 0.0),
        (register.affine, "learning_rate", float("nan")),
        (register.affine, "levels", 0),
        (register.affine, "levels", 1.5),
        (register.affine, "steps", -5),
        (register.affine, "steps", 0),
        (register.affine, "steps", (10, 2.5, 10)),
        (register.affine, "smoothing", -1.0),
        (register.nonrigid, "grid_spacing", 0),
        (register.nonrigid, "grid_spacing", -8.0),
        (register.nonrigid, "regulariser_weight", -1.0),
        (register.nonrigid, "label_weight", float("inf")),
        (register.nonrigid, "learning_rate", -0.1),
        (register.nonrigid, "levels", 0),
        (register.nonrigid, "steps", -5),
        (register.nonrigid, "tolerance", -0.1),
    ],
)
def test_numeric_options_are_checked_before_any_work(function, option, value):
    # grid_spacing=0 used to reach 12 GB of memory, levels=0 an IndexError, steps=-5 an empty history.
    image = blobs(shape=(16, 16, 16))
    extra = {"transform": "bspline"} if option == "grid_spacing" else {}
    with pytest.raises(ValueError, match=rf"^{option} must .*got {re.escape(repr(value))}\.$"):
        function(image, image, **{option: value}, **extra)


@pytest.mark.parametrize(
    "function,options,small,minimum",
    [
        (register.affine, {"levels": 3}, (4, 4, 4), 5),
        (register.affine, {"levels": 1}, (1, 4, 4), 2),
        (register.nonrigid, {"levels": 3, "regulariser": "bending"}, (4, 4, 4), 9),
        (register.nonrigid, {"levels": 3}, (4, 4, 4), 5),
    ],
)
def test_too_small_images_are_refused_with_the_real_minimum(function, options, small, minimum):
    # 4x4x4 with 3 levels used to fail with "affine contains NaN" (affine) or deep in the regulariser (nonrigid).
    image = blobs(shape=small)
    expected = rf"^moving and fixed must have at least {minimum} voxels along D, H and W for levels={options['levels']} "
    with pytest.raises(ValueError, match=expected):
        function(image, image, steps=2, **options)
    # the stated minimum is enough: images of that size register to a finite transform
    shape = (minimum,) * 3
    result = function(blobs(shape=shape), blobs(shape=shape, seed=1), steps=2, **options)
    assert result.ddf.shape == (1, *shape, 3) and np.isfinite(result.ddf.numpy()).all()
    assert len(result.history) == 2 * options["levels"]


def test_predict_ddf_refuses_tiny_images_bad_batch_sizes_and_nan():
    model = network.RegistrationNetwork()
    image = 1000 * blobs(shape=(8, 10, 12)) - 1000
    with pytest.raises(ValueError, match=r"^moving and fixed must have at least 4 voxels along D, H and W.*\(1, 3, 3, 3\)"):
        model.predict_ddf(image[:3, :3, :3], image[:3, :3, :3])
    assert model.predict_ddf(image[:4, :4, :4], image[:4, :4, :4]).shape == (1, 4, 4, 4, 3)  # the minimum works
    with pytest.raises(ValueError, match=r"^batch_size must be a whole number >= 1, got 0\."):
        model.predict_ddf(image, image, batch_size=0)
    broken = image.copy()
    broken[2, 3, 4] = np.nan
    with pytest.raises(ValueError, match=r"^fixed contains NaN or infinite values"):
        model.predict_ddf(image, broken)


# --- demons ---


def wave_ddf(shape, amplitude):
    """A smooth DDF `[1, D, H, W, 3]` (voxels) of sines across the volume, largest `amplitude`, without folds."""
    z, y, x = (spatial.reference_grid(shape).numpy()[..., i] / (n - 1) for i, n in enumerate(shape))
    field = np.stack([np.sin(np.pi * y) * np.sin(np.pi * x), np.sin(2 * np.pi * z) * np.sin(np.pi * x),
                      np.sin(np.pi * y) * np.cos(np.pi * z)], axis=-1)
    return (amplitude * field)[None].astype(np.float32)


@pytest.mark.parametrize("diffeomorphic", [False, True])
def test_demons_recovers_a_known_smooth_deformation(diffeomorphic):
    moving = blobs(seed=3)
    true_ddf = wave_ddf(moving.shape, 2.0)
    fixed = spatial.warp(moving[None], true_ddf).numpy()[0]
    seen = []
    result = register.demons(moving, fixed, diffeomorphic=diffeomorphic,
                             callback=lambda level, step, value: seen.append((level, step)))
    inner = (slice(3, -3),) * 3  # the field is only determined where the image has something to match
    error = np.linalg.norm(result.ddf.numpy() - true_ddf, axis=-1)[0][inner].mean()
    initial = np.linalg.norm(true_ddf, axis=-1)[0][inner].mean()
    assert initial > 1.5
    assert error < 0.4 * initial, f"mean displacement error {error:.2f} of {initial:.2f} voxels"
    before = np.mean((moving - fixed) ** 2)
    after = np.mean((result.warp(moving) - fixed) ** 2)
    assert after < 0.05 * before, f"mean squared difference {before:.5f} -> {after:.5f}"
    assert metrics.folding_fraction(result.ddf) == 0.0
    assert result.ddf.shape == (1, *moving.shape, 3) and result.seconds > 0
    assert len(result.history) == 90 and result.levels == [0] * 30 + [1] * 30 + [2] * 30
    assert seen == list(zip(result.levels, [*range(30)] * 3))
    assert result.history[-1] < result.history[60]  # the finest level lowers the mean squared difference


def test_diffeomorphic_demons_do_not_fold_where_additive_demons_do():
    # A large deformation and a weak field smoothing: adding the updates folds the field,
    # composing their exponentials does not.
    moving = blobs(seed=3)
    fixed = spatial.warp(moving[None], smooth_ddf(moving.shape, 3.0, seed=4)).numpy()[0]
    options = dict(field_sigma=0.5, levels=2, steps=(50, 100))
    additive = register.demons(moving, fixed, **options)
    diffeomorphic = register.demons(moving, fixed, diffeomorphic=True, **options)
    assert metrics.folding_fraction(additive.ddf) > 0.002  # 0.76 % of the voxels fold
    assert metrics.folding_fraction(diffeomorphic.ddf) == 0.0
    assert diffeomorphic.history[-1] < 0.5 * diffeomorphic.history[0]  # it still registers


def test_demons_smoothing_options_count():
    moving = blobs(shape=(16, 16, 16), seed=7)
    fixed = spatial.warp(moving[None], smooth_ddf(moving.shape, 1.5, seed=8)).numpy()[0]
    options = dict(levels=2, steps=10)
    first, again = (register.demons(moving, fixed, **options) for _ in range(2))
    np.testing.assert_array_equal(first.ddf.numpy(), again.ddf.numpy())  # compiled once, same answer
    stiff = register.demons(moving, fixed, field_sigma=3.0, **options)
    fluid = register.demons(moving, fixed, update_sigma=2.0, **options)
    for other in (stiff, fluid):
        assert losses.bending_energy_loss(other.ddf) < losses.bending_energy_loss(first.ddf)
    swapped = register.demons(fixed, moving, **options)
    assert not np.allclose(swapped.ddf.numpy(), first.ddf.numpy(), atol=0.1)


@pytest.mark.parametrize(
    "option,value,match",
    [
        ("levels", 0, r"^levels must be a whole number >= 1, got 0\.$"),
        ("steps", -5, r"^steps must be whole numbers >= 0"),
        ("steps", (10, 10), r"^steps must be one number or one per level \(3\)"),
        ("field_sigma", -1.0, r"^field_sigma must be a finite number >= 0, got -1\.0\.$"),
        ("update_sigma", float("nan"), r"^update_sigma must be a finite number >= 0, got nan\.$"),
        ("max_step", 0.0, r"^max_step must be a finite number > 0, got 0\.0\.$"),
        ("gradient", "moving", r"^gradient must be 'fixed', 'symmetric' or None, got 'moving'\.$"),
        ("diffeomorphic", "yes", r"^diffeomorphic must be True or False, got 'yes'\.$"),
    ],
)
def test_demons_rejects_bad_options(option, value, match):
    image = blobs(shape=(16, 16, 16))
    with pytest.raises(ValueError, match=match):
        register.demons(image, image, **{option: value})


def test_demons_rejects_bad_images():
    image = blobs(shape=(16, 16, 16))
    with pytest.raises(ValueError, match="same shape"):
        register.demons(image, image[:, :, :12])
    with pytest.raises(ValueError, match=r"^fixed is constant"):
        register.demons(image, np.zeros_like(image))
    broken = image.copy()
    broken[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"^moving contains NaN"):
        register.demons(broken, image)
    with pytest.raises(ValueError, match=r"^moving and fixed must have at least 5 voxels along D, H and W for levels=3"):
        register.demons(image[:4], image[:4])
    with pytest.raises(ValueError, match=r"^moving must have shape \[D, H, W\] or \[1, D, H, W\]"):
        register.demons(image[None, None], image[None, None])


# --- the point term (feature-based registration) ---


def test_nonrigid_without_points_is_unchanged():
    # Values of the code before the point term was added (same machine type; XLA on CPU), on inputs
    # made here so that they stay fixed: smooth noise, mean magnitude 1.5 voxels.
    fixed = blobs(shape=(16, 20, 20), seed=3)
    field = spatial.smooth(np.random.default_rng(4).normal(size=(1, 16, 20, 20, 3)).astype(np.float32), 4.0).numpy()
    moving = spatial.warp(fixed[None], field * 1.5 / np.linalg.norm(field, axis=-1).mean()).numpy()[0]
    tutorial = dict(regulariser="bending", regulariser_weight=1.0, learning_rate=0.1)  # the defaults of then
    result = register.nonrigid(moving, fixed, transform="ddf", levels=2, steps=(15, 10), **tutorial)
    np.testing.assert_allclose(np.abs(result.ddf.numpy()).sum(), 5681.5888671875, rtol=1e-5)
    np.testing.assert_allclose(np.abs(result.history).sum(), 0.8399649374186993, rtol=1e-5)
    labels = [(image > 0.3).astype(np.float32) for image in (moving, fixed)]
    start = register.affine(moving, fixed, levels=2, steps=10)
    result = register.nonrigid(moving, fixed, moving_label=labels[0], fixed_label=labels[1], label_weight=1.0,
                               transform="bspline", grid_spacing=2.0, loss="ssd", initial=start, levels=2,
                               steps=(15, 10), crop=1.0, **tutorial)
    np.testing.assert_allclose(np.abs(result.ddf.numpy()).sum(), 11552.537109375, rtol=1e-5)
    np.testing.assert_allclose(np.abs(result.history).sum(), 1.3035557139664888, rtol=1e-5)


@pytest.mark.parametrize("start", [None, "half"])
def test_point_term_pulls_the_registration_to_known_correspondences(start):
    # Identical images hold the DDF at zero; the points ask for a shift (with `initial`, of which
    # half is given): the DDF at the points must follow them.
    image = blobs(shape=(16, 20, 20), seed=5)
    shift = np.array([1.0, -1.5, 2.0])
    fixed_points = np.random.default_rng(0).uniform(3, 12, (40, 3))
    initial = None if start is None else register.Result(ddf=np.broadcast_to(shift / 2, (1, 16, 20, 20, 3)))
    options = dict(transform="bspline", grid_spacing=4.0, levels=2, steps=(60, 40), initial=initial)
    plain = register.nonrigid(image, image, **options)
    pulled = register.nonrigid(image, image, fixed_points=fixed_points, moving_points=fixed_points + shift,
                               point_weight=10.0, **options)

    def error(result):
        moved = fixed_points + spatial.resample(result.ddf, fixed_points[None].astype(np.float32)).numpy()[0]
        return np.linalg.norm(moved - (fixed_points + shift), axis=-1).mean()

    assert error(plain) > 1.0
    assert error(pulled) < 0.2, f"{error(pulled):.3f} voxels from the known correspondences"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(fixed_points=np.ones((5, 3))), "give both fixed_points and moving_points"),
        (dict(point_weight=1.0), "give both fixed_points and moving_points"),
        (dict(fixed_points=np.ones((5, 3)), moving_points=np.ones((4, 3)), point_weight=1.0), "pair up: got 5 and 4"),
        (dict(fixed_points=np.ones((5, 2)), moving_points=np.ones((5, 2)), point_weight=1.0), r"\[N, 3\].*\(5, 2\)"),
        (dict(fixed_points=np.full((5, 3), 12.0), moving_points=np.ones((5, 3)), point_weight=1.0),
         r"fixed_points: 5 of 5 points lie outside the grid \[12, 12, 12\]"),
        (dict(fixed_points=np.ones((5, 3)), moving_points=np.full((5, 3), np.nan), point_weight=1.0), "NaN"),
        (dict(fixed_points=np.ones((5, 3)), moving_points=np.ones((5, 3)), point_weight=-1.0), "point_weight"),
        (dict(fixed_points=np.ones((5, 3)), moving_points=np.ones((5, 3)), point_weight=1.0, crop=0.5),
         "below 1 only for transform='bspline' without points"),
    ],
)
def test_nonrigid_refuses_bad_points(kwargs, match):
    image = blobs(shape=(12, 12, 12))
    with pytest.raises(ValueError, match=match):
        register.nonrigid(image, image, levels=1, steps=1, **kwargs)
