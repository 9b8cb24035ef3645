"""Write the set-up lines at the top of every chapter's first code cell, and the book's launch reference.

Every chapter (book/ch*.ipynb) starts with the same lines, so that it runs unchanged in Colab and
in a local JupyterLab:

    import sys
    if "google.colab" in sys.modules:  # on Colab: install teachreg, pinned
        %pip install --quiet git+<repository>@<reference>
    from teachreg import colab
    colab.setup()  # widgets on in Colab; prints the versions and the GPU or CPU

<repository> is `repository.url` in book/_config.yml; <reference> is `v` + the version in
pyproject.toml, the release tag the book is published from. The same reference is written to
`repository.branch` in book/_config.yml, which the launch buttons open, so a notebook opened from
the book installs the package it was written for.

    python book/tools/colab_cell.py          # rewrite what differs (idempotent); lists the changes
    python book/tools/colab_cell.py --check  # change nothing; exit 1 if anything differs

Only those first lines of the cell change (the chapter's own imports after them are kept); the
stored outputs are kept too: re-execute the chapters (`make execute`) before publishing.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

import nbformat
import yaml

BOOK = Path(__file__).resolve().parents[1]
ROOT = BOOK.parent
CONFIG = BOOK / "_config.yml"
_BRANCH = re.compile(r"^(repository:\n(?:[ \t]+.*\n|\s*\n)*?[ \t]+branch:[ \t]*)(\S+)(.*)$", re.MULTILINE)


def reference() -> str:
    """The release tag of this version: `v` + pyproject.toml's version."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return "v" + tomllib.load(f)["project"]["version"]


def repository() -> str:
    return yaml.safe_load(CONFIG.read_text(encoding="utf-8"))["repository"]["url"].rstrip("/")


def setup_lines(url: str, ref: str) -> list[str]:
    return [
        "import sys",
        'if "google.colab" in sys.modules:  # on Colab: install teachreg, pinned',
        f"    %pip install --quiet git+{url}@{ref}",  # pip's VCS form: fits the book's 76 columns
        "from teachreg import colab",
        "colab.setup()  # widgets on in Colab; prints the versions and the GPU or CPU",
    ]


def _old_block_end(lines: list[str]) -> int | None:
    """How many leading lines are an earlier version of the set-up lines (None: not recognised)."""
    if len(lines) < 3 or lines[0].strip() != "import sys":
        return None
    if not lines[1].startswith('if "google.colab" in sys.modules') or "%pip install" not in lines[2]:
        return None
    end = 3
    if end < len(lines) and lines[end].strip() == "from teachreg import colab":
        end += 1
        if end < len(lines) and lines[end].startswith("colab.setup("):
            end += 1
    return end


def first_cell_source(source: str, url: str, ref: str) -> str | None:
    """The first cell's source with current set-up lines (None if its start is not recognised)."""
    lines = source.splitlines()
    end = _old_block_end(lines)
    if end is None:
        return None
    return "\n".join(setup_lines(url, ref) + lines[end:])


def chapters() -> list[Path]:
    return sorted(BOOK.glob("ch*.ipynb"))


def update(write: bool) -> list[str]:
    """Bring the chapters and _config.yml up to date (or only say what differs); the differences."""
    url, ref = repository(), reference()
    problems = []
    for path in chapters():
        nb = nbformat.read(path, as_version=4)
        cell = next((c for c in nb.cells if c.cell_type == "code"), None)
        new = first_cell_source(cell.source, url, ref) if cell is not None else None
        if new is None:
            problems.append(f"{path.name}: the first code cell does not start with the Colab set-up lines")
        elif new != cell.source:
            problems.append(f"{path.name}: the first cell's set-up lines are not the current ones ({ref})")
            if write:
                cell.source = new
                nbformat.write(nb, path)
    config = CONFIG.read_text(encoding="utf-8")
    match = _BRANCH.search(config)
    if match is None:
        problems.append("book/_config.yml: no `branch:` under `repository:`")
    elif match.group(2) != ref:
        problems.append(f"book/_config.yml: repository.branch is {match.group(2)}, not {ref}")
        if write:
            CONFIG.write_text(config[: match.start(2)] + ref + config[match.end(2) :], encoding="utf-8")
    return problems


def check() -> list[str]:
    """What differs from the current set-up lines and reference (nothing is written)."""
    return update(write=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything differs")
    args = parser.parse_args(argv)
    problems = update(write=not args.check)
    for line in problems:
        print(line)
    if args.check:
        return 1 if problems else 0
    unfixable = [p for p in problems if "does not start" in p or "no `branch:`" in p]
    print(f"{len(problems) - len(unfixable)} updated, {len(unfixable)} to fix by hand" if problems else "up to date")
    return 1 if unfixable else 0


if __name__ == "__main__":
    sys.exit(main())
