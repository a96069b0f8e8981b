"""Moved: the YunShan demo is tools/yunshan_demo.py (run `python tools/yunshan_demo.py`); this name only says so."""

import sys

from ._moved import run_moved

if __name__ == "__main__":
    sys.exit(run_moved("yunshan_demo"))
