"""Settings written twice must agree: chapter 4's parameters cell and `register.nonrigid`'s defaults."""

import ast
import inspect

from notebook_tools import CHAPTERS, read, tagged

from teachreg import register


def test_chapter_4_parameters_are_the_nonrigid_defaults():
    # papermill needs literals in the cell, so the values are written there and checked here
    (cell,) = tagged(read(CHAPTERS["ch04"]), "parameters")
    values = {node.targets[0].id: ast.literal_eval(node.value)
              for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)}
    defaults = {name: parameter.default for name, parameter in inspect.signature(register.nonrigid).parameters.items()}
    shared = {"transform", "grid_spacing", "regulariser", "regulariser_weight", "levels", "steps", "learning_rate",
              "crop"}
    assert {key: values[key] for key in shared} == {key: defaults[key] for key in shared}
