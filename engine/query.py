"""Read-only SQL on a node's store, for scripts and for checking books.

The store is opened on a second connection with ``mode=ro`` and
``PRAGMA query_only`` (SQLite refuses every write), and an authorizer refuses
ATTACH and PRAGMAs that set a value: a query can read, never change,
anything. Values come back as SQLite holds them (int, str, bytes, None;
REAL as float).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from . import plugins
from .errors import BranchlineError, QueryError, StoreError
from .schema import Schema

MAX_ROWS = 1_000_000

# mode=ro and query_only refuse every write to the store; the authorizer
# also refuses ATTACH (it could create another file) and PRAGMAs that set.
_DENIED = {sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH}
_SETTING_PRAGMAS_OK = {
    "table_info",
    "table_xinfo",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
}


@dataclass(frozen=True)
class QueryResult:
    """Column names and rows of a read-only query."""

    columns: list[str]
    rows: list[tuple[Any, ...]]

    def objects(self) -> list[dict[str, Any]]:
        """Rows as dicts keyed by column name (a repeated name gets ``:2``, ``:3``...)."""
        keys: list[str] = []
        seen: dict[str, int] = {}
        for name in self.columns:
            seen[name] = seen.get(name, 0) + 1
            keys.append(name if seen[name] == 1 else f"{name}:{seen[name]}")
        return [dict(zip(keys, row, strict=True)) for row in self.rows]

    def json_rows(self) -> list[list[Any]]:
        """Rows with every value as ``json_cell`` shows it."""
        return [[json_cell(v) for v in row] for row in self.rows]


def json_cell(value: Any) -> Any:
    """A query value for JSON: integers and text as they are; any other
    number as exact decimal text; blobs as hex."""
    if isinstance(value, float):
        return str(Decimal(repr(value)))
    if isinstance(value, bytes):
        return value.hex()
    return value


def _authorize(action: int, arg1: str | None, arg2: str | None, db: str | None, src: Any) -> int:
    if action in _DENIED:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA and arg2 is not None and arg1 not in _SETTING_PRAGMAS_OK:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def run_query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> QueryResult:
    """Run one read-only statement on the store file at ``path``.

    Raises QueryError (with one clear line) for a statement that would
    write, for several statements, or for an SQL error; StoreError when the
    file cannot be opened.
    """
    if not sql.strip():
        raise QueryError("query: empty SQL; give one SELECT statement")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path} read-only: {exc}") from None
    try:
        conn.execute("PRAGMA query_only = ON")
        conn.set_authorizer(_authorize)
        try:
            cur = conn.execute(sql, params)
            rows = cur.fetchmany(MAX_ROWS + 1)
        except sqlite3.DatabaseError as exc:
            text = str(exc)
            if "not authorized" in text or "readonly" in text or "read-only" in text:
                raise QueryError(
                    "query: refused: queries are read-only; use SELECT (writes go through the node)"
                ) from None
            raise QueryError(f"query: {text}") from None
        except sqlite3.ProgrammingError as exc:
            raise QueryError(f"query: {exc}") from None
        except sqlite3.Warning as exc:  # several statements in one string
            raise QueryError(f"query: {exc}") from None
        if len(rows) > MAX_ROWS:
            raise QueryError(f"query: more than {MAX_ROWS:,} rows; add a LIMIT or aggregate")
        columns = [d[0] for d in cur.description or ()]
        return QueryResult(columns, [tuple(r) for r in rows])
    finally:
        conn.close()


def adapter_owning(name: str, schema: Schema, skip: Iterable[str] = ()) -> str | None:
    """The installed adapter (other than those in ``skip``) whose tables or
    views include ``name``, found by setting each up with its default
    options in a scratch database; None when none does."""
    for adapter_name in sorted(set(plugins.installed()) - set(skip)):
        try:
            adapter = plugins.load(adapter_name, schema)
        except BranchlineError:
            continue  # it needs options to say what it would make
        scratch = sqlite3.connect(":memory:")
        try:
            adapter.setup(scratch)
            found = scratch.execute(
                "SELECT 1 FROM sqlite_master WHERE name = ? COLLATE NOCASE", (name,)
            ).fetchone()
        except (sqlite3.Error, BranchlineError):
            found = None
        finally:
            scratch.close()
        if found:
            return adapter_name
    return None
