"""Which is new to the lung network on a test pair, the patient or the breathing motion?

`teachreg.lung` splits by both: a test pair has a CT and a motion that training never saw.
This crosses them. Every CT of either split (4 train, 2 test) is paired with every motion that
starts at its breathing state (15 train and 3 test patients' motions), built as `lung.build`
builds pairs but with the grid centred (no random shift), and the pretrained network predicts
each DDF. Printed: per group of (CT split, motion split), and per test CT and test patient, the
TRE ratio (mean TRE over mean initial displacement, in the fixed lungs, as `evaluate.evaluate`)
and the mean Dice of the lung masks after warping. About 12 minutes on a 2-core CPU (36 mask
registrations, 108 pairs). `--out FILE` also saves every pair's figures as JSON.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from teachreg import evaluate, lung, network
from teachreg.data import DataError


def motions() -> list[tuple[str, str, lung.Motion]]:
    """(split, patient, motion) for every patient of `lung.MOTIONS`, one motion from each breathing state."""
    found = []
    for split, patients in lung.MOTIONS.items():
        for kind, case in patients:
            try:
                motions = lung.patient_motions(kind, case)  # both states, the course's grid
            except DataError as err:  # left out of the splits too (lung.split_parts)
                print(f"left out: {err}")
                continue
            found += [(split, lung.patient_name(kind, case), m) for m in motions]
    return found


def crossed(model) -> list[dict]:
    """The network's accuracy (`evaluate.accuracy`) on every CT with every motion of its state."""
    rows = []
    all_motions = motions()
    for ct, loader, state, ct_split in lung.CTS:
        source = lung.prepare_ct(loader(), state, ct)
        for motion_split, patient, motion in all_motions:
            if motion.source != state or lung.landmarks_inside(source, motion) < lung.INSIDE_FRACTION:
                continue  # as the splits couple them
            pair, _ = lung.make_pair(source, motion, f"{ct}/{motion.name}")
            ddf = model.predict_ddf(pair.moving.image, pair.fixed.image,
                                    masks=evaluate.lung_masks(pair) if model.masks else None)
            row = evaluate.accuracy(ddf, pair)
            row.update(ct=ct, ct_split=ct_split, motion=motion.name,
                       patient=patient, motion_split=motion_split)
            rows.append(row)
            print(f"{ct:14s} {motion.name:20s} "
                  f"TRE {row['tre_mm']:5.2f} of {row['initial_mm']:5.2f} mm", flush=True)
    return rows


def summary(label: str, rows: list[dict]) -> str:
    ratios = [r["tre_mm"] / r["initial_mm"] for r in rows]
    ratio = np.mean([r["tre_mm"] for r in rows]) / np.mean([r["initial_mm"] for r in rows])
    dice = np.mean([r["dice_after"] for r in rows])
    return (f"{label:34s} {len(rows):3d} {ratio:6.3f} ({min(ratios):.2f}-{max(ratios):.2f})"
            f" {dice:6.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="save every pair's figures to this JSON file")
    args = parser.parse_args()
    rows = crossed(network.load_pretrained("lung_ct"))
    if args.out:
        with open(args.out, "w") as file:
            json.dump(rows, file, indent=1, default=float)
    print(f"\n{'CT and motion':34s} {'n':>3s} {'TRE ratio (range)':>18s} {'Dice':>6s}")
    for ct_split in ("train", "test"):
        for motion_split in ("train", "test"):
            group = [r for r in rows if (r["ct_split"], r["motion_split"]) == (ct_split, motion_split)]
            print(summary(f"{ct_split} CTs, {motion_split} motions", group))
    print()
    test_patients = sorted({r["patient"] for r in rows if r["motion_split"] == "test"})
    for patient in test_patients:
        group = [r for r in rows if r["patient"] == patient and r["ct_split"] == "train"]
        print(summary(f"train CTs, {patient}", group))
    for ct, *_, ct_split in lung.CTS:
        if ct_split == "test":
            print(summary(f"{ct}, train motions",
                          [r for r in rows if r["ct"] == ct and r["motion_split"] == "train"]))


if __name__ == "__main__":
    main()
