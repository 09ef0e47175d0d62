"""Voucher numbering (DESIGN §4).

``node`` strategy: each node numbers its own sub-series (the node code is in
the number), so nodes never clash and need no coordination. ``blocks``
strategy: one company-wide series whose numbers the relay leases to nodes in
blocks; the node keeps a reserve leased ahead to work offline and issues
provisional numbers when the reserve is empty, finalizing them once a block
arrives. All functions here work inside the caller's store transaction, so a
number is durable together with the voucher that carries it, and a rolled
back voucher consumes no number.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from dataclasses import dataclass
from typing import Protocol

from .errors import SeriesError, ValidationError
from .schema.model import Collection, Series

PROVISIONAL_TEMPLATE = "{prefix}-{node}-P{seq:06}"


class BlockSource(Protocol):
    """Who leases ``blocks`` numbers to a node (the relay, over the protocol).

    ``lease`` returns an inclusive range ``(first, last)`` of ``count`` numbers
    of the company-wide series ``series_key`` that no one else has or will
    ever get. It may raise any ``BranchlineError`` (offline, refused).
    """

    def lease(self, series_key: str, count: int) -> tuple[int, int]: ...


@dataclass(frozen=True)
class Allocation:
    number: str
    series_key: str
    provisional: bool


def series_key(coll: Collection, date: dt.date | None) -> str:
    """The counter a voucher draws from: per collection, per year on yearly reset."""
    series = _series(coll)
    if series.reset == "yearly":
        if date is None:
            # A user mistake (the required date is missing), not a numbering failure.
            raise ValidationError(
                f"{coll.name}.{coll.partition_field}: required, cannot be empty "
                "(a yearly series numbers vouchers by their date)"
            )
        return f"{coll.name}@{date.year}"
    return coll.name


def format_number(series: Series, node: str, year: int | None, seq: int) -> str:
    return series.template.format(prefix=series.prefix, node=node, year=year or "", seq=seq)


def allocate(
    conn: sqlite3.Connection,
    coll: Collection,
    node: str,
    date: dt.date | None,
    record_id: str,
    at_ms: int,
) -> Allocation:
    """The next number for a new voucher, journalled; inside a transaction."""
    series = _series(coll)
    key = series_key(coll, date)
    year = date.year if date else None
    if series.strategy == "node":
        # A node re-created from an export restarts its counters; numbers its
        # earlier life issued are in the records, so skip those: never reuse.
        while True:
            number = format_number(series, node, year, _next_counter(conn, key))
            if not _number_known(conn, coll.name, number):
                break
        _journal(conn, key, number, "issued", coll.name, record_id, None, at_ms)
        return Allocation(number, key, False)
    seq_or_none = _take_from_blocks(conn, key)
    if seq_or_none is not None:
        number = format_number(series, node, year, seq_or_none)
        _journal(conn, key, number, "issued", coll.name, record_id, None, at_ms)
        return Allocation(number, key, False)
    seq = _next_counter(conn, f"{key}#provisional")
    number = PROVISIONAL_TEMPLATE.format(prefix=series.prefix, node=node, seq=seq)
    conn.execute(
        "INSERT INTO provisional (record_id, collection, series, provisional, at) "
        "VALUES (?, ?, ?, ?, ?)",
        (record_id, coll.name, key, number, at_ms),
    )
    _journal(conn, key, number, "provisional", coll.name, record_id, None, at_ms)
    return Allocation(number, key, True)


def finalize(
    conn: sqlite3.Connection,
    coll: Collection,
    node: str,
    record_id: str,
    date: dt.date | None,
    at_ms: int,
) -> str | None:
    """Final number for a provisionally numbered voucher, or None while no
    leased number is available. The mapping stays in ``provisional``."""
    row = conn.execute(
        "SELECT series, provisional FROM provisional WHERE record_id = ? AND final IS NULL",
        (record_id,),
    ).fetchone()
    if row is None:
        return None
    key, provisional = row
    seq = _take_from_blocks(conn, key)
    if seq is None:
        return None
    number = format_number(_series(coll), node, date.year if date else None, seq)
    conn.execute(
        "UPDATE provisional SET final = ?, finalized_at = ? WHERE record_id = ?",
        (number, at_ms, record_id),
    )
    _journal(conn, key, number, "finalized", coll.name, record_id, provisional, at_ms)
    return number


def add_block(conn: sqlite3.Connection, key: str, first: int, last: int, at_ms: int) -> None:
    """Record a block leased from the relay. Raises SeriesError if it overlaps one we hold."""
    if not 1 <= first <= last:
        raise SeriesError(f"{key}: invalid block {first}..{last}")
    overlap = conn.execute(
        "SELECT start, stop FROM series_blocks WHERE series = ? AND start <= ? AND stop >= ?",
        (key, last, first),
    ).fetchone()
    if overlap:
        raise SeriesError(
            f"{key}: block {first}..{last} overlaps held block {overlap[0]}..{overlap[1]}"
        )
    conn.execute(
        "INSERT INTO series_blocks (series, start, stop, next) VALUES (?, ?, ?, ?)",
        (key, first, last, first),
    )
    _journal(conn, key, f"{first}..{last}", "lease", None, None, None, at_ms)


def reserve_left(conn: sqlite3.Connection, key: str) -> int:
    """How many leased numbers of ``key`` are still unused."""
    row = conn.execute(
        "SELECT COALESCE(SUM(stop - next + 1), 0) FROM series_blocks WHERE series = ?", (key,)
    ).fetchone()
    return int(row[0])


def void(
    conn: sqlite3.Connection, key: str, number: str, coll: str, record_id: str, at_ms: int
) -> None:
    """Journal a number that will not be used again (its voucher was deleted)."""
    _journal(conn, key, number, "void", coll, record_id, None, at_ms)


def _series(coll: Collection) -> Series:
    if coll.series is None:
        raise SeriesError(f"{coll.name} has no series; give the voucher a 'number'")
    return coll.series


def _next_counter(conn: sqlite3.Connection, key: str) -> int:
    row = conn.execute(
        "INSERT INTO series_counters (series, next) VALUES (?, 2) "
        "ON CONFLICT (series) DO UPDATE SET next = next + 1 RETURNING next - 1",
        (key,),
    ).fetchone()
    return int(row[0])


def _number_known(conn: sqlite3.Connection, collection: str, number: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM records INDEXED BY records_key WHERE collection = ? AND key = ? LIMIT 1",
        (collection, number),
    ).fetchone()
    return row is not None


def _take_from_blocks(conn: sqlite3.Connection, key: str) -> int | None:
    row = conn.execute(
        "SELECT start, next FROM series_blocks WHERE series = ? AND next <= stop "
        "ORDER BY start LIMIT 1",
        (key,),
    ).fetchone()
    if row is None:
        return None
    conn.execute(
        "UPDATE series_blocks SET next = next + 1 WHERE series = ? AND start = ?", (key, row[0])
    )
    return int(row[1])


def _journal(
    conn: sqlite3.Connection,
    key: str,
    number: str,
    event: str,
    coll: str | None,
    record_id: str | None,
    detail: str | None,
    at_ms: int,
) -> None:
    conn.execute(
        "INSERT INTO series_journal (series, number, event, collection, record_id, detail, at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (key, number, event, coll, record_id, detail, at_ms),
    )
