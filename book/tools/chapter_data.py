"""The chapters and the datasets they load; run as a script, print those datasets' names on one line.

`make data` runs it to fetch what the chapters need; the notebook tests (tests/notebook_tools.py)
import `chapter_paths` and `datasets_used` from here. The names come from the chapters'
`data.load("name")` and `data.fetch("name")` calls, so a new chapter needs no list to update.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat

BOOK = Path(__file__).resolve().parents[1]
_LOAD = re.compile(r"""\bdata\.(?:load|fetch)\(\s*["']([\w.-]+)["']""")


def chapter_paths() -> list[Path]:
    """Every chapter notebook present in book/ (`chNN_*.ipynb`), sorted."""
    return sorted(BOOK.glob("ch*.ipynb"))


def datasets_used(path: Path) -> list[str]:
    """The datasets a notebook loads with `data.load("name")` or `data.fetch("name")`, in order."""
    names = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code":
            names += [n for n in _LOAD.findall(cell.source) if n not in names]
    return names


if __name__ == "__main__":
    names: list[str] = []
    for chapter in chapter_paths():
        names += [n for n in datasets_used(chapter) if n not in names]
    print(" ".join(names))
