"""The `teachreg` command line: `teachreg data list|fetch|verify|page|build-lung`, `teachreg train`,
`teachreg register` and `teachreg warp`.

Each command group adds its subcommands in its own `_add_*` function; a subcommand sets
`func` (called with the parsed arguments, returns the exit status).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from teachreg import data, presets

__all__ = ["build_parser", "main"]


def _data_list(args: argparse.Namespace) -> int:
    rows = [("dataset", "files", "size", "cached", "licence")]
    for d in data.manifest().values():
        cached = "yes" if data.is_cached(d.name) else "no"
        rows.append((d.name, str(len(d.files)), f"{d.size / 2**20:.1f} MiB", cached, d.license))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4])
    print(f"\ncache: {data.data_dir()}")
    return 0


def _data_fetch(args: argparse.Namespace) -> int:
    for name in args.names or list(data.manifest()):
        paths = data.fetch(name, progressbar=True)
        print(f"{name}: {len(paths)} files in {data.data_dir()}")
    return 0


def _data_verify(args: argparse.Namespace) -> int:
    for path in data.remove_leftovers(args.names or None):
        print(f"removed {path} (the temporary file of an interrupted download)")
    bad = data.verify(args.names or None)
    for path in bad:
        if path.is_dir():
            print(f"BAD {path}: a directory where a cached file should be; move it away or delete it")
        else:
            print(f"BAD {path}: does not match its SHA-256; `teachreg data fetch` downloads it again")
    if bad:
        return 1
    names = args.names or list(data.manifest())
    missing = [name for name in names if not data.is_cached(name)]
    if args.names and missing:
        print(f"not cached: {', '.join(missing)} (`teachreg data fetch NAME` downloads a dataset)")
    if not args.names and len(missing) == len(names):
        print(f"nothing is cached in {data.data_dir()}; `teachreg data fetch NAME` downloads a dataset")
    elif len(missing) < len(names):
        print(f"all cached files match their SHA-256 ({data.data_dir()})")
    return 0


def _data_page(args: argparse.Namespace) -> int:
    sys.stdout.write(data.manifest_markdown())
    return 0


def _add_data(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """`teachreg data ...`; returns the group's subcommands, so that others can join them."""
    group = commands.add_parser("data", help="list, download, check and build the course's datasets")
    sub = group.add_subparsers(dest="data_command", required=True)
    sub.add_parser("list", help="datasets, sizes, licences, whether cached").set_defaults(
        func=_data_list
    )
    fetch = sub.add_parser("fetch", help="download datasets (default: all) into the cache")
    fetch.add_argument("names", nargs="*", metavar="NAME", help="dataset name")
    fetch.set_defaults(func=_data_fetch)
    verify = sub.add_parser("verify", help="re-hash cached files; exit 1 if any is bad")
    verify.add_argument("names", nargs="*", metavar="NAME", help="dataset name")
    verify.set_defaults(func=_data_verify)
    sub.add_parser("page", help="print the book's data page (Markdown)").set_defaults(
        func=_data_page
    )
    return sub


def _train(args: argparse.Namespace) -> int:
    from teachreg import device, train  # TensorFlow loads only for this command

    try:
        config = train.load_config(args.config)
        model, history = train.train(config, output=args.output, epochs=args.epochs,
                                     resume=not args.restart, progress=not args.quiet)
    except (OSError, ValueError) as err:  # a missing file or dataset, a wrong config key or value
        print(f"teachreg: error: {err}", file=sys.stderr)
        return 1
    print(f"trained {len(history)} epochs on {device.description()}; final loss "
          f"{history[-1]['total']:.4f}" if history else "nothing to train")
    return 0


def _add_train(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="train a registration network from a YAML config")
    parser.add_argument("config", metavar="CONFIG.yaml", help="training config (see teachreg.train.DEFAULTS)")
    parser.add_argument("--output", metavar="DIR", help="output folder (default: the config's)")
    parser.add_argument("--epochs", type=int, metavar="N", help="total epochs (default: the config's)")
    parser.add_argument("--restart", action="store_true",
                        help="start afresh: delete the output folder's checkpoints and history")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    parser.set_defaults(func=_train)


def _data_build_lung(args: argparse.Namespace) -> int:
    import json

    motion = args.masks is not None or args.landmarks is not None
    problem = None
    if args.keypoints is not None and args.masks is None:
        problem = "--keypoints needs --masks EXP INSP (the masks on the keypoints' grid)"
    elif args.masks is not None and args.landmarks is not None:
        problem = "give --masks (with --keypoints) or --landmarks, not both: each makes the motion"
    elif (args.landmarks is None) != (args.landmark_spacing is None):
        problem = ("--landmarks FILE.mat needs --landmark-spacing SY SX SZ (its voxel size in mm) and the other way "
                   "round")
    elif args.landmark_spacing is not None and min(args.landmark_spacing) <= 0:
        problem = f"--landmark-spacing must be 3 positive voxel sizes in mm (y, x, z), got {args.landmark_spacing}"
    elif (args.ct is None) == motion:
        given, needed = ("--ct", "--masks or --landmarks") if args.ct is not None else (
            "--masks" if args.masks is not None else "--landmarks", "--ct")
        problem = (f"{given} needs {needed}: give --ct CT --masks EXP INSP (or --landmarks) for a pair made from "
                   "your own CT, or neither for the course's dataset")
    if problem:
        print(f"teachreg: error: {problem}", file=sys.stderr)
        return 2  # a usage error, as argparse's

    from teachreg import lung  # TensorFlow loads only for this command

    try:
        root = lung.build(out=args.out, splits=args.splits, grid=args.grid, spacing=args.spacing,
                          seed=args.seed, ct=args.ct, masks=args.masks, ct_state=args.ct_state, force=args.force,
                          keypoints=args.keypoints, landmarks=args.landmarks, landmark_spacing=args.landmark_spacing)
    except ValueError as err:
        print(f"teachreg: error: {err}", file=sys.stderr)
        return 1
    for split, info in json.loads((root / "build.json").read_text())["splits"].items():
        motions = info["motions"].values()
        dice = [m["dice"] for m in motions if "dice" in m]
        held = [m["held_out_mm_mean"] for m in motions if "held_out_mm_mean" in m]
        print(f"{split}: {len(info['pairs'])} pairs in {root / split}"
              + (f"; mask Dice of the {len(dice)} motions {min(dice):.3f}-{max(dice):.3f}" if dice else "")
              + (f"; held-out point error {min(held):.2f}-{max(held):.2f} mm" if held else ""))
    return 0


def _add_build_lung(data_commands: argparse._SubParsersAction) -> None:
    """`teachreg data build-lung`, one of the `data` group's subcommands."""
    parser = data_commands.add_parser(
        "build-lung", help="build the paired lung CT dataset (real CTs, real breathing motion, true DDFs)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: lung_ct in the data cache)")
    parser.add_argument("--splits", nargs="+", choices=("train", "test"), default=["train", "test"])
    parser.add_argument("--grid", nargs=3, type=int, default=list(presets.LUNG_GRID), metavar=("D", "H", "W"),
                        help="voxels along z, y, x (default: half the Learn2Reg grid)")
    parser.add_argument("--spacing", nargs=3, type=float, default=list(presets.LUNG_SPACING),
                        metavar=("Z", "Y", "X"), help="voxel size in mm")
    parser.add_argument("--seed", type=int, default=0, help="seed of the grid shifts")
    parser.add_argument("--ct", metavar="PATH",
                        help="with --masks: your own chest CT, a NIfTI or NRRD file, or a DICOM folder")
    parser.add_argument("--masks", nargs=2, metavar=("EXP", "INSP"),
                        help="with --ct: one patient's expiration and inspiration lung masks (NIfTI, one grid)")
    parser.add_argument("--keypoints", metavar="FILE",
                        help="with --masks: corrField keypoint pairs on the masks' grid (Learn2Reg .csv or COPD .dat), "
                             "fitted with the masks")
    parser.add_argument("--landmarks", metavar="FILE.mat",
                        help="with --ct, instead of --masks: DIR-Lab landmark pairs (landmark_EE and landmark_EI or "
                             "landmark_new_EI, [y, x, z] voxels); the motion is their thin-plate spline")
    parser.add_argument("--landmark-spacing", nargs=3, type=float, metavar=("SY", "SX", "SZ"),
                        help="with --landmarks: the voxel size of the landmarks' grid in mm, in the file's order")
    parser.add_argument("--ct-state", choices=("inspiration", "expiration"), default="inspiration",
                        help="with --ct: the CT's breathing state")
    parser.add_argument("--force", action="store_true", help="rebuild even if built with these parameters")
    parser.set_defaults(func=_data_build_lung)


def _register(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from teachreg import scans  # TensorFlow loads only for this command

    with tqdm(unit="step", disable=args.quiet) as bar:
        def progress(stage: str, done: int, total: int, loss: float) -> None:
            bar.total = total
            bar.set_description(stage)
            bar.update(done - bar.n)

        try:
            report = scans.register_files(args.moving, args.fixed, args.out, method=args.method,
                                          moving_label=args.moving_label, fixed_label=args.fixed_label,
                                          affine=not args.no_affine, max_voxels=args.max_voxels, force=args.force,
                                          progress=progress)
        except (OSError, ValueError) as err:  # a missing or unreadable file, a bad label, an occupied folder
            bar.close()
            print(f"teachreg: error: {err}", file=sys.stderr)
            return 1
    dice = f"Dice {report['dice_before']:.3f} -> {report['dice_after']:.3f}; " if "dice_after" in report else ""
    print(f"{args.method}: {dice}folded voxels {100 * report['folded_fraction']:.3f} %; {report['seconds']:.1f} s; "
          f"results in {args.out}: {', '.join(report['outputs'])}")
    if report["folded_fraction"] > _FOLDING_WARNING and args.method in ("bspline", "ddf"):
        print(f"teachreg: warning: the field folds {100 * report['folded_fraction']:.2f} % of the voxels, where no tissue "
              "folds; --method demons keeps the transform invertible, and svf folds far less (only by "
              "discretisation)", file=sys.stderr)
    return 0


_FOLDING_WARNING = 0.001
"""`teachreg register` warns when more than this fraction of the voxels fold (0.1 %)."""


def _add_register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "register", help="register two scans (NIfTI, NRRD, MetaImage, DICOM folder): affine, then nonrigid",
        description="Register MOVING to FIXED and write into DIR the warped image (on FIXED's grid and header), "
                    "the displacement field ddf.nii.gz (ITK convention: mm, LPS, pulls fixed points to moving "
                    "ones; SimpleITK, ANTs and 3D Slicer apply it) and report.json.")
    parser.add_argument("moving", metavar="MOVING", help="image to warp: a file or a DICOM folder")
    parser.add_argument("fixed", metavar="FIXED", help="image to match: a file or a DICOM folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--method", default="bspline",
                        help="nonrigid step: bspline (default), ddf or svf (register.nonrigid's defaults, chapter "
                             "4's), demons (diffeomorphic demons, register.demons), or network: the pretrained "
                             "lung CT network, for chest CTs in HU only (teachreg.scans.METHODS)")
    parser.add_argument("--moving-label", metavar="FILE", help="with --fixed-label: binary masks for Dice (not used "
                        "to register)")
    parser.add_argument("--fixed-label", metavar="FILE", help="the fixed image's mask of the same structure")
    parser.add_argument("--no-affine", action="store_true", help="skip the affine step (as chapter 4)")
    parser.add_argument("--max-voxels", type=int, default=2**19, metavar="N",
                        help="register on a grid of at most N voxels (default 2^19 = 524288; the field is then "
                             "brought back to the fixed grid)")
    parser.add_argument("--force", action="store_true", help="replace the results of an earlier run in DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_register)


def _warp(args: argparse.Namespace) -> int:
    if (args.image is None) == (args.points is None):
        print("teachreg: error: give IMAGE (an image or, with --label, a label map) or --points CSV, one of them",
              file=sys.stderr)
        return 2  # a usage error, as argparse's
    from teachreg import files, scans  # TensorFlow loads only for this command

    try:
        if args.image is not None:
            scans.warp_file(args.field, args.image, args.out, label=args.label, force=args.force)
        else:
            if Path(args.out).exists() and not args.force:
                raise ValueError(f"{args.out} exists; give another file, or --force to replace it.")
            points = _read_points(args.points)
            moved = scans.warp_points(args.field, points)
            files.write_atomic(args.out, "x,y,z\n" + "".join(",".join(f"{v:.4f}" for v in p) + "\n" for p in moved))
    except (OSError, ValueError) as err:
        print(f"teachreg: error: {err}", file=sys.stderr)
        return 1
    what = f"{len(points)} points" if args.points else ("label map" if args.label else "image")
    print(f"warped {what} written to {args.out}")
    return 0


def _read_points(path) -> np.ndarray:
    """Points x, y, z (mm) from a CSV file, one per line; a first line with a letter is a header."""
    lines = Path(path).read_text().splitlines()
    lines = lines[1:] if lines and any(c.isalpha() for c in lines[0]) else lines
    try:
        points = np.array([[float(v) for v in line.split(",")] for line in lines if line.strip()], ndmin=2)
    except ValueError:
        raise ValueError(f"{path}: every line must be three numbers x,y,z (mm), separated by commas.") from None
    if points.shape[1:] != (3,):
        raise ValueError(f"{path}: every line must be three numbers x,y,z (mm), got {points.shape[1]} columns.")
    return points


def _add_warp(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "warp", help="apply a saved displacement field to an image, a label map or points",
        description="Warp IMAGE (any grid) with FIELD onto FIELD's grid, or map --points: a pull field maps a "
                    "point p of the FIXED image to p + field(p) in the MOVING image, so --points takes fixed-image "
                    "points to the moving image (the other way needs the inverse field).")
    parser.add_argument("field", metavar="FIELD", help="displacement field (ddf.nii.gz of teachreg register, or "
                        "one from ITK, ANTs or 3D Slicer)")
    parser.add_argument("image", metavar="IMAGE", nargs="?", help="image or label map to warp")
    parser.add_argument("--out", required=True, metavar="FILE", help="warped image (.nii.gz, .nrrd, .mha) or, "
                        "with --points, a CSV")
    parser.add_argument("--label", action="store_true", help="IMAGE is a label map: nearest neighbour, values kept")
    parser.add_argument("--points", metavar="CSV", help="instead of IMAGE: points x,y,z in mm, physical LPS "
                        "coordinates of the fixed image (3D Slicer shows RAS: negate x and y)")
    parser.add_argument("--force", action="store_true", help="replace FILE if it exists")
    parser.set_defaults(func=_warp)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all command groups."""
    parser = argparse.ArgumentParser(prog="teachreg", description="teachreg course tools")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_build_lung(_add_data(commands))
    _add_train(commands)
    _add_register(commands)
    _add_warp(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (1 with a message on a DataError, 130 on Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except data.DataError as err:
        print(f"teachreg: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("teachreg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
