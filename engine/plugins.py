"""What the engine knows of adapters (DESIGN §8): the record changes it hands
them, the protocol they implement, discovery through the entry-point group
``branchline.adapters``, and the generic rebuild-and-compare.

The engine never imports the ``adapters`` package: adapters import the engine
and register a factory ``factory(schema, options) -> Adapter`` under the group.
A node lists its enabled adapters (with their options) in its ``meta`` table
under the key ``adapters``; with none enabled, ``Node`` holds no ``AdapterSet``
and a write costs nothing more.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal, Protocol, runtime_checkable

import orjson

from .errors import AdapterConfigError, AdapterError, AdapterNotFound
from .gcpause import paused_gc
from .merge import resolve
from .schema import Collection, Schema

GROUP = "branchline.adapters"
META_KEY = "adapters"

ChangeKind = Literal["inserted", "updated", "deleted"]
# (document, record id) -> the record's CRDT entries, for ``resolve``.
StatesOf = Callable[[str, str], dict[str, Any]]

CONFLICTS_SQL = """
CREATE TABLE IF NOT EXISTS adapter_conflicts (
    adapter TEXT NOT NULL,
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    rule TEXT NOT NULL,
    level TEXT NOT NULL CHECK (level IN ('error', 'warning')),
    collection TEXT NOT NULL,
    records TEXT NOT NULL,
    field TEXT NOT NULL,
    data TEXT NOT NULL,
    explanation TEXT NOT NULL,
    PRIMARY KEY (adapter, id)
) WITHOUT ROWID
"""


@dataclass(frozen=True, slots=True)
class RecordChange:
    """One record as it is after a materialization.

    ``values`` are the record's full current values in stored form (decimal
    strings, ISO dates, reference ids, lines as lists of dicts); for
    ``deleted`` they are its last values. ``edited`` (voucher books only)
    names the fields whose value in force was written after the record's
    creating write, derived from replicated state so every node agrees.
    ``alias_of``: the record was merged into that record of the same
    collection (``resolve --merge-into``); tables that group by a catalog
    record count it under the survivor.
    """

    kind: ChangeKind
    collection: str
    id: str
    doc: str
    values: dict[str, Any]
    created_hlc: int
    created_node: str
    updated_hlc: int
    edited: tuple[str, ...] = ()
    alias_of: str | None = None


@runtime_checkable
class Adapter(Protocol):
    """An adapter owns SQL tables and views in the node's store.

    ``apply`` runs inside the write transaction of the CRDT change, so the
    adapter's tables commit or roll back with it; it must not commit. Its
    tables must always equal what ``rebuild`` makes from the same records.
    """

    name: str
    collections: frozenset[str]

    def tables(self) -> Sequence[str]:
        """The tables it owns (compared by ``rebuild``); views excluded."""
        ...

    def setup(self, conn: Any) -> None:
        """Create its tables and views if missing (idempotent)."""
        ...

    def drop(self, conn: Any) -> None:
        """Remove its tables and views."""
        ...

    def apply(self, conn: Any, changes: Sequence[RecordChange]) -> None:
        """Bring its tables up to date with ``changes`` (of its collections)."""
        ...

    def rebuild(self, conn: Any, records: Iterable[RecordChange]) -> None:
        """Replace its tables' contents by what ``records`` (every live
        record of its collections, as ``inserted``) make."""
        ...


Factory = Callable[[Schema, dict[str, Any]], Adapter]


def installed() -> dict[str, Any]:
    """Installed adapters: name -> entry point."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load(name: str, schema: Schema, options: dict[str, Any] | None = None) -> Adapter:
    """Instantiate the installed adapter ``name`` for ``schema``.

    Raises AdapterNotFound, AdapterConfigError (options or schema do not
    fit), AdapterError (the plugin failed to load).
    """
    eps = installed()
    ep = eps.get(name)
    if ep is None:
        known = ", ".join(sorted(eps)) or "none"
        raise AdapterNotFound(f"no adapter named '{name}' is installed (installed: {known})")
    try:
        factory = ep.load()
    except Exception as exc:  # a broken plugin must not look like our bug
        raise AdapterError(f"adapter '{name}' ({ep.value}) failed to load: {exc}") from None
    adapter = factory(schema, dict(options or {}))
    if not isinstance(adapter, Adapter):
        raise AdapterError(f"adapter '{name}' ({ep.value}) does not implement the Adapter protocol")
    return adapter


def enabled(meta: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The adapters a node's meta enables: name -> options."""
    raw = meta.get(META_KEY)
    if not raw:
        return {}
    value = orjson.loads(raw)
    if not isinstance(value, dict):
        raise AdapterConfigError(f"node meta '{META_KEY}' is not an object of adapter options")
    return value


@dataclass(frozen=True)
class TableDiff:
    """How a table's incremental contents compare with its rebuild."""

    table: str
    rows: int  # rows after the rebuild
    missing: int  # rows the rebuild has that the incremental table lacked
    extra: int  # rows the incremental table had that the rebuild does not
    samples: list[str] = field(default_factory=list)  # a few differing rows, as text

    @property
    def same(self) -> bool:
        return self.missing == 0 and self.extra == 0


@dataclass(frozen=True)
class RebuildReport:
    """What ``Node.rebuild_adapters`` did for one adapter."""

    adapter: str
    records: int
    seconds: float
    tables: list[TableDiff]

    @property
    def same(self) -> bool:
        return all(t.same for t in self.tables)


RebuildReports = list[RebuildReport]  # (inside Node, ``list`` names a method)


class AdapterSet:
    """The adapters enabled on one open node, in the order they were enabled,
    then ``sinks``: what else takes record changes in the write transaction
    (captured tables' write-back), which no rebuild or listing shows."""

    def __init__(self, adapters: list[Adapter], sinks: Sequence[Adapter] = ()) -> None:
        self.adapters = adapters
        self._by_collection: dict[str, list[Adapter]] = {}
        for adapter in [*adapters, *sinks]:
            for name in adapter.collections:
                self._by_collection.setdefault(name, []).append(adapter)

    @classmethod
    def from_meta(
        cls, meta: dict[str, str], schema: Schema, sinks: Sequence[Adapter] = ()
    ) -> AdapterSet | None:
        """The set a node's meta enables (with ``sinks``), or None when
        there is nothing to feed."""
        wanted = enabled(meta)
        if not wanted and not sinks:
            return None
        try:
            return cls([load(name, schema, options) for name, options in wanted.items()], sinks)
        except AdapterError as exc:
            # The node still opens (reads, queries, disabling the adapter);
            # only writes are refused, since they would leave its tables stale.
            return BrokenAdapterSet(exc)

    def __bool__(self) -> bool:
        return bool(self.adapters)

    def consumes(self, coll: Collection) -> bool:
        """Whether an enabled adapter wants the changes of ``coll``'s records."""
        return coll.name in self._by_collection

    def apply(self, conn: Any, coll: Collection, changes: Sequence[RecordChange]) -> None:
        """Inside the write transaction that made them: pass ``changes`` (of
        records of ``coll``) to each adapter consuming ``coll``."""
        for adapter in self._by_collection.get(coll.name, ()):
            adapter.apply(conn, changes)


class BrokenAdapterSet(AdapterSet):
    """An enabled adapter cannot be loaded: every write is refused."""

    def __init__(self, error: AdapterError) -> None:
        super().__init__([])
        self.error = error

    def __bool__(self) -> bool:
        return True

    def consumes(self, coll: Collection) -> bool:
        raise type(self.error)(
            f"{self.error}; this node enables it, so writes are refused until it is "
            "installed or disabled ('branchline adapters disable')"
        )


def edited_fields(coll: Collection, states: dict[str, Any], created_hlc: int) -> tuple[str, ...]:
    """Schema fields whose value in force was written after the creating write."""
    writers = resolve(states).writers
    return tuple(
        sorted(
            name for name, (_, hlc) in writers.items() if name in coll.fields and hlc > created_hlc
        )
    )


def live_records(
    conn: Any, schema: Schema, collections: Iterable[str], states_of: StatesOf
) -> Iterator[RecordChange]:
    """Every live record of ``collections`` as an ``inserted`` change, the
    way the incremental path would have delivered it."""
    for name in sorted(collections):
        coll = schema.collections.get(name)
        if coll is None:
            continue
        for rid, doc, c_hlc, c_node, u_hlc, data, alias in conn.execute(
            "SELECT id, doc, created_hlc, created_node, updated_hlc, data, alias_of FROM records "
            "WHERE collection = ? AND deleted = 0 ORDER BY id",
            (name,),
        ):
            edited = (
                edited_fields(coll, states_of(doc, rid), c_hlc)
                if coll.is_voucher and u_hlc != c_hlc
                else ()
            )
            yield RecordChange(
                "inserted", name, rid, doc, orjson.loads(data), c_hlc, c_node, u_hlc, edited, alias
            )


def ensure_conflicts_table(conn: Any) -> None:
    conn.execute(CONFLICTS_SQL)


def rebuild(
    conn: Any,
    adapter: Adapter,
    records: Iterable[RecordChange],
    compare: bool = True,
) -> RebuildReport:
    """Rebuild one adapter's tables inside the caller's transaction and, with
    ``compare``, report how they differ from what was there before."""
    started = time.perf_counter()
    ensure_conflicts_table(conn)
    tables = list(adapter.tables())
    old: dict[str, str] = {}
    if compare:
        for i, table in enumerate(tables):
            if _exists(conn, table):
                old[table] = f"temp._bl_old_{i}"
                conn.execute(f"DROP TABLE IF EXISTS {old[table]}")
                conn.execute(f'CREATE TEMP TABLE _bl_old_{i} AS SELECT * FROM "{table}"')
        conn.execute("DROP TABLE IF EXISTS temp._bl_old_conflicts")
        conn.execute(
            "CREATE TEMP TABLE _bl_old_conflicts AS SELECT * FROM adapter_conflicts "
            "WHERE adapter = ?",
            (adapter.name,),
        )
    conn.execute("DELETE FROM adapter_conflicts WHERE adapter = ?", (adapter.name,))
    counted = _Counter(records)
    # A rebuild makes millions of short-lived containers (measured with the
    # cyclic GC on: build time x3).
    with paused_gc():
        adapter.rebuild(conn, counted)
    diffs: list[TableDiff] = []
    if compare:
        for table in tables:
            diffs.append(_diff(conn, table, f'"{table}"', old.get(table)))
        diffs.append(
            _diff(
                conn,
                "adapter_conflicts",
                f"(SELECT * FROM adapter_conflicts WHERE adapter = '{_quote(adapter.name)}')",
                "temp._bl_old_conflicts",
            )
        )
        for name in [*old.values(), "temp._bl_old_conflicts"]:
            conn.execute(f"DROP TABLE IF EXISTS {name}")
    return RebuildReport(adapter.name, counted.count, time.perf_counter() - started, diffs)


class _Counter:
    def __init__(self, records: Iterable[RecordChange]) -> None:
        self._records = records
        self.count = 0

    def __iter__(self) -> Iterator[RecordChange]:
        for record in self._records:
            self.count += 1
            yield record


def _diff(conn: Any, name: str, new: str, old: str | None) -> TableDiff:
    rows = conn.execute(f"SELECT COUNT(*) FROM {new}").fetchone()[0]
    if old is None:
        return TableDiff(name, rows, rows, 0, [])
    missing = conn.execute(f"SELECT * FROM {new} EXCEPT SELECT * FROM {old} LIMIT 1000001")
    missing_rows = missing.fetchall()
    extra_rows = conn.execute(
        f"SELECT * FROM {old} EXCEPT SELECT * FROM {new} LIMIT 1000001"
    ).fetchall()
    samples = [f"missing {tuple(r)!r}" for r in missing_rows[:3]]
    samples += [f"extra {tuple(r)!r}" for r in extra_rows[:3]]
    return TableDiff(name, rows, len(missing_rows), len(extra_rows), samples)


def _exists(conn: Any, table: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    return row is not None


def _quote(text: str) -> str:
    return text.replace("'", "''")


def conflict_dicts(conn: Any) -> list[dict[str, Any]]:
    """The adapters' open conflicts (kind ``invariant``) as ``Node.conflicts``
    dicts, plus ``level`` and ``rule``; ``{name}`` placeholders of an
    explanation are filled with the current code of the record they name."""
    if not _exists(conn, "adapter_conflicts"):
        return []
    out = []
    for adapter, cid, kind, rule, level, coll, records, fld, data, text in conn.execute(
        "SELECT adapter, id, kind, rule, level, collection, records, field, data, explanation "
        "FROM adapter_conflicts ORDER BY id"
    ):
        payload = orjson.loads(data)
        for placeholder, (target, rid) in sorted(payload.get("names", {}).items()):
            row = conn.execute(
                "SELECT key FROM records WHERE collection = ? AND id = ?", (target, rid)
            ).fetchone()
            text = text.replace("{" + placeholder + "}", str(row[0]) if row and row[0] else rid)
        out.append(
            {
                "id": cid,
                "kind": kind,
                "collection": coll,
                "records": orjson.loads(records),
                "field": fld,
                "values": payload.get("values", []),
                "explanation": text,
                "level": level,
                "rule": rule,
                "adapter": adapter,
            }
        )
    return out
