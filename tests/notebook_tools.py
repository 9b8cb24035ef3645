"""Helpers for the notebook tests: the chapters, the data they need, and papermill runs.

A chapter notebook (`book/chNN_*.ipynb`) has a code cell tagged `parameters` (papermill injects
other values after it) and ends with a code cell tagged `results` that prints one line,
`json.dumps(results)`: the chapter's key figures. `run_chapter` executes a chapter with other
parameters in a fresh kernel and returns that dict.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import nbformat

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
sys.path.insert(0, str(BOOK / "tools"))
from chapter_data import chapter_paths, datasets_used  # noqa: E402, F401  (one source, also for `make data`)

SANITIZE = BOOK / "nbval_sanitize.cfg"
# Chapters published in the book; each must exist (the tests name them explicitly).
CHAPTERS = {
    "ch01": BOOK / "ch01_images_transforms.ipynb",
    "ch02": BOOK / "ch02_losses.ipynb",
    "ch03": BOOK / "ch03_affine.ipynb",
    "ch04": BOOK / "ch04_nonrigid.ipynb",
    "ch05": BOOK / "ch05_learning.ipynb",
}
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def tagged(nb, tag: str) -> list:
    return [c for c in nb.cells if tag in c.metadata.get("tags", [])]


def missing_data(path: Path) -> str | None:
    """Why the datasets `path` needs cannot be had without the network, or None if they can.

    Available means: in the cache already, or in a mirror directory (`TEACHREG_DATA_MIRROR`
    laid out as sha256/<digest>), or behind a mirror URL on this machine.
    """
    from teachreg import data

    mirror = os.environ.get("TEACHREG_DATA_MIRROR", "")
    missing = []
    for name in datasets_used(path):
        if data.is_cached(name):
            continue
        files = data.dataset(name).files
        if "://" in mirror:
            if urlparse(mirror).hostname in LOCAL_HOSTS:
                continue
        elif mirror and all((Path(mirror) / "sha256" / f.sha256).is_file() for f in files):
            continue
        missing.append(name)
    if not missing:
        return None
    where = f"the mirror {mirror} lacks them" if mirror else "TEACHREG_DATA_MIRROR is not set"
    return (
        f"{path.name} needs {', '.join(missing)}: not cached in {data.data_dir()} and {where}; "
        "the tests do not download (set TEACHREG_DATA_MIRROR to the data mirror, or run "
        f"`teachreg data fetch {' '.join(missing)}` once)"
    )


def stored_results(nb) -> dict:
    """The dict printed by the cell tagged `results` (its stdout: one JSON object)."""
    cells = tagged(nb, "results")
    if len(cells) != 1:
        raise AssertionError(f"expected one cell tagged 'results', found {len(cells)}")
    text = "".join(o.get("text", "") for o in cells[0].get("outputs", []) if o.get("name") == "stdout")
    if not text.strip():
        raise AssertionError("the 'results' cell printed nothing (was the notebook executed?)")
    results = json.loads(text)
    if not isinstance(results, dict):
        raise AssertionError(f"the 'results' cell printed {type(results).__name__}, not a dict")
    return results


def run_chapter(path: Path, parameters: dict, workdir: Path, timeout_s: int = 900) -> tuple[dict, float]:
    """Execute chapter `path` with `parameters` (papermill, fresh kernel, in the book's folder).

    The executed copy is written to `workdir`. Returns (the `results` dict, wall seconds).
    """
    import papermill

    out = Path(workdir) / f"{path.stem}-executed.ipynb"
    start = time.perf_counter()
    papermill.execute_notebook(
        str(path),
        str(out),
        parameters=parameters,
        kernel_name="python3",
        cwd=str(path.parent),
        progress_bar=False,
        log_output=False,
        execution_timeout=timeout_s,
        start_timeout=120,
    )
    seconds = time.perf_counter() - start
    return stored_results(read(out)), seconds


def non_finite(results: dict) -> list[str]:
    """The keys whose values are not finite numbers."""
    return [k for k, v in results.items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
