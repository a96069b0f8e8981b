"""The import contracts (.importlinter) hold on the checkout and catch an upward import."""

from __future__ import annotations

import check_imports  # tools/ is on sys.path (tests/conftest.py)
import pytest


def test_contracts_hold_on_the_checkout():
    done = check_imports.check()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("file", "line", "broken"),
    [
        # the model library reaching up into the command line
        ("pangu_pi/config.py", "from pangu_pi import commands",
         "pangu_pi.config is not allowed to import pangu_pi.commands"),
        # serving and training are independent of each other
        ("serving/chat.py", "import pangu_pi.training.config",
         "pangu_pi.serving is not allowed to import pangu_pi.training"),
        # a circle inside the model library
        ("pangu_pi/folders.py", "import pangu_pi.tokenizer", "No cycles are allowed in pangu_pi."),
        # the training core reaching up to a recipe, and a recipe to one that builds on it
        ("training/core.py", "from .recipes import sft",
         "pangu_pi.training.core is not allowed to import pangu_pi.training.recipes"),
        ("training/recipes/sft.py", "from . import dpo",
         "pangu_pi.training.recipes.sft is not allowed to import pangu_pi.training.recipes.dpo"),
    ],
)
def test_a_planted_import_breaks_a_contract(file, line, broken):
    done = check_imports.check(plant=(file, line))
    assert done.returncode != 0
    assert broken in " ".join(done.stdout.split()), done.stdout[-4000:]
