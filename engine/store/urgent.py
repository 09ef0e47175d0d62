"""Urgent pending records: local changes the relay has not acknowledged, of
records matching their collection's ``urgent_when`` (docs/schema.md), and the
documents a sync pass takes first because of them.

A record is urgent when every ``urgent_when`` field holds the given value as
materialized now; a ``bool`` field the record lacks counts as false (an
invoice nobody marked paid is unpaid). Deleted records are not urgent.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

import orjson

from ..schema import Collection, Schema
from .inlists import chunks, marks
from .records import ref_paths, references


@dataclass
class Urgent:
    """``counts``: per collection with ``urgent_when``, its urgent pending
    records; ``docs``: the documents holding their changes and those holding
    pending changes of records they refer to (a catalog entry made offline
    for an urgent invoice goes with it)."""

    counts: dict[str, int] = field(default_factory=dict)
    docs: set[str] = field(default_factory=set)


def _where(coll: Collection) -> tuple[str, list[object]]:
    """SQL condition on ``r.data`` for ``coll.urgent_when``, and its parameters."""
    parts: list[str] = []
    params: list[object] = []
    for name, value in sorted(coll.urgent_when.items()):
        fld = coll.fields.get(name)
        extract = "json_extract(r.data, ?)"
        params.append(f'$."{name}"')
        if fld is not None and fld.type == "bool" and value is False:
            extract = f"coalesce({extract}, 0)"
        parts.append(f"{extract} = ?")
        params.append(int(value) if isinstance(value, bool) else value)
    return " AND ".join(parts), params


#: Pending records of one collection that are live, joined to their rows.
#: Read from ``pending_set`` (kept by triggers, keyed by document) over the
#: collection's documents only (``coll`` and ``coll/...``; parameters: the
#: collection, its name, and the bounds ``coll/`` and ``coll0``, as "0"
#: follows "/"): a backlog of other collections costs nothing here.
_FROM = (
    "FROM pending_set p JOIN records r ON r.collection = ? AND r.id = p.record "
    "WHERE (p.doc = ? OR (p.doc >= ? AND p.doc < ?)) AND r.deleted = 0 AND "
)


def _docs_of(coll: Collection) -> list[object]:
    return [coll.name, coll.name, f"{coll.name}/", f"{coll.name}0"]


def pending(conn: sqlite3.Connection, schema: Schema, *, with_docs: bool = False) -> Urgent:
    """Urgent pending records per collection (every collection that has
    ``urgent_when``, zero included), and with ``with_docs`` the documents a
    pass takes first (``Urgent``). Reads the pending records of the
    collections with ``urgent_when`` only, and the records they refer to by
    their keys."""
    out = Urgent()
    targets: set[tuple[str, str]] = set()
    for coll in schema.ordered():
        if not coll.urgent_when:
            continue
        where, params = _where(coll)
        if not with_docs:  # ``status``: a count, no record read
            (n,) = conn.execute(
                f"SELECT COUNT(DISTINCT r.id) {_FROM}{where}", [*_docs_of(coll), *params]
            ).fetchone()
            out.counts[coll.name] = int(n)
            continue
        rows = conn.execute(
            f"SELECT DISTINCT p.doc, r.id, r.data {_FROM}{where}", [*_docs_of(coll), *params]
        ).fetchall()
        out.counts[coll.name] = len({rid for _, rid, _ in rows})
        out.docs.update(str(doc) for doc, _, _ in rows)
        paths = ref_paths(coll)
        if paths:
            targets.update(t for _, _, data in rows for t in references(paths, orjson.loads(data)))
    by_collection: dict[str, list[str]] = {}
    for target, rid in sorted(targets):
        by_collection.setdefault(target, []).append(rid)
    for target, ids in by_collection.items():
        for chunk in chunks(ids):
            # By the records' keys, then their document's pending set: no scan.
            out.docs.update(
                str(doc)
                for (doc,) in conn.execute(
                    "SELECT DISTINCT r.doc FROM records r JOIN pending_set p "
                    "ON p.doc = r.doc AND p.record = r.id "
                    f"WHERE r.collection = ? AND r.id IN ({marks(chunk)})",
                    (target, *chunk),
                )
            )
    return out
