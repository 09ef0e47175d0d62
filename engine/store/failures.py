"""The ``sync_failures`` table: what failed to go up or come down, one row per
(direction, document, reason), counting attempts. The failure's code is a
column (store format 5); the reason is the text shown, ``code: message``.
The policy (quarantine, retry marks) is ``engine.sync.failures``."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from .txn import WriteTxn


@dataclass(frozen=True)
class FailureRow:
    """One stored failure. ``records``: the record ids it names (may be empty)."""

    id: int
    direction: str
    doc: str
    records: list[str]
    code: str
    reason: str
    first_at: int
    last_at: int
    attempts: int


def record(
    txn: WriteTxn,
    direction: str,
    doc: str,
    code: str,
    reason: str,
    at_ms: int,
    records: list[str],
) -> int:
    """Insert a failure, or count one more attempt of the same (direction,
    document, reason); returns its id."""
    stored = orjson.dumps(records).decode() if records else None
    row = txn.execute(
        "INSERT INTO sync_failures (direction, doc, record, reason, first_at, last_at, code) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (direction, doc, reason) DO UPDATE SET "
        "attempts = attempts + 1, last_at = excluded.last_at, code = excluded.code, "
        "record = COALESCE(excluded.record, record) RETURNING id",
        (direction, doc, stored, reason, at_ms, at_ms, code),
    ).fetchone()
    return int(row[0])


def delete(txn: WriteTxn, ids: Iterable[int]) -> None:
    txn.executemany("DELETE FROM sync_failures WHERE id = ?", [(i,) for i in ids])


def ids_of(conn: sqlite3.Connection, direction: str, docs: Iterable[str]) -> list[int]:
    """Ids of the failures of ``docs`` in ``direction``."""
    out: list[int] = []
    wanted = sorted(set(docs))
    for i in range(0, len(wanted), 500):
        chunk = wanted[i : i + 500]
        out += [
            int(r[0])
            for r in conn.execute(
                "SELECT id FROM sync_failures WHERE direction = ? "
                f"AND doc IN ({', '.join('?' * len(chunk))})",
                (direction, *chunk),
            )
        ]
    return out


def all_ids(conn: sqlite3.Connection) -> set[int]:
    return {int(r[0]) for r in conn.execute("SELECT id FROM sync_failures")}


def keys(conn: sqlite3.Connection, direction: str) -> list[tuple[int, str, str]]:
    """(id, document, code) of every failure in ``direction``."""
    return [
        (int(fid), str(doc), str(code))
        for fid, doc, code in conn.execute(
            "SELECT id, doc, code FROM sync_failures WHERE direction = ?", (direction,)
        )
    ]


def rows(conn: sqlite3.Connection) -> list[FailureRow]:
    """Every failure, uploads first, then by document and id."""
    return [
        FailureRow(
            int(fid),
            str(direction),
            str(doc),
            _records(record_ids),
            str(code),
            str(reason),
            int(first_at),
            int(last_at),
            int(attempts),
        )
        for fid, direction, doc, record_ids, code, reason, first_at, last_at, attempts in (
            conn.execute(
                "SELECT id, direction, doc, record, code, reason, first_at, last_at, attempts "
                "FROM sync_failures ORDER BY direction DESC, doc, id"
            )
        )
    ]


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Failures per direction (directions without any are left out)."""
    return {
        str(direction): int(count)
        for direction, count in conn.execute(
            "SELECT direction, COUNT(*) FROM sync_failures GROUP BY direction"
        )
    }


def _records(stored: object) -> list[str]:
    if stored is None:
        return []
    text = str(stored)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return [text]  # a single id, as older rows may hold
    if isinstance(value, list):
        return [str(v) for v in value]
    return [text]
