"""Settings written twice must agree: chapter 4's parameters cell and `presets.PROSTATE_NONRIGID`."""

import ast

from notebook_tools import CHAPTERS, read, tagged

from teachreg import presets


def test_chapter_4_parameters_are_the_prostate_preset():
    # papermill needs literals in the cell, so the values are written there and checked here
    (cell,) = tagged(read(CHAPTERS["ch04"]), "parameters")
    values = {node.targets[0].id: ast.literal_eval(node.value)
              for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)}
    assert {key: values[key] for key in presets.PROSTATE_NONRIGID} == presets.PROSTATE_NONRIGID
