"""Speed and accuracy figures for the course, printed as JSON (`make bench`).

Core operations (warping, losses), `register.nonrigid`'s defaults against elastix on chapter 4's
prostate pair, `register.demons` against SimpleITK's demons filters on that pair, and chapter 5's
pretrained lung network against the classical optimiser, alone and refined by a short run of
that optimiser.

Every comparison is measured side by side in one run, interleaving the contenders and taking the
median of repeated runs, because shared machines are noisy. Targets (2-core CPU), for the warp of
a 128^3 volume called eagerly and inside a caller's `tf.function`: forward no slower than
`scipy.ndimage.map_coordinates(order=1)`, forward + gradient at least 4x faster than DeepReg's
`resample`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from scipy.ndimage import map_coordinates

from teachreg import losses, spatial


def side_by_side(contenders: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each contender, their runs interleaved round by round."""
    for fn in contenders.values():
        fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def deepreg_resample():
    """DeepReg's `deepreg.model.layer_util.resample`, or None where deepreg is not installed.

    `make bench` installs deepreg (PyPI, the version pinned in the Makefile) without its
    dependencies, which pin TensorFlow 2.3; the module is loaded from its file because the package's `__init__` imports all of
    DeepReg. The function itself needs only TensorFlow and numpy.
    """
    spec = importlib.util.find_spec("deepreg")
    if spec is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / "model" / "layer_util.py"
    module_spec = importlib.util.spec_from_file_location("deepreg_layer_util", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.resample


def warp_figures(device: str, size: int, repeats: int) -> dict:
    """The linear warp of a `size`^3 volume, forward and forward + gradient (DDF), on the three
    paths a call takes: eagerly, inside a caller's plain `tf.function` (a training step), inside
    a caller's `tf.function(jit_compile=True)`; beside scipy's `map_coordinates(order=1)` and
    DeepReg's `resample` inside a plain `tf.function`, as DeepReg's training step calls it."""
    rng = np.random.default_rng(0)
    volume_np = rng.uniform(size=(size,) * 3).astype(np.float32)
    ddf_np = rng.uniform(-3, 3, size=(1, size, size, size, 3)).astype(np.float32)
    coords_np = np.moveaxis(spatial.reference_grid((size,) * 3).numpy() + ddf_np[0], -1, 0)
    resample = deepreg_resample()
    with tf.device(device):
        volume = tf.constant(volume_np[None])  # data, not a parameter: no tape watches it
        ddf = tf.Variable(ddf_np)
        weights = tf.Variable(rng.normal(size=(1, size, size, size)).astype(np.float32))
        grid = spatial.reference_grid((size,) * 3)[None]

        def forward(warp=spatial.warp):
            return warp(volume, ddf)

        def forward_and_gradient(warp=spatial.warp):
            with tf.GradientTape() as tape:
                value = tf.reduce_sum(warp(volume, ddf) * weights)
            return tape.gradient(value, ddf)

        contenders = {}
        for path, wrap in (("eager", lambda fn: fn), ("graph", tf.function),
                           ("compiled", lambda fn: tf.function(fn, jit_compile=True))):
            contenders[f"tf_forward_{path}"] = (lambda f: lambda: f().numpy())(wrap(forward))
            contenders[f"tf_forward_and_gradient_{path}"] = (lambda f: lambda: f().numpy())(wrap(forward_and_gradient))
        if resample is not None:
            def deepreg_warp(image, field):
                return resample(vol=image, loc=grid + field)

            deepreg_forward = tf.function(lambda: forward(deepreg_warp))
            deepreg_gradient = tf.function(lambda: forward_and_gradient(deepreg_warp))
            contenders["deepreg_forward_graph"] = lambda: deepreg_forward().numpy()
            contenders["deepreg_forward_and_gradient_graph"] = lambda: deepreg_gradient().numpy()
        if device.startswith("/CPU"):
            contenders["scipy_map_coordinates_order1"] = lambda: map_coordinates(volume_np, coords_np, order=1, mode="nearest")
        seconds = side_by_side(contenders, repeats)
    out = {f"{k}_s": round(v, 4) for k, v in seconds.items()}
    for path in ("eager", "graph", "compiled"):
        if "scipy_map_coordinates_order1" in seconds:
            out[f"forward_{path}_over_scipy"] = round(seconds[f"tf_forward_{path}"] / seconds["scipy_map_coordinates_order1"], 2)
        if resample is not None:
            out[f"deepreg_gradient_over_{path}_gradient"] = round(
                seconds["deepreg_forward_and_gradient_graph"] / seconds[f"tf_forward_and_gradient_{path}"], 2)
    deepreg = importlib.metadata.version("deepreg") if resample is not None else "not installed"
    return {"shape": [size] * 3, "deepreg": deepreg, **out}


def loss_figures(device: str, repeats: int) -> dict:
    rng = np.random.default_rng(1)
    shape = (1, 32, 128, 128)
    fixed_np = spatial.smooth(rng.uniform(size=shape).astype(np.float32), 2.0).numpy()
    moving_np = spatial.smooth(rng.uniform(size=shape).astype(np.float32), 2.0).numpy()
    with tf.device(device):
        fixed, moving = tf.Variable(fixed_np), tf.Variable(moving_np)
        ddf = tf.Variable(rng.normal(scale=0.5, size=(*shape, 3)).astype(np.float32))

        def step():
            with tf.GradientTape() as tape:
                warped = spatial.warp(moving, ddf)
                value = losses.lncc_loss(fixed, warped) + 0.5 * losses.bending_energy_loss(ddf)
            return tape.gradient(value, ddf)

        compiled, graph = tf.function(step, jit_compile=True), tf.function(step)
        seconds = side_by_side({"compiled": lambda: compiled().numpy(), "graph": lambda: graph().numpy()}, repeats)
    return {"shape": list(shape[1:]), **{f"lncc_bending_with_gradient_{k}_s": round(v, 4) for k, v in seconds.items()}}


def nonrigid_figures(repeats: int, store_elastix: bool) -> dict:
    """`register.nonrigid` with its defaults against elastix's default maps on the prostate pair.

    Both directions, the contenders interleaved. Per contender: the medians over `repeats` runs,
    and the first run's seconds apart ("first_seconds"): ours then includes compiling its steps,
    once per Python session and image size.
    """
    from teachreg import data, elastix, metrics, register

    pair = data.load("prostate_mr")
    out = {}
    for direction, (moving, fixed) in {"0_onto_1": (pair.moving, pair.fixed), "1_onto_0": (pair.fixed, pair.moving)}.items():
        gland, fixed_gland = moving.labels[..., 0].astype(np.float32), fixed.labels[..., 0]
        contenders = {"teachreg_defaults": lambda: register.nonrigid(moving.image, fixed.image)}
        if elastix.available():
            contenders["elastix_bspline"] = lambda: elastix.register(moving.image, fixed.image, maps=("bspline",))
            contenders["elastix_affine_then_bspline"] = lambda: elastix.register(moving.image, fixed.image,
                                                                                  maps=("affine", "bspline"))
        runs = {name: [] for name in contenders}
        for _ in range(repeats):
            for name, register_pair in contenders.items():
                result = register_pair()
                runs[name].append(dict(dice=metrics.dice(result.warp_label(gland), fixed_gland),
                                       folding=metrics.folding_fraction(result.ddf), seconds=result.seconds))
        out[direction] = {"dice_before": round(metrics.dice(gland, fixed_gland), 4)}
        for name, rows in runs.items():
            out[direction][name] = {**{key: round(statistics.median(r[key] for r in rows), 4) for key in rows[0]},
                                    "first_seconds": round(rows[0]["seconds"], 2)}
    if store_elastix and elastix.available():
        import itk

        stored = {"measured": {"date": time.strftime("%Y-%m-%d"), "itk": itk.__version__, "cpus": os.cpu_count(),
                               "command": f"benchmarks/bench.py --nonrigid {repeats} --store-elastix (medians)"},
                  **{name: {key: out["0_onto_1"][f"elastix_{key_name}"][key] for key in ("dice", "folding", "seconds")}
                     for name, key_name in (("bspline", "bspline"), ("affine then bspline", "affine_then_bspline"))}}
        elastix.STORED.write_text(json.dumps(stored, indent=2) + "\n", encoding="utf-8")
    return out


def sitk_demons(moving, fixed, diffeomorphic: bool, levels: int, steps, field_sigma: float):
    """SimpleITK's (Diffeomorphic)DemonsRegistrationFilter, coarse to fine, on the very pyramid `register.demons` uses.

    The multi-resolution wrapper of the SimpleITK notebooks (`multiscale_demons`: the filter's
    `Execute` on each level from the previous level's field, resampled onto the finer grid), fed
    with teachreg's windowed images and pyramid so that only the demons themselves differ. Each
    level's spacing is its voxel size in finest voxels, so fields come back in finest voxels.
    Returns a `register.Result` (seconds: the filter and the field resampling, not the pyramid).
    """
    import SimpleITK as sitk

    from teachreg import register

    moving_t, fixed_t = register._pair(moving, fixed, levels, coarsest=2, window="each")
    full = np.asarray(fixed_t.shape[1:4], np.float64)
    pyramid = []
    for moving_l, fixed_l in register._pyramid(moving_t, fixed_t, levels, 0.0):
        spacing = (full - 1) / np.maximum(np.asarray(fixed_l.shape[1:4]) - 1, 1)  # z, y, x
        images = [sitk.GetImageFromArray(image.numpy()[0, ..., 0]) for image in (moving_l, fixed_l)]
        for image in images:
            image.SetSpacing([float(s) for s in spacing[::-1]])
        pyramid.append(images)
    demons = sitk.DiffeomorphicDemonsRegistrationFilter() if diffeomorphic else sitk.DemonsRegistrationFilter()
    demons.SetSmoothDisplacementField(field_sigma > 0)
    demons.SetStandardDeviations(field_sigma)
    start = time.perf_counter()
    field = None
    for level, (moving_l, fixed_l) in enumerate(pyramid):
        if field is None:
            field = sitk.Image(fixed_l.GetSize(), sitk.sitkVectorFloat64, 3)
            field.CopyInformation(fixed_l)
        else:
            field = sitk.Resample(field, fixed_l)
        demons.SetNumberOfIterations(int(steps[level]))
        field = demons.Execute(fixed_l, moving_l, field)
    seconds = time.perf_counter() - start
    ddf = sitk.GetArrayFromImage(field)[..., ::-1][None].astype(np.float32)  # (x, y, z) mm -> (z, y, x) voxels
    return register.Result(ddf=tf.constant(ddf), seconds=seconds)


def demons_figures(repeats: int) -> dict:
    """`register.demons` (defaults) against SimpleITK's demons filters with the same levels, steps and
    sigma, on the prostate pair in both directions, interleaved. Per contender: the median over
    `repeats` runs after a first call (`first_seconds`: ours includes XLA compiling the steps)."""
    import inspect

    from teachreg import data, metrics, register

    defaults = {k: v.default for k, v in inspect.signature(register.demons).parameters.items()
                if v.default is not inspect.Parameter.empty}
    same = dict(levels=defaults["levels"], steps=register._per_level(defaults["steps"], defaults["levels"]),
                field_sigma=defaults["field_sigma"])
    pair = data.load("prostate_mr")
    out = {"settings": {**same, "steps": list(same["steps"])}}
    for direction, (moving, fixed) in (("0_onto_1", (pair.moving, pair.fixed)), ("1_onto_0", (pair.fixed, pair.moving))):
        gland, fixed_gland = moving.labels[..., 0].astype(np.float32), fixed.labels[..., 0]
        contenders = {
            "teachreg_demons": lambda: register.demons(moving.image, fixed.image),
            "sitk_demons": lambda: sitk_demons(moving.image, fixed.image, False, **same),
            "teachreg_diffeomorphic": lambda: register.demons(moving.image, fixed.image, diffeomorphic=True),
            "sitk_diffeomorphic": lambda: sitk_demons(moving.image, fixed.image, True, **same),
        }
        runs = {name: [] for name in contenders}
        for _ in range(repeats + 1):
            for name, register_pair in contenders.items():
                result = register_pair()
                runs[name].append(dict(dice=metrics.dice(result.warp_label(gland), fixed_gland),
                                       folding=metrics.folding_fraction(result.ddf), seconds=result.seconds))
        row = {"dice_before": round(metrics.dice(gland, fixed_gland), 4)}
        for name, rows in runs.items():
            later = rows[1:] or rows
            row[name] = {key: round(statistics.median(r[key] for r in later), 4) for key in rows[0]}
            row[name]["first_seconds"] = round(rows[0]["seconds"], 4)
        for variant in ("demons", "diffeomorphic"):
            ours, peer = row[f"teachreg_{variant}"], row[f"sitk_{variant}"]
            row[f"{variant}_dice_minus_sitk"] = round(ours["dice"] - peer["dice"], 4)
            row[f"{variant}_seconds_over_sitk"] = round(ours["seconds"] / peer["seconds"], 2)
        out[direction] = row
    return out


def network_figures(classical: int) -> dict:
    """The pretrained lung CT network on every test pair, and `classical` pairs also by `register.nonrigid`
    with `presets.LUNG_CLASSICAL`, as in chapter 5; "refined": the network's DDF refined by
    `presets.LUNG_REFINE_STEPS` of that optimiser on every pair, as chapter 5's default (seconds include
    the network's pass)."""
    from teachreg import data, evaluate, lung, network, presets, register

    lung.build(splits=("test",), progress=False)
    pairs = data.load_paired(split="test")
    model = network.load_pretrained("lung_ct")
    report = evaluate.evaluate(model, pairs, classical=classical)
    mean = report["mean"]
    if classical:
        mean["speed_up"] = mean["classical_seconds"] / mean["seconds"]
        mean["dice_minus_classical"] = mean["dice_after"] - mean["classical_dice_after"]
    short = {**presets.LUNG_CLASSICAL, "steps": presets.LUNG_REFINE_STEPS}
    register.nonrigid(pairs[0].moving.image, pairs[0].fixed.image, **{**short, "steps": 1})  # compiles the steps
    refined = []
    for pair in pairs:
        result = evaluate.network_then_optimiser(model, pair.moving.image, pair.fixed.image)
        refined.append({**evaluate.accuracy(result.ddf.numpy(), pair), "seconds": result.seconds})
    refined_mean = {key: float(np.mean([r[key] for r in refined])) for key in refined[0]}
    refined_mean["tre_ratio"] = refined_mean["tre_mm"] / refined_mean["initial_mm"]
    if classical:
        refined_mean["speed_up"] = mean["classical_seconds"] / refined_mean["seconds"]
    def rounded(row):
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}

    return {"pairs": [rounded(r) for r in report["pairs"]], "mean": rounded(mean),
            "refined": {"steps": list(presets.LUNG_REFINE_STEPS), "mean": rounded(refined_mean)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--nonrigid", type=int, default=3, metavar="N",
                        help="runs of each prostate registration in each direction, ours and elastix's (0 skips them)")
    parser.add_argument("--store-elastix", action="store_true", help="save elastix's figures for the book")
    parser.add_argument("--demons", type=int, default=2, metavar="N",
                        help="runs of each prostate demons registration, ours and SimpleITK's, after a first call "
                             "(0 skips them)")
    parser.add_argument("--classical", type=int, default=2, metavar="N",
                        help="lung test pairs also registered by the classical optimiser (-1 skips the network)")
    args = parser.parse_args()
    devices = ["/CPU:0"] + [f"/GPU:{i}" for i, _ in enumerate(tf.config.list_physical_devices("GPU"))]
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "tensorflow": tf.__version__, "devices": devices},
    }
    for device in devices:
        report[device] = {
            "warp": warp_figures(device, args.size, args.repeats),
            "lncc_bending": loss_figures(device, args.repeats),
        }
    if args.nonrigid:
        report["prostate_nonrigid"] = nonrigid_figures(args.nonrigid, args.store_elastix)
    if args.demons:
        report["prostate_demons"] = demons_figures(args.demons)
    if args.classical >= 0:
        report["lung_network"] = network_figures(args.classical)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
