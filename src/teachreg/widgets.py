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

__all__ = ["interactive_figure", "on_demand_figure"]


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


def on_demand_figure(
    draw: Callable[..., plt.Figure],
    controls: dict[str, widgets.ValueWidget],
    run: Callable[..., object],
    description: str = "Run",
) -> widgets.Box:
    """Like `interactive_figure`, for work too slow to redo on every change: a button starts it.

    draw: quick; returns a figure for keyword values named like `controls`, showing what has been
    computed for them (or saying that nothing has been yet). run: the slow work for those values
    (an optimisation, say), called only when the button is clicked, never at display time, so a
    headless run just draws. The figure is redrawn after a control changes and after each run; a
    status line says when a run is under way, how long it took, or why it failed.
    Returns the box of controls, button and status line (already displayed).
    """
    import time

    button = widgets.Button(description=description, button_style="primary", icon="play")
    status = widgets.Label("")

    def values() -> dict:
        return {name: control.value for name, control in controls.items()}

    def figure() -> plt.Figure:
        fig = draw(**values())
        plt.close(fig)  # shown through the display handle, not again by the inline backend
        return fig

    handle = display(figure(), display_id=True)

    def redraw(_change=None) -> None:
        if handle is not None:
            handle.update(figure())

    def clicked(_button) -> None:
        button.disabled, status.value = True, "running ..."
        start = time.perf_counter()
        try:
            run(**values())
            status.value = f"done in {time.perf_counter() - start:.0f} s"
        except Exception as error:  # shown to the student instead of vanishing in a log
            status.value = f"failed: {error}"
        finally:
            button.disabled = False
        redraw()

    for control in controls.values():
        control.observe(redraw, names="value")
    button.on_click(clicked)
    box = widgets.VBox([*controls.values(), widgets.HBox([button, status])])
    display(box)
    return box
