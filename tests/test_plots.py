"""The figures' helpers draw what they say: label contours in the label colours, Jacobian maps centred on 1."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
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
