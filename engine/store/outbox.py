"""The outbox: local updates (and those imported with ``--unsynced``) the
relay has not acknowledged, ``updates.pending = 1``, with the records each
carries (``updates.record`` for a local row, ``outbox_records`` for an
imported one; the view ``pending_records`` lists both)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from .txn import WriteTxn

Row = tuple[int, str, bytes]  # (seq, document, update)


def rows(conn: sqlite3.Connection, *, after: int = 0, limit: int = 1000) -> list[Row]:
    """Outbox rows with seq above ``after``, in seq order, at most ``limit``."""
    return [
        (int(s), str(d), bytes(b))
        for s, d, b in conn.execute(
            "SELECT seq, doc, data FROM updates WHERE pending = 1 AND seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        )
    ]


def of_doc(conn: sqlite3.Connection, doc: str) -> list[tuple[int, bytes, str]]:
    """(seq, update, origin) of ``doc``'s outbox rows, in seq order."""
    return [
        (int(seq), bytes(data), str(origin))
        for seq, data, origin in conn.execute(
            "SELECT seq, data, origin FROM updates WHERE pending = 1 AND doc = ? ORDER BY seq",
            (doc,),
        )
    ]


def by_doc(conn: sqlite3.Connection) -> dict[str, list[bytes]]:
    """Per document, its outbox updates in seq order."""
    out: dict[str, list[bytes]] = {}
    for doc, data in conn.execute(
        "SELECT doc, data FROM updates WHERE pending = 1 ORDER BY doc, seq"
    ):
        out.setdefault(str(doc), []).append(bytes(data))
    return out


def rows_per_doc(conn: sqlite3.Connection) -> dict[str, int]:
    """Per document with any, how many outbox rows it has."""
    return {
        str(doc): int(count)
        for doc, count in conn.execute(
            "SELECT doc, COUNT(*) FROM updates WHERE pending = 1 GROUP BY doc ORDER BY doc"
        )
    }


def seqs_of(conn: sqlite3.Connection, doc: str, limit: int) -> list[int]:
    """The first ``limit`` outbox seqs of ``doc``."""
    return [
        int(r[0])
        for r in conn.execute(
            "SELECT seq FROM updates WHERE pending = 1 AND doc = ? ORDER BY seq LIMIT ?",
            (doc, limit),
        )
    ]


def records_per_doc(conn: sqlite3.Connection) -> dict[str, int]:
    """Per document with any, the distinct records its outbox rows carry
    (kept by the store's triggers: one row per document is read)."""
    return {
        str(doc): int(count)
        for doc, count in conn.execute("SELECT doc, records FROM pending_docs WHERE records > 0")
    }


def owners(conn: sqlite3.Connection, doc: str) -> dict[int, list[str]]:
    """Outbox seq -> the records that row of ``doc`` carries."""
    out: dict[int, list[str]] = {}
    for seq, record in conn.execute(
        "SELECT seq, record FROM pending_records WHERE doc = ?", (doc,)
    ):
        out.setdefault(int(seq), []).append(str(record))
    return out


def records_of(conn: sqlite3.Connection, seqs: list[int], limit: int) -> list[str]:
    """The records outbox rows ``seqs`` carry, sorted, at most ``limit``."""
    out: set[str] = set()
    for i in range(0, len(seqs), 500):
        chunk = seqs[i : i + 500]
        out.update(
            str(r[0])
            for r in conn.execute(
                "SELECT DISTINCT record FROM pending_records "
                f"WHERE seq IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
        )
        if len(out) >= limit:
            break
    return sorted(out)[:limit]


def pending_records(
    conn: sqlite3.Connection, limit: int
) -> list[tuple[str, str, str | None, str | None]]:
    """(document, record, collection, key) of locally changed records, oldest
    change first, at most ``limit`` (collection and key None when the record
    has no row)."""
    return [
        (str(doc), str(rid), coll, key)
        for doc, rid, coll, key in conn.execute(
            "SELECT u.doc, u.record, r.collection, r.key FROM updates u "
            # The primary key is (collection, id): joining on the id alone
            # would scan every record for every outbox row.
            "LEFT JOIN records r ON r.collection = "
            "substr(u.doc, 1, instr(u.doc || '/', '/') - 1) AND r.id = u.record "
            "WHERE u.pending = 1 AND u.record IS NOT NULL "
            "GROUP BY u.doc, u.record ORDER BY MIN(u.seq) LIMIT ?",
            (max(limit, 0),),
        )
    ]


def any_pending(conn: sqlite3.Connection, *, except_docs: Iterable[str] = ()) -> bool:
    """Whether the outbox holds a row of a document not in ``except_docs``."""
    held = sorted(except_docs)
    row = conn.execute(
        "SELECT 1 FROM updates WHERE pending = 1 "
        f"AND doc NOT IN ({', '.join('?' * len(held))}) LIMIT 1",
        held,
    ).fetchone()
    return row is not None


def pending_upto(conn: sqlite3.Connection, doc: str, upto: int) -> bool:
    """Whether ``doc`` has an outbox row with seq at most ``upto``."""
    row = conn.execute(
        "SELECT 1 FROM updates WHERE pending = 1 AND doc = ? AND seq <= ? LIMIT 1", (doc, upto)
    ).fetchone()
    return row is not None


def carries(txn: WriteTxn, seq: int, records: Iterable[str]) -> None:
    """Note the records an imported outbox row carries."""
    txn.executemany(
        "INSERT OR IGNORE INTO outbox_records VALUES (?, ?)", [(seq, rid) for rid in records]
    )


def ack(txn: WriteTxn, seqs: Iterable[int]) -> None:
    """Take rows ``seqs`` out of the outbox (the relay has them)."""
    keys = [(s,) for s in seqs]
    txn.executemany("UPDATE updates SET pending = 0 WHERE seq = ?", keys)
    txn.executemany("DELETE FROM outbox_records WHERE seq = ?", keys)
