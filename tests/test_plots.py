"""The figures' helpers draw what they say: label contours in the label colours, Jacobian maps centred on 1,
diagrams whose arrows join their boxes."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from teachreg import plots  # noqa: E402


def test_label_colours_are_the_okabe_ito_palette_in_a_fixed_order():
    assert plots.LABEL_COLOURS[:2] == (plots.OKABE_ITO["orange"], plots.OKABE_ITO["sky_blue"])
    assert sorted(plots.LABEL_COLOURS) == sorted(plots.OKABE_ITO.values())


def test_contours_draw_each_present_label_in_its_colour():
    labels = np.zeros((20, 20, 3), np.float32)
    labels[5:10, 5:10, 0] = 1
    labels[12:18, 3:9, 2] = 1  # channel 1 is empty: no contour
    fig, ax = plt.subplots()
    plots.contours(ax, labels, linestyle="--", extent=(0, 38, 19, 0))
    colours = [tuple(c.get_edgecolor()[0]) for c in ax.collections]
    assert colours == [to_rgba(plots.LABEL_COLOURS[0]), to_rgba(plots.LABEL_COLOURS[2])]
    # channel 0 (columns 5 to 9) at its 0.5 level, in mm: 2 mm per column
    vertices = ax.collections[0].get_paths()[0].vertices
    np.testing.assert_allclose([vertices[:, 0].min(), vertices[:, 0].max()], [9.0, 19.0])
    plt.close(fig)


def test_show_jacobian_is_centred_on_one():
    determinant = np.linspace(0.2, 1.6, 12).reshape(3, 4)
    fig, ax = plt.subplots()
    image = plots.show_jacobian(determinant, ax=ax, spread=0.8, title="J")
    np.testing.assert_allclose(image.get_clim(), (0.2, 1.8))
    assert image.get_cmap().name == "RdBu_r"
    assert ax.get_title() == "J"
    np.testing.assert_array_equal(image.get_array(), determinant)
    plt.close(fig)


def test_show_jacobian_draws_folded_voxels_in_their_own_colour():
    determinant = np.full((8, 8), 0.3)  # strong compression everywhere ...
    determinant[2:4, 5:7] = -0.2  # ... and a fold
    determinant[6, 1] = 0.0
    fig, ax = plt.subplots(figsize=(2, 2), dpi=80)
    plots.show_jacobian(determinant, ax=ax, spread=0.5, extent=(0, 8, 8, 0))
    ax.set_position((0, 0, 1, 1))
    ax.axis("off")
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0  # 160 x 160, 20 pixels per voxel
    voxel = lambda row, col: pixels[20 * row + 10, 20 * col + 10]  # noqa: E731
    folded = np.asarray(to_rgba(plots.FOLDED_COLOUR)[:3])
    for row, col in ((2, 5), (3, 6), (6, 1)):
        np.testing.assert_allclose(voxel(row, col), folded, atol=0.02)
    compressed = voxel(0, 0)
    assert np.abs(compressed - folded).max() > 0.2  # compression keeps the map's own colour
    np.testing.assert_allclose(compressed, plt.get_cmap("RdBu_r")(0.0)[:3], atol=0.02)  # 0.3 < 1 - 0.5: clipped
    plt.close(fig)


def test_diagram_joins_boxes_by_arrows_that_stop_at_their_edges():
    boxes = {"a": (1.0, 1.0, "first", "orange"), "b": (4.0, 1.0, "second\nbox", "sky_blue"),
             "c": (4.0, 3.0, "third", "blue")}
    fig = plots.diagram(boxes, [("a", "b", "level", 0), ("b", "c", "up", 0)], size=(5, 4), title="T")
    ax = fig.axes[0]
    fig.canvas.draw()
    texts = {t.get_text(): t for t in ax.texts}
    assert {"first", "second\nbox", "third", "level", "up"} <= texts.keys() and ax.get_title() == "T"
    fill = texts["first"].get_bbox_patch().get_facecolor()
    np.testing.assert_allclose(fill, to_rgba(plots.OKABE_ITO["orange"], 0x55 / 255), atol=1e-3)
    extents = {name: texts[text].get_bbox_patch().get_window_extent() for name, (_, _, text, _) in boxes.items()}
    arrows = [a.arrow_patch.get_window_extent() for a in ax.texts if getattr(a, "arrow_patch", None) is not None]
    assert len(arrows) == 2
    a, b, c = extents["a"], extents["b"], extents["c"]
    # a -> b runs level from a's right edge to b's left edge; b -> c rises from b's top to c's bottom
    # (each end stops 2 points short of its box, about 3 pixels at 100 dpi; the head's tip a few pixels more)
    assert 0 <= arrows[0].x0 - a.x1 < 8 and 0 <= b.x0 - arrows[0].x1 < 8
    assert 0 <= arrows[1].y0 - b.y1 < 8 and 0 <= c.y0 - arrows[1].y1 < 8
    # a level arrow's label sits above it, a rising arrow's to its right
    assert texts["level"].get_position() == pytest.approx((2.5, 1.08)) and texts["level"].get_va() == "bottom"
    assert texts["up"].get_position() == pytest.approx((4.1, 2.0)) and texts["up"].get_ha() == "left"
    plt.close(fig)


def test_diagram_draws_into_given_axes():
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4, 4))
    drawn = plots.diagram({"a": (1.0, 1.0, "a", "orange"), "b": (3.0, 1.0, "b", "blue")}, [("a", "b", "", 0)],
                          size=(4, 2), title="lower", ax=bottom)
    assert drawn is fig and tuple(fig.get_size_inches()) == (4, 4), "no new figure, no resizing"
    assert {t.get_text() for t in bottom.texts} >= {"a", "b"} and bottom.get_title() == "lower"
    assert bottom.get_xlim() == (0, 4) and bottom.get_ylim() == (0, 2) and not top.texts
    plt.close(fig)


def test_figures_fit_the_books_column_under_its_style():
    """A figure wider than the column is shrunk by the browser, and its text with it."""
    volume = np.random.default_rng(0).random((4, 30, 40))
    with plt.style.context(plots.BOOK_STYLE):
        column_px = plots.COLUMN_WIDTH * plt.rcParams["figure.dpi"]
        assert column_px <= 688  # the width the rendered book gives an output (tests/test_book.py)
        grid = plots.show_slice_grid([volume] * 5, list("abcde"), [1, 2])
        assert grid.get_size_inches()[0] == pytest.approx(plots.COLUMN_WIDTH)
        two = plots.show_slice_grid([volume] * 2, ["a", "b"], [1])
        assert two.get_size_inches()[0] == pytest.approx(4.0)  # two panels of 2 in: no need to shrink
        wide = plots.diagram({"a": (1.0, 1.0, "a", "orange")}, [], size=(12.4, 3.0))
        np.testing.assert_allclose(wide.get_size_inches(), (plots.COLUMN_WIDTH, 1.5))
        assert wide.axes[0].get_xlim() == (0, 12.4)  # the boxes keep their coordinates
    for fig in (grid, two, wide):
        plt.close(fig)


def test_show_overlap_names_its_colours_only_when_asked():
    image, truth, prediction = np.zeros((6, 6)), np.eye(6), np.fliplr(np.eye(6))
    fig, (left, right) = plt.subplots(1, 2)
    plots.show_overlap(image, truth, prediction, ax=left, legend=False)
    plots.show_overlap(image, truth, prediction, ax=right)
    assert left.get_legend() is None
    assert [t.get_text() for t in right.get_legend().get_texts()] == list(plots.OVERLAP_COLOURS)
    plt.close(fig)
