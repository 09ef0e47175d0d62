"""The ``mirror`` adapter: collections of any schema as plain tables, for
embedding apps that read SQL.

One table per mirrored collection, named ``{prefix}{collection}`` (prefix
``mirror_`` by default), holding its live records: ``id`` then one column per
field. Text, dates and references are TEXT (references are record ids),
ints and bools INTEGER, decimals exact decimal TEXT, lines JSON TEXT.

Options: ``collections`` (list of names; default every collection) and
``prefix``. A column the table lacks (a newer schema) is added in ``setup``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any

import orjson

from engine.errors import AdapterConfigError
from engine.names import NODE_RE
from engine.plugins import RecordChange
from engine.schema import Collection, Schema

from ..base import db, drop_objects, option

NAME = "mirror"
BATCH = 5000


class MirrorAdapter:
    """Mirrors collections as plain tables (module docstring)."""

    name = NAME

    def __init__(self, schema: Schema, options: dict[str, Any]) -> None:
        unknown = set(options) - {"collections", "prefix"}
        if unknown:
            raise AdapterConfigError(
                f"adapter '{NAME}': unknown option(s) {', '.join(sorted(unknown))} "
                "(known: collections, prefix)"
            )
        names = option(options, "collections", list, sorted(schema.collections))
        prefix = option(options, "prefix", str, "mirror_")
        if prefix and not NODE_RE.match(prefix):
            raise AdapterConfigError(
                f"adapter '{NAME}': prefix {prefix!r} must be letters, digits, '_' or '-'"
            )
        missing = [n for n in names if n not in schema.collections]
        if missing:
            raise AdapterConfigError(
                f"adapter '{NAME}': schema '{schema.name}' has no collection "
                f"{', '.join(map(str, missing))}"
            )
        self.prefix = prefix
        self.mirrored: dict[str, Collection] = {n: schema.collections[n] for n in names}
        self.collections = frozenset(self.mirrored)

    def table(self, collection: str) -> str:
        return f"{self.prefix}{collection}"

    def tables(self) -> Sequence[str]:
        return [self.table(n) for n in sorted(self.mirrored)]

    def setup(self, conn: sqlite3.Connection) -> None:
        d = db(conn)
        for name, coll in sorted(self.mirrored.items()):
            columns = _columns(coll)
            table = d.table(self.table(name))
            if table.exists():
                have = set(table.columns_dict)
                for column, kind in columns.items():
                    if column not in have:
                        table.add_column(column, kind)
            else:
                table.create(columns, pk="id")

    def drop(self, conn: sqlite3.Connection) -> None:
        drop_objects(conn, (), self.tables())

    def apply(self, conn: sqlite3.Connection, changes: Sequence[RecordChange]) -> None:
        for name, coll in self.mirrored.items():
            mine = [c for c in changes if c.collection == name]
            if not mine:
                continue
            conn.executemany(
                f'DELETE FROM "{self.table(name)}" WHERE id = ?',
                [(c.id,) for c in mine if c.kind == "deleted"],
            )
            self._insert(conn, coll, [c for c in mine if c.kind != "deleted"], "INSERT OR REPLACE")

    def rebuild(self, conn: sqlite3.Connection, records: Iterable[RecordChange]) -> None:
        self.drop(conn)
        self.setup(conn)
        it = iter(records)
        while batch := list(islice(it, BATCH)):
            by_coll: dict[str, list[RecordChange]] = {}
            for change in batch:
                by_coll.setdefault(change.collection, []).append(change)
            for name, group in by_coll.items():
                self._insert(conn, self.mirrored[name], group, "INSERT")

    def _insert(
        self, conn: sqlite3.Connection, coll: Collection, changes: list[RecordChange], verb: str
    ) -> None:
        if not changes:
            return
        names = list(coll.fields)
        # Column order of the table may differ after an evolution: name them.
        columns = ", ".join(f'"{n}"' for n in ["id", *names])
        lines = {n for n, f in coll.fields.items() if f.type == "lines"}
        rows = []
        for c in changes:
            v = c.values
            row: list[Any] = [c.id]
            for n in names:
                value = v.get(n)
                if n in lines and value is not None:
                    value = orjson.dumps(value).decode()
                elif type(value) is bool:
                    value = int(value)
                row.append(value)
            rows.append(row)
        conn.executemany(
            f'{verb} INTO "{self.table(coll.name)}" ({columns}) '
            f"VALUES ({', '.join('?' * (len(names) + 1))})",
            rows,
        )


def _columns(coll: Collection) -> dict[str, type]:
    cols: dict[str, type] = {"id": str}
    for name, fld in coll.fields.items():
        cols[name] = int if fld.type in ("int", "bool") else str
    return cols


def factory(schema: Schema, options: dict[str, Any]) -> MirrorAdapter:
    """Entry point of ``branchline.adapters``: ``mirror``."""
    return MirrorAdapter(schema, options)
