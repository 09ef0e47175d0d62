"""The SQL side of write-back capture (engine.capture): the change queue,
the triggers that fill it in the app's own transaction, the suppress flag
that keeps the node's write-back from being captured again (no echo), and
the statements that read and write the app's table.

Tables (created when a node first captures a table):

- ``capture_queue``: one row per captured insert, update or delete, in commit
  order (``seq``): the row's rowid, its key before and after, and the
  captured columns before and after as JSON objects (a BLOB value becomes
  ``["blob", hex]``, which no field accepts, so it is quarantined, not lost).
- ``capture_flag``: one row; while the node writes back into a captured
  table, ``suppress`` is 1 inside its write transaction (and back to 0 before
  it commits), so no other connection ever sees it set.
- ``capture_links``: which row of a captured table shows which record (its
  rowid and the key it was written under), so a rename or a voucher numbered
  after its insert still finds its row.
- ``capture_deferred``: records whose write-back waited because their row
  had queued changes; written once the drain has passed those changes.
- ``capture_failures``: queued changes that could not become a write (a bad
  value, an unknown reference), with the reason: quarantined, kept whole,
  until a later change of the same row drains cleanly or ``retry`` queues
  them again.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from ..errors import CaptureError

if TYPE_CHECKING:
    from ..capture.spec import CaptureSpec

TABLES_SQL = """
CREATE TABLE IF NOT EXISTS capture_queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl TEXT NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('insert', 'update', 'delete')),
    row INTEGER NOT NULL,
    old_key,
    new_key,
    old TEXT,
    new TEXT,
    at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS capture_queue_row ON capture_queue (tbl, row);
CREATE TABLE IF NOT EXISTS capture_flag (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    suppress INTEGER NOT NULL
);
INSERT OR IGNORE INTO capture_flag VALUES (1, 0);
CREATE TABLE IF NOT EXISTS capture_links (
    tbl TEXT NOT NULL,
    record TEXT NOT NULL,
    row INTEGER NOT NULL,
    key,
    PRIMARY KEY (tbl, record)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS capture_links_row ON capture_links (tbl, row);
CREATE TABLE IF NOT EXISTS capture_deferred (
    tbl TEXT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (tbl, record)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS capture_failures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    seq INTEGER NOT NULL,
    tbl TEXT NOT NULL,
    op TEXT NOT NULL,
    row INTEGER NOT NULL,
    old_key,
    new_key,
    old TEXT,
    new TEXT,
    at INTEGER NOT NULL,
    code TEXT NOT NULL,
    reason TEXT NOT NULL,
    failed_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS capture_failures_row ON capture_failures (tbl, row);
"""

#: Milliseconds since the epoch, from inside SQLite (the app's clock: when the
#: app wrote the row; shown, never used to order anything).
_NOW_MS = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
OPS = ("insert", "update", "delete")
QUEUE_COLUMNS = "seq, tbl, op, row, old_key, new_key, old, new, at"
#: Reasons of quarantined changes longer than this are cut.
MAX_REASON_CHARS = 500


@dataclass(frozen=True)
class Change:
    """One queued change of a captured table (a row of ``capture_queue``)."""

    seq: int
    table: str
    op: str
    row: int
    old_key: Any
    new_key: Any
    old: dict[str, Any] | None
    new: dict[str, Any] | None
    at: int


def ensure_tables(conn: sqlite3.Connection) -> None:
    """Create the capture tables if missing (inside the caller's transaction)."""
    for statement in TABLES_SQL.split(";"):
        if statement.strip():
            conn.execute(statement)


def trigger_names(table: str) -> list[str]:
    return [f"capture_{table}_{op}" for op in OPS]


def install(conn: sqlite3.Connection, spec: CaptureSpec) -> None:
    """Create the table's three triggers (replacing older ones)."""
    drop_triggers(conn, spec.table)
    for name, sql in zip(trigger_names(spec.table), _trigger_sql(spec), strict=True):
        conn.execute(f'DROP TRIGGER IF EXISTS "{name}"')
        conn.execute(sql)


def drop_triggers(conn: sqlite3.Connection, table: str) -> None:
    for name in trigger_names(table):
        conn.execute(f'DROP TRIGGER IF EXISTS "{name}"')


def forget(conn: sqlite3.Connection, table: str) -> None:
    """Remove a table's triggers, queue, links and failures (capture disabled)."""
    drop_triggers(conn, table)
    for name in ("capture_queue", "capture_links", "capture_deferred", "capture_failures"):
        conn.execute(f"DELETE FROM {name} WHERE tbl = ?", (table,))


def enqueue_existing(conn: sqlite3.Connection, spec: CaptureSpec) -> int:
    """Queue every row of the table as an insert (capture enabled on a table
    that already holds rows); returns how many."""
    cur = conn.execute(
        f"INSERT INTO capture_queue (tbl, op, row, new_key, new, at) "
        f"SELECT ?, 'insert', rowid, \"{spec.key}\", {_json(spec, 'T')}, {_NOW_MS} "
        f'FROM "{spec.table}" AS T ORDER BY rowid',
        (spec.table,),
    )
    return int(cur.rowcount)


def head(conn: sqlite3.Connection, limit: int) -> list[Change]:
    """The oldest ``limit`` queued changes, in commit order."""
    return [
        _change(r)
        for r in conn.execute(
            f"SELECT {QUEUE_COLUMNS} FROM capture_queue ORDER BY seq LIMIT ?", (limit,)
        )
    ]


def queued(conn: sqlite3.Connection) -> dict[str, int]:
    """Queued changes per table (tables without any left out)."""
    if not _exists(conn, "capture_queue"):
        return {}
    return {
        str(t): int(n)
        for t, n in conn.execute("SELECT tbl, COUNT(*) FROM capture_queue GROUP BY tbl")
    }


def any_queued(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM capture_queue LIMIT 1").fetchone() is not None


def take(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute("DELETE FROM capture_queue WHERE seq = ?", (seq,))


def row_pending(conn: sqlite3.Connection, table: str, row: int) -> bool:
    """Whether a queued change of that row waits (the row holds what the app
    wrote after the record's state the node has)."""
    found = conn.execute(
        "SELECT 1 FROM capture_queue WHERE tbl = ? AND row = ? LIMIT 1", (table, row)
    ).fetchone()
    return found is not None


def set_suppress(conn: sqlite3.Connection, on: bool) -> None:
    conn.execute("UPDATE capture_flag SET suppress = ?", (1 if on else 0,))


# -- the app's table ------------------------------------------------------------


class RowRefused(Exception):
    """The app's table refused a row the node wrote back (its own UNIQUE,
    CHECK or NOT NULL constraint); the message is SQLite's."""


def table_info(conn: sqlite3.Connection, table: str) -> list[dict[str, Any]]:
    """``PRAGMA table_info`` of an app's rowid table, as dicts. Raises
    CaptureError when it is missing, a view or a WITHOUT ROWID table."""
    row = conn.execute(
        "SELECT type, wr FROM pragma_table_list WHERE schema = 'main' AND name = ?", (table,)
    ).fetchone()
    if row is None:
        raise CaptureError(f"no table '{table}' in the node store; create it first")
    if row[0] != "table":
        raise CaptureError(f"{table} is a {row[0]}, not a table")
    if row[1]:
        raise CaptureError(f"{table} is a WITHOUT ROWID table, which capture cannot follow")
    cur = conn.execute(f'SELECT * FROM pragma_table_info("{table}")')
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur]


def create_table(conn: sqlite3.Connection, table: str, key: str, columns: dict[str, str]) -> None:
    """Create an app table (``columns``: name -> SQL type), its key column
    unique, if it does not exist."""
    body = ", ".join(
        f'"{name}" {kind}' + (" UNIQUE" if name == key else "") for name, kind in columns.items()
    )
    conn.execute(f'CREATE TABLE IF NOT EXISTS "{table}" ({body})')


def row_holds(conn: sqlite3.Connection, spec: CaptureSpec, row: int, key: Any) -> bool:
    """Whether row ``row`` exists and holds ``key`` in the key column."""
    found = conn.execute(
        f'SELECT 1 FROM "{spec.table}" WHERE rowid = ? AND "{spec.key}" IS ?', (row, key)
    ).fetchone()
    return found is not None


def row_exists(conn: sqlite3.Connection, spec: CaptureSpec, row: int) -> bool:
    found = conn.execute(f'SELECT 1 FROM "{spec.table}" WHERE rowid = ?', (row,)).fetchone()
    return found is not None


def row_with_key(conn: sqlite3.Connection, spec: CaptureSpec, key: Any) -> int | None:
    """The first row holding ``key``, or None."""
    found = conn.execute(
        f'SELECT rowid FROM "{spec.table}" WHERE "{spec.key}" = ? ORDER BY rowid LIMIT 1', (key,)
    ).fetchone()
    return int(found[0]) if found else None


def write_row(
    conn: sqlite3.Connection, spec: CaptureSpec, row: int | None, columns: dict[str, Any]
) -> int:
    """Set ``columns`` of row ``row`` (None: insert a new row); returns its
    rowid. Raises RowRefused."""
    try:
        if row is not None:
            sets = ", ".join(f'"{c}" = ?' for c in columns)
            conn.execute(
                f'UPDATE "{spec.table}" SET {sets} WHERE rowid = ?', (*columns.values(), row)
            )
            return row
        names = ", ".join(f'"{c}"' for c in columns)
        marks = ", ".join("?" * len(columns))
        cur = conn.execute(
            f'INSERT INTO "{spec.table}" ({names}) VALUES ({marks})', tuple(columns.values())
        )
        return int(cur.lastrowid or 0)
    except sqlite3.IntegrityError as exc:
        raise RowRefused(str(exc)) from None


def delete_row(conn: sqlite3.Connection, spec: CaptureSpec, row: int) -> None:
    conn.execute(f'DELETE FROM "{spec.table}" WHERE rowid = ?', (row,))


# -- links ---------------------------------------------------------------------


def link(conn: sqlite3.Connection, table: str, record: str, row: int, key: Any) -> None:
    """Record ``record`` as shown by ``row`` under ``key`` (the one record of that row)."""
    conn.execute(
        "DELETE FROM capture_links WHERE tbl = ? AND row = ? AND record != ?", (table, row, record)
    )
    conn.execute(
        "INSERT OR REPLACE INTO capture_links VALUES (?, ?, ?, ?)", (table, record, row, key)
    )


def unlink(conn: sqlite3.Connection, table: str, record: str) -> None:
    conn.execute("DELETE FROM capture_links WHERE tbl = ? AND record = ?", (table, record))


def linked_row(conn: sqlite3.Connection, table: str, record: str) -> tuple[int, Any] | None:
    """(rowid, key) the record was last shown under, or None."""
    found = conn.execute(
        "SELECT row, key FROM capture_links WHERE tbl = ? AND record = ?", (table, record)
    ).fetchone()
    return (int(found[0]), found[1]) if found else None


def record_of_row(conn: sqlite3.Connection, table: str, row: int) -> str | None:
    found = conn.execute(
        "SELECT record FROM capture_links WHERE tbl = ? AND row = ?", (table, row)
    ).fetchone()
    return str(found[0]) if found else None


def defer(conn: sqlite3.Connection, table: str, record: str) -> None:
    conn.execute("INSERT OR IGNORE INTO capture_deferred VALUES (?, ?)", (table, record))


def undefer(conn: sqlite3.Connection, table: str, record: str) -> None:
    conn.execute("DELETE FROM capture_deferred WHERE tbl = ? AND record = ?", (table, record))


def deferred(conn: sqlite3.Connection, table: str) -> list[str]:
    return [
        str(r[0])
        for r in conn.execute("SELECT record FROM capture_deferred WHERE tbl = ?", (table,))
    ]


# -- failures (quarantine) -----------------------------------------------------


def quarantine(
    conn: sqlite3.Connection, change: Change, code: str, reason: str, at_ms: int | None = None
) -> int:
    """Keep ``change`` whole with why it could not be written (``code:
    reason``); returns its id. ``at_ms`` None: SQLite's clock."""
    cur = conn.execute(
        "INSERT INTO capture_failures (seq, tbl, op, row, old_key, new_key, old, new, at, "
        "code, reason, failed_at) VALUES "
        f"(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, COALESCE(?, {_NOW_MS}))",
        (
            change.seq,
            change.table,
            change.op,
            change.row,
            change.old_key,
            change.new_key,
            _dump(change.old),
            _dump(change.new),
            change.at,
            code,
            f"{code}: {reason}"[:MAX_REASON_CHARS],
            at_ms,
        ),
    )
    return int(cur.lastrowid or 0)


def clear_failures(conn: sqlite3.Connection, table: str, row: int) -> int:
    """A later change of the row was written: its older failures are moot."""
    return int(
        conn.execute(
            "DELETE FROM capture_failures WHERE tbl = ? AND row = ?", (table, row)
        ).rowcount
    )


@dataclass(frozen=True)
class FailureRow:
    """A quarantined change, as ``Node.capture_failures`` lists it."""

    id: int
    change: Change
    code: str
    reason: str
    failed_at: int

    def to_json(self) -> dict[str, Any]:
        c = self.change
        return {
            "id": self.id,
            "table": c.table,
            "op": c.op,
            "row": c.row,
            "key": c.old_key if c.op == "delete" else c.new_key,
            "values": c.old if c.op == "delete" else c.new,
            "code": self.code,
            "reason": self.reason,
            "captured_at": c.at,
            "failed_at": self.failed_at,
        }


def failures(conn: sqlite3.Connection) -> list[FailureRow]:
    if not _exists(conn, "capture_failures"):
        return []
    return [
        FailureRow(int(r[0]), _change(r[1:10]), str(r[10]), str(r[11]), int(r[12]))
        for r in conn.execute(
            f"SELECT id, {QUEUE_COLUMNS}, code, reason, failed_at FROM capture_failures ORDER BY id"
        )
    ]


def failure_count(conn: sqlite3.Connection) -> int:
    if not _exists(conn, "capture_failures"):
        return 0
    return int(conn.execute("SELECT COUNT(*) FROM capture_failures").fetchone()[0])


def requeue(conn: sqlite3.Connection, ids: Iterable[int]) -> int:
    """Put quarantined changes back at the end of the queue (``retry``), in
    their original order; returns how many."""
    wanted = sorted(set(ids))
    done = 0
    for fid in wanted:
        cur = conn.execute(
            "INSERT INTO capture_queue (tbl, op, row, old_key, new_key, old, new, at) "
            "SELECT tbl, op, row, old_key, new_key, old, new, at FROM capture_failures "
            "WHERE id = ?",
            (fid,),
        )
        conn.execute("DELETE FROM capture_failures WHERE id = ?", (fid,))
        done += cur.rowcount
    return done


def clear_writeback_failure(conn: sqlite3.Connection, table: str, record: str) -> None:
    """The record's row was written: an earlier refusal of it is moot."""
    conn.execute(
        "DELETE FROM capture_failures WHERE tbl = ? AND op = 'writeback' AND old_key = ?",
        (table, record),
    )


def drop_failure(conn: sqlite3.Connection, fid: int) -> None:
    conn.execute("DELETE FROM capture_failures WHERE id = ?", (fid,))


# -- internals -----------------------------------------------------------------


def _trigger_sql(spec: CaptureSpec) -> list[str]:
    t, k = spec.table, spec.key
    when = "(SELECT suppress FROM capture_flag) = 0"
    changed = " OR ".join(f'OLD."{c}" IS NOT NEW."{c}"' for c in spec.columns.values())
    insert = "INSERT INTO capture_queue (tbl, op, row, old_key, new_key, old, new, at) VALUES"
    names = trigger_names(t)
    return [
        f'CREATE TRIGGER "{names[0]}" AFTER INSERT ON "{t}" WHEN {when} BEGIN '
        f"{insert} ('{t}', 'insert', NEW.rowid, NULL, NEW.\"{k}\", NULL, "
        f"{_json(spec, 'NEW')}, {_NOW_MS}); END",
        f'CREATE TRIGGER "{names[1]}" AFTER UPDATE ON "{t}" WHEN {when} AND ({changed}) BEGIN '
        f"{insert} ('{t}', 'update', NEW.rowid, OLD.\"{k}\", NEW.\"{k}\", "
        f"{_json(spec, 'OLD')}, {_json(spec, 'NEW')}, {_NOW_MS}); END",
        f'CREATE TRIGGER "{names[2]}" AFTER DELETE ON "{t}" WHEN {when} BEGIN '
        f"{insert} ('{t}', 'delete', OLD.rowid, OLD.\"{k}\", NULL, "
        f"{_json(spec, 'OLD')}, NULL, {_NOW_MS}); END",
    ]


def _json(spec: CaptureSpec, alias: str) -> str:
    """``json_object`` of the captured columns of row ``alias``, by field name."""
    parts = []
    for fld, col in spec.columns.items():
        ref = f'{alias}."{col}"'
        parts.append(
            f"'{fld}', CASE WHEN typeof({ref}) = 'blob' THEN json_array('blob', hex({ref})) "
            f"ELSE {ref} END"
        )
    return f"json_object({', '.join(parts)})"


def _change(r: Any) -> Change:
    return Change(
        int(r[0]),
        str(r[1]),
        str(r[2]),
        int(r[3]),
        r[4],
        r[5],
        orjson.loads(r[6]) if r[6] is not None else None,
        orjson.loads(r[7]) if r[7] is not None else None,
        int(r[8]),
    )


def _dump(values: dict[str, Any] | None) -> str | None:
    return orjson.dumps(values).decode() if values is not None else None


def _exists(conn: sqlite3.Connection, table: str) -> bool:
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    return found is not None
