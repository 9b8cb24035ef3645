"""The built book, checked as a reader meets it: every page opened in a headless Chromium.

The book is built once per session into a temporary folder exactly as `make book` builds it
(`jupyter-book build book/ -W --keep-going`: offline, warnings fail it), served on 127.0.0.1,
and every page of the table of contents, and the index, module index and search pages, is
opened in Debian's Chromium, driven by Playwright (no browser is downloaded:
`TEACHREG_CHROMIUM` or `chromium` on the PATH). A page fails on:

- a console error or an uncaught script error;
- a request that fails, answers an HTTP error or leaves the machine (the book must read offline);
- an image that does not load, or has no alt text (figures from the notebooks: a sentence);
- maths that MathJax did not typeset (a `.math` element without its MathJax output, a TeX
  error, or raw `$...$`, `\\(` or `\\[` left in the prose);
- a widget left as a "Loading widget" box, a widget script, or a widget's text fallback
  (`VBox(children=...)`) instead of the picture and the note that names its controls;
- more or fewer than one h1, or a heading level skipped (h2 to h4).

A full-page screenshot of every page is saved under `$TEACHREG_ARTIFACTS/screenshots` (default
`book/_build/screenshots`; CI sets it) for a person to look at. Without Chromium or Playwright
the browser tests are skipped, except under CI (`CI` set), where they fail.

The other tests here need no browser: the launch buttons and the chapters' first cell agree on
one pinned reference, the API page documents every public module, the instructor notes have a
row for every chapter, and the overlay colours stay distinct for colour-blind readers.
"""

from __future__ import annotations

import functools
import http.server
import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from notebook_tools import BOOK, ROOT, chapter_paths, read

sys.path.insert(0, str(BOOK / "tools"))
import colab_cell  # noqa: E402

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-features=Translate,OptimizationHints,MediaRouter",
    # nothing but this machine resolves: the book must read offline
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]
VIEWPORT = {"width": 1280, "height": 900}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
MIN_SCALE = 0.9  # a figure shown smaller than this fraction of its natural width is hard to read
RUN_TIME = "Running this chapter takes"
# Modules that are not part of the course's API: the command line (on the set-up and data pages),
# the demo script, private helpers.
NOT_IN_API = {"cli", "demo"}


def toc_pages() -> list[str]:
    """The documents of book/_toc.yml, in reading order."""
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text(encoding="utf-8"))
    pages = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                pages.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return pages


PAGES = [*toc_pages(), "genindex", "py-modindex", "search"]  # and the pages Sphinx generates


# --- the build and the browser -----------------------------------------------------------------


@pytest.fixture(scope="session")
def built_book(tmp_path_factory) -> Path:
    """Build the book as `make book` does, into a temporary folder; the HTML folder.

    `TEACHREG_BOOK_HTML=book/_build/html` checks that build instead (faster while editing).
    """
    if os.environ.get("TEACHREG_BOOK_HTML"):
        return Path(os.environ["TEACHREG_BOOK_HTML"]).resolve()
    out = tmp_path_factory.mktemp("book")
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    command = [str(jupyter_book), "build", str(BOOK), "-W", "--keep-going", "--path-output", str(out)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    print(f"book built in {time.perf_counter() - start:.0f} s")
    if done.returncode != 0:
        pytest.fail(f"`jupyter-book build book/ -W` failed:\n{(done.stdout + done.stderr)[-6000:]}")
    return out / "_build" / "html"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


@pytest.fixture(scope="session")
def site(built_book) -> str:
    """The built book served on 127.0.0.1 (a free port); its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(built_book))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the browser tests: .ci/run installs Debian's chromium)")
    pytest.skip(reason)


def chromium_path() -> str | None:
    candidates = [os.environ.get("TEACHREG_CHROMIUM", "")]
    candidates += [shutil.which(n) or "" for n in ("chromium", "chromium-browser", "google-chrome")]
    return next((c for c in candidates if c and Path(c).is_file()), None)


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright is not installed (pip install -e '.[dev]')")
    executable = chromium_path()
    if executable is None:
        _unavailable("no Chromium found (apt-get install chromium, or set TEACHREG_CHROMIUM)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    folder = Path(os.environ.get("TEACHREG_ARTIFACTS") or BOOK / "_build") / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# What a page reports once loaded, images decoded and MathJax done (runs in the browser).
INSPECT = r"""
async () => {
  for (const img of document.images) img.loading = "eager";
  await Promise.all([...document.images].map(img => img.decode().catch(() => null)));
  const math = document.querySelectorAll(".math");
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  const visible = el => !el.closest(".onlyprint");  // the theme's print-only copy of the title
  const article = document.querySelector("article.bd-article") || document.body;
  const headings = [...article.querySelectorAll("h1, h2, h3, h4, h5, h6")].filter(visible)
    .map(h => ({level: Number(h.tagName[1]), text: h.textContent.replace("#", "").trim()}));
  const prose = [];
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT, {
    acceptNode: node => node.parentElement.closest("pre, code, script, style, mjx-container, .math, .highlight, .cell_output")
      ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT,
  });
  while (walker.nextNode()) prose.push(walker.currentNode.textContent);
  const notes = [...document.querySelectorAll(".teachreg-widget-static")];
  return {
    title: document.title,
    h1: [...document.querySelectorAll("h1")].filter(visible).length,
    headings,
    images: [...document.images].map(img => ({
      src: img.getAttribute("src"), alt: (img.getAttribute("alt") || "").trim(),
      loaded: img.complete && img.naturalWidth > 0,
      output: !!img.closest(".cell_output"),
      natural: img.naturalWidth, shown: img.clientWidth,  // 0 shown: in a closed dropdown
    })),
    math: math.length,
    mathjax: !!(window.MathJax && MathJax.startup),
    untypeset: [...math].filter(m => !m.querySelector("mjx-container")).map(m => m.textContent.slice(0, 80)),
    texErrors: [...document.querySelectorAll("mjx-merror")].map(e => e.textContent.slice(0, 80)),
    prose: prose.join(" "),
    outputs: [...article.querySelectorAll(".cell_output")].map(o => o.innerText).join("\n"),
    // code and printed text wider than its column scrolls sideways: the longest line of each such block
    wide: [...article.querySelectorAll("pre")].filter(p => p.scrollWidth > p.clientWidth + 1)
      .map(p => p.textContent.split("\n").reduce((a, b) => (b.length > a.length ? b : a), "").trim().slice(0, 60)),
    widgetScripts: document.querySelectorAll('script[type^="application/vnd.jupyter.widget"]').length,
    widgetNotes: notes.length,
    notesAfterPicture: notes.filter(n => {
      const output = n.closest(".cell_output");
      return output && output.querySelector("img") &&
        (output.querySelector("img").compareDocumentPosition(n) & Node.DOCUMENT_POSITION_FOLLOWING);
    }).length,
  };
}
"""

RAW_MATHS = [
    (re.compile(r"\\\(|\\\)|\\\[|\\\]"), "a raw \\( \\) or \\[ \\] delimiter"),
    (re.compile(r"\$[^$\s][^$]*\$"), "raw $...$"),
    (re.compile(r"\\(frac|sum|mathbf|mathrm|left|right|begin)\b"), "a raw TeX command"),
]


def widget_views(page: str) -> int:
    path = BOOK / f"{page}.ipynb"
    if not path.exists():
        return 0
    return sum(
        WIDGET_VIEW in output.get("data", {})
        for cell in read(path).cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )


def save_screenshot(tab, path: Path) -> None:
    """Save the whole page for a reviewer, or the viewport where Chromium cannot.

    The picture is an artifact, not a check: Chromium sometimes refuses a full-page
    capture ("Unable to capture screenshot", playwright issue 32144) on a page that
    renders well, so one refusal falls back to the visible part.
    """
    from playwright.sync_api import Error as PlaywrightError

    try:
        tab.screenshot(path=str(path), full_page=True)
    except PlaywrightError:
        tab.screenshot(path=str(path))


@pytest.mark.parametrize("page", PAGES)
def test_page_in_a_browser(page, browser, site, screenshots):
    problems: list[str] = []
    context = browser.new_context(viewport=VIEWPORT)
    tab = context.new_page()

    def outside(route):
        problems.append(f"request leaves the machine: {route.request.url}")
        route.abort()

    context.route(re.compile(r"^(?!https?://127\.0\.0\.1[:/]).*"), outside)
    tab.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text}"))
    tab.on("pageerror", lambda e: problems.append(f"script error: {e}"))
    tab.on("requestfailed", lambda r: problems.append(f"failed request: {r.url} ({r.failure})"))
    tab.on("response", lambda r: r.status >= 400 and not r.url.endswith("/favicon.ico")
           and problems.append(f"HTTP {r.status}: {r.url}"))
    try:
        response = tab.goto(f"{site}/{page}.html", wait_until="load")
        assert response is not None and response.ok, f"{page}.html: HTTP {response and response.status}"
        report = tab.evaluate(INSPECT)
        save_screenshot(tab, screenshots / f"{page}.png")
    finally:
        context.close()

    # images: loaded, described
    for image in report["images"]:
        if not image["loaded"]:
            problems.append(f"image not loaded: {image['src']}")
        if not image["alt"]:
            problems.append(f"image without alt text: {image['src']}")
        elif image["output"] and len(image["alt"]) <= 20:
            problems.append(f"figure with a too short alt text ({image['alt']!r}): {image['src']}")
        if image["output"] and 0 < image["shown"] < MIN_SCALE * image["natural"]:
            problems.append(
                f"figure shrunk to {image['shown'] / image['natural']:.0%} of its {image['natural']} px "
                f"(make it at most plots.COLUMN_WIDTH wide): {image['src']}"
            )
    # every chapter says at its top how long it runs
    if page.startswith("ch") and RUN_TIME not in report["prose"][:2000]:
        problems.append(f"no {RUN_TIME!r} near the top of the chapter")
    # maths: typeset by MathJax, nothing raw left
    if report["math"] and not report["mathjax"]:
        problems.append(f"{report['math']} maths elements but MathJax did not load")
    problems += [f"maths not typeset: {m!r}" for m in report["untypeset"]]
    problems += [f"TeX error: {m!r}" for m in report["texErrors"]]
    for pattern, what in RAW_MATHS:
        for match in itertools.islice(pattern.finditer(report["prose"]), 3):
            start = max(match.start() - 40, 0)
            excerpt = " ".join(report["prose"][start : match.end() + 40].split())
            problems.append(f"unrendered maths, {what}: ...{excerpt}...")
    # widgets: the picture and a note, never an empty box, a script or a text fallback
    if report["widgetScripts"]:
        problems.append(f"{report['widgetScripts']} widget scripts on the page (views or state)")
    for stub in ("Loading widget", "VBox(children=", "HBox(children=", "Error displaying widget"):
        if stub in report["outputs"]:
            problems.append(f"a widget shows as {stub!r}")
    expected = widget_views(page)
    if report["widgetNotes"] != expected:
        problems.append(f"{report['widgetNotes']} widget notes for {expected} widgets in the notebook")
    if report["notesAfterPicture"] != report["widgetNotes"]:
        problems.append("a widget note does not follow the picture of its default state")
    # code and outputs fit their column
    problems += [f"a code block is wider than its column, it scrolls sideways: {line!r}..." for line in report["wide"]]
    # one heading hierarchy
    if report["h1"] != 1:
        problems.append(f"{report['h1']} h1 headings (one per page)")
    levels = [h["level"] for h in report["headings"]]
    if levels and levels[0] != 1:
        problems.append(f"the first heading is an h{levels[0]}, not the h1")
    for previous, heading in zip(report["headings"], report["headings"][1:]):
        if heading["level"] > previous["level"] + 1:
            problems.append(
                f"heading level skipped: h{previous['level']} {previous['text']!r} "
                f"-> h{heading['level']} {heading['text']!r}"
            )
    assert not problems, f"{page}.html ({report['title']}):\n- " + "\n- ".join(dict.fromkeys(problems))


def test_the_build_has_no_other_pages(built_book):
    """Every page the build writes is checked above (a page outside the toc would be missed)."""
    built = {p.stem for p in built_book.glob("*.html")} - {"index"}  # index.html redirects to the root
    assert built == set(PAGES), f"pages built but not checked: {sorted(built - set(PAGES))}"
    assert (built_book / "_static" / "mathjax" / "tex-mml-chtml.js").is_file(), "MathJax is not served from _static"


# --- launch buttons and the first cell -----------------------------------------------------------


def test_chapters_install_the_reference_the_book_launches():
    """Launch buttons (_config.yml `repository`) and the chapters' first cell name one reference."""
    problems = colab_cell.check()
    assert not problems, "\n".join(problems) + "\n(run `.venv/bin/python book/tools/colab_cell.py`)"


def test_first_cell_setup_reports_versions_and_device(capsys):
    from teachreg import colab

    line = colab.setup()
    assert capsys.readouterr().out.strip() == line
    assert line.startswith("teachreg ") and "TensorFlow " in line and "(local)" in line
    assert "GPU: " in line or "no GPU, CPU: " in line
    assert all(len(part) <= 76 for part in line.splitlines())  # the rendered book cuts longer output lines
    assert not colab.on_colab() and not colab.enable_colab_widgets()


@pytest.mark.parametrize("page", [p.stem for p in chapter_paths()])
def test_launch_buttons(page, built_book):
    html = (built_book / f"{page}.html").read_text(encoding="utf-8")
    config = yaml.safe_load((BOOK / "_config.yml").read_text(encoding="utf-8"))
    repository = config["repository"]["url"].removeprefix("https://github.com/")
    reference = config["repository"]["branch"]
    colab = f"https://colab.research.google.com/github/{repository}/blob/{reference}/book/{page}.ipynb"
    assert colab in html, f"no Colab launch button for {page} ({colab})"
    assert f"https://mybinder.org/v2/gh/{repository}/{reference}" in html, f"no Binder launch button for {page}"


# --- pages that must follow the package and the chapters ---------------------------------------


def public_modules() -> list[str]:
    package = ROOT / "src" / "teachreg"
    names = [p.stem for p in package.glob("*.py")] + [p.name for p in package.iterdir() if (p / "__init__.py").is_file()]
    return sorted(n for n in names if not n.startswith("_") and n not in NOT_IN_API)


def test_api_reference_documents_every_public_module():
    text = (BOOK / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\.\. automodule:: teachreg\.(\w+)", text, re.MULTILINE))
    missing = [m for m in public_modules() if m not in documented]
    assert not missing, f"book/api.md has no automodule for teachreg.{', teachreg.'.join(missing)}"


def test_instructor_notes_have_a_row_per_chapter():
    text = (BOOK / "instructors.md").read_text(encoding="utf-8")
    rows = {m for m in re.findall(r"^\|\s*\[[^\]]*\]\((ch\d\d_\w+)\.ipynb\)", text, re.MULTILINE)}
    for path in chapter_paths():
        assert path.stem in rows, f"book/instructors.md: no row for {path.name} in the time table"


# --- colour-blind-safe overlays ------------------------------------------------------------------

# Machado, Oliveira and Fernandes (2009), dichromacy at severity 1, on linear RGB.
DICHROMACY = {
    "protanopia": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]],
    "deuteranopia": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]],
    "tritanopia": [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]],
    "typical vision": np.eye(3).tolist(),
}
MIN_DELTA_E = 10.0  # CIEDE2000: clearly different colours at a glance


def _simulate(colour, matrix):
    from matplotlib.colors import to_rgb

    rgb = np.asarray(to_rgb(colour))
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    out = np.clip(np.asarray(matrix) @ linear, 0, 1)
    return np.where(out <= 0.0031308, 12.92 * out, 1.055 * out ** (1 / 2.4) - 0.055)


def test_overlay_colours_stay_distinct_for_colour_blind_readers():
    """True/false positives/negatives, and the two label outlines, in every kind of colour vision."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    from teachreg import plots

    groups = {
        "overlap": plots.OVERLAP_COLOURS,
        "label outlines": dict(list(plots.OKABE_ITO.items())[:2]),  # spinal cord, brainstem
    }
    for group, colours in groups.items():
        for vision, matrix in DICHROMACY.items():
            lab = {n: rgb2lab(_simulate(c, matrix)[None, None])[0, 0] for n, c in colours.items()}
            for a, b in itertools.combinations(lab, 2):
                delta = float(deltaE_ciede2000(lab[a], lab[b]))
                assert delta >= MIN_DELTA_E, f"{group}: {a} and {b} differ by ΔE {delta:.1f} with {vision}"
