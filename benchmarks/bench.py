"""Speed and accuracy figures for the course, printed as JSON (`make bench`).

Core operations (warping, losses), chapter 4's nonrigid registration against elastix on the
prostate pair, and chapter 5's pretrained lung network against the classical optimiser, alone and
refined by a short run of that optimiser.

Every comparison is measured side by side in one run, interleaving the contenders and taking the
median of repeated runs, because shared machines are noisy. Targets (2-core CPU): the forward warp
of a 128^3 volume no slower than `scipy.ndimage.map_coordinates(order=1)`, forward + gradient
within 3x of the forward warp.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

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


def warp_figures(device: str, size: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    volume_np = rng.uniform(size=(size,) * 3).astype(np.float32)
    ddf_np = rng.uniform(-3, 3, size=(1, size, size, size, 3)).astype(np.float32)
    coords_np = np.moveaxis(spatial.reference_grid((size,) * 3).numpy() + ddf_np[0], -1, 0)
    with tf.device(device):
        volume = tf.Variable(volume_np[None])
        ddf = tf.Variable(ddf_np)
        weights = tf.Variable(rng.normal(size=(1, size, size, size)).astype(np.float32))

        @tf.function(jit_compile=True)
        def forward():
            return spatial.warp(volume, ddf)

        @tf.function(jit_compile=True)
        def forward_and_gradient():
            with tf.GradientTape() as tape:
                value = tf.reduce_sum(spatial.warp(volume, ddf) * weights)
            return tape.gradient(value, ddf)

        contenders = {
            "tf_forward_compiled": lambda: forward().numpy(),
            "tf_forward_and_gradient_compiled": lambda: forward_and_gradient().numpy(),
            "tf_forward_eager_call": lambda: spatial.warp(volume_np[None], ddf_np).numpy(),
        }
        if device.startswith("/CPU"):
            contenders["scipy_map_coordinates_order1"] = lambda: map_coordinates(volume_np, coords_np, order=1, mode="nearest")
        seconds = side_by_side(contenders, repeats)
    out = {f"{k}_s": round(v, 4) for k, v in seconds.items()}
    out["gradient_over_forward"] = round(seconds["tf_forward_and_gradient_compiled"] / seconds["tf_forward_compiled"], 2)
    if "scipy_map_coordinates_order1_s" in out:
        out["forward_over_scipy"] = round(seconds["tf_forward_compiled"] / seconds["scipy_map_coordinates_order1"], 2)
        out["eager_call_over_scipy"] = round(seconds["tf_forward_eager_call"] / seconds["scipy_map_coordinates_order1"], 2)
    return {"shape": [size] * 3, **out}


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
    """Chapter 4's registration against elastix's default maps on the prostate pair, interleaved."""
    from teachreg import data, elastix, metrics, presets, register

    pair = data.load("prostate_mr")
    moving, fixed = pair.moving.image, pair.fixed.image
    gland, fixed_gland = pair.moving.labels[..., 0].astype(np.float32), pair.fixed.labels[..., 0]
    contenders = {"teachreg_bspline": lambda: register.nonrigid(moving, fixed, **presets.PROSTATE_NONRIGID)}
    if elastix.available():
        contenders["elastix_bspline"] = lambda: elastix.register(moving, fixed, maps=("bspline",))
        contenders["elastix_affine_then_bspline"] = lambda: elastix.register(moving, fixed, maps=("affine", "bspline"))
    runs = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, register_pair in contenders.items():
            result = register_pair()
            runs[name].append(dict(dice=metrics.dice(result.warp_label(gland), fixed_gland),
                                   folding=metrics.folding_fraction(result.ddf), seconds=result.seconds))
    out = {"dice_before": round(metrics.dice(gland, fixed_gland), 4)}
    for name, rows in runs.items():
        out[name] = {key: round(statistics.median(r[key] for r in rows), 4) for key in rows[0]}
    if store_elastix and elastix.available():
        import itk

        stored = {"measured": {"date": time.strftime("%Y-%m-%d"), "itk": itk.__version__, "cpus": os.cpu_count(),
                               "command": f"benchmarks/bench.py --nonrigid {repeats} --store-elastix (medians)"},
                  "bspline": out["elastix_bspline"], "affine then bspline": out["elastix_affine_then_bspline"]}
        elastix.STORED.write_text(json.dumps(stored, indent=2) + "\n", encoding="utf-8")
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
    for pair, row in zip(pairs, report["pairs"]):
        initial = register.Result(ddf=tf.constant(model.predict_ddf(pair.moving.image, pair.fixed.image)))
        result = register.nonrigid(pair.moving.image, pair.fixed.image, initial=initial, **short)
        refined.append({**evaluate.accuracy(result.ddf.numpy(), pair),
                        "seconds": row["seconds"] + result.seconds})
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
    parser.add_argument("--nonrigid", type=int, default=2, metavar="N",
                        help="runs of each prostate registration, ours and elastix's (0 skips them)")
    parser.add_argument("--store-elastix", action="store_true", help="save elastix's figures for the book")
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
    if args.classical >= 0:
        report["lung_network"] = network_figures(args.classical)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
