"""The interactive figures and Colab's widget set-up, with whichever ipywidgets is installed.

Colab ships ipywidgets 7.7.1, the lab and book extras install 8: `make test` runs this file with
8 and `make widgets7` runs it again with 7.7.1 (see the Makefile), so both are checked.
"""

import os
import sys
import types

import ipywidgets
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from teachreg import colab, widgets  # noqa: E402


class Handle:
    """Stands in for IPython's display handle: records what each update shows."""

    def __init__(self):
        self.updates = []

    def update(self, obj):
        self.updates.append(obj)


@pytest.fixture
def displayed(monkeypatch):
    """What `widgets` displays, in order, and the handle given for the first displayed figure."""
    shown, handles = [], []

    def display(obj, display_id=False):
        shown.append(obj)
        if display_id:
            handles.append(Handle())
            return handles[-1]
        return None

    monkeypatch.setattr(widgets, "display", display)
    return shown, handles


def draw_title(**values) -> plt.Figure:
    fig, ax = plt.subplots()
    ax.set_title(" ".join(f"{k}={v}" for k, v in sorted(values.items())))
    return fig


def title(fig: plt.Figure) -> str:
    return fig.axes[0].get_title()


def test_interactive_figure_shows_defaults_then_redraws_on_change(displayed):
    shown, handles = displayed
    slider = ipywidgets.IntSlider(value=3, min=0, max=9)
    box = widgets.interactive_figure(draw_title, {"n": slider})
    assert title(shown[0]) == "n=3" and shown[1] is box and box.children == (slider,)
    slider.value = 7
    assert [title(f) for f in handles[0].updates] == ["n=7"]


def test_on_demand_figure_runs_only_on_click_and_reports(displayed):
    shown, handles = displayed
    runs = []
    slider = ipywidgets.FloatSlider(value=0.5, min=0.0, max=1.0)
    box = widgets.on_demand_figure(draw_title, {"w": slider}, run=lambda w: runs.append(w))
    assert runs == [] and title(shown[0]) == "w=0.5"  # a headless run only draws
    button, status = box.children[-1].children
    button.click()
    assert runs == [0.5] and status.value.startswith("done in") and not button.disabled
    slider.value = 0.25
    button.click()
    assert runs == [0.5, 0.25]
    assert [title(f) for f in handles[0].updates] == ["w=0.5", "w=0.25", "w=0.25"]


def test_on_demand_figure_shows_why_a_run_failed(displayed):
    def fail(w):
        raise ValueError("too few steps")

    box = widgets.on_demand_figure(draw_title, {"w": ipywidgets.FloatSlider(value=0.5)}, run=fail)
    button, status = box.children[-1].children
    button.click()
    assert status.value == "failed: too few steps" and not button.disabled


def _fake_colab(monkeypatch) -> list:
    calls = []
    output = types.SimpleNamespace(enable_custom_widget_manager=lambda: calls.append("enabled"))
    google = types.ModuleType("google")
    google.colab = types.ModuleType("google.colab")
    google.colab.output = output
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", google.colab)
    return calls


@pytest.mark.parametrize("version, enabled", [("7.7.1", False), ("8.1.5", True)])
def test_colab_widget_manager_only_for_ipywidgets_8(monkeypatch, version, enabled):
    calls = _fake_colab(monkeypatch)
    monkeypatch.setattr(ipywidgets, "__version__", version)
    assert colab.on_colab()
    assert colab.enable_colab_widgets() is enabled
    assert calls == (["enabled"] if enabled else [])


def test_the_ipywidgets_version_asked_for_is_the_one_tested():
    expected = os.environ.get("TEACHREG_EXPECT_IPYWIDGETS")
    assert expected is None or ipywidgets.__version__ == expected


def test_outside_colab_nothing_is_enabled():
    assert not colab.on_colab() and colab.enable_colab_widgets() is False
