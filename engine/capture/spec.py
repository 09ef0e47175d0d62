"""Which app tables a node captures, and how their columns map to a collection.

A ``CaptureSpec`` is checked once, when capture is enabled (``plan``), and
kept in node meta ``capture`` as JSON; every process that opens the home
reads it back with ``specs_of``. What the checks guarantee: the table exists
in the store with a rowid, its key column holds the collection's unique key,
every required field has a column, and a row coming from another node can
always be inserted (no unmapped ``NOT NULL`` column without a default).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import CaptureError
from ..schema import Collection, Schema
from ..store.capture import table_info

#: Node meta key: the captured tables (JSON, ``specs_to_meta``).
META_KEY = "capture"
TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}\Z")
#: Tables of Branchline's own, never an app's (the rest: ``reserved``).
OWN_PREFIXES = ("capture_", "sqlite_")


@dataclass(frozen=True)
class CaptureSpec:
    """One captured table: ``columns`` maps each captured field of
    ``collection`` to its column; ``key`` is the column holding the
    collection's unique key (``code``, a voucher's ``number``)."""

    table: str
    collection: str
    key: str
    columns: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "collection": self.collection,
            "key": self.key,
            "columns": dict(self.columns),
        }


def specs_of(meta: dict[str, str]) -> dict[str, CaptureSpec]:
    """The captured tables node ``meta`` lists: table -> spec."""
    raw = meta.get(META_KEY)
    if not raw:
        return {}
    value = orjson.loads(raw)
    out: dict[str, CaptureSpec] = {}
    for table, body in sorted(value.items()):
        out[table] = CaptureSpec(table, body["collection"], body["key"], dict(body["columns"]))
    return out


def specs_to_meta(specs: dict[str, CaptureSpec]) -> str:
    return orjson.dumps(
        {t: {k: v for k, v in s.to_json().items() if k != "table"} for t, s in specs.items()},
        option=orjson.OPT_SORT_KEYS,
    ).decode()


def plan(
    conn: Any,
    schema: Schema,
    table: str,
    collection: str,
    key: str | None,
    reserved: frozenset[str],
) -> CaptureSpec:
    """The spec for capturing ``table`` into ``collection`` with ``key``
    (default: a column named like the collection's key). ``reserved``: the
    tables Branchline or an adapter owns. Raises CaptureError."""
    if not TABLE_RE.match(table):
        raise CaptureError(f"table name {table!r}: letters, digits and '_' only")
    if table in reserved or table.lower().startswith(OWN_PREFIXES):
        raise CaptureError(
            f"{table} is a table of Branchline's own or of an adapter; "
            "capture a table your application writes"
        )
    coll = schema.collections.get(collection)
    if coll is None:
        known = ", ".join(sorted(c for c in schema.collections if not schema.collections[c].system))
        raise CaptureError(f"unknown collection '{collection}' (known: {known})")
    if coll.system:
        raise CaptureError(f"{collection} is written by Branchline only and cannot be captured")
    info = table_info(conn, table)
    names = {c["name"]: c for c in info}
    key = key or coll.key
    if key not in names:
        raise CaptureError(
            f"{table} has no column '{key}' to hold {collection}.{coll.key}; "
            f"name it with --key (columns: {', '.join(names)})"
        )
    if key != coll.key and coll.key in names:
        raise CaptureError(
            f"{table} has both '{key}' and '{coll.key}': which holds {collection}.{coll.key}? "
            f"capture with --key {coll.key}, or rename one"
        )
    columns = {coll.key: key}
    for name in names:
        if name != key and name in coll.fields and name != coll.key:
            columns[name] = name
    missing = [f.name for f in coll.fields.values() if f.required and f.name not in columns]
    if missing:
        raise CaptureError(
            f"{table} has no column for required field(s) {', '.join(missing)} of {collection}"
        )
    blocking = [
        c["name"]
        for c in info
        if c["notnull"]
        and c["dflt_value"] is None
        and c["name"] not in columns.values()
        and not _is_rowid_alias(c, info)
    ]
    if blocking:
        raise CaptureError(
            f"{table}: column(s) {', '.join(blocking)} are NOT NULL without a default and hold "
            f"no field of {collection}, so a row coming from another node could not be written; "
            "give them a default"
        )
    return CaptureSpec(table, collection, key, columns)


def collection_of(schema: Schema, spec: CaptureSpec) -> Collection:
    """The collection a spec captures into. Raises CaptureError when the
    schema lost it."""
    coll = schema.collections.get(spec.collection)
    if coll is None:
        raise CaptureError(f"{spec.table} captures '{spec.collection}', which the schema lacks")
    return coll


def _is_rowid_alias(column: dict[str, Any], info: list[dict[str, Any]]) -> bool:
    """An INTEGER PRIMARY KEY column gets a value by itself."""
    pk = [c for c in info if c["pk"]]
    return len(pk) == 1 and column["pk"] == 1 and str(column["type"]).upper() == "INTEGER"
