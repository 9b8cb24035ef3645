"""Figures for the course: slices, label overlays, deformed grids, live loss curves and block diagrams (matplotlib).

Volumes are NumPy arrays `[D, H, W]` (z, y, x); a slice `k` is `volume[k]`, shown with rows
down and columns across. Label overlays use the Okabe-Ito palette, which readers with the
common colour-vision deficiencies can tell apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

__all__ = [
    "BOOK_STYLE",
    "COLUMN_WIDTH",
    "FOLDED_COLOUR",
    "LABEL_COLOURS",
    "LiveLoss",
    "OKABE_ITO",
    "OVERLAP_COLOURS",
    "PLANES",
    "contours",
    "ct_window",
    "deformed_grid",
    "diagram",
    "overlap_image",
    "show_jacobian",
    "show_overlap",
    "show_slice_grid",
    "show_slices",
]

COLUMN_WIDTH = 6.2
"""The widest figure (inches) that the book shows at its natural size under `BOOK_STYLE`:
6.2 in x 110 dpi = 682 px, inside the 688 px the rendered book gives an output on a laptop."""
BOOK_STYLE = {"figure.dpi": 110, "font.size": 8, "axes.titlesize": 9, "legend.fontsize": 7}
"""The chapters' matplotlib settings, `plt.style.use(plots.BOOK_STYLE)`: text 8 pt, 12 px tall."""

# Okabe & Ito (2008), "Color Universal Design": distinguishable with deuteranopia and protanopia.
OKABE_ITO = {
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
}
LABEL_COLOURS = tuple(OKABE_ITO.values())
"""The colour of label channel `c` is `LABEL_COLOURS[c % 7]`: orange, sky blue, bluish green, ..."""
FOLDED_COLOUR = OKABE_ITO["bluish_green"]
"""The colour `show_jacobian` gives folded voxels (determinant <= 0): in no diverging map of red and blue."""
OVERLAP_COLOURS = {
    "true positive": OKABE_ITO["bluish_green"],
    "false positive": OKABE_ITO["orange"],
    "false negative": OKABE_ITO["blue"],
}


def ct_window(image: np.ndarray, centre: float = 40.0, width: float = 400.0) -> np.ndarray:
    """Map Hounsfield units to [0, 1] with a display window (soft tissue by default)."""
    return np.clip((np.asarray(image, np.float32) - (centre - width / 2)) / width, 0.0, 1.0)


def show_slices(
    volumes: Sequence[np.ndarray],
    titles: Sequence[str],
    index: int | None = None,
    labels: Sequence[np.ndarray | None] | None = None,
    spacing: Sequence[float] | None = None,
    cmap: str = "gray",
    suptitle: str | None = None,
):
    """Show slice `index` (default: the middle) of each volume `[D, H, W]` side by side.

    `labels`: optional masks `[D, H, W]` or `[D, H, W, L]` drawn as coloured contours.
    `spacing` (mm, z y x) sets the pixel aspect ratio. Returns the figure.
    """
    index = volumes[0].shape[0] // 2 if index is None else index
    return show_slice_grid(volumes, titles, [index], spacing=spacing, labels=labels, cmap=cmap, suptitle=suptitle)


def contours(ax, label_slice: np.ndarray, linestyle: str = "solid", linewidth: float = 1.2, **kwargs) -> None:
    """Draw each label channel of a slice `[H, W]` or `[H, W, L]` as a 0.5 contour in its colour.

    Channel `c` is drawn in `LABEL_COLOURS[c]`; one without voxels both above and below 0.5 in
    the slice (no edge) is skipped.
    `kwargs` (`extent`, `origin`, ...) go to `ax.contour`, e.g. to draw in mm.
    """
    channels = label_slice[..., None] if label_slice.ndim == 2 else label_slice
    for c in range(channels.shape[-1]):
        if channels[..., c].max() > 0.5 and channels[..., c].min() < 0.5:
            ax.contour(channels[..., c], levels=[0.5], colors=[LABEL_COLOURS[c % len(LABEL_COLOURS)]],
                       linestyles=linestyle, linewidths=linewidth, **kwargs)


def show_jacobian(determinant: np.ndarray, ax=None, spread: float = 1.0, cmap: str = "RdBu_r", title: str = "",
                  **kwargs):
    """Show a slice `[H, W]` of a Jacobian determinant map in a diverging colour map centred on 1.

    `determinant`: a slice of `spatial.jacobian_determinant(ddf)[0]` (no unit: a volume ratio).
    Colours run from `1 - spread` (compression) to `1 + spread` (expansion); folded voxels
    (determinant <= 0) are drawn on top in `FOLDED_COLOUR`, so that they stand out from strong
    compression. `kwargs` (`extent`, ...) go to `ax.imshow`. Returns the determinant's image,
    for a colour bar.
    """
    ax = ax or plt.gca()
    image = ax.imshow(determinant, cmap=cmap, vmin=1 - spread, vmax=1 + spread, **kwargs)
    folded = np.ma.masked_where(np.asarray(determinant) > 0, np.ones(np.shape(determinant)))
    ax.imshow(folded, cmap=ListedColormap([FOLDED_COLOUR]), vmin=0, vmax=1, interpolation="nearest",
              **{k: v for k, v in kwargs.items() if k in ("extent", "aspect", "origin")})
    ax.set_title(title)
    return image


def diagram(boxes: dict, arrows: Sequence, size: tuple[float, float], title: str = "", ax=None):
    """A block diagram: boxes of text joined by arrows that stop at the boxes' edges. Returns the figure.

    size: the diagram's coordinates, x from 0 to width and y from 0 to height, and the figure's
    (width, height) in inches, scaled down to `COLUMN_WIDTH` if wider. boxes: `{name: (x, y, text, colour)}`: the centre of each box,
    its text (several lines allowed) and an `OKABE_ITO` colour name for its fill. arrows:
    `(start, end, label, bend)`: the names of two boxes, a label ("" for none) written above the
    midpoint of the two boxes' centres for a level arrow or to its right for any other (beside a
    straight arrow; a bent one passes elsewhere), and the arrow's curvature (0: straight;
    as matplotlib's "arc3" connection style, positive bends it to the right of its direction).
    ax: draw into these axes (one panel of a figure of several diagrams) instead of a new figure;
    `size` then gives only the coordinates.
    """
    if ax is None:
        fit = min(1.0, COLUMN_WIDTH / size[0])
        _, ax = plt.subplots(figsize=(size[0] * fit, size[1] * fit), layout="constrained")
    ax.set(xlim=(0, size[0]), ylim=(0, size[1]))
    ax.axis("off")
    texts = {
        name: ax.text(x, y, text, ha="center", va="center",
                      bbox={"boxstyle": "round,pad=0.5", "ec": "0.3", "fc": OKABE_ITO[colour] + "55"})
        for name, (x, y, text, colour) in boxes.items()
    }
    for start, end, label, bend in arrows:
        ax.annotate("", xy=(0.5, 0.5), xycoords=texts[end], xytext=(0.5, 0.5), textcoords=texts[start],
                    arrowprops={"arrowstyle": "-|>", "lw": 1.4, "color": "0.2", "shrinkA": 2, "shrinkB": 2,
                                "patchA": texts[start].get_bbox_patch(), "patchB": texts[end].get_bbox_patch(),
                                "connectionstyle": f"arc3,rad={bend}"})
        if label:
            (x0, y0, *_), (x1, y1, *_) = boxes[start], boxes[end]
            level = abs(y1 - y0) < 0.3
            ax.text((x0 + x1) / 2 + (0 if level else 0.1), (y0 + y1) / 2 + (0.08 if level else 0), label,
                    fontsize="small", ha="center" if level else "left", va="bottom" if level else "center")
    ax.set_title(title)
    return ax.figure


def overlap_image(truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Classify pixels of two binary masks: 0 background, 1 true positive, 2 false positive, 3 false negative."""
    truth, prediction = np.asarray(truth) > 0.5, np.asarray(prediction) > 0.5
    out = np.zeros(truth.shape, np.uint8)
    out[truth & prediction] = 1
    out[~truth & prediction] = 2
    out[truth & ~prediction] = 3
    return out


def show_overlap(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, ax=None, title: str = "",
                 aspect: float = 1.0, legend: bool = True):
    """Overlay true positives, false positives and false negatives of two 2-D masks on a 2-D image.

    `legend`: name the three colours in the panel (pass False to all but one panel of a figure).
    """
    ax = ax or plt.gca()
    ax.imshow(image, cmap="gray", aspect=aspect)
    cmap = ListedColormap(["none", *OVERLAP_COLOURS.values()])
    ax.imshow(overlap_image(truth, prediction), cmap=cmap, vmin=0, vmax=3, alpha=0.75, interpolation="nearest", aspect=aspect)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in OVERLAP_COLOURS.values()]
    if legend:
        ax.legend(handles, list(OVERLAP_COLOURS), loc="lower right", fontsize="small", framealpha=0.8)
    ax.set_title(title)
    ax.axis("off")
    return ax


def deformed_grid(ddf_slice: np.ndarray, ax=None, step: int = 4, colour: str = OKABE_ITO["blue"], title: str = ""):
    """Draw the grid lines of a 2-D slice of a DDF, `[H, W, 2]` (row and column displacements, voxels).

    Each grid point `x` is drawn at `x + ddf(x)`: where the transform sends it to sample the moving image.
    """
    ax = ax or plt.gca()
    rows, cols = np.meshgrid(np.arange(ddf_slice.shape[0]), np.arange(ddf_slice.shape[1]), indexing="ij")
    y, x = rows + ddf_slice[..., 0], cols + ddf_slice[..., 1]
    for r in range(0, y.shape[0], step):
        ax.plot(x[r], y[r], color=colour, linewidth=0.8)
    for c in range(0, y.shape[1], step):
        ax.plot(x[:, c], y[:, c], color=colour, linewidth=0.8)
    ax.set_aspect("equal")
    ax.invert_yaxis()
    ax.set_title(title)
    ax.axis("off")
    return ax


class LiveLoss:
    """A loss curve that redraws itself during an optimisation; pass it as the `callback`.

    In a notebook the figure updates in place every `every` steps (one output, so the stored
    notebook keeps only the final curve); elsewhere it just records the values.
    """

    def __init__(self, every: int = 10, title: str = "loss during optimisation", logy: bool = False):
        from IPython.display import display

        self.every, self.title, self.logy = every, title, logy
        self.values: list[float] = []
        self.levels: list[int] = []
        self.fig, self.ax = plt.subplots(figsize=(5, 2.5))
        plt.close(self.fig)  # shown through the display handle only
        self.handle = display(self.fig, display_id=True)

    def __call__(self, level: int, step: int, value: float) -> None:
        self.values.append(value)
        self.levels.append(level)
        if len(self.values) % self.every == 0:
            self.draw()

    def draw(self) -> None:
        """Redraw the curve with every value so far, one colour per pyramid level."""
        self.ax.clear()
        steps, levels = np.arange(len(self.values)), np.asarray(self.levels)
        colours = list(OKABE_ITO.values())
        for level in np.unique(levels):
            at = levels == level
            self.ax.plot(steps[at], np.asarray(self.values)[at], color=colours[level % len(colours)], label=f"level {level}")
        self.ax.set_xlabel("step")
        self.ax.set_ylabel("loss")
        if self.logy:
            self.ax.set_yscale("log")
        self.ax.set_title(self.title)
        self.ax.legend()
        self.fig.tight_layout()
        if self.handle is not None:
            self.handle.update(self.fig)


PLANES = ("axial", "coronal", "sagittal")
"""The names of the cuts along axes 0, 1 and 2 of a (z, y, x) volume."""


def show_slice_grid(
    volumes: Sequence[np.ndarray],
    titles: Sequence[str],
    indices: Sequence[int],
    axis: int = 0,
    spacing: Sequence[float] | None = None,
    labels: Sequence[np.ndarray | None] | None = None,
    cmap: str = "gray",
    suptitle: str | None = None,
    panel: float = 2.0,
):
    """Show several cuts of each volume `[D, H, W]`: one row per index in `indices`, one column per volume.

    `axis` 0 cuts axial slices `volume[k]` (anterior at the top); 1 and 2 cut coronal `volume[:, k]`
    and sagittal `volume[:, :, k]` reformats, drawn with z (inferior to superior) upwards.
    `spacing` (mm, z y x) sets the pixel aspect ratio. `labels`: per volume, masks `[D, H, W]` or
    `[D, H, W, L]` drawn as contours, or None. Each volume keeps one grey range in all its cuts.
    `panel`: the width of one cut in inches, at most `COLUMN_WIDTH` over the number of volumes.
    Returns the figure.
    """
    spacing = (1.0, 1.0, 1.0) if spacing is None else spacing
    kept = [i for i in range(3) if i != axis]  # the cut's (rows, columns) axes
    aspect = spacing[kept[0]] / spacing[kept[1]]
    height_ratio = volumes[0].shape[kept[0]] * aspect / volumes[0].shape[kept[1]]
    panel = min(panel, COLUMN_WIDTH / len(volumes))
    fig, axes = plt.subplots(
        len(indices), len(volumes), figsize=(panel * len(volumes), panel * height_ratio * len(indices) + 0.5),
        squeeze=False,
    )
    for r, index in enumerate(indices):
        for c, volume in enumerate(volumes):
            ax = axes[r, c]
            origin = "upper" if axis == 0 else "lower"
            ax.imshow(np.take(volume, index, axis=axis), cmap=cmap, aspect=aspect, origin=origin,
                      vmin=np.min(volume), vmax=np.max(volume))
            if labels is not None and labels[c] is not None:
                contours(ax, np.take(labels[c], index, axis=axis))
            ax.set_title(f"{titles[c]}, {PLANES[axis]} {index}", fontsize="medium")
            ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig
