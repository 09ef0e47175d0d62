"""Bounded ``IN (...)`` lists: ids go to SQLite ``CHUNK`` at a time, far
below its limit on parameters (32,766 by default)."""

from __future__ import annotations

from collections.abc import Iterator

CHUNK = 500  # ids per IN (...) list


def chunks(items: list[str]) -> Iterator[list[str]]:
    """``items`` in consecutive slices of at most ``CHUNK``."""
    for i in range(0, len(items), CHUNK):
        yield items[i : i + CHUNK]


def marks(chunk: list[str]) -> str:
    """The ``?, ?, ...`` placeholders for one slice."""
    return ", ".join("?" * len(chunk))
