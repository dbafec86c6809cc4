"""The exception raised for malformed dataset files."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset file is malformed; the message names the file, the line or field, the problem."""
