"""Tests of the student notebooks that `make student` writes (book/tools/student.py).

Fast checks on the chapters' student copies (no solution, no output, every other cell kept in
order, exercises' text kept), on a small made-up notebook (tags `solution` and `exercise`), and on
the output folder (refusal of a folder the tool did not write, idempotence, nothing deleted).
Every exercise has a cell to fill, hidden in the book and a comment only in the chapter, so each
student copy runs the chapter's code; the `notebook`-marked test runs chapter 1's copy top to
bottom, exercises empty.
"""

from __future__ import annotations

import re

import nbformat
import pytest
import student  # book/tools: on sys.path once notebook_tools is imported (conftest.py imports it)
from notebook_tools import CHAPTERS, read, stored_results
from test_notebooks import chapter, chapter_ids, run

SOLUTION_LINE = re.compile(r"\{[\w-]+\}.*solution", re.IGNORECASE)  # a directive titled Solution


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    student.write_student([CHAPTERS[name] for name in chapter_ids], out)
    return out


def is_solution(cell) -> bool:
    return student.SOLUTION_TAG in cell.metadata.get("tags", [])


@pytest.mark.parametrize("name", chapter_ids)
def test_no_solutions_no_outputs(name, student_dir):
    nb = read(student_dir / CHAPTERS[name].name)
    assert "widgets" not in nb.metadata, "saved widget state is an output"
    for i, cell in enumerate(nb.cells):
        assert not is_solution(cell), f"cell {i} is tagged {student.SOLUTION_TAG!r}"
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"code cell {i} kept its outputs"
            assert "execution" not in cell.metadata
        else:
            solutions = [line for line in cell.source.splitlines() if SOLUTION_LINE.search(line)]
            assert not solutions, f"cell {i} still holds {solutions} (not a closed ```{{admonition}} Solution block?)"


@pytest.mark.parametrize("name", chapter_ids)
def test_every_other_cell_kept_in_order(name, student_dir):
    original = read(chapter(name))
    copy = read(student_dir / chapter(name).name)
    kept = [c for c in original.cells if not is_solution(c)]
    kept = [c for c in kept if c.cell_type != "markdown" or student.strip_solutions(c.source)[0].strip()]
    assert [c.id for c in copy.cells] == [c.id for c in kept]
    removed = 0
    for before, after in zip(kept, copy.cells):
        assert (after.cell_type, after.metadata.get("tags")) == (before.cell_type, before.metadata.get("tags"))
        if after.cell_type == "markdown":
            stripped, n = student.strip_solutions(before.source)
            assert after.source == stripped
            removed += n
            # the exercises' statements stay: every "**N. Title.**" line of the chapter
            assert re.findall(r"^\*\*\d+\. .*$", after.source, re.MULTILINE) == re.findall(
                r"^\*\*\d+\. .*$", before.source, re.MULTILINE
            )
        elif "exercise" in before.metadata.get("tags", []):
            assert after.source == student.PLACEHOLDER
        else:
            assert after.source == before.source
    assert removed >= 1, f"{name}: no solution found (the chapters hide them in ```{{admonition}} Solution blocks)"
    assert stored_results(original), "the chapter itself still has its results"


@pytest.mark.parametrize("name", chapter_ids)
def test_every_exercise_has_a_cell_to_fill_that_the_book_hides(name):
    # The chapter's exercise cells hold comments only: the student copy's code is the chapter's,
    # so it runs top to bottom with the exercises empty whenever the chapter does (nbval).
    cells = read(chapter(name)).cells
    statements = [i for i, c in enumerate(cells) if c.cell_type == "markdown"
                  and re.match(r"\*\*\d+\. ", c.source)]
    exercises = [i for i, c in enumerate(cells) if student.EXERCISE_TAG in c.metadata.get("tags", [])]
    assert statements, f"{name}: no exercise statement (a markdown cell starting **N. Title.**)"
    assert exercises == [i + 1 for i in statements], "each exercise's statement, then its cell to fill"
    for i in exercises:
        assert cells[i].cell_type == "code" and "remove-cell" in cells[i].metadata.tags
        code = [line for line in cells[i].source.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        assert not code, f"cell {i}: an exercise cell holds comments only, not {code}"


def made_up_notebook():
    markdown = "\n".join([
        "## Exercises",
        "",
        "**1. First.** Do this.",
        "",
        "```{admonition} Solution",
        ":class: dropdown",
        "~~~python",
        "print(1)",
        "~~~",
        "Because.",
        "```",
        "",
        "**2. Second.** Do that:",
        "",
        "```python",
        "start = 0",
        "```",
        "",
        "````{dropdown} Solution",
        "```python",
        "print(2)",
        "```",
        "````",
    ])
    cells = [
        nbformat.v4.new_markdown_cell(markdown),
        nbformat.v4.new_code_cell("answer = 42", metadata={"tags": ["exercise"]}),
        nbformat.v4.new_code_cell("print(answer)", metadata={"tags": ["solution", "hide-input"]}),
        nbformat.v4.new_markdown_cell("```{admonition} Solution\n:class: dropdown\nOnly a solution.\n```"),
        nbformat.v4.new_markdown_cell("Text", metadata={"tags": ["solution"]}),
        nbformat.v4.new_code_cell("x = 1", execution_count=3,
                                  outputs=[nbformat.v4.new_output("stream", name="stdout", text="1\n")]),
    ]
    return nbformat.v4.new_notebook(cells=cells)


def test_made_up_notebook():
    nb, removed = student.student_version(made_up_notebook())
    assert removed == 5
    assert [c.source for c in nb.cells] == [
        "## Exercises\n\n**1. First.** Do this.\n\n**2. Second.** Do that:\n\n```python\nstart = 0\n```",
        student.PLACEHOLDER,
        "x = 1",
    ]
    assert nb.cells[1].metadata.tags == ["exercise"]
    assert nb.cells[2].outputs == [] and nb.cells[2].execution_count is None


def test_unclosed_solution_is_an_error():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("```{admonition} Solution\nno end")])
    with pytest.raises(student.StudentError, match="never closed"):
        student.student_version(nb)


def test_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(SystemExit, match="did not write") as exit_info:
        student.main(["--out", str(tmp_path), "ch01"])
    assert "--out" in str(exit_info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"], "nothing written or removed"
    with pytest.raises(SystemExit, match="chapters' own folder"):
        student.main(["--out", str(chapter("ch01").parent), "ch01"])


def test_rerun_is_identical_and_deletes_nothing(tmp_path):
    out = tmp_path / "student"
    assert student.main(["--out", str(out), "ch01", "ch02"]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(first) == {student.MARKER, chapter("ch01").name, chapter("ch02").name}
    (out / "my_answers.ipynb").write_text("{}", encoding="utf-8")  # a student's file in the folder
    assert student.main(["--out", str(out), "ch01", "ch02"]) == 0
    second = {p.name: p.read_bytes() for p in out.iterdir()}
    assert second == {**first, "my_answers.ipynb": b"{}"}, "same bytes, no temporary file left, nothing deleted"


@pytest.mark.notebook
@pytest.mark.parametrize("name", chapter_ids[:1])
def test_student_notebook_runs_with_the_exercises_empty(name, tmp_path):
    # One chapter, to show the written file runs: every student copy keeps its chapter's code
    # cells unchanged (test_every_other_cell_kept_in_order), and nbval runs every chapter.
    [path] = student.write_student([chapter(name)], tmp_path / "student")
    results = run(path, {}, tmp_path)  # papermill, fresh kernel; an error in any cell fails
    assert results.keys() == stored_results(read(chapter(name))).keys()
