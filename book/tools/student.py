"""Write the student version of every chapter: no solutions, no outputs, exercises left to fill.

    python book/tools/student.py                 # all chapters into student/ (`make student`)
    python book/tools/student.py --out DIR ch01  # chapters whose file name starts with ch01

A student copy is the chapter (book/chNN_*.ipynb, same file name) with:

- every output, execution count, execution timing and the saved widget state cleared;
- the solutions removed: the chapters hide each solution in a MyST block of their markdown,
  ```{admonition} Solution  (or {dropdown} Solution) ... ```, which goes with the blank lines
  after it; a cell tagged `solution` (code or markdown) goes whole, and so does a markdown cell
  that held nothing but solutions;
- every code cell tagged `exercise` emptied to the placeholder `# your answer here` (each
  exercise's statement is followed by such a cell in the chapter, a comment only and tagged
  `remove-cell` so that the book does not show it);
- everything else as it is (cell ids, tags, other metadata, the exercises' text).

The tool only writes into its output folder, each notebook atomically (a temporary file in the
same folder, then os.replace), and deletes nothing. It marks the folder with the file
`.teachreg-student` and refuses a folder that exists, is not empty and lacks that mark, so it
cannot overwrite anyone's files; in a marked folder it overwrites the chapters' notebooks and
leaves any other file alone.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
from pathlib import Path

import nbformat
from chapter_data import chapter_paths

ROOT = Path(__file__).resolve().parents[2]
MARKER = ".teachreg-student"
MARKER_TEXT = (
    "Written by book/tools/student.py (`make student`): student copies of the chapters.\n"
    "Running it again overwrites the chapter notebooks in this folder; other files are left alone.\n"
)
PLACEHOLDER = "# your answer here"
SOLUTION_TAG = "solution"
EXERCISE_TAG = "exercise"
# The opening line of a solution block: a fence of 3+ backticks or tildes, then the directive.
_SOLUTION_OPEN = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*\{(?:admonition|dropdown)\}\s+solution\b", re.IGNORECASE)


class StudentError(Exception):
    """A chapter or an output folder the tool cannot handle; the message says what to do."""


def strip_solutions(markdown: str) -> tuple[str, int]:
    """`markdown` without its solution blocks (and the blank lines after each); and their number.

    A block ends at the first line that is a fence of the same character, at least as long as
    the opening one, and nothing else (as CommonMark closes it): solutions whose code sits in
    ~~~ fences, inside a ``` block, come out whole.
    """
    lines = markdown.splitlines(keepends=True)
    kept, removed, i = [], 0, 0
    while i < len(lines):
        opening = _SOLUTION_OPEN.match(lines[i])
        if not opening:
            kept.append(lines[i])
            i += 1
            continue
        fence = opening.group(1)
        closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), None)
        if end is None:
            raise StudentError(f"a solution block opened with {lines[i].strip()!r} is never closed")
        i = end + 1
        while i < len(lines) and not lines[i].strip():
            i += 1
        removed += 1
    text = "".join(kept)
    if removed and not markdown.endswith("\n"):  # as stored in notebooks: no final newline
        text = text.rstrip("\n")
    return text, removed


def student_version(nb: nbformat.NotebookNode) -> tuple[nbformat.NotebookNode, int]:
    """A copy of notebook `nb` for students (see the module's docstring); and the solutions removed."""
    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)  # saved widget state: an output
    cells, removed = [], 0
    for index, cell in enumerate(nb.cells):
        tags = cell.metadata.get("tags", [])
        if SOLUTION_TAG in tags:
            removed += 1
            continue
        if cell.cell_type == "markdown":
            try:
                source, n = strip_solutions(cell.source)
            except StudentError as error:
                raise StudentError(f"cell {index}: {error}") from None
            if n and not source.strip():  # the cell held solutions only
                removed += n
                continue
            cell.source, removed = source, removed + n
        elif cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)  # timings of the last run
            if EXERCISE_TAG in tags:
                cell.source = PLACEHOLDER
        cells.append(cell)
    nb.cells = cells
    return nb, removed


def prepare(out: Path) -> None:
    """Create the output folder, or check that this tool made it; mark it."""
    marker = out / MARKER
    if out.exists() and not out.is_dir():
        raise StudentError(f"{out} exists and is not a folder: choose another --out")
    if out.is_dir() and not marker.is_file() and any(out.iterdir()):
        raise StudentError(
            f"{out} already holds files that `make student` did not write (it has no {MARKER} file); "
            "nothing was changed. Choose another folder with --out, or move that one away."
        )
    out.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        write_atomically(marker, MARKER_TEXT)


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it onto `path`."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "x", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_student(chapters: list[Path], out: Path) -> dict[Path, int]:
    """Write the student copy of each chapter into `out`; return {written path: solutions removed}."""
    out = Path(out).resolve()
    sources = {Path(c).resolve() for c in chapters}
    if any(out / c.name in sources for c in sources):
        raise StudentError(f"--out {out} is the chapters' own folder: choose another")
    prepare(out)
    written = {}
    for chapter in chapters:
        try:
            nb, removed = student_version(nbformat.read(chapter, as_version=4))
        except StudentError as error:
            raise StudentError(f"{chapter.name}, {error}") from None
        path = out / chapter.name
        write_atomically(path, nbformat.writes(nb))
        written[path] = removed
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "student", help="output folder (default: student/)")
    parser.add_argument("chapters", nargs="*", help="prefixes of chapter file names (default: every chapter)")
    args = parser.parse_args(argv)
    chapters = [p for p in chapter_paths() if not args.chapters or p.name.startswith(tuple(args.chapters))]
    if not chapters:
        parser.error(f"no chapter in book/ starts with {' or '.join(args.chapters)}")
    try:
        written = write_student(chapters, args.out)
    except StudentError as error:
        sys.exit(f"student.py: {error}")
    for path, removed in written.items():
        print(f"{os.path.relpath(path)}: {removed} solutions removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
