"""Moved: the demo data generator is tools/domain_demo.py (run `python tools/domain_demo.py`); this name
only says so."""

import sys

from ._moved import run_moved

if __name__ == "__main__":
    sys.exit(run_moved("domain_demo"))
