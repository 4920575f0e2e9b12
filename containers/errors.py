"""The image build's one error."""

from __future__ import annotations


class BuildError(Exception):
    """An image cannot be built; the message is meant for the user, on one line."""
