"""The write transaction every node-store writer goes through."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any


class WriteTxn:
    """An open ``BEGIN IMMEDIATE`` transaction of one node store: holding one
    is what entitles a caller to write. Store modules take it as their first
    argument; it commits or rolls back as a whole (``NodeStore.transaction``).
    """

    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Any]) -> sqlite3.Cursor:
        return self.conn.executemany(sql, rows)
