"""The motion library's raw material: thin-plate-spline motions fitted to real keypoints, as JSON.

For every Learn2Reg lung case with both masks and keypoints in the data mirror, every DIR-Lab
COPD case (masks and keypoints) and every DIR-Lab 4D-CT case (dense landmarks, no images), a TPS
(`teachreg.landmarks`) is fitted on the inspiration grid (fixed = inspiration, moving =
expiration: the field pulls the expiration state onto the inspiration one). Reported per motion:
the error at the 20 % of the points held out of the fit (mean, median, 90th percentile, mm) beside
their initial distance; where masks exist, the fitted field from all points on the full grid and
the Dice of the expiration mask warped by it against the inspiration mask (and before), its
folded voxel fraction, its size in mm inside the inspiration lungs (mean, 95th percentile) and
the seconds taken. Beside the TPS, the motions `teachreg.lung` fits on its grid (expiration to
inspiration, halved grid): from the masks alone and from the masks with the keypoints
(`lung.estimate_motion`), each with its mask Dice, error at the same held-out keypoints, folded
fraction, size and seconds. `python benchmarks/motions.py [--smoothness MM] [--step N]
[--cases l2r_001 copd_01 ...]` (default: every case).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from teachreg import data, landmarks, lung, metrics, presets, spatial
from teachreg.data import loaders


def _summary(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()), "median": float(np.median(values)), "p90": float(np.percentile(values, 90))}


def masked_motion(name: str, masks: data.Pair, inspiration, expiration, smoothness: float, step: int) -> dict:
    spacing = masks.fixed.spacing
    insp_lung, exp_lung = masks.fixed.labels[..., 0] > 0, masks.moving.labels[..., 0] > 0
    start = time.perf_counter()
    held_out = landmarks.held_out_error(inspiration, expiration, spacing, smoothness=smoothness)
    ddf = landmarks.tps_ddf(inspiration, expiration, insp_lung.shape, spacing, smoothness, step)
    seconds = time.perf_counter() - start
    warped = spatial.warp(exp_lung[None].astype(np.float32), ddf).numpy()[0] > 0.5
    size = metrics.displacement_mm(ddf, spacing)[insp_lung]
    return {
        "motion": name, "points": len(inspiration), "held_out_mm": held_out,
        "dice_before": metrics.dice(exp_lung, insp_lung), "dice_after": metrics.dice(warped, insp_lung),
        "folding_fraction": metrics.folding_fraction(ddf),
        "motion_mm": {"mean": float(size.mean()), "p95": float(np.percentile(size, 95))},
        "seconds": round(seconds, 1),
    }


def lung_fits(name: str, masks: data.Pair, inspiration, expiration) -> dict:
    """The mask-only and the combined (masks + keypoints) motion of `teachreg.lung`, expiration -> inspiration,
    both measured at the combined fit's held-out keypoints (those within the masks' common slices)."""
    fits = {fit: lung.estimate_motion(masks.moving, masks.fixed, name, "expiration", pairs=pairs)
            for fit, pairs in (("masks_only", None), ("masks_and_keypoints", (expiration, inspiration)))}
    combined = fits["masks_and_keypoints"]
    z0, z1 = combined.stats["field_of_view_slices"]
    kept = np.all([(p[:, 0] >= z0) & (p[:, 0] <= z1) for p in (inspiration, expiration)], axis=0)
    spacing = np.asarray(presets.LUNG_SPACING)
    target, source = ((p[kept] * np.asarray(masks.fixed.spacing) - combined.origin) / spacing
                      for p in (inspiration, expiration))
    held, _ = lung._held_out_split(len(target))
    out = {}
    for fit, motion in fits.items():
        out[fit] = {key: motion.stats[key] for key in ("dice_before", "dice", "mm_mean", "mm_p95", "seconds")}
        out[fit] |= {"folding_fraction": metrics.folding_fraction(motion.ddf),
                     "held_out_mm_mean": float(lung._point_error(motion.ddf, target[held], source[held], spacing).mean())}
    out["masks_and_keypoints"] |= {k: v for k, v in combined.stats.items() if k.startswith(("held_out", "initial", "points"))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoothness", type=float, default=0.0, help="TPS lambda in mm (0 interpolates)")
    parser.add_argument("--step", type=int, default=1, help="evaluate the TPS every STEP voxels, then interpolate")
    parser.add_argument("--cases", nargs="+", metavar="NAME", help="only these motions (l2r_001, copd_01, "
                        "dirlab4dct_1, ...)")
    args = parser.parse_args()

    def wanted(name: str) -> bool:
        return args.cases is None or name in args.cases

    def report(name, masks, inspiration, expiration) -> None:
        motions.append(masked_motion(name, masks, inspiration, expiration, args.smoothness, args.step))
        motions[-1]["lung_fits"] = lung_fits(name, masks, inspiration, expiration)
        print(json.dumps(motions[-1]), flush=True)

    motions = []
    for split in ("train", "test"):
        for case in loaders._lung_cases(split):
            if wanted(f"l2r_{case:03d}"):
                inspiration, expiration = data.load("lung_keypoints_l2r", case=case)
                report(f"l2r_{case:03d}", data.load("lung_masks", case=case, split=split), inspiration, expiration)
    for case in range(1, 11):
        if wanted(f"copd_{case:02d}"):
            report(f"copd_{case:02d}", *data.load("lung_motion_copd", case=case))
    paths = data.fetch("lung_landmarks_dirlab4dct")
    for case, (_, spacing) in data.DIRLAB_4DCT_GRIDS.items():
        if not wanted(f"dirlab4dct_{case}"):
            continue
        inspiration, expiration = data.read_landmarks(paths[f"lung_motion/dirlab4dct/dense_case{case}.mat"])
        start = time.perf_counter()
        held_out = landmarks.held_out_error(inspiration, expiration, spacing, smoothness=args.smoothness)
        motions.append({"motion": f"dirlab4dct_{case}", "points": len(inspiration), "held_out_mm": held_out,
                        "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(motions[-1]), flush=True)
    summary = {}
    for group in ("l2r", "copd", "dirlab4dct"):
        rows = [m for m in motions if m["motion"].startswith(group)]
        if not rows:
            continue
        summary[group] = {"motions": len(rows)} | {
            key: float(np.mean([m["held_out_mm"][key] for m in rows])) for key in ("mean", "initial_mean")}
        if "dice_after" in rows[0]:
            summary[group] |= {f"{key}_{stat.__name__}": float(stat([m[key] for m in rows]))
                               for key in ("dice_before", "dice_after") for stat in (np.mean, np.min)}
            summary[group]["folding_fraction_max"] = float(np.max([m["folding_fraction"] for m in rows]))
            for fit in ("masks_only", "masks_and_keypoints"):
                summary[group][fit] = {f"{key}_mean": float(np.mean([m["lung_fits"][fit][key] for m in rows]))
                                       for key in ("dice", "held_out_mm_mean", "folding_fraction", "seconds")}
    print(json.dumps({"smoothness": args.smoothness, "step": args.step, "summary": summary, "motions": motions}, indent=1))


if __name__ == "__main__":
    main()
