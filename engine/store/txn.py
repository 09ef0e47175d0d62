"""The write transaction every node-store writer goes through."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from typing import Any


class WriteTxn:
    """An open ``BEGIN IMMEDIATE`` transaction of one node store: holding one
    is what entitles a caller to write. Store modules take it as their first
    argument; it commits or rolls back as a whole (``NodeStore.transaction``).
    """

    __slots__ = ("conn", "points")

    def __init__(
        self, conn: sqlite3.Connection, points: Callable[[str], None] | None = None
    ) -> None:
        self.conn = conn
        self.points = points

    def point(self, name: str) -> None:
        """A named point inside the transaction where the simulator may crash
        the node (``NodeStore.commit_points``); a no-op otherwise."""
        if self.points is not None:
            self.points(name)

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Any]) -> sqlite3.Cursor:
        return self.conn.executemany(sql, rows)
