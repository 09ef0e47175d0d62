"""Voucher numbering (DESIGN §4).

``node`` strategy: each node numbers its own sub-series (the node code is in
the number), so nodes never clash and need no coordination. ``blocks``
strategy: one company-wide series whose numbers the relay leases to nodes in
blocks; the node keeps a reserve leased ahead to work offline and issues
provisional numbers when the reserve is empty, finalizing them once a block
arrives. All functions here work inside the caller's store transaction, so a
number is durable together with the voucher that carries it, and a rolled
back voucher consumes no number.

A number once returned as final is never issued again and never changed.
A home that cannot know how far its node's sub-series went (a rebuilt home
of an existing node, before its first completed sync: node meta
``numbering`` = ``unconfirmed``) issues provisional numbers from ``node``
and ``blocks`` series alike (its restored blocks may be older than numbers
its earlier life used), finalized once the sync brought the node's earlier
vouchers back. Every received voucher raises the counters past the numbers
this node issued (``learn``), and ``dump_state``/``restore_state`` carry
counters, leased blocks, provisional numbers and the gap journal in export
files (docs/conflicts.md, "Voucher numbers over a node's life").
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import sqlite3
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import SeriesError, ValidationError
from .schema.model import Collection, Series

PROVISIONAL_TEMPLATE = "{prefix}-{node}-P{seq:06}"
PROVISIONAL_SUFFIX = "#provisional"  # counter key of a series' provisional numbers
#: Node meta key: ``unconfirmed`` while the home cannot know its node's
#: high-water marks; absent (or ``known``) otherwise.
NUMBERING_META = "numbering"
UNCONFIRMED = "unconfirmed"
KNOWN = "known"
#: Journal and finalized-provisional rows an export carries (the latest ones);
#: counters, blocks and unfinalized provisional numbers are always carried whole.
MAX_STATE_ROWS = 20_000
JOURNAL_EVENTS = ("issued", "provisional", "finalized", "void", "lease")


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
    if series.strategy == "node" and numbering_known(conn):
        number = _next_free(conn, coll, node, key, year)
        _journal(conn, key, number, "issued", coll.name, record_id, None, at_ms)
        return Allocation(number, key, False)
    # A home that cannot know how far its node went takes no block number
    # either: its restored blocks may predate numbers its earlier life used.
    blocks = series.strategy == "blocks" and numbering_known(conn)
    seq_or_none = _take_from_blocks(conn, key) if blocks else None
    if seq_or_none is not None:
        number = format_number(series, node, year, seq_or_none)
        _journal(conn, key, number, "issued", coll.name, record_id, None, at_ms)
        return Allocation(number, key, False)
    while True:
        seq = _next_counter(conn, key + PROVISIONAL_SUFFIX)
        number = PROVISIONAL_TEMPLATE.format(prefix=series.prefix, node=node, seq=seq)
        if not _number_known(conn, coll.name, number):
            break
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
    if not numbering_known(conn):
        return None  # finalized by ``confirm`` once the node's history is back
    row = conn.execute(
        "SELECT series, provisional FROM provisional WHERE record_id = ? AND final IS NULL",
        (record_id,),
    ).fetchone()
    if row is None:
        return None
    key, provisional = row
    year = date.year if date else None
    if _series(coll).strategy == "node":
        number = _next_free(conn, coll, node, key, year)
    else:
        seq = _take_from_blocks(conn, key)
        if seq is None:
            return None
        number = format_number(_series(coll), node, year, seq)
    conn.execute(
        "UPDATE provisional SET final = ?, finalized_at = ? WHERE record_id = ?",
        (number, at_ms, record_id),
    )
    _journal(conn, key, number, "finalized", coll.name, record_id, provisional, at_ms)
    return number


def adopt_provisional(conn: sqlite3.Connection, coll: Collection, node: str, at_ms: int) -> int:
    """A rebuilt home's own vouchers that came back with a provisional number
    of this node but without the mapping (it was booked after the export the
    home was rebuilt from, and lost with the disk): record them as
    provisional so they get a final number. Returns how many."""
    series = _series(coll)
    head = PROVISIONAL_TEMPLATE.split("{seq")[0].format(prefix=series.prefix, node=node)
    shape = re.compile(re.escape(head) + r"\d{6}\Z")
    rows = conn.execute(
        "SELECT id, key, json_extract(data, '$.' || ?) FROM records "
        "WHERE collection = ? AND key >= ? AND key < ? AND deleted = 0 AND created_node = ? "
        "AND id NOT IN (SELECT record_id FROM provisional WHERE collection = ?)",
        (coll.partition_field, coll.name, head, head + "\uffff", node, coll.name),
    ).fetchall()
    adopted = 0
    for rid, number, raw in rows:
        if not shape.match(str(number)):
            continue
        date = dt.date.fromisoformat(raw) if raw else None
        key = series_key(coll, date)
        conn.execute(
            "INSERT INTO provisional (record_id, collection, series, provisional, at) "
            "VALUES (?, ?, ?, ?, ?)",
            (rid, coll.name, key, number, at_ms),
        )
        _journal(conn, key, number, "provisional", coll.name, rid, None, at_ms)
        adopted += 1
    return adopted


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


def waiting_years(conn: sqlite3.Connection, collection: str) -> list[int]:
    """The years (series keys ``collection@YEAR``) of ``collection``'s
    provisional numbers that have no final number yet."""
    rows = conn.execute(
        "SELECT DISTINCT series FROM provisional WHERE collection = ? AND final IS NULL",
        (collection,),
    )
    years = {key.rpartition("@")[2] for (key,) in rows if "@" in key}
    return sorted(int(y) for y in years if y.isdigit())


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


def numbering_known(conn: sqlite3.Connection) -> bool:
    """False while this home cannot know its node's high-water marks."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (NUMBERING_META,)).fetchone()
    return row is None or row[0] != UNCONFIRMED


def set_numbering(conn: sqlite3.Connection, known: bool) -> None:
    """Mark the home's numbering known or unconfirmed (inside a transaction)."""
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (NUMBERING_META, KNOWN if known else UNCONFIRMED),
    )


def learn(
    conn: sqlite3.Connection,
    coll: Collection,
    node: str,
    found: Iterable[tuple[str, Any, Any]],
    at_ms: int,
) -> None:
    """Raise this node's counters past the numbers it issued among ``found``
    (record id, number, date of received vouchers): its earlier vouchers,
    coming back from the relay or an export, are never numbered again.

    A final ``node`` number raises the series counter; a final ``blocks``
    number moves on the held block that contains it; a provisional number
    of this node raises the provisional counter and, if no provisional row
    knows the voucher (an earlier life booked it), adds one so that it is
    finalized. Values that are not this node's numbers are ignored.
    """
    series = coll.series
    if series is None:
        return
    top: dict[str, int] = {}
    taken: list[tuple[str, int]] = []
    orphans: list[tuple[str, str, str, str, int]] = []
    for rid, number, date in found:
        if type(number) is not str or not number:
            continue
        year = _year(date)
        if year is None and series.reset == "yearly":
            continue
        key = f"{coll.name}@{year}" if series.reset == "yearly" else coll.name
        seq = parse_number(series.template, series.prefix, node, year, number)
        if seq is not None:
            if series.strategy == "node":
                top[key] = max(top.get(key, 0), seq + 1)
            else:
                taken.append((key, seq))
            continue
        seq = parse_number(PROVISIONAL_TEMPLATE, series.prefix, node, None, number)
        if seq is not None:
            pkey = key + PROVISIONAL_SUFFIX
            top[pkey] = max(top.get(pkey, 0), seq + 1)
            orphans.append((rid, coll.name, key, number, at_ms))
    if top:
        conn.executemany(
            "INSERT INTO series_counters (series, next) VALUES (?, ?) "
            "ON CONFLICT (series) DO UPDATE SET next = MAX(next, excluded.next)",
            sorted(top.items()),
        )
    if taken:
        conn.executemany(
            "UPDATE series_blocks SET next = ?1 + 1 "
            "WHERE series = ?2 AND start <= ?1 AND stop >= ?1 AND next <= ?1",
            [(seq, key) for key, seq in taken],
        )
    if orphans:
        conn.executemany(
            "INSERT OR IGNORE INTO provisional (record_id, collection, series, provisional, at) "
            "VALUES (?, ?, ?, ?, ?)",
            orphans,
        )


def parse_number(
    template: str, prefix: str, node: str, year: int | None, number: str
) -> int | None:
    """The ``seq`` of ``number`` if ``template`` formats exactly that number
    for this prefix, node and year, else None."""
    pattern = _pattern(template, prefix, node, year)
    if pattern is None:
        return None
    found = pattern.match(number)
    if found is None:
        return None
    seq = int(found.group(1))
    try:
        again = template.format(prefix=prefix, node=node, year=year or "", seq=seq)
    except (ValueError, KeyError, IndexError):
        return None
    return seq if again == number and seq >= 1 else None


@functools.lru_cache(maxsize=512)
def _pattern(template: str, prefix: str, node: str, year: int | None) -> re.Pattern[str] | None:
    """A regular expression matching what ``template`` formats, ``seq`` as a
    group; None for a template it cannot read (then nothing is learned)."""
    out: list[str] = []
    seq = False
    try:
        fields = list(string.Formatter().parse(template))
        for literal, name, spec, conversion in fields:
            out.append(re.escape(literal))
            if name is None:
                continue
            if conversion:
                return None
            if name == "seq" and not seq:
                out.append(r"(\d{1,18})")
                seq = True
            elif name in ("prefix", "node", "year"):
                value = {"prefix": prefix, "node": node, "year": year or ""}[name]
                out.append(re.escape(format(value, spec or "")))
            else:
                return None
    except (ValueError, TypeError):
        return None
    return re.compile("".join(out) + r"\Z") if seq else None


def _year(date: Any) -> int | None:
    if type(date) is not str or len(date) < 4 or not date[:4].isdigit():
        return None
    return int(date[:4])


def dump_state(conn: sqlite3.Connection) -> dict[str, Any]:
    """This home's series state, JSON-ready, for an export file: counters
    (next number per series key), leased blocks with what is left of them,
    provisional numbers (every unfinalized one, the latest finalized ones)
    and the latest journal entries other than ``issued``, oldest first
    (``MAX_STATE_ROWS`` of each)."""
    counters = dict(conn.execute("SELECT series, next FROM series_counters ORDER BY series"))
    blocks = [
        {"series": k, "start": a, "stop": b, "next": n}
        for k, a, b, n in conn.execute(
            "SELECT series, start, stop, next FROM series_blocks ORDER BY series, start"
        )
    ]
    provisional = [
        {"record": r, "collection": c, "series": k, "provisional": p, "final": f, "at": at}
        for r, c, k, p, f, at in conn.execute(
            "SELECT record_id, collection, series, provisional, final, at FROM ("
            "SELECT rowid, * FROM provisional WHERE final IS NULL UNION ALL "
            "SELECT * FROM (SELECT rowid, * FROM provisional WHERE final IS NOT NULL "
            "ORDER BY rowid DESC LIMIT ?)) ORDER BY rowid",
            (MAX_STATE_ROWS,),
        )
    ]
    journal = [
        {"series": k, "number": n, "event": e, "collection": c, "record": r, "detail": d, "at": at}
        for k, n, e, c, r, d, at in conn.execute(
            "SELECT series, number, event, collection, record_id, detail, at FROM ("
            "SELECT * FROM series_journal WHERE event != 'issued' ORDER BY seq DESC LIMIT ?) "
            "ORDER BY seq",
            (MAX_STATE_ROWS,),
        )
    ]
    return {"counters": counters, "blocks": blocks, "provisional": provisional, "journal": journal}


def restore_state(conn: sqlite3.Connection, state: Mapping[str, Any]) -> int:
    """Merge a series state of this node (``dump_state``, checked by
    ``engine.exchange``) into this home: counters and blocks only move up,
    held blocks keep what this home used of them, a block overlapping one
    held differently is left out, provisional numbers and journal entries
    already here are not added again (idempotent). Never marks the numbering
    known: an export is a snapshot, only the relay knows what came after.
    Returns how many rows it added or raised."""
    changed = 0
    for key, nxt in sorted(state["counters"].items()):
        changed += conn.execute(
            "INSERT INTO series_counters (series, next) VALUES (?, ?) "
            "ON CONFLICT (series) DO UPDATE SET next = excluded.next "
            "WHERE excluded.next > next",
            (key, nxt),
        ).rowcount
    for b in state["blocks"]:
        held = conn.execute(
            "SELECT start, stop FROM series_blocks WHERE series = ? AND start <= ? AND stop >= ?",
            (b["series"], b["stop"], b["start"]),
        ).fetchall()
        if not held:
            conn.execute(
                "INSERT INTO series_blocks (series, start, stop, next) VALUES (?, ?, ?, ?)",
                (b["series"], b["start"], b["stop"], b["next"]),
            )
            changed += 1
        elif held == [(b["start"], b["stop"])]:
            changed += conn.execute(
                "UPDATE series_blocks SET next = ? WHERE series = ? AND start = ? AND next < ?",
                (b["next"], b["series"], b["start"], b["next"]),
            ).rowcount
    for p in state["provisional"]:
        changed += conn.execute(
            "INSERT OR IGNORE INTO provisional (record_id, collection, series, provisional, "
            "final, at, finalized_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                p["record"],
                p["collection"],
                p["series"],
                p["provisional"],
                p["final"],
                p["at"],
                p["at"] if p["final"] else None,
            ),
        ).rowcount
        if p["final"]:
            changed += conn.execute(
                "UPDATE provisional SET final = ?, finalized_at = ? "
                "WHERE record_id = ? AND final IS NULL",
                (p["final"], p["at"], p["record"]),
            ).rowcount
    here = set(conn.execute("SELECT series, number, event, record_id, at FROM series_journal"))
    for j in state["journal"]:
        row = (j["series"], j["number"], j["event"], j["record"], j["at"])
        if row in here:
            continue
        here.add(row)
        _journal(
            conn,
            j["series"],
            j["number"],
            j["event"],
            j["collection"],
            j["record"],
            j["detail"],
            j["at"],
        )
        changed += 1
    return changed


def _next_free(
    conn: sqlite3.Connection, coll: Collection, node: str, key: str, year: int | None
) -> str:
    """The next final number of a ``node`` series: the counter, past any
    number already held by a record (an earlier life's, typed by hand)."""
    series = _series(coll)
    while True:
        number = format_number(series, node, year, _next_counter(conn, key))
        if not _number_known(conn, coll.name, number):
            return number


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
