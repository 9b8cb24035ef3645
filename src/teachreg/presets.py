"""Settings used in more than one place (chapters, command line, `make bench`), each written once.

Plain Python values, no TensorFlow: the command line reads them before it loads anything heavy.
"""

from __future__ import annotations

__all__ = ["LUNG_CLASSICAL", "LUNG_GRID", "LUNG_REFINE_STEPS", "LUNG_SPACING"]

LUNG_GRID = (104, 96, 96)
"""Voxels (z, y, x) of the lung CT pairs: half the Learn2Reg grid (208 x 192 x 192)."""

LUNG_SPACING = (3.5, 2.5, 3.5)
"""Voxel size in mm (z, y, x) of the lung CT pairs: twice Learn2Reg's 1.75 x 1.25 x 1.75 mm."""

LUNG_CLASSICAL = dict(transform="bspline", grid_spacing=8, regulariser="l2", regulariser_weight=0.1,
                      learning_rate=0.2, levels=3, steps=(100, 100, 100), crop_levels=2)
"""`register.nonrigid`'s options for the classical registration the lung network is compared with
(chapter 5 and `make bench`): chapter 4's optimiser with LNCC, a B-spline grid every 8 voxels and
the diffusion regulariser, random half-size boxes at the two finest levels (`register.nonrigid`'s
`crop` and `crop_levels`): on the 10 test pairs as accurate as boxes at the finest level only (mean
TRE 1.77 mm, Dice 0.978, both) in 4.5 s instead of 6.3 s on a 2-core CPU; it sees no labels, as
the network at inference."""

LUNG_REFINE_STEPS = (20, 40, 20)
"""Steps per level of `LUNG_CLASSICAL` started from the network's DDF: chapter 5's "old and new
together" (about 1.5 s a pair on a 2-core CPU)."""
