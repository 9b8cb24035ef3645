"""Interactive figures that also read well on a static page.

`interactive_figure(draw, controls)` shows the figure of the controls' default values as an
ordinary output (so the rendered book and a headless run show a real picture), then the
controls; moving a control redraws that same output in place (JupyterLab, Colab).
"""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as widgets
import matplotlib.pyplot as plt
from IPython.display import display


def interactive_figure(draw: Callable[..., plt.Figure], controls: dict[str, widgets.ValueWidget]) -> widgets.Box:
    """Display `draw(**values)` and `controls`; redraw whenever a control changes.

    draw: returns a new matplotlib figure for keyword values named like `controls`.
    Returns the box of controls (already displayed), so a test can set values and check redraws.
    """

    def figure() -> plt.Figure:
        fig = draw(**{name: control.value for name, control in controls.items()})
        plt.close(fig)  # shown through the display handle, not again by the inline backend
        return fig

    handle = display(figure(), display_id=True)

    def redraw(_change) -> None:
        if handle is not None:
            handle.update(figure())

    for control in controls.values():
        control.observe(redraw, names="value")
    box = widgets.VBox(list(controls.values()))
    display(box)
    return box
