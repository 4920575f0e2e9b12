"""Turning an exception into a one-line message for a user or a client."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The exception's first non-empty line, at most ``limit`` characters; its type's name if it says nothing."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(exc).__name__
