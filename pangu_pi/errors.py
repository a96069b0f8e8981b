"""Errors that library code raises for problems the user can fix.

The `pangu-pi` command (and `python -m pangu_pi.cli`) prints such an error as one line naming the
problem and the fix, without a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; the CLI prints its message alone."""
