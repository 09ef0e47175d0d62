"""Resolved records: the materializer, which re-resolves records from CRDT
state into ``records``, ``record_conflicts``, ``resolutions`` and
``waiting`` and returns the changes it made (adapters are fed from those),
and the reads of those tables.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from .. import series as series_mod
from ..crdt import RecordDoc
from ..ids import is_id
from ..merge import ALIAS, Resolved, resolve
from ..plugins import ChangeKind, RecordChange
from ..schema import Collection, Schema
from ..values import decode, stored_check
from .conflict_index import ConflictIndex, Written
from .inlists import chunks, marks
from .txn import WriteTxn

Held = list[tuple[str, Resolved, dict[str, Any]]]  # (record id, resolved, valid values)
Batches = list[tuple[Collection, list[RecordChange]]]
Checks = dict[str, Callable[[Any], bool]]  # field -> is_stored for it
RefPath = tuple[str, str | None, str]  # (field, line sub-field or None, target collection)


@dataclass
class Materialized:
    """What one materialization did: ``rows`` records written, and per
    collection the changes of records adapters consume, in the order they
    are to be delivered (records released from ``waiting`` first)."""

    rows: int = 0
    changes: Batches = field(default_factory=list)


class Materializer:
    """Resolves records of one node's schema into the record tables.

    ``doc_of(name)`` gives a loaded document (to re-resolve released waiting
    records), ``observe(hlc)`` feeds the hybrid clock the newest timestamp
    seen, ``consumes(coll)`` says whether an adapter wants its changes (and
    raises when the enabled adapters cannot be loaded: writes are refused).
    """

    def __init__(
        self,
        schema: Schema,
        node_id: str,
        wall_ms: Callable[[], int],
        doc_of: Callable[[str], RecordDoc],
        observe: Callable[[int], None],
    ) -> None:
        self.schema = schema
        self.node_id = node_id
        self._wall_ms = wall_ms
        self._doc_of = doc_of
        self._observe = observe
        self.consumes: Callable[[Collection], bool] = _nobody
        self.refs = {c.name: ref_paths(c) for c in schema.collections.values()}
        self.checks = {c.name: field_checks(c) for c in schema.collections.values()}
        self.index = ConflictIndex(schema)

    def materialize(
        self, txn: WriteTxn, coll: Collection, doc: RecordDoc, rids: set[str], hold: bool = False
    ) -> Materialized:
        """Re-resolve records ``rids`` of ``doc``. With ``hold`` (received
        updates), a new record that refers to a record not here yet waits in
        ``waiting`` instead. Raises what ``consumes`` raises."""
        conn = txn.conn
        watched = self.consumes(coll) and bool(rids)
        before = _live(conn, coll.name, sorted(rids)) if watched else set()
        rows, incomplete, conflicts, journal = [], [], [], []
        newest = 0
        resolved: Held = []
        checks = self.checks[coll.name]
        states = doc.states
        # In key order: SQLite inserts several times faster.
        for rid in sorted(rids):
            r = resolve(states(rid))
            if r.newest > newest:
                newest = r.newest
            if r.created is None:
                incomplete.append((coll.name, rid))
            else:
                resolved.append((rid, r, valid_values(checks, r.values)))
        if hold and resolved and coll.series is not None:
            # Received vouchers: this node's own numbers among them (an
            # earlier life's, back from the relay) are never issued again.
            found = [(rid, v.get(coll.key), v.get(coll.partition_field)) for rid, _, v in resolved]
            series_mod.learn(conn, coll, self.node_id, found, self._wall_ms())
        if hold and resolved and self.refs[coll.name]:
            resolved, waiting = self._hold_back(txn, coll, doc.name, resolved)
            incomplete += waiting
        for rid, r, values in resolved:
            assert r.created is not None
            rows.append(
                (
                    coll.name,
                    rid,
                    doc.name,
                    values.get(coll.key),
                    int(r.deleted),
                    *r.created,
                    r.newest,
                    orjson.dumps(values, option=orjson.OPT_SORT_KEYS).decode(),
                    _alias(r, rid),
                )
            )
            for entry in r.journal:
                at = entry.get("at")
                journal.append(
                    (
                        entry["id"],
                        coll.name,
                        rid,
                        at if type(at) is int else 0,
                        orjson.dumps(entry, option=orjson.OPT_SORT_KEYS).decode(),
                    )
                )
            for c in r.conflicts:
                competitors = [
                    {"node": p.node, "hlc": p.hlc, "value": p.value} for p in c.competitors
                ]
                conflicts.append(
                    (
                        c.conflict_id(coll.name, rid),
                        coll.name,
                        rid,
                        c.kind,
                        c.field,
                        orjson.dumps(competitors).decode(),
                    )
                )
        self._observe(newest)
        # The journal too is what the state holds now, not all it ever held:
        # a node's own list can lose entries (its cap; a rebuilt home writing
        # over its earlier life's entry), and a node that saw them must not
        # keep rows one that did not lacks (seed 3115).
        for table in ("record_conflicts", "resolutions"):
            _clear(conn, table, coll.name, rids)
        written = [
            Written(rid, row[3], not r.deleted, row[9] is not None, values)
            for (rid, r, values), row in zip(resolved, rows, strict=True)
        ]
        removed = [rid for _, rid in incomplete]
        old = self.index.before(conn, coll.name, written, removed)
        conn.executemany("DELETE FROM records WHERE collection = ? AND id = ?", incomplete)
        conn.executemany(
            "INSERT OR REPLACE INTO records (collection, id, doc, key, deleted, created_hlc, "
            "created_node, updated_hlc, data, alias_of) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        # Records written, conflicts, journal, index and adapters not yet: a
        # crash here must leave nothing of the batch (one transaction).
        txn.point("mid_materialize")
        self.index.after(conn, coll.name, written, removed, old)
        conn.executemany(
            "INSERT OR REPLACE INTO record_conflicts VALUES (?, ?, ?, ?, ?, ?)", conflicts
        )
        conn.executemany("INSERT OR REPLACE INTO resolutions VALUES (?, ?, ?, ?, ?)", journal)
        done = Materialized(len(rows))
        if rows and has_waiting(conn):
            done.changes = self._release(txn, coll, [row[1] for row in rows]).changes
        if watched:
            made = [(rid, r, row[8]) for (rid, r, _), row in zip(resolved, rows, strict=True)]
            changes = _changes(coll, doc.name, made, before)
            if changes:
                done.changes.append((coll, changes))
        return done

    def settle(self, txn: WriteTxn) -> Materialized:
        """Show every record still waiting for a reference (it is then a
        ``dangling_reference`` conflict)."""
        found = set(txn.execute("SELECT DISTINCT collection, id, doc FROM waiting"))
        return self._rematerialize(txn, found, hold=False)

    def _hold_back(
        self, txn: WriteTxn, coll: Collection, docname: str, resolved: Held
    ) -> tuple[Held, list[tuple[str, str]]]:
        """Split received records into those to materialize and those that
        must wait for a referenced record that has not arrived (a record
        already shown is never hidden again). Records the waits."""
        conn = txn.conn
        wanted: dict[tuple[str, str], list[str]] = {}
        for rid, _, values in resolved:
            for target, tid in references(self.refs[coll.name], values):
                wanted.setdefault((target, tid), []).append(rid)
        if not wanted:
            return resolved, []
        here = {(coll.name, rid) for rid, _, _ in resolved}
        by_target: dict[str, list[str]] = {}
        for target, tid in wanted:
            if (target, tid) not in here:
                by_target.setdefault(target, []).append(tid)
        found = {(t, i) for t, ids in by_target.items() for i in present(conn, t, ids)}
        missing = {k: v for k, v in wanted.items() if k not in here and k not in found}
        if not missing:
            return resolved, []
        referring = sorted({rid for rids in missing.values() for rid in rids})
        hold = set(referring) - set(present(conn, coll.name, referring))
        if not hold:
            return resolved, []
        conn.executemany(
            "INSERT OR IGNORE INTO waiting VALUES (?, ?, ?, ?, ?)",
            [
                (coll.name, rid, docname, target, tid)
                for (target, tid), rids in missing.items()
                for rid in rids
                if rid in hold
            ],
        )
        return (
            [item for item in resolved if item[0] not in hold],
            [(coll.name, rid) for rid in sorted(hold)],
        )

    def _release(self, txn: WriteTxn, coll: Collection, rids: list[str]) -> Materialized:
        """Materialize the records that were waiting for any of ``rids``."""
        found: set[tuple[str, str, str]] = set()
        for chunk in chunks(rids):
            found.update(
                txn.execute(
                    "SELECT collection, id, doc FROM waiting INDEXED BY waiting_target "
                    f"WHERE target_collection = ? AND target_id IN ({marks(chunk)})",
                    (coll.name, *chunk),
                )
            )
        return self._rematerialize(txn, found, hold=True) if found else Materialized()

    def _rematerialize(
        self, txn: WriteTxn, found: set[tuple[str, str, str]], hold: bool
    ) -> Materialized:
        txn.executemany(
            "DELETE FROM waiting WHERE collection = ? AND id = ?", [(c, i) for c, i, _ in found]
        )
        groups: dict[tuple[str, str], set[str]] = {}
        for cname, rid, docname in found:
            groups.setdefault((cname, docname), set()).add(rid)
        done = Materialized()
        for (cname, docname), ids in sorted(groups.items()):
            coll = self.schema.collections[cname]
            step = self.materialize(txn, coll, self._doc_of(docname), ids, hold=hold)
            done.rows += step.rows
            done.changes += step.changes
        return done


def _nobody(coll: Collection) -> bool:
    return False


def _alias(r: Resolved, rid: str) -> str | None:
    alias = r.values.get(ALIAS)
    return alias if type(alias) is str and alias != rid else None


def _changes(
    coll: Collection, docname: str, written: list[tuple[str, Resolved, str]], before: set[str]
) -> list[RecordChange]:
    """The adapters' view of a materialization: each record written (id,
    resolution, the values JSON just stored) that is or was live, then those
    that were live and have no row any more (held back again or incomplete),
    as deleted."""
    out: list[RecordChange] = []
    after: set[str] = set()
    for rid, r, data in written:
        assert r.created is not None
        live = not r.deleted
        was = rid in before
        if not live and not was:
            continue
        after.add(rid)
        kind: ChangeKind = "deleted" if not live else "updated" if was else "inserted"
        created_hlc, created_node = r.created
        edited: tuple[str, ...] = ()
        if live and coll.is_voucher and r.newest != created_hlc:
            edited = tuple(
                sorted(
                    name
                    for name, (_, hlc) in r.writers.items()
                    if name in coll.fields and hlc > created_hlc
                )
            )
        out.append(
            RecordChange(
                kind,
                coll.name,
                rid,
                docname,
                # Values as stored (keys sorted at every level), each record's
                # its own: parsing the JSON just made (about 6 us for a 3-line
                # voucher) is cheaper than a copy in Python (12 to 25 us).
                orjson.loads(data),
                created_hlc,
                created_node,
                r.newest,
                edited,
                _alias(r, rid),
            )
        )
    for rid in sorted(before - after):
        out.append(RecordChange("deleted", coll.name, rid, "", {}, 0, "", 0))
    return out


# -- references ----------------------------------------------------------------


def ref_paths(coll: Collection) -> list[RefPath]:
    """Every place a record of ``coll`` refers to another record."""
    out: list[RefPath] = []
    for f in coll.fields.values():
        if f.type == "ref" and f.to:
            out.append((f.name, None, f.to))
        out.extend((f.name, sub.name, sub.to) for sub in f.fields if sub.type == "ref" and sub.to)
    return out


def references(paths: list[RefPath], values: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(target collection, id) of every reference in a record's valid values."""
    for name, sub, target in paths:
        value = values.get(name)
        if value is None:
            continue
        if sub is None:
            yield target, value
        else:
            for line in value:
                ref = line.get(sub)
                if type(ref) is str:
                    yield target, ref


def field_checks(coll: Collection) -> Checks:
    """Per schema field of ``coll``, its ``is_stored`` check."""
    return {name: stored_check(fld) for name, fld in coll.fields.items()}


def valid_values(checks: Checks, values: dict[str, Any]) -> dict[str, Any]:
    """Schema fields (``field_checks``) whose replicated value is well-formed;
    a malformed value from a faulty peer is dropped the same way on every node."""
    out = {}
    for name, value in values.items():
        check = checks.get(name)
        if check is not None and value is not None and check(value):
            out[name] = value
    return out


# -- reads ---------------------------------------------------------------------


def present(conn: sqlite3.Connection, collection: str, ids: list[str]) -> list[str]:
    """Which of ``ids`` have a row in ``records`` (live, deleted or alias)."""
    out: list[str] = []
    for chunk in chunks(sorted(set(ids))):
        out += [
            r[0]
            for r in conn.execute(
                f"SELECT id FROM records WHERE collection = ? AND id IN ({marks(chunk)})",
                (collection, *chunk),
            )
        ]
    return out


def _live(conn: sqlite3.Connection, collection: str, ids: list[str]) -> set[str]:
    out: set[str] = set()
    for chunk in chunks(ids):
        out.update(
            r[0]
            for r in conn.execute(
                f"SELECT id FROM records WHERE collection = ? AND deleted = 0 "
                f"AND id IN ({marks(chunk)})",
                (collection, *chunk),
            )
        )
    return out


def lookup(
    conn: sqlite3.Connection, coll: Collection, id_or_key: str, by_id: bool = True
) -> tuple[str, str] | None:
    """(id, document) of the live record with that id (when ``by_id``) or
    key; with several live records on one key (a duplicate_key conflict),
    the earliest created. Neither an alias nor a deleted record is found by key."""
    if not id_or_key.isascii() and not _encodable(id_or_key):
        return None  # no stored key holds unpaired surrogates; SQLite cannot bind it
    if by_id and is_id(id_or_key):
        row = conn.execute(
            "SELECT id, doc FROM records WHERE collection = ? AND id = ? AND deleted = 0",
            (coll.name, id_or_key),
        ).fetchone()
        if row:
            return str(row[0]), str(row[1])
    row = conn.execute(
        "SELECT id, doc FROM records INDEXED BY records_key "
        "WHERE collection = ? AND key = ? AND deleted = 0 AND alias_of IS NULL "
        "ORDER BY created_hlc, created_node LIMIT 1",
        (coll.name, id_or_key),
    ).fetchone()
    return (str(row[0]), str(row[1])) if row else None


@dataclass(frozen=True)
class RecordRow:
    """A record's row: its document, key, deletion and creator."""

    doc: str
    key: str | None
    deleted: bool
    created_node: str


def row_of(conn: sqlite3.Connection, collection: str, rid: str) -> RecordRow | None:
    """The row of record ``rid`` (live, deleted or alias), or None."""
    row = conn.execute(
        "SELECT doc, key, deleted, created_node FROM records WHERE collection = ? AND id = ?",
        (collection, rid),
    ).fetchone()
    return None if row is None else RecordRow(str(row[0]), row[1], bool(row[2]), str(row[3]))


def stored_data(conn: sqlite3.Connection, collection: str, rid: str) -> str | None:
    """Record ``rid``'s values as stored (JSON text; live or not), or None."""
    row = conn.execute(
        "SELECT data FROM records WHERE collection = ? AND id = ?", (collection, rid)
    ).fetchone()
    return None if row is None else str(row[0])


def stored_value(conn: sqlite3.Connection, collection: str, rid: str, name: str) -> Any:
    """Field ``name`` of record ``rid`` in stored form (None when absent)."""
    row = conn.execute(
        "SELECT json_extract(data, '$.' || ?) FROM records WHERE collection = ? AND id = ?",
        (name, collection, rid),
    ).fetchone()
    return None if row is None else row[0]


def live_row(conn: sqlite3.Connection, collection: str, rid: str) -> tuple[Any, ...] | None:
    """(id, data, alias_of) of a live record, or None."""
    row = conn.execute(
        "SELECT id, data, alias_of FROM records WHERE collection = ? AND id = ? AND deleted = 0",
        (collection, rid),
    ).fetchone()
    return None if row is None else tuple(row)


def live_rows(
    conn: sqlite3.Connection, collection: str, limit: int | None, offset: int
) -> list[tuple[Any, ...]]:
    """(id, data, alias_of) of live records in id order, ``limit`` after ``offset``."""
    return [
        tuple(r)
        for r in conn.execute(
            "SELECT id, data, alias_of FROM records "
            "WHERE collection = ? AND deleted = 0 ORDER BY id LIMIT ? OFFSET ?",
            (collection, -1 if limit is None else max(limit, 0), max(offset, 0)),
        )
    ]


def count(conn: sqlite3.Connection, collection: str) -> int:
    """Live records of ``collection``."""
    row = conn.execute(
        "SELECT COUNT(*) FROM records WHERE collection = ? AND deleted = 0", (collection,)
    ).fetchone()
    return int(row[0])


def unnumbered(conn: sqlite3.Connection, collection: str) -> list[tuple[str, str | None]]:
    """(record id, stored date) of ``collection``'s provisionally numbered
    vouchers that have no final number yet, in the order they were booked."""
    return [
        (str(rid), date)
        for rid, date in conn.execute(
            "SELECT p.record_id, json_extract(r.data, '$.date') FROM provisional p "
            "JOIN records r ON r.collection = p.collection AND r.id = p.record_id "
            "WHERE p.collection = ? AND p.final IS NULL ORDER BY p.rowid",
            (collection,),
        )
    ]


def has_unnumbered(conn: sqlite3.Connection, collection: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM provisional WHERE collection = ? AND final IS NULL LIMIT 1", (collection,)
    ).fetchone()
    return row is not None


def to_dicts(
    conn: sqlite3.Connection, coll: Collection, rows: Iterable[Any], codes: bool
) -> list[dict[str, Any]]:
    """Rows of (id, data, alias_of) as typed records. A reference reads as
    the target's code with ``codes``, and a record merged into another (an
    alias) reads as the survivor."""
    shown: dict[str, dict[str, str]] = {}
    targets = {f.to for f in coll.fields.values() if f.type == "ref" and f.to}
    targets |= {s.to for f in coll.fields.values() for s in f.fields if s.type == "ref" and s.to}
    for target in targets:
        if codes:
            shown[target] = dict(
                conn.execute(
                    "SELECT r.id, COALESCE(s.key, r.key) FROM records r LEFT JOIN records s "
                    "ON s.collection = r.collection AND s.id = r.alias_of "
                    "WHERE r.collection = ?",
                    (target,),
                ).fetchall()
            )
        else:
            shown[target] = dict(
                conn.execute(
                    "SELECT id, alias_of FROM records INDEXED BY records_alias "
                    "WHERE collection = ? AND alias_of IS NOT NULL",
                    (target,),
                ).fetchall()
            )
    remap = {
        f.name
        for f in coll.fields.values()
        if f.type == "lines" and any(shown[s.to] for s in f.fields if s.type == "ref" and s.to)
    }
    out = []
    for rid, data, *alias in rows:
        stored = orjson.loads(data)
        rec: dict[str, Any] = {"id": rid}
        if alias and alias[0]:
            rec["alias_of"] = alias[0]
        for name, fld in coll.fields.items():
            if name not in stored or stored[name] is None:
                continue
            value = stored[name]
            if fld.type == "ref" and fld.to:
                rec[name] = shown[fld.to].get(value, value)
                continue
            if name in remap:
                value = [
                    {
                        k: (shown[s.to].get(v, v) if (s := fld.line_field(k)) and s.to else v)
                        for k, v in line.items()
                    }
                    for line in value
                ]
            rec[name] = decode(fld, value)
        out.append(rec)
    return out


# -- waiting -------------------------------------------------------------------


def has_waiting(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM waiting LIMIT 1").fetchone() is not None


def waiting_count(conn: sqlite3.Connection) -> int:
    """Records held back (each once, whatever it waits for)."""
    row = conn.execute(
        "SELECT COUNT(*) FROM (SELECT DISTINCT collection, id FROM waiting)"
    ).fetchone()
    return int(row[0])


def waiting_ids(conn: sqlite3.Connection) -> set[tuple[str, str]]:
    """(collection, id) of every record held back."""
    return {
        (str(c), str(i)) for c, i in conn.execute("SELECT DISTINCT collection, id FROM waiting")
    }


def waiting_rows(conn: sqlite3.Connection) -> list[tuple[str, str, str, str, str]]:
    """(collection, id, document, target collection, target id), sorted."""
    return [
        tuple(map(str, r))  # type: ignore[misc]
        for r in conn.execute(
            "SELECT collection, id, doc, target_collection, target_id FROM waiting "
            "ORDER BY collection, id, target_collection, target_id"
        )
    ]


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _clear(conn: sqlite3.Connection, table: str, collection: str, rids: Iterable[str]) -> None:
    """Delete ``table``'s rows (conflicts or journal) of records ``rids``. Few
    records have any: on a bulk import that is a handful of DELETEs, not one
    per record."""
    had = {
        rid
        for (rid,) in conn.execute(
            f"SELECT record_id FROM {table} WHERE collection = ?", (collection,)
        )
    }
    conn.executemany(
        f"DELETE FROM {table} WHERE collection = ? AND record_id = ?",
        [(collection, rid) for rid in rids if rid in had],
    )
