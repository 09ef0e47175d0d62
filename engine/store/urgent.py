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


def pending(conn: sqlite3.Connection, schema: Schema, *, with_docs: bool = False) -> Urgent:
    """Urgent pending records per collection (every collection that has
    ``urgent_when``, zero included), and with ``with_docs`` the documents a
    pass takes first (``Urgent``). Reads only pending records."""
    out = Urgent()
    for coll in schema.ordered():
        if not coll.urgent_when:
            continue
        where, params = _where(coll)
        rows = conn.execute(
            "SELECT DISTINCT p.doc, r.id, r.data FROM pending_records p "
            "JOIN records r ON r.collection = ? AND r.id = p.record "
            f"WHERE r.deleted = 0 AND {where}",
            [coll.name, *params],
        ).fetchall()
        out.counts[coll.name] = len({rid for _, rid, _ in rows})
        if not with_docs or not rows:
            continue
        out.docs.update(str(doc) for doc, _, _ in rows)
        paths = ref_paths(coll)
        if not paths:
            continue
        targets = {t for _, _, data in rows for t in references(paths, orjson.loads(data))}
        for target, tid in targets:
            found = conn.execute(
                "SELECT DISTINCT doc FROM pending_records WHERE record = ? "
                "AND doc IN (SELECT doc FROM records WHERE collection = ? AND id = ?)",
                (tid, target, tid),
            ).fetchall()
            out.docs.update(str(d) for (d,) in found)
    return out
