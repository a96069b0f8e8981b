"""The old `python -m pangu_pi.training.X` commands of the demo and quickstart scripts.

Those scripts are orchestration, not library code, so they live in the checkout's tools/ and are
not installed. The old command names still answer: they say in one line what the command became
and, from a checkout, run the script with the same arguments.
"""

from __future__ import annotations

import runpy
import shlex
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def run_moved(name: str) -> int:
    script = TOOLS / f"{name}.py"
    print(f"moved: run python tools/{name}.py {shlex.join(sys.argv[1:])}".rstrip(), file=sys.stderr, flush=True)
    if not script.is_file():  # an installed copy: there is no checkout, so nothing to run
        return 2
    # As `python tools/NAME.py` would: the script is __main__ and its folder comes first on sys.path,
    # so the tools import each other by name.
    sys.argv[0] = str(script)
    sys.path.insert(0, str(TOOLS))
    runpy.run_path(str(script), run_name="__main__")
    return 0


def moved_names(old: str, new: dict[str, str]):
    """A module `__getattr__` for names that moved out of module `old`: each resolves to where it lives
    now (`new` maps a name to its module) with a FutureWarning saying so, once per name."""
    import importlib
    import warnings

    def __getattr__(name: str):
        if name not in new:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old}.{name} moved: import it from {new[name]}", FutureWarning, stacklevel=2)
        return getattr(importlib.import_module(new[name]), name)

    return __getattr__
