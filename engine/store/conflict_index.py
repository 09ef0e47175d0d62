"""The conflict index: keys shared by several live records and references to
records that are missing or deleted, kept current as records are
materialized, so listing conflicts (engine.conflicts) reads a few rows
instead of scanning every record.

Both tables are functions of the ``records`` table, like the conflicts
themselves: ``rebuild`` derives them from scratch (a store migrated from an
older format is marked stale and rebuilt when first opened) and ``compare``
checks the incremental tables against a rebuild (the tests do, after random
histories).

Costs on the write path, for a batch of records of one collection: one probe
per distinct key written (``records_key``), one per distinct reference
target, and nothing more unless a record that others may refer to goes from
live to deleted or missing; only then are the referring collections scanned
for it (deleting a catalog record is rare; booking vouchers is not).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..schema import Collection, Schema
from .inlists import chunks, marks

INDEX_SQL = """
-- Keys that several live, not merged, records of a collection share.
CREATE TABLE shared_keys (
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (collection, key)
) WITHOUT ROWID;

-- References of live records whose target is missing or deleted (the state
-- is read from ``records`` when listed). ``field`` is 'name' or 'lines.sub'.
CREATE TABLE dangling_refs (
    collection TEXT NOT NULL,
    id TEXT NOT NULL,
    field TEXT NOT NULL,
    target_collection TEXT NOT NULL,
    target_id TEXT NOT NULL,
    -- Every column in the key, in order: SQLite 3.40's integrity_check
    -- reports a false "NULL value" for a column between key columns.
    PRIMARY KEY (collection, id, field, target_collection, target_id)
) WITHOUT ROWID;
CREATE INDEX dangling_refs_target ON dangling_refs (target_collection, target_id);
"""

# Set in meta by the migration that adds the tables: rebuild before use.
STALE_META = "conflict_index_stale"


@dataclass(frozen=True)
class RefPath:
    """One reference field: ``name`` (a ref) or ``name.sub`` (a ref in lines)."""

    collection: str
    name: str
    sub: str | None
    target: str

    @property
    def label(self) -> str:
        return self.name if self.sub is None else f"{self.name}.{self.sub}"

    def targets(self, values: dict[str, Any]) -> Iterator[str]:
        """The ids this path refers to in a record's valid values."""
        value = values.get(self.name)
        if value is None:
            return
        if self.sub is None:
            if type(value) is str:
                yield value
            return
        for line in value:
            ref = line.get(self.sub) if isinstance(line, dict) else None
            if type(ref) is str:
                yield ref


@dataclass
class Written:
    """A record row as the materializer writes it."""

    id: str
    key: str | None
    live: bool  # not deleted
    alias: bool  # merged into another record
    values: dict[str, Any] = field(default_factory=dict)


class ConflictIndex:
    """The index's logic for one schema (holds no connection)."""

    def __init__(self, schema: Schema) -> None:
        self.paths: dict[str, list[RefPath]] = {}
        self.referrers: dict[str, list[RefPath]] = {}
        for coll in schema.collections.values():
            mine = list(_paths(coll))
            self.paths[coll.name] = mine
            for p in mine:
                self.referrers.setdefault(p.target, []).append(p)
        self.keyed = {c.name for c in schema.collections.values() if c.key}

    # -- the write path ----------------------------------------------------------

    def before(
        self, conn: sqlite3.Connection, coll: str, written: list[Written], removed: list[str]
    ) -> dict[str, tuple[str | None, bool]]:
        """Call before the rows are written: the old (key, live) of the rows
        whose change can end a shared key or start dangling references."""
        wanted: list[str] = []
        if coll in self.referrers:
            wanted += [w.id for w in written if not w.live]
            wanted += removed
        if _any(conn, "SELECT 1 FROM shared_keys WHERE collection = ? LIMIT 1", (coll,)):
            wanted = [w.id for w in written] + removed
        old: dict[str, tuple[str | None, bool]] = {}
        for chunk in chunks(sorted(set(wanted))):
            for rid, key, deleted in conn.execute(
                f"SELECT id, key, deleted FROM records WHERE collection = ? "
                f"AND id IN ({marks(chunk)})",
                (coll, *chunk),
            ):
                old[str(rid)] = (None if key is None else str(key), not deleted)
        return old

    def after(
        self,
        conn: sqlite3.Connection,
        coll: str,
        written: list[Written],
        removed: list[str],
        old: dict[str, tuple[str | None, bool]],
    ) -> None:
        """Call after the rows are written (same transaction), with what
        ``before`` returned."""
        self._keys(conn, coll, written, old)
        self._referring(conn, coll, written, removed)
        self._referred(conn, coll, written, removed, old)

    def _keys(
        self,
        conn: sqlite3.Connection,
        coll: str,
        written: list[Written],
        old: dict[str, tuple[str | None, bool]],
    ) -> None:
        if coll not in self.keyed:
            return
        keys = {w.key for w in written if w.key is not None and w.live and not w.alias}
        keys.update(k for k, _ in old.values() if k is not None)
        shared = set(_shared(conn, coll, sorted(keys)))
        conn.executemany(
            "DELETE FROM shared_keys WHERE collection = ? AND key = ?",
            [(coll, k) for k in sorted(keys - shared)],
        )
        conn.executemany(
            "INSERT OR IGNORE INTO shared_keys VALUES (?, ?)", [(coll, k) for k in sorted(shared)]
        )

    def _referring(
        self, conn: sqlite3.Connection, coll: str, written: list[Written], removed: list[str]
    ) -> None:
        """The written records' own references."""
        paths = self.paths.get(coll, [])
        if not paths:
            return
        if _any(conn, "SELECT 1 FROM dangling_refs WHERE collection = ? LIMIT 1", (coll,)):
            conn.executemany(
                "DELETE FROM dangling_refs WHERE collection = ? AND id = ?",
                [(coll, rid) for rid in [w.id for w in written] + removed],
            )
        refs = [
            (w.id, p, tid) for w in written if w.live for p in paths for tid in p.targets(w.values)
        ]
        wanted: dict[str, set[str]] = {}
        for _, p, tid in refs:
            wanted.setdefault(p.target, set()).add(tid)
        live = {(target, tid) for target, ids in wanted.items() for tid in _live(conn, target, ids)}
        conn.executemany(
            "INSERT OR IGNORE INTO dangling_refs VALUES (?, ?, ?, ?, ?)",
            [
                (coll, rid, p.label, p.target, tid)
                for rid, p, tid in refs
                if (p.target, tid) not in live
            ],
        )

    def _referred(
        self,
        conn: sqlite3.Connection,
        coll: str,
        written: list[Written],
        removed: list[str],
        old: dict[str, tuple[str | None, bool]],
    ) -> None:
        """References from other records to the written ones."""
        paths = self.referrers.get(coll)
        if not paths:
            return
        back = [w.id for w in written if w.live]
        if back and _any(
            conn, "SELECT 1 FROM dangling_refs WHERE target_collection = ? LIMIT 1", (coll,)
        ):
            for chunk in chunks(back):
                conn.execute(
                    "DELETE FROM dangling_refs WHERE target_collection = ? "
                    f"AND target_id IN ({marks(chunk)})",
                    (coll, *chunk),
                )
        gone = sorted(
            rid
            for rid in [w.id for w in written if not w.live] + removed
            if old.get(rid, (None, False))[1]
        )
        for p in paths:
            for chunk in chunks(gone):
                conn.executemany(
                    "INSERT OR IGNORE INTO dangling_refs VALUES (?, ?, ?, ?, ?)",
                    [
                        (p.collection, rid, p.label, p.target, tid)
                        for rid, tid in _referring_rows(conn, p, chunk)
                    ],
                )

    # -- whole-table ---------------------------------------------------------------

    def derive(self, conn: sqlite3.Connection) -> set[tuple[str, ...]]:
        """The rows both tables should hold, derived from ``records`` (reads
        only: a read-only connection will do)."""
        rows: set[tuple[str, ...]] = set()
        for name in sorted(self.keyed):
            rows.update(
                ("key", name, str(key))
                for (key,) in conn.execute(
                    "SELECT key FROM records INDEXED BY records_key WHERE collection = ? "
                    "AND deleted = 0 AND key IS NOT NULL AND alias_of IS NULL "
                    "GROUP BY key HAVING COUNT(*) > 1",
                    (name,),
                )
            )
        for paths in self.paths.values():
            for p in paths:
                rows.update(
                    ("ref", p.collection, rid, p.label, p.target, tid)
                    for rid, tid in _scan(conn, p)
                )
        return rows

    def rebuild(self, conn: sqlite3.Connection) -> None:
        """Derive both tables again from ``records``."""
        rows = self.derive(conn)
        conn.execute("DELETE FROM shared_keys")
        conn.execute("DELETE FROM dangling_refs")
        conn.executemany(
            "INSERT INTO shared_keys VALUES (?, ?)", sorted(r[1:] for r in rows if r[0] == "key")
        )
        conn.executemany(
            "INSERT INTO dangling_refs VALUES (?, ?, ?, ?, ?)",
            sorted(r[1:] for r in rows if r[0] == "ref"),
        )
        conn.execute("DELETE FROM meta WHERE key = ?", (STALE_META,))

    def compare(
        self, conn: sqlite3.Connection
    ) -> tuple[set[tuple[str, ...]], set[tuple[str, ...]]]:
        """(rows a rebuild would add, rows a rebuild would drop); both empty
        when the incremental tables are right. Reads only."""
        held, derived = _rows(conn), self.derive(conn)
        return derived - held, held - derived


def is_stale(conn: sqlite3.Connection) -> bool:
    return _any(conn, "SELECT 1 FROM meta WHERE key = ?", (STALE_META,))


def shared_keys(conn: sqlite3.Connection, collection: str) -> list[str]:
    """Keys several live records of ``collection`` share, sorted."""
    return [
        str(r[0])
        for r in conn.execute(
            "SELECT key FROM shared_keys WHERE collection = ? ORDER BY key", (collection,)
        )
    ]


def dangling(
    conn: sqlite3.Connection, collection: str
) -> list[tuple[str, str, str, str, str, str]]:
    """(id, created node, field, target collection, target id, 'missing' or
    'deleted') of the dangling references of ``collection``'s live records."""
    rows = conn.execute(
        "SELECT d.id, r.created_node, d.field, d.target_collection, d.target_id, x.deleted "
        "FROM dangling_refs d JOIN records r ON r.collection = d.collection AND r.id = d.id "
        "LEFT JOIN records x ON x.collection = d.target_collection AND x.id = d.target_id "
        "WHERE d.collection = ? ORDER BY d.id, d.field, d.target_id",
        (collection,),
    ).fetchall()
    return [
        (str(a), str(b), str(c), str(d), str(e), "missing" if f is None else "deleted")
        for a, b, c, d, e, f in rows
    ]


def _paths(coll: Collection) -> Iterator[RefPath]:
    for f in coll.fields.values():
        if f.type == "ref" and f.to:
            yield RefPath(coll.name, f.name, None, f.to)
        for sub in f.fields:
            if sub.type == "ref" and sub.to:
                yield RefPath(coll.name, f.name, sub.name, sub.to)


#: Keys asked about at once beyond which one scan of the collection's key
#: index is cheaper than lookups by IN-list (a bulk import asks about all).
SCAN_KEYS = 5_000


def _shared(conn: sqlite3.Connection, coll: str, keys: list[str]) -> Iterator[str]:
    """Which of ``keys`` more than one live, unaliased record holds."""
    if len(keys) > SCAN_KEYS:
        wanted = set(keys)
        for (key,) in conn.execute(
            "SELECT key FROM records INDEXED BY records_key WHERE collection = ? "
            "AND key IS NOT NULL AND deleted = 0 AND alias_of IS NULL "
            "GROUP BY key HAVING COUNT(*) > 1",
            (coll,),
        ):
            if key in wanted:
                yield str(key)
        return
    for chunk in chunks(keys):
        for (key,) in conn.execute(
            "SELECT key FROM records INDEXED BY records_key WHERE collection = ? "
            f"AND key IN ({marks(chunk)}) AND deleted = 0 AND alias_of IS NULL "
            "GROUP BY key HAVING COUNT(*) > 1",
            (coll, *chunk),
        ):
            yield str(key)


def _live(conn: sqlite3.Connection, coll: str, ids: Iterable[str]) -> Iterator[str]:
    for chunk in chunks(sorted(ids)):
        for (rid,) in conn.execute(
            f"SELECT id FROM records WHERE collection = ? AND id IN ({marks(chunk)}) "
            "AND deleted = 0",
            (coll, *chunk),
        ):
            yield str(rid)


def _source(p: RefPath) -> tuple[str, tuple[str, ...]]:
    """A query of (referring id, target id) over ``p``'s live records."""
    if p.sub is None:
        return (
            "SELECT r.id, json_extract(r.data, ?) AS t FROM records r "
            "WHERE r.collection = ? AND r.deleted = 0 AND t IS NOT NULL",
            (f"$.{p.name}", p.collection),
        )
    return (
        "SELECT DISTINCT r.id, json_extract(l.value, ?) AS t "
        "FROM records r, json_each(r.data, ?) l "
        "WHERE r.collection = ? AND r.deleted = 0 AND t IS NOT NULL",
        (f"$.{p.sub}", f"$.{p.name}", p.collection),
    )


def _scan(conn: sqlite3.Connection, p: RefPath) -> list[tuple[str, str]]:
    """Every (referring id, target id) of ``p`` whose target is not live."""
    query, args = _source(p)
    return [
        (str(r[0]), str(r[1]))
        for r in conn.execute(
            f"SELECT q.id, q.t FROM ({query}) q "
            "LEFT JOIN records x ON x.collection = ? AND x.id = q.t "
            "WHERE x.id IS NULL OR x.deleted = 1",
            (*args, p.target),
        )
    ]


def _referring_rows(
    conn: sqlite3.Connection, p: RefPath, targets: list[str]
) -> list[tuple[str, str]]:
    """(referring id, target id) of ``p``'s live records that refer to any of ``targets``."""
    query, args = _source(p)
    return [
        (str(r[0]), str(r[1]))
        for r in conn.execute(
            f"SELECT q.id, q.t FROM ({query}) q WHERE q.t IN ({marks(targets)})",
            (*args, *targets),
        )
    ]


def _rows(conn: sqlite3.Connection) -> set[tuple[str, ...]]:
    keys = {("key", str(c), str(k)) for c, k in conn.execute("SELECT * FROM shared_keys")}
    refs = {("ref", *map(str, row)) for row in conn.execute("SELECT * FROM dangling_refs")}
    return keys | refs


def _any(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> bool:
    return conn.execute(sql, args).fetchone() is not None
