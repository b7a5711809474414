"""User-facing errors.

Every error a user can cause (bad recipe, bad catalogue row, bad argument) is a `MoonError`: the CLI prints its
message on one line and exits with code 2, without a traceback (unless `--debug`). Messages name the place (file,
line, key or id) and say what was expected.
"""

from __future__ import annotations


class MoonError(Exception):
    """Base class of errors caused by the user's input, reported without a traceback."""

    exit_code = 2


class RecipeError(MoonError):
    """A recipe file or override is invalid."""


class DataError(MoonError):
    """A catalogue, pair file or image is invalid."""
