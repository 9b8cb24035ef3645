"""Analytic and reference tests of the image, label and deformation losses, and of their gradients."""

import re

import numpy as np
import pytest
import tensorflow as tf

from teachreg import losses, spatial
from teachreg.filters import box_kernel1d, gaussian_kernel1d, separable_filter

RNG = np.random.default_rng(0)
SHAPE = (6, 7, 8)


def image(shape=SHAPE, batch=2, channels=None, seed=0):
    rng = np.random.default_rng(seed)
    full = (batch, *shape) + ((channels,) if channels else ())
    return rng.uniform(size=full).astype(np.float32)


def value(tensor) -> float:
    assert tensor.shape == () and tensor.dtype == tf.float32
    return float(tensor)


def directional_check(fn, x, rng, h=1e-2, rtol=1e-2, mask=None):
    """Compare the GradientTape gradient of `fn` at `x` with central differences along one direction.

    The direction mixes the normalised gradient with a random unit vector, so the derivative is
    large enough for float32 differences yet a wrong gradient cannot pass by construction.
    """
    x = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    grad = tape.gradient(y, x).numpy().astype(np.float64)
    noise = rng.standard_normal(x.shape)
    v = grad / np.linalg.norm(grad) + noise / np.linalg.norm(noise)
    v = (v if mask is None else v * mask).astype(np.float32)
    analytic = float(np.sum(grad * v))
    numeric = (float(fn(x + h * v)) - float(fn(x - h * v))) / (2 * h)
    np.testing.assert_allclose(analytic, numeric, rtol=rtol)


# --- image similarity -------------------------------------------------------------------------


def test_ssd_is_zero_for_identical_images_and_the_mean_squared_difference_otherwise():
    x = image()
    assert value(losses.ssd_loss(x, x)) == 0.0
    assert value(losses.ssd_loss(x, x + 0.5)) == pytest.approx(0.25, rel=1e-5)
    y = image(seed=1)
    assert value(losses.ssd_loss(x, y)) == pytest.approx(np.mean((x - y) ** 2), rel=1e-5)


@pytest.mark.parametrize("a,b", [(1.0, 0.0), (2.5, -3.0), (0.1, 7.0)])
def test_ncc_of_an_increasing_affine_intensity_map_is_one(a, b):
    x = image(channels=2)
    assert value(losses.ncc(x, a * x + b)) == pytest.approx(1.0, abs=1e-5)
    assert value(losses.ncc(x, -a * x + b)) == pytest.approx(-1.0, abs=1e-5)
    assert value(losses.ncc_loss(x, a * x + b)) == pytest.approx(0.0, abs=1e-5)


def test_ncc_matches_the_correlation_coefficient_per_sample_and_channel():
    x, y = image(channels=2), image(channels=2, seed=1)
    expected = np.mean(
        [np.corrcoef(x[i, ..., c].ravel(), y[i, ..., c].ravel())[0, 1] for i in range(2) for c in range(2)]
    )
    assert value(losses.ncc(x, y)) == pytest.approx(expected, abs=1e-5)


def test_ncc_of_a_constant_image_is_zero_with_a_finite_gradient():
    x, flat = tf.constant(image()), tf.fill([2, *SHAPE], 0.3)
    with tf.GradientTape() as tape:
        tape.watch(flat)
        score = losses.ncc(x, flat)
    assert value(score) == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.isfinite(tape.gradient(score, flat).numpy()))


def lncc_reference(f, w, taps):
    """LNCC in float64 from its definition: weighted window means, windows cut at the border and
    renormalised, the stabiliser EPS**2 times the variances of the whole images."""
    k = taps.astype(np.float64)
    r = len(k) // 2
    values = []
    for b in range(f.shape[0]):
        fb, wb = f[b].astype(np.float64), w[b].astype(np.float64)
        floor = losses.EPS**2 * np.var(fb) * np.var(wb)
        for i, j, m in np.ndindex(fb.shape):
            lo = [max(0, c - r) for c in (i, j, m)]
            hi = [min(n, c + r + 1) for c, n in zip((i, j, m), fb.shape)]
            window = tuple(slice(a, z) for a, z in zip(lo, hi))
            weights = np.einsum(
                "a,b,c->abc", *(k[a - c + r : z - c + r] for a, z, c in zip(lo, hi, (i, j, m)))
            )
            weights /= weights.sum()
            fw, ww = fb[window], wb[window]
            fw, ww = fw - np.sum(weights * fw), ww - np.sum(weights * ww)  # two-pass: no cancellation
            cross, var_f, var_w = np.sum(weights * fw * ww), np.sum(weights * fw * fw), np.sum(weights * ww * ww)
            denominator = var_f * var_w + floor
            values.append(cross * cross / denominator if denominator > 0 else 0.0)
    return np.mean(values)


@pytest.mark.parametrize(
    "kernel,size,taps",
    [("box", 3, box_kernel1d(3)), ("box", 5, box_kernel1d(5)), ("gaussian", 6, gaussian_kernel1d(1.0))],
)
def test_lncc_matches_a_voxel_by_voxel_reference_including_the_borders(kernel, size, taps):
    # Low-contrast images with a faint corner (local variance near EPS times the image's), so the
    # stabiliser matters and its scaling relative to the data is checked too.
    f = 0.05 * image()
    f[:, :3, :3] = 0.02 + 5e-6 * image()[:, :3, :3]
    w = 0.5 * f + 0.02 * image(seed=1)
    w[:, :3, :3] = 0.01 + 5e-6 * image(seed=1)[:, :3, :3]
    expected = lncc_reference(f, w, taps)
    assert value(losses.lncc(f, w, kernel_size=size, kernel=kernel)) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("kernel", ["box", "gaussian"])
def test_lncc_of_an_increasing_affine_intensity_map_is_one(kernel):
    x = image(channels=2)
    assert value(losses.lncc(x, 3.0 * x + 1.0, kernel_size=5, kernel=kernel)) == pytest.approx(1.0, abs=1e-4)
    assert value(losses.lncc_loss(x, 3.0 * x + 1.0, kernel_size=5, kernel=kernel)) == pytest.approx(0.0, abs=1e-4)
    unrelated = value(losses.lncc(x, image(channels=2, seed=1), kernel_size=5, kernel=kernel))
    assert 0.0 <= unrelated < 0.2


def test_lncc_of_flat_images_is_zero():
    flat = np.full((1, *SHAPE), 0.7, np.float32)
    assert value(losses.lncc(flat, flat)) == 0.0


def mi_reference(f, w, bins=23, sigma_ratio=0.5):
    """DeepReg's GlobalMutualInformation in float64, each image rescaled to [0, 1] by its min and max."""
    centres = np.linspace(0, 1, bins)
    sigma = sigma_ratio / (bins - 1)
    out = []
    for a, b in zip(f, w):
        ia, ib = (
            np.exp(-((((x.ravel() - x.min()) / (x.max() - x.min()))[:, None] - centres) ** 2) / (2 * sigma**2))
            for x in (a.astype(np.float64), b.astype(np.float64))
        )
        ia /= ia.sum(1, keepdims=True)
        ib /= ib.sum(1, keepdims=True)
        pab = ia.T @ ib / len(ia)
        papb = np.outer(ia.mean(0), ib.mean(0))
        out.append(np.sum(pab * np.log((pab + losses.EPS) / (papb + losses.EPS))))
    return np.mean(out)


def test_mutual_information_matches_deepreg_and_prefers_the_aligned_image():
    x = image((16, 16, 16))
    shuffled = RNG.permutation(x.ravel()).reshape(x.shape)
    aligned = value(losses.mutual_information(x, x))
    unrelated = value(losses.mutual_information(x, shuffled))
    assert aligned == pytest.approx(mi_reference(x, x), rel=1e-4)
    assert unrelated == pytest.approx(mi_reference(x, shuffled), rel=1e-3)
    assert aligned > 2.0 and unrelated < 0.1
    # Invariant to a monotone affine intensity change, through the min-max normalisation.
    assert value(losses.mutual_information(x, 4.0 * x - 2.0)) == pytest.approx(aligned, rel=1e-4)
    assert value(losses.mutual_information_loss(x, x)) == pytest.approx(-aligned)


# --- raw scanner intensities ------------------------------------------------------------------


def raw_pair(kind, shape=(10, 11, 12), seed=0):
    """A fixed image and a noisy, rescaled copy `[1, D, H, W]` on a scanner's raw range, each with a
    flat background: "ct" has air at -1000 HU around a body of -100..500 HU; "mr" a zero background
    around tissue of 0..1000 and a faint noise floor of a few units along one side."""
    rng = np.random.default_rng(seed)
    body = np.zeros((1, *shape), bool)
    body[:, 2:-2, 3:-2, 4:] = True
    noise = rng.standard_normal(body.shape)
    if kind == "ct":
        f = np.where(body, -100 + 600 * rng.random(body.shape), -1000.0)
        w = np.where(body, f + 40 * noise, -1000.0)
    else:
        f = np.where(body, 1000 * rng.random(body.shape), 0.0)
        f[:, :, :2, :3] = 3 * rng.random(f[:, :, :2, :3].shape)
        w = np.where(body, 0.8 * f + 50 + 30 * noise, 0.0)
        w[:, :, :2, :3] = 2 * rng.random(w[:, :, :2, :3].shape)
    return f.astype(np.float32), w.astype(np.float32)


def issue_reproducer():
    """The images of the LNCC defect report: MR-like (zero background) and CT-like (air) fixed images."""
    rng = np.random.default_rng(0)
    f = np.zeros((1, 16, 16, 16), np.float32)
    f[..., 8:] = 500 + 500 * rng.random((1, 16, 16, 8))
    w = f + 50 * rng.standard_normal(f.shape).astype(np.float32) * (f > 0)
    ct = np.full_like(f, -1000.0)
    ct[..., 8:] = 500.0
    return f, ct, w


def ncc_reference(f, w):
    """Global NCC in float64: the correlation coefficient per sample, averaged over the batch."""
    return np.mean([np.corrcoef(np.ravel(a), np.ravel(b))[0, 1] for a, b in zip(np.float64(f), np.float64(w))])


def reference_directional_check(fn, reference, x, rng, h, rtol=1e-3, mask=None):
    """The GradientTape gradient of `fn` (float32) at `x` along one direction, against central
    differences of `reference`, the same function in float64 (so `h` can be small against the data)."""
    x32 = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x32)
        y = fn(x32)
    grad = tape.gradient(y, x32).numpy().astype(np.float64)
    assert np.all(np.isfinite(grad))
    noise = rng.standard_normal(x.shape)
    v = grad / np.linalg.norm(grad) + noise / np.linalg.norm(noise)
    v = v if mask is None else v * mask
    numeric = (reference(x + h * v) - reference(x - h * v)) / (2 * h)
    np.testing.assert_allclose(np.sum(grad * v), numeric, rtol=rtol)


@pytest.mark.parametrize("kind", ["ct", "mr"])
@pytest.mark.parametrize("kernel,size,taps", [("box", 5, box_kernel1d(5)), ("gaussian", 6, gaussian_kernel1d(1.0))])
def test_lncc_on_raw_intensities_matches_the_float64_reference(kind, kernel, size, taps):
    f, w = raw_pair(kind)
    score = value(losses.lncc(f, w, kernel_size=size, kernel=kernel))
    assert score == pytest.approx(lncc_reference(f, w, taps), rel=1e-4)
    assert 0.2 < score < 1.0
    # Each image rescaled to [0, 1] by its own range: the same value, the stabiliser scales with the data.
    unit = [(x - x.min()) / (x.max() - x.min()) for x in (f, w)]
    assert value(losses.lncc(*unit, kernel_size=size, kernel=kernel)) == pytest.approx(score, rel=1e-4)


@pytest.mark.parametrize("kernel,taps", [("box", box_kernel1d(9)), ("gaussian", gaussian_kernel1d(1.5))])
def test_lncc_of_the_issue_reproducer_matches_the_float64_reference(kernel, taps):
    f, ct, w = issue_reproducer()
    for fixed in (f, ct):  # float32 window sums gave 3929657.5 and 17230818.0 for the box
        score = value(losses.lncc(fixed, w, kernel=kernel))
        assert 0.0 <= score <= 1.0
        assert score == pytest.approx(lncc_reference(fixed, w, taps), rel=1e-4)


@pytest.mark.parametrize("kind", ["ct", "mr"])
def test_lncc_stays_in_zero_one_on_raw_intensities(kind):
    f, w = raw_pair(kind)
    flat = np.full_like(f, f.min())
    for kernel in ("box", "gaussian"):
        same = value(losses.lncc(f, f, kernel_size=5, kernel=kernel))
        assert 0.0 < same <= 1.0
        for other in (3.0 * f - 200.0, -f, 0.001 * f + 0.5):  # LNCC squares the correlation: -f scores as f
            assert value(losses.lncc(f, other, kernel_size=5, kernel=kernel)) == pytest.approx(same, rel=1e-5)
        for a, b in ((f, w), (w, f), (f, flat), (flat, flat)):
            assert 0.0 <= value(losses.lncc(a, b, kernel_size=5, kernel=kernel)) <= 1.0
    # A constant image (air) scores 0 with a zero gradient, not 0 / 0.
    x = tf.constant(flat)
    with tf.GradientTape() as tape:
        tape.watch(x)
        score = losses.lncc(f, x)
    assert value(score) == 0.0
    assert np.all(tape.gradient(score, x).numpy() == 0.0)


@pytest.mark.parametrize("kind", ["unit", "ct", "mr"])
def test_ncc_of_an_affine_intensity_map_is_one_across_scales(kind):
    x = image() if kind == "unit" else raw_pair(kind)[0]
    for a in (1e-3, 1.0, 1e3):
        for b in (0.0, 0.5, -1000.0):
            if a * np.std(x) < 1e3 * abs(np.spacing(np.float32(b))):
                continue  # a * x + b itself would keep too few distinct float32 values
            assert value(losses.ncc(x, a * x + b)) == pytest.approx(1.0, abs=1e-5), (a, b)
            assert value(losses.ncc(x, -a * x + b)) == pytest.approx(-1.0, abs=1e-5), (a, b)


@pytest.mark.parametrize("kind", ["ct", "mr"])
def test_ncc_on_raw_intensities_matches_the_float64_reference(kind):
    f, w = raw_pair(kind)
    assert value(losses.ncc(f, w)) == pytest.approx(ncc_reference(f, w), abs=1e-6)
    body = f > f.min()  # a mask: the correlation over the voxels that count
    masked = value(losses.ncc(f, w, mask=body))
    assert masked == pytest.approx(np.corrcoef(f[body].astype(np.float64), w[body])[0, 1], abs=1e-6)


@pytest.mark.parametrize("level", [0.0, 0.3, -1000.0])
def test_ncc_of_constant_images_is_zero_with_a_zero_gradient(level):
    f = raw_pair("ct")[0]
    flat = tf.fill(f.shape, level)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(flat)
        scores = [losses.ncc(f, flat), losses.ncc(flat, f), losses.ncc(flat, flat)]
    for score in scores:
        assert value(score) == 0.0
        assert np.all(tape.gradient(score, flat).numpy() == 0.0)


@pytest.mark.parametrize("kind", ["ct", "mr"])
def test_mutual_information_on_raw_and_tiny_ranges_matches_the_reference(kind):
    f, w = raw_pair(kind, shape=(16, 16, 16))
    score = value(losses.mutual_information(f, w))
    assert score == pytest.approx(mi_reference(f, w), rel=1e-4)
    # Rescaled to ranges far under the old absolute epsilon (1e-5), as on the original range.
    tiny = [((x - x.min()) * 1e-9).astype(np.float32) for x in (f, w)]
    assert value(losses.mutual_information(*tiny)) == pytest.approx(score, rel=1e-4)
    assert value(losses.mutual_information(f, 1e-7 * w + 0.25)) == pytest.approx(score, rel=1e-3)


@pytest.mark.parametrize("level", [0.0, 1e-3, -1000.0])
def test_mutual_information_of_a_constant_image_is_zero_and_finite(level):
    f = raw_pair("mr")[0]
    flat = tf.fill(f.shape, level)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(flat)
        scores = [losses.mutual_information(f, flat), losses.mutual_information(flat, flat)]
    for score in scores:
        assert value(score) == pytest.approx(0.0, abs=1e-5)
        assert np.all(np.isfinite(tape.gradient(score, flat).numpy()))


@pytest.mark.parametrize("kind", ["ct", "mr"])
def test_raw_intensity_loss_gradients_agree_with_float64_finite_differences(kind):
    rng = np.random.default_rng(6)
    f, w = raw_pair(kind, shape=(8, 9, 10))
    h = 1e-4 * float(np.std(w))  # along a direction of norm about 1: a few thousandths of an intensity unit per voxel
    for kernel, size, taps in (("box", 5, box_kernel1d(5)), ("gaussian", 6, gaussian_kernel1d(1.0))):
        reference_directional_check(
            lambda x, kernel=kernel, size=size: losses.lncc_loss(f, x, kernel_size=size, kernel=kernel),
            lambda x, taps=taps: 1.0 - lncc_reference(f, x, taps), w, rng, h)
    reference_directional_check(lambda x: losses.ncc_loss(f, x), lambda x: 1.0 - ncc_reference(f, x), w, rng, h)
    # MI does not differentiate through the minimum and maximum: leave the voxels at either alone.
    inside = ((w > w.min()) & (w < w.max())).astype(np.float64)
    reference_directional_check(
        lambda x: losses.mutual_information_loss(f, x), lambda x: -mi_reference(f, x), w, rng, h, mask=inside)


@pytest.mark.parametrize("compiled", [False, True])
def test_separable_filter_gradient_is_the_transpose_of_the_filter(compiled):
    """The filter's hand-written gradient (its adjoint) against the transpose of the filter's matrix,
    built column by column in float64, with a kernel that is not symmetric."""
    shape, kernel = (1, 3, 4, 5, 1), np.array([0.1, 0.5, 0.2, 0.15, 0.05])
    size = int(np.prod(shape))
    columns = [separable_filter(tf.constant(np.eye(size)[i].reshape(shape)), kernel).numpy().ravel() for i in range(size)]
    matrix = np.stack(columns, axis=1)  # filter(x).ravel() == matrix @ x.ravel()
    upstream = np.random.default_rng(3).normal(size=shape)

    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(tf.constant(upstream) * separable_filter(x, kernel))
        return tape.gradient(total, x)

    x = tf.constant(np.random.default_rng(4).normal(size=shape))
    got = (tf.function(gradient, jit_compile=True) if compiled else gradient)(x)
    np.testing.assert_allclose(got.numpy().ravel(), matrix.T @ upstream.ravel(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="odd number of taps"):
        separable_filter(x, np.ones(4) / 4)


def test_image_losses_by_name():
    assert set(losses.IMAGE_LOSSES) == {"ssd", "ncc", "lncc", "mi"}
    x = image()
    for name, fn in losses.IMAGE_LOSSES.items():
        assert value(fn(x, x)) <= value(fn(x, image(seed=1))), name


# --- labels -----------------------------------------------------------------------------------


def test_dice_and_jaccard_of_identical_and_empty_masks_are_one():
    mask = image() > 0.5
    empty = np.zeros((2, *SHAPE), np.float32)
    for score in (losses.soft_dice, losses.hard_dice, losses.jaccard):
        assert value(score(mask, mask)) == pytest.approx(1.0)
        assert value(score(empty, empty)) == pytest.approx(1.0)
    assert value(losses.dice_loss(mask, mask)) == pytest.approx(0.0)


def test_dice_and_jaccard_known_values():
    t = np.zeros((1, 4, 4, 4), np.float32)
    p = np.zeros_like(t)
    t[0, 0, 0, :2] = 1  # two voxels
    p[0, 0, 0, 1] = 1  # one of them
    assert value(losses.soft_dice(t, p)) == pytest.approx(2 / 3, abs=1e-5)
    assert value(losses.jaccard(t, p)) == pytest.approx(1 / 2, abs=1e-5)
    assert value(losses.soft_dice(t, 1 - t)) == pytest.approx(0.0, abs=1e-5)
    # Soft: a prediction of 0.5 on the two voxels gives 2 * 1 / (2 + 1).
    assert value(losses.soft_dice(t, 0.5 * t)) == pytest.approx(2 / 3, abs=1e-5)
    assert value(losses.hard_dice(t, 0.5 * t)) == pytest.approx(1.0)
    assert value(losses.hard_dice(t, 0.4 * t)) == pytest.approx(0.0, abs=1e-5)


def test_label_scores_average_over_labels_and_the_batch():
    t = (image(channels=3) > 0.5).astype(np.float32)
    p = t.copy()
    p[..., 1] = 1 - t[..., 1]  # label 1 is completely wrong
    assert value(losses.soft_dice(t, p)) == pytest.approx(2 / 3, abs=1e-5)
    p[1] = 1 - t[1]  # sample 1 is completely wrong
    assert value(losses.jaccard(t, p)) == pytest.approx(0.5 * (2 / 3), abs=1e-5)


def test_cross_entropy_known_values():
    ones = np.ones((1, *SHAPE, 2), np.float32)
    assert value(losses.cross_entropy_loss(ones, 0.8 * ones)) == pytest.approx(-np.log(0.8), rel=1e-5)
    assert value(losses.cross_entropy_loss(0 * ones, 0.8 * ones)) == pytest.approx(-np.log(0.2), rel=1e-5)
    assert value(losses.cross_entropy_loss(ones, ones)) == pytest.approx(0.0, abs=1e-6)
    smallest = 1 - np.float32(1 - losses.CE_EPS)  # 1 - p after clipping p = 1, in float32
    assert value(losses.cross_entropy_loss(0 * ones, ones)) == pytest.approx(-np.log(smallest), rel=1e-5)


# --- deformation regularisers -----------------------------------------------------------------


def affine_ddf(seed=0, batch=2):
    return spatial.affine_to_ddf(spatial.random_affine(batch, 0.3, seed=seed, shape=SHAPE), SHAPE).numpy()


def test_bending_energy_of_an_affine_ddf_is_zero():
    assert value(losses.bending_energy_loss(affine_ddf())) == pytest.approx(0.0, abs=1e-9)
    assert value(losses.bending_energy_loss(np.full((1, *SHAPE, 3), 2.5, np.float32))) == 0.0


def test_bending_energy_of_quadratic_ddfs():
    grid = spatial.reference_grid(SHAPE).numpy()
    d, h, w = grid[..., 0], grid[..., 1], grid[..., 2]
    ddf = np.zeros((1, *SHAPE, 3), np.float32)
    ddf[0, ..., 0] = 0.5 * d**2  # u_dd = 1 on one of the three components
    assert value(losses.bending_energy_loss(ddf)) == pytest.approx(1 / 3, rel=1e-5)
    ddf[0, ..., 0] = 0
    ddf[0, ..., 2] = h * w  # u_hw = 1, counted twice
    assert value(losses.bending_energy_loss(ddf)) == pytest.approx(2 / 3, rel=1e-5)


def test_gradient_norms_of_an_affine_ddf():
    affine = spatial.random_affine(1, 0.3, seed=3, shape=SHAPE).numpy()
    ddf = spatial.affine_to_ddf(affine, SHAPE).numpy()
    jacobian = affine[0, :3] - np.eye(3)  # du_c / dx_axis = jacobian[axis, c]
    assert value(losses.gradient_l1_loss(ddf)) == pytest.approx(np.abs(jacobian).sum() / 3, rel=1e-4)
    assert value(losses.gradient_l2_loss(ddf)) == pytest.approx(np.square(jacobian).sum() / 3, rel=1e-4)
    assert value(losses.gradient_l2_loss(np.ones((1, *SHAPE, 3)))) == 0.0


# --- gradients ----------------------------------------------------------------------------------


def test_image_loss_gradients_agree_with_finite_differences():
    rng = np.random.default_rng(1)
    f = spatial.smooth(image(), 1.0).numpy()
    w = spatial.smooth(image(seed=1), 1.0).numpy()
    directional_check(lambda x: losses.ssd_loss(f, x), w, rng)
    directional_check(lambda x: losses.ncc_loss(f, x), w, rng)
    directional_check(lambda x: losses.lncc_loss(f, x, kernel_size=5), w, rng)
    directional_check(lambda x: losses.lncc_loss(f, x, kernel_size=5, kernel="gaussian"), w, rng)
    # MI does not differentiate through the min and max: keep those two voxels fixed.
    mask = np.ones_like(w)
    for b in range(w.shape[0]):
        for index in (np.argmin(w[b]), np.argmax(w[b])):
            mask[b].flat[index] = 0
    directional_check(lambda x: losses.mutual_information_loss(f, x), w, rng, h=1e-3, mask=mask)


def test_label_loss_gradients_agree_with_finite_differences():
    rng = np.random.default_rng(2)
    t = (image(channels=2) > 0.5).astype(np.float32)
    p = 0.1 + 0.8 * image(channels=2, seed=1)
    for fn in (losses.dice_loss, losses.jaccard, losses.cross_entropy_loss):
        directional_check(lambda x: fn(t, x), p, rng)
    with tf.GradientTape() as tape:
        x = tf.constant(p)
        tape.watch(x)
        score = losses.hard_dice(t, x)
    assert tape.gradient(score, x) is None


def test_regulariser_gradients_agree_with_finite_differences():
    rng = np.random.default_rng(3)
    ddf = rng.normal(size=(2, *SHAPE, 3)).astype(np.float32)
    for fn in (losses.bending_energy_loss, losses.gradient_l1_loss, losses.gradient_l2_loss):
        directional_check(fn, ddf, rng, h=1e-3)


def bending_reference(u: np.ndarray) -> float:
    """The bending energy of a DDF `[batch, D, H, W, 3]` in float64 NumPy, from its definition."""
    n = u.shape[1:4]

    def at(offset):
        return u[(slice(None), *(slice(1 + o, k - 1 + o) for o, k in zip(offset, n)), slice(None))]

    unit = np.eye(3, dtype=int)
    energy = sum((at(unit[a]) - 2 * at((0, 0, 0)) + at(-unit[a])) ** 2 for a in range(3))
    energy += sum(2 * ((at(unit[a] + unit[b]) - at(unit[a] - unit[b]) - at(unit[b] - unit[a])
                        + at(-unit[a] - unit[b])) / 4) ** 2 for a, b in ((0, 1), (0, 2), (1, 2)))
    return float(np.mean(energy))


@pytest.mark.parametrize("compiled", [False, True])
def test_bending_energy_and_its_gradient_match_the_float64_definition(compiled):
    """The energy is quadratic, so central differences of the float64 reference give its gradient exactly."""
    u = np.random.default_rng(7).normal(size=(2, 3, 4, 5, 3))
    eye = np.eye(u.size).reshape(u.size, *u.shape)
    expected = np.array([(bending_reference(u + e) - bending_reference(u - e)) / 2 for e in eye]).reshape(u.shape)

    def energy_and_gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = losses.bending_energy_loss(x)
        return value, tape.gradient(value, x)

    value, gradient = (tf.function(energy_and_gradient, jit_compile=True) if compiled else energy_and_gradient)(
        tf.constant(u, tf.float32))
    assert float(value) == pytest.approx(bending_reference(u), rel=1e-5)
    np.testing.assert_allclose(gradient.numpy(), expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_registration_objective_gradient_through_warp():
    rng = np.random.default_rng(4)
    fixed = spatial.smooth(image(batch=1), 1.0)
    moving = spatial.smooth(image(batch=1, seed=1), 1.0)

    @tf.function(jit_compile=True)
    def objective(ddf):
        return losses.lncc_loss(fixed, spatial.warp(moving, ddf), kernel_size=5) + 0.1 * losses.bending_energy_loss(ddf)

    ddf = 0.3 + 0.2 * rng.standard_normal((1, *SHAPE, 3)).astype(np.float32)
    directional_check(objective, ddf, rng, h=1e-3)


def test_all_losses_trace_under_xla_and_match_eager():
    f, w = image(), image(seed=1)
    ddf = RNG.normal(size=(2, *SHAPE, 3)).astype(np.float32)
    calls = {
        "ssd": (losses.ssd_loss, (f, w)),
        "ncc": (losses.ncc_loss, (f, w)),
        "lncc": (losses.lncc_loss, (f, w)),
        "lncc_gaussian": (lambda a, b: losses.lncc_loss(a, b, kernel="gaussian"), (f, w)),
        "mi": (losses.mutual_information_loss, (f, w)),
        "dice": (losses.dice_loss, (f > 0.5, w)),
        "hard_dice": (losses.hard_dice, (f, w)),
        "jaccard": (losses.jaccard, (f > 0.5, w)),
        "ce": (losses.cross_entropy_loss, (f > 0.5, w)),
        "bending": (losses.bending_energy_loss, (ddf,)),
        "l1": (losses.gradient_l1_loss, (ddf,)),
        "l2": (losses.gradient_l2_loss, (ddf,)),
    }
    for name, (fn, args) in calls.items():
        args = [tf.constant(a, tf.float32) for a in args]
        compiled = tf.function(fn, jit_compile=True)
        assert float(compiled(*args)) == pytest.approx(float(fn(*args)), rel=1e-5, abs=1e-6), name


# --- validation -------------------------------------------------------------------------------


def raises(*fragments):
    return pytest.raises(ValueError, match=".*".join(re.escape(f) for f in fragments))


def test_image_losses_reject_bad_inputs():
    x = image()
    for fn in losses.IMAGE_LOSSES.values():
        with raises("fixed", "[batch, D, H, W] or [batch, D, H, W, C]"):
            fn(x[0], x)
        with raises("warped", "[batch, D, H, W] or [batch, D, H, W, C]"):
            fn(x, x[..., None, None])
        with raises("fixed and warped", "same shape"):
            fn(x, x[:, :-1])
        bad = x.copy()
        bad[0, 1, 2, 3] = np.nan
        with raises("warped", "NaN", "[batch, D, H, W]"):
            fn(x, bad)
        with raises("fixed", "real numbers", "[batch, D, H, W]"):
            fn(x.astype(np.complex64), x)
    with pytest.raises(ValueError, match="kernel"):
        losses.lncc(x, x, kernel="triangle")
    with pytest.raises(ValueError, match="odd"):
        losses.lncc(x, x, kernel_size=4)


def test_label_losses_reject_bad_inputs():
    t = image() > 0.5
    for fn in (losses.soft_dice, losses.hard_dice, losses.jaccard, losses.dice_loss, losses.cross_entropy_loss):
        with raises("y_true", "[batch, D, H, W] or [batch, D, H, W, L]"):
            fn(t[0], t)
        with raises("y_true and y_pred", "same shape"):
            fn(t, t[..., None].repeat(2, axis=-1))
        with raises("y_pred", "NaN"):
            fn(t, np.where(t, np.inf, 0.0))


def test_regularisers_reject_bad_inputs():
    for fn in (losses.bending_energy_loss, losses.gradient_l1_loss, losses.gradient_l2_loss):
        with raises("ddf", "[batch, D, H, W, 3]"):
            fn(np.zeros((1, *SHAPE, 2)))
        with raises("ddf", "[batch, D, H, W, 3]"):
            fn(np.zeros((*SHAPE, 3)))
        with raises("ddf", "NaN", "[batch, D, H, W, 3]"):
            fn(np.full((1, *SHAPE, 3), np.nan))
    with raises("ddf", "at least 3 voxels"):
        losses.bending_energy_loss(np.zeros((1, 2, 5, 5, 3)))


@pytest.mark.parametrize("name", ["ssd", "ncc", "lncc", "mi"])
def test_mask_leaves_out_voxels(name):
    """A mask of ones changes nothing; voxels with weight 0 cannot change the value."""
    rng = np.random.default_rng(5)
    fixed = rng.uniform(size=(1, 20, 9, 10)).astype(np.float32)
    warped = (0.5 * fixed + 0.2 * rng.uniform(size=fixed.shape)).astype(np.float32)
    loss = losses.IMAGE_LOSSES[name]
    np.testing.assert_allclose(loss(fixed, warped, mask=np.ones_like(fixed)), loss(fixed, warped), rtol=1e-4, atol=1e-6)
    spoiled = warped.copy()
    spoiled[:, :3] = rng.uniform(-5, 5, size=spoiled[:, :3].shape)
    mask = np.ones_like(fixed)
    # LNCC's windows (9 voxels) reach 4 voxels across the mask's edge: leave those out too
    mask[:, : 7 if name == "lncc" else 3] = 0
    np.testing.assert_allclose(loss(fixed, spoiled, mask=mask), loss(fixed, warped, mask=mask), rtol=1e-4, atol=1e-6)


def test_mask_shape_is_checked():
    x = np.zeros((1, 4, 5, 6), np.float32)
    with pytest.raises(ValueError, match="mask"):
        losses.ssd_loss(x, x, mask=np.ones((1, 4, 5, 7)))
