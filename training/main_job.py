"""Moved: the quickstart's main job is tools/main_job.py (run `python tools/main_job.py`); this name only says so."""

import sys

from ._moved import run_moved

if __name__ == "__main__":
    sys.exit(run_moved("main_job"))
