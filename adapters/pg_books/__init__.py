"""The ``pg_books`` adapter: the head office's consolidated books in
PostgreSQL, fed from a read-only reporting node (docs/adapters.md).

Enabled on the reporting node's home, its node-side part is a change queue
(``pg_books_queue``) written in the same SQLite transaction as the records
it follows: one row per record, its latest ``RecordChange``, numbered by a
sequence that only grows. ``adapters.pg_books.feed`` applies the queue to
PostgreSQL (``adapters.pg_books.books``: the accounting adapter's postings
on a second SQL back end) in one PostgreSQL transaction per batch, with the
last sequence number applied stored in the same transaction. So the node
syncs on while PostgreSQL is away, and a crash applies nothing twice.

The queue is not a table of books: ``tables()`` is empty and its rebuild
leaves it as it is (the books' rebuild is ``branchline report rebuild``).
It holds at most one row per record, and rows PostgreSQL has are deleted.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from adapters.accounting import AccountingAdapter
from engine.errors import AdapterConfigError
from engine.plugins import RecordChange
from engine.schema import Schema

NAME = "pg_books"
QUEUE = "pg_books_queue"
QUEUE_DDL = (
    f"CREATE TABLE IF NOT EXISTS {QUEUE} (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
    "collection TEXT NOT NULL, id TEXT NOT NULL, change BLOB NOT NULL, UNIQUE (collection, id))"
)


class ChangeQueue:
    """The node-side part of ``pg_books`` (module docstring)."""

    name = NAME
    collections: frozenset[str]

    def __init__(self, schema: Schema, options: dict[str, Any]) -> None:
        if options:
            raise AdapterConfigError(
                f"adapter '{NAME}' takes no options (got {', '.join(sorted(options))}); "
                "PostgreSQL is named by 'branchline report serve --pg URL'"
            )
        try:
            self.collections = AccountingAdapter(schema, {}).collections
        except AdapterConfigError as exc:
            raise AdapterConfigError(str(exc).replace("'accounting'", f"'{NAME}'")) from None

    def tables(self) -> Sequence[str]:
        return ()

    def setup(self, conn: sqlite3.Connection) -> None:
        conn.execute(QUEUE_DDL)

    def drop(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"DROP TABLE IF EXISTS {QUEUE}")

    def apply(self, conn: sqlite3.Connection, changes: Sequence[RecordChange]) -> None:
        # REPLACE deletes the record's older row: the new one gets a new seq.
        conn.executemany(
            f"INSERT OR REPLACE INTO {QUEUE} (collection, id, change) VALUES (?, ?, ?)",
            [(c.collection, c.id, encode(c)) for c in changes],
        )

    def rebuild(self, conn: sqlite3.Connection, records: Iterable[RecordChange]) -> None:
        self.setup(conn)


def encode(change: RecordChange) -> bytes:
    """A change as a queue row's ``change`` (JSON)."""
    return orjson.dumps(
        [
            change.kind,
            change.collection,
            change.id,
            change.doc,
            change.values,
            change.created_hlc,
            change.created_node,
            change.updated_hlc,
            change.edited,
            change.alias_of,
        ]
    )


def decode(data: bytes) -> RecordChange:
    """The change ``encode`` wrote."""
    kind, coll, rid, doc, values, c_hlc, c_node, u_hlc, edited, alias = orjson.loads(data)
    return RecordChange(kind, coll, rid, doc, values, c_hlc, c_node, u_hlc, tuple(edited), alias)


def pending(conn: sqlite3.Connection, after: int, limit: int) -> tuple[list[RecordChange], int]:
    """Up to ``limit`` queued changes after sequence number ``after``, in
    order, and the last one's number (``after`` when there are none)."""
    rows = conn.execute(
        f"SELECT seq, change FROM {QUEUE} WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
    ).fetchall()
    return [decode(row[1]) for row in rows], (rows[-1][0] if rows else after)


def queued_upto(conn: sqlite3.Connection) -> int:
    """The last sequence number the queue gave (0 for none), also when its
    rows are gone."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (QUEUE,)).fetchone()
    return int(row[0]) if row else 0


def factory(schema: Schema, options: dict[str, Any]) -> ChangeQueue:
    """Entry point of ``branchline.adapters``: ``pg_books``."""
    return ChangeQueue(schema, options)
