"""The import package's one error."""

from __future__ import annotations


class ImportFailure(Exception):
    """An import that cannot go on; the message is meant for the user, on one line."""
