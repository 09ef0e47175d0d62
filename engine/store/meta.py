"""The ``meta`` table: one text value per key (dataset, node, schema, clock,
relay settings, markers of other modules)."""

from __future__ import annotations

import sqlite3

from .txn import WriteTxn


def read_all(conn: sqlite3.Connection) -> dict[str, str]:
    """Every key and value."""
    return dict(conn.execute("SELECT key, value FROM meta").fetchall())


def get(conn: sqlite3.Connection, key: str) -> str | None:
    """The value of ``key``, or None."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def put(txn: WriteTxn, key: str, value: str) -> None:
    """Set ``key`` (inserted or replaced)."""
    txn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def delete(txn: WriteTxn, key: str) -> bool:
    """Remove ``key``; True when it was there."""
    return txn.execute("DELETE FROM meta WHERE key = ?", (key,)).rowcount > 0


def insert_many(txn: WriteTxn, items: dict[str, str]) -> None:
    """Insert new keys (a fresh store), in key order."""
    txn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", sorted(items.items()))
