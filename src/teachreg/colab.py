"""The set-up step of every chapter's first cell: Colab's widgets, and where TensorFlow runs.

The first code cell of a chapter installs `teachreg` when it runs on Colab, then calls
`setup()`, which works the same in Colab, JupyterLab or a plain Python process::

    from teachreg import colab
    colab.setup()

On Colab with ipywidgets 8 it turns on Colab's widget manager (the sliders of the interactive
figures; Colab's own ipywidgets 7.7 needs none); everywhere it prints two short lines: the versions, and the GPU TensorFlow will use, or
that it runs on the CPU (every chapter is sized to run on a laptop CPU in a few minutes).
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata

__all__ = ["enable_colab_widgets", "on_colab", "setup", "summary"]


def on_colab() -> bool:
    """Whether this runs in a Google Colab kernel."""
    return "google.colab" in sys.modules


def summary() -> str:
    """Two lines, each short enough for the book's code column: the teachreg, TensorFlow and Python
    versions and where this runs; then the GPU or the CPU."""
    import tensorflow as tf

    from teachreg import device

    try:
        version = metadata.version("teachreg")
    except metadata.PackageNotFoundError:
        version = "(not installed)"
    python = platform.python_version()
    hardware = device.description()
    if hardware.startswith("CPU"):
        hardware = f"no GPU, {hardware} (enough for every chapter)"
    where = "Colab" if on_colab() else "local"
    return f"teachreg {version}, TensorFlow {tf.__version__}, Python {python} ({where})\n{hardware}"


def enable_colab_widgets() -> bool:
    """On Colab with ipywidgets 8, turn on Colab's custom widget manager, which renders them.

    Colab ships ipywidgets 7.7.1, which it renders natively: then, and outside Colab, nothing is
    done. Returns whether the manager was turned on.
    """
    import ipywidgets

    if not on_colab() or int(ipywidgets.__version__.split(".")[0]) < 8:
        return False
    try:
        from google.colab import output
    except ImportError:
        return False
    enable = getattr(output, "enable_custom_widget_manager", None)
    if enable is None:
        return False
    enable()
    return True


def setup(verbose: bool = True) -> str:
    """Prepare the kernel for a chapter and return (and by default print) `summary()`."""
    enable_colab_widgets()
    line = summary()
    if verbose:
        print(line)
    return line
