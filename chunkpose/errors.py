"""The errors that mean "the input is wrong", apart from bugs.

Everything the caller can fix (a mesh in millimetres, an empty mask, depth in the wrong
units, a missing scene file, a weights folder of the wrong layout, an output folder that is
not ours) raises an InputError (a ValueError, so plain `except ValueError` code keeps
working); the message names the argument and the fix. The command line turns exactly
these (and BudgetTooSmall) into one line and exit code 2; any other exception is a bug and
keeps its traceback.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input; the message names the argument and how to fix it."""
