"""Print the names of the datasets the chapters load, on one line (for `make data`).

The names come from the chapters' `data.load("name")` and `data.fetch("name")` calls, found as
the notebook tests find them (tests/notebook_tools.py), so a new chapter needs no list to update.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from notebook_tools import chapter_paths, datasets_used  # noqa: E402

if __name__ == "__main__":
    names: list[str] = []
    for path in chapter_paths():
        names += [n for n in datasets_used(path) if n not in names]
    print(" ".join(names))
