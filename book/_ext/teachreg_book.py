"""Sphinx extension of the teachreg book (loaded by `sphinx.local_extensions` in _config.yml).

It makes the built HTML read well with no network and no kernel, and keeps `-W` builds green:

- Widgets. A chapter's interactive figure (`teachreg.widgets.interactive_figure`) stores the
  figure of its default values as an ordinary image output, followed by the controls as an
  ipywidgets view. Without a kernel the controls cannot work, and rendering them would need the
  widget JavaScript from a CDN, so each widget view is replaced by a short note that names the
  controls and their default values (read from the widget state stored in the notebook), and the
  widget state itself (tens of kB of JSON per page) is left out of the page.
- Docstrings (the API page). teachreg's docstrings are plain text whose lists need not be set
  off by blank lines; the blank lines reStructuredText requires are added before autodoc parses
  them.
- Scripts. A script that Jupyter Book's extensions add twice (sphinx-thebe's configuration, a
  script error on every page) is kept once.
- MathJax. `mathjax_path` (in _config.yml) points into `_static/mathjax/`; the files are copied
  there from the `sphinx-mathjax-offline` package (MathJax 3.2.2, an install dependency of the
  `book` extra) at the end of the build, so the maths renders without a CDN.
"""

from __future__ import annotations

import json
import re
import shutil
from importlib import metadata
from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util import logging

logger = logging.getLogger(__name__)

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE_KEY = "ipywidgets_state"  # myst-nb's key for the page's widget-state script

MATHJAX_PACKAGE = "sphinx-mathjax-offline"
# The parts of MathJax's es5 tree that `tex-mml-chtml.js` loads on demand: TeX extensions
# (autoload), the CHTML fonts, the menu and the accessibility tools (speech rule engine).
MATHJAX_FILES = ["tex-mml-chtml.js", "input", "output/chtml", "ui", "a11y", "sre"]


# --- widgets ------------------------------------------------------------------------------------


def _widget_state(env, docname: str) -> dict:
    js_files = getattr(env, "nb_metadata", {}).get(docname, {}).get("js_files", {})
    entry = js_files.get(WIDGET_STATE_KEY)
    if not entry:
        return {}
    _uri, kwargs = entry
    try:
        return json.loads(kwargs.get("body", "{}")).get("state", {})
    except json.JSONDecodeError:
        return {}


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _describe(model_id: str, state: dict) -> list[str]:
    """One line per control of a widget (recursing into boxes); labels and unknown models skipped."""
    model = state.get(model_id, {})
    name = model.get("model_name", "")
    values = model.get("state", {})
    if name in ("VBoxModel", "HBoxModel", "BoxModel", "GridBoxModel"):
        lines = []
        for child in values.get("children", []):
            lines += _describe(str(child).removeprefix("IPY_MODEL_"), state)
        return lines
    description = values.get("description", "") or name.removesuffix("Model")
    if name.endswith("SliderModel") and "value" in values:
        value = values["value"]
        if isinstance(value, list):  # range sliders
            value = " to ".join(_number(v) for v in value)
        return [f"{description}: {_number(value)} (from {_number(values.get('min'))} to {_number(values.get('max'))})"]
    if "_options_labels" in values:
        options = values["_options_labels"]
        index = values.get("index")
        chosen = options[index] if isinstance(index, int) and 0 <= index < len(options) else "none"
        return [f"{description}: {chosen} (choices: {', '.join(options)})"]
    if name == "ButtonModel":
        return [f"a button, {description!r}, that starts the computation for the chosen values"]
    if name in ("CheckboxModel", "ToggleButtonModel") and "value" in values:
        return [f"{description}: {'on' if values['value'] else 'off'}"]
    if name.endswith("TextModel") and "value" in values:
        return [f"{description}: {values['value']}"]
    return []


def _widget_note(lines: list[str]) -> nodes.Element:
    box = nodes.container(classes=["teachreg-widget-static"])
    intro = nodes.paragraph()
    intro += nodes.strong(text="Interactive figure. ")
    intro += nodes.Text(
        "The picture above is drawn for the default values of the controls below. "
        "Run this chapter in Colab or JupyterLab (the launch button at the top of the page) "
        "to change them and redraw it."
    )
    box += intro
    if lines:
        items = nodes.bullet_list()
        for line in lines:
            item = nodes.list_item()
            item += nodes.paragraph(text=line)
            items += item
        box += items
    return box


def replace_widget_views(app: Sphinx, doctree: nodes.document) -> None:
    """Replace each stored widget view by a note naming its controls; drop the page's widget state."""
    env = app.env
    docname = env.docname
    state = _widget_state(env, docname)
    for raw in list(doctree.findall(nodes.raw)):
        text = raw.astext()
        if WIDGET_VIEW not in text:
            continue
        body = text.split(">", 1)[1].rsplit("</script>", 1)[0]
        try:
            model_id = json.loads(body).get("model_id", "")
        except json.JSONDecodeError:
            model_id = ""
        raw.replace_self(_widget_note(_describe(model_id, state)))
    js_files = getattr(env, "nb_metadata", {}).get(docname, {}).get("js_files", {})
    for key in [k for k in js_files if k.startswith("ipywidgets")]:
        del js_files[key]


# --- docstrings ----------------------------------------------------------------------------------

_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+\S")


def separate_lists(app: Sphinx, what: str, name: str, obj, options, lines: list[str]) -> None:
    """Put the blank lines reStructuredText needs around the lists of teachreg's docstrings.

    The docstrings are plain text in a Markdown spirit: a list may follow its introducing line
    directly, and a paragraph may follow the list's last item. reStructuredText reads both as
    errors ("Unexpected indentation"), which would fail the build (-W); a blank line fixes both.
    """
    out: list[str] = []
    list_indent = None  # the indentation of the list's bullets, while in a list
    for line in lines:
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if stripped and _ITEM.match(line):
            if list_indent is None and out and out[-1].strip():
                out.append("")
            list_indent = indent if list_indent is None else list_indent
        elif stripped and list_indent is not None and indent <= list_indent:
            if out[-1].strip():
                out.append("")
            list_indent = None
        out.append(line)
    lines[:] = out


# --- scripts ------------------------------------------------------------------------------------


def drop_duplicate_scripts(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Keep one copy of each script: sphinx-thebe's inline configuration is added twice in a
    Jupyter Book build, and its second `const THEBE_JS_URL` is a script error on every page."""
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen, unique = set(), []
    for js in scripts:  # the two copies differ only by a filename of None or "" (inline scripts)
        key = (str(js.filename or ""), js.priority, tuple(sorted((k, str(v)) for k, v in js.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique  # in place: later handlers may still add scripts to the same list


# --- MathJax ------------------------------------------------------------------------------------


def mathjax_source() -> Path:
    try:
        dist = metadata.distribution(MATHJAX_PACKAGE)
    except metadata.PackageNotFoundError as error:
        raise ExtensionError(
            f"the book serves MathJax itself: install {MATHJAX_PACKAGE} "
            '(`pip install -e ".[book]"` does)'
        ) from error
    source = Path(str(dist.locate_file(f"{MATHJAX_PACKAGE}/static/mathjax")))
    if not (source / "tex-mml-chtml.js").is_file():
        raise ExtensionError(f"{MATHJAX_PACKAGE} has no MathJax files in {source}")
    return source


def check_mathjax(app: Sphinx, config) -> None:
    if "://" in (config.mathjax_path or ""):
        logger.warning(f"mathjax_path is a URL ({config.mathjax_path}): the maths needs the network")
    mathjax_source()  # fail early, not after the whole build


def copy_mathjax(app: Sphinx, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    source = mathjax_source()
    target = Path(app.outdir) / "_static" / "mathjax"
    for name in MATHJAX_FILES:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, target / name, dirs_exist_ok=True)
        else:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / name)


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", check_mathjax)
    app.connect("doctree-read", replace_widget_views)
    app.connect("autodoc-process-docstring", separate_lists)
    app.connect("html-page-context", drop_duplicate_scripts, priority=900)  # after the others
    app.connect("build-finished", copy_mathjax)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
