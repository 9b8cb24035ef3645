"""Tests of the chapter notebooks in book/.

Three layers:

- conventions, read from the stored notebooks (fast, no kernel): every chapter is in the table
  of contents, was executed top to bottom without error, has a `parameters` and a final
  `results` cell, alt text on every figure, a few `# NBVAL_CHECK_OUTPUT` cells, exercises with
  solutions, and cites only keys of book/references.bib;
- nbval (collected from `testpaths`, options in pyproject.toml): every chapter re-executed in a
  fresh kernel; cells marked `# NBVAL_CHECK_OUTPUT` must reproduce their stored output after the
  substitutions of book/nbval_sanitize.cfg;
- papermill (marker `notebook`): chapters re-executed with other parameters, asserting on the
  figures their `results` cell records.

`pytest -m "not notebook"` leaves out every notebook execution. Notebook runs skip, with the
reason, when the data they load are neither cached nor in TEACHREG_DATA_MIRROR.
"""

from __future__ import annotations

import re
import warnings

import pytest
import student  # book/tools: on sys.path once notebook_tools is imported (conftest.py imports it)
import yaml
from nbval.plugin import get_sanitize_patterns
from notebook_tools import (
    BOOK,
    CHAPTERS,
    SANITIZE,
    chapter_paths,
    code_cells,
    missing_data,
    non_finite,
    read,
    run_chapter,
    stored_results,
    tagged,
)

MAX_BYTES = 2 * 2**20  # a chapter notebook, outputs included
MAX_SECONDS = 180  # a chapter's run with default-sized parameters (2-core CPU)
CODE_COLUMN = 76  # characters of a code or printed line that the rendered book shows without scrolling
LABELS = ("spinal_cord", "brainstem")

chapter_ids = sorted(CHAPTERS)


def chapter(name: str):
    path = CHAPTERS[name]
    if not path.exists():
        pytest.fail(f"{path.relative_to(BOOK.parent)} does not exist")
    return path


def needs_data(path):
    reason = missing_data(path)
    if reason:
        pytest.skip(reason)


def run(path, parameters, tmp_path) -> dict:
    needs_data(path)
    results, seconds = run_chapter(path, parameters, tmp_path)
    print(f"{path.name} with {parameters}: {seconds:.0f} s, results {results}")
    if seconds > MAX_SECONDS:
        warnings.warn(f"{path.name} took {seconds:.0f} s with {parameters} (target: under {MAX_SECONDS} s)")
    assert not non_finite(results), f"results that are not finite numbers: {non_finite(results)}"
    return results


# --- conventions (stored notebooks) ------------------------------------------------------------


def test_every_chapter_is_in_the_book():
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text(encoding="utf-8"))
    files = {entry["file"] for part in toc["parts"] for entry in part["chapters"]}
    for path in chapter_paths():
        assert path.stem in files, f"{path.name} is not in book/_toc.yml"
    for path in CHAPTERS.values():
        assert path.stem in files


@pytest.mark.parametrize("name", chapter_ids)
def test_chapter_was_executed_in_order_without_errors(name):
    nb = read(chapter(name))
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    counts = [c.execution_count for c in code_cells(nb)]
    assert counts == list(range(1, len(counts) + 1)), (
        "the stored outputs must come from one top-to-bottom run in a fresh kernel (run `make execute`)"
    )
    errors = [o for c in code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors, f"stored errors: {[e.ename + ': ' + e.evalue for e in errors]}"
    size = chapter(name).stat().st_size
    assert size < MAX_BYTES, f"{size / 2**20:.1f} MB with outputs; keep figures small"


@pytest.mark.parametrize("name", chapter_ids)
def test_chapter_structure(name):
    nb = read(chapter(name))
    cells = code_cells(nb)
    assert 'if "google.colab" in sys.modules' in cells[0].source and "%pip install" in cells[0].source
    assert tagged(nb, "parameters") == [cells[1]], "the second code cell must be the one tagged 'parameters'"
    chapter_cells = [c for c in cells if student.EXERCISE_TAG not in c.metadata.get("tags", [])]
    assert tagged(nb, "results") == [chapter_cells[-1]], (
        "the last code cell (the exercises' cells aside) must be the one tagged 'results'")
    results = stored_results(nb)
    assert results and not non_finite(results)
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert re.search(r"^# \d+\. ", markdown, re.MULTILINE), "a title '# N. Title'"
    assert "learning objectives" in markdown.lower()
    assert ":class: dropdown" in markdown, "exercises with solutions in dropdowns"
    checked = [c for c in cells if "# NBVAL_CHECK_OUTPUT" in c.source]
    assert 1 <= len(checked) <= 3, f"{len(checked)} cells marked # NBVAL_CHECK_OUTPUT (1 to 3)"
    for cell in checked:
        assert any(o.output_type == "stream" for o in cell.outputs), "a checked cell must print its result"


@pytest.mark.parametrize("name", chapter_ids)
def test_every_figure_has_alt_text(name):
    nb = read(chapter(name))
    for i, cell in enumerate(code_cells(nb)):
        if any("image/png" in o.get("data", {}) for o in cell.outputs):
            alt = cell.metadata.get("mystnb", {}).get("image", {}).get("alt", "")
            assert len(alt) > 20, f"code cell {i} shows a figure without alt text in metadata mystnb.image.alt"


@pytest.mark.parametrize("name", chapter_ids)
def test_no_cell_shows_the_repr_of_a_plotting_call(name):
    # a figure cell ending in `ax.set_title(...)` or `fig.suptitle(...)` also shows "Text(0.5, 1.0, '...')"
    for i, cell in enumerate(code_cells(read(chapter(name)))):
        for output in cell.outputs:
            text = output.get("data", {}).get("text/plain", "") if output.output_type == "execute_result" else ""
            assert not re.match(r"[\[(]?(Text\(|<matplotlib|<Figure|<Axes)", text), (
                f"code cell {i} shows {text[:60]!r}: end the cell with `;` or a statement")


@pytest.mark.parametrize("name", chapter_ids)
def test_printed_lines_fit_the_books_code_column(name):
    nb = read(chapter(name))
    for i, cell in enumerate(code_cells(nb)):
        for output in cell.outputs:
            if output.output_type == "stream" and output.name == "stdout":
                for line in output.text.splitlines():
                    assert len(line) <= CODE_COLUMN, f"code cell {i} prints {len(line)} characters: {line[:60]}..."


@pytest.mark.parametrize("name", chapter_ids)
def test_code_lines_fit_the_books_code_column(name):
    for i, cell in enumerate(code_cells(read(chapter(name)))):
        for n, line in enumerate(cell.source.splitlines(), 1):
            assert len(line) <= CODE_COLUMN, f"code cell {i}, line {n}: {len(line)} characters: {line[:60]}..."


def test_citations_are_in_the_bibliography():
    keys = set(re.findall(r"^@\w+\{([^,\s]+),", (BOOK / "references.bib").read_text(encoding="utf-8"), re.MULTILINE))
    texts = {p.name: p.read_text(encoding="utf-8") for p in BOOK.glob("*.md")}
    texts.update({p.name: "\n".join(c.source for c in read(p).cells) for p in chapter_paths()})
    for name, text in texts.items():
        for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", text):
            for key in group.split(","):
                assert key.strip() in keys, f"{name} cites {key.strip()!r}, which is not in book/references.bib"


def test_sanitizer():
    patterns = get_sanitize_patterns(SANITIZE.read_text(encoding="utf-8"))
    assert len(patterns) == 8, "a pattern was lost (an empty 'replace: ' line needs its trailing space)"

    def sanitize(text):
        for regex, replace in patterns:
            text = re.sub(regex, replace, text)
        return text

    log = "I0000 00:00:1795271553.476194   12722 service.cc:153] XLA service initialized\n"
    assert sanitize(log + "Dice 0.912\n") == "Dice 0.912\n"
    assert sanitize("<Figure at 0x7f3a2c1b5e50>") == sanitize("<Figure at 0x55d0aa0e1f10>")
    assert sanitize("done in 12.3 s") == sanitize("done in 9.8 s")
    assert sanitize("optimisation time: 41.2 s") == "TIMING LINE"
    assert sanitize("error 0.12345 voxels") == "error 0.123 voxels"
    assert sanitize("Dice ≈0.912") == sanitize("Dice ≈0.913") != sanitize("Dice ≈0.902")
    assert sanitize("Dice 0.912") != sanitize("Dice 0.913")  # three decimals are compared by default


# --- papermill: other parameters ----------------------------------------------------------------


@pytest.mark.notebook
def test_ch01_other_seed(tmp_path):
    stored = stored_results(read(chapter("ch01")))
    results = run(chapter("ch01"), {"seed": 1, "ddf_max_mm": 15.0}, tmp_path)
    assert results.keys() == stored.keys()
    # the random field follows the parameters, and stays free of folding at this size
    assert results["ddf_max_mm"] == pytest.approx(15.0, abs=1e-3)
    assert 0 < results["jacobian_min"] < 1 < results["jacobian_max"]
    assert results["folding_fraction"] == 0
    # pulling leaves no hole, pushing an enlarged slice leaves many
    assert results["pull_hole_fraction"] == 0 and results["push_hole_fraction"] > 0.3
    # the interpolation round trip does not depend on the seed: it reproduces the stored figures
    for key in [k for k in stored if k.startswith("dice_round_trip_")]:
        assert results[key] == pytest.approx(stored[key], abs=1e-3), key
        assert 0.8 < results[key] <= 1


@pytest.mark.notebook
def test_ch02_other_seed(tmp_path):
    stored = stored_results(read(chapter("ch02")))
    results = run(chapter("ch02"), {"seed": 1}, tmp_path)
    assert results.keys() == stored.keys()
    for key, value in results.items():
        if key.startswith(("dice_", "jaccard_")):
            assert 0 <= value <= 1, key
        if key.startswith("argmin_") and key.endswith("_same"):
            assert value == 0, f"{key}: every loss is minimal at the true alignment of identical images"
    for label in LABELS:  # Jaccard = Dice / (2 - Dice) for the same masks
        dice = results[f"dice_hard_{label}"]
        assert results[f"jaccard_hard_{label}"] == pytest.approx(dice / (2 - dice), abs=2e-3)
    # the regularisers are homogeneous in the displacement, of degree 2, 1 and 2
    for key, degree in (("bending_energy", 2), ("gradient_L1", 1), ("gradient_L2", 2)):
        assert results[f"{key}_exponent_amplitude"] == pytest.approx(degree, abs=0.01), key


@pytest.mark.notebook
@pytest.mark.parametrize("loss", ["ssd", "lncc"])
def test_ch03_reaches_its_targets(loss, tmp_path):
    results = run(chapter("ch03"), {"loss": loss, "seed": 1}, tmp_path)
    assert results["error_voxels"] < 0.5, f"mean displacement error {results['error_voxels']:.3f} voxels with {loss}"
    for label in LABELS:
        after, exact = results[f"dice_after_{label}"], results[f"dice_exact_{label}"]
        assert abs(after - exact) <= 0.02, f"{label}: Dice {after:.3f} after registration, {exact:.3f} with the exact inverse ({loss})"
    assert results["error_mm"] > 0 and results["seconds"] > 0
    # feature-based: ICP on the skin removes most of the displacement, far less precisely than intensities
    assert results["icp_error_mm"] < 0.25 * results["initial_mm"], results
    assert results["icp_error_mm"] > 5 * results["error_mm"], results


@pytest.mark.notebook
def test_ch04_other_direction(tmp_path):
    # subject 1 onto subject 0: a pair the defaults were not chosen on; one sweep weight to save time
    results = run(chapter("ch04"), {"swap": True, "sweep_weights": [1.0]}, tmp_path)
    assert results["dice_after"] > results["dice_before"] + 0.03, results
    assert results["hd95_after_mm"] < results["hd95_before_mm"], results
    assert results["folding"] < 0.001, "the B-spline default folds under 0.1 % of the voxels"
    assert results["dice_ddf_bending_1"] > results["dice_before"]
    # the same field integrated as a velocity field (scaling and squaring) folds far less than the DDF
    assert results["folding_svf_bending_1"] < 0.2 * results["folding_ddf_bending_1"], results
    assert results["dice_label_driven"] > max(0.9, results["dice_after"]), "labels drive the overlap up"


@pytest.mark.notebook
def test_ch05_another_pair_and_supervision(tmp_path):
    # the classical comparison on a pair whose real scan is the fixed image; the demo trained supervised, another seed
    stored = stored_results(read(chapter("ch05")))
    results = run(chapter("ch05"), {"pair_index": 5, "train_mode": "supervised", "seed": 1}, tmp_path)
    assert results.keys() == stored.keys()
    # the pretrained network on the unseen test pairs: lungs overlap better, part of the motion removed, few folds
    assert results["mean_dice_after"] > results["mean_dice_before"], results
    assert results["mean_tre_mm"] < results["mean_initial_mm"], results
    assert results["mean_folding"] < 0.005, "the network folds under 0.5 % of the voxels"
    # the chosen pair: both methods move it towards the truth; one forward pass is far faster than the optimiser
    assert results["pair_tre_mm"] < results["pair_initial_mm"], results
    assert results["classical_tre_mm"] < 0.6 * results["pair_initial_mm"], results
    assert results["classical_folding"] < 0.001
    assert results["seconds_per_pair"] < 1 and results["speedup"] > 20, results
    # aligning the lungs first helps the network; a short optimisation from it improves on it; the full one most
    assert results["aligned_tre_mm"] < results["mean_tre_mm"], results
    assert results["short_network_tre_mm"] < results["mean_tre_mm"], results
    assert results["short_network_dice_after"] > results["mean_dice_after"], results
    assert results["full_tre_mm"] < results["short_network_tre_mm"], results
    # two epochs of supervised training lower the training loss (the DDF's end-point error, voxels)
    assert results["train_loss_last_epoch"] < results["train_loss_first_epoch"], results
