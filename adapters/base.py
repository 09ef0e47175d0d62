"""What every adapter shares: exact numbers as integer minor units, table
creation through sqlite-utils, and rows of the ``adapter_conflicts`` table.

An adapter implements ``engine.plugins.Adapter`` (see docs/adapters.md) and is
registered under the entry-point group ``branchline.adapters`` as a factory
``factory(schema, options) -> Adapter``.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any, Protocol

import orjson
import sqlite_utils

from engine.errors import AdapterConfigError
from engine.plugins import RecordChange

# SQLite integers are signed 64-bit; sums of amounts must stay below this.
# Anything larger is refused per value (stored NULL, reported as an invariant).
MAX_UNITS = 2**62

# Quantities, rates and prices repeat a lot across vouchers: parsing each
# distinct text once saves most of the work in a rebuild.
PARSED_CACHE = 65_536
_PARSED: dict[str, tuple[int, int]] = {}

ConflictRow = tuple[str, str, str, str, str, str, str, str, str, str]


class SqlConn(Protocol):
    """What books write through: a sqlite3 connection, or a PostgreSQL one
    behind the same two calls (adapters.pg_books.books.PgConn)."""

    def execute(self, sql: str, params: Any = ..., /) -> Any: ...

    def executemany(self, sql: str, rows: Iterable[Any], /) -> Any: ...


def db(conn: sqlite3.Connection) -> sqlite_utils.Database:
    """A sqlite-utils view of the node's connection. Its writes run in a
    savepoint of the caller's transaction, so they commit with it."""
    return sqlite_utils.Database(conn, execute_plugins=False, use_counts_table=False)


def parse_decimal(value: Any) -> tuple[int, int]:
    """A stored decimal (canonical string, or a Decimal) as ``(m, e)`` with
    value = m * 10**-e, exactly. Integer arithmetic on these is several times
    faster than Decimal on the rebuild's hot path."""
    text = value if type(value) is str else str(value)
    hit = _PARSED.get(text)
    if hit is not None:
        return hit
    if "E" in text or "e" in text:
        sign, digits, exp = Decimal(text).as_tuple()
        assert isinstance(exp, int)
        m = int("".join(map(str, digits)) or "0")
        m = -m if sign else m
        parsed = (m * 10**exp, 0) if exp >= 0 else (m, -exp)
    else:
        whole, _, frac = text.partition(".")
        parsed = int(whole + frac), len(frac)
    if len(_PARSED) >= PARSED_CACHE:
        _PARSED.clear()
    _PARSED[text] = parsed
    return parsed


def rescale(m: int, e: int, scale: int) -> tuple[int | None, bool]:
    """m * 10**-e as a count of ``10**-scale`` units, rounded half up (away
    from zero, as Decimal's ROUND_HALF_UP), and whether that was exact.
    (None, False) when it does not fit SQLite's integers (``MAX_UNITS``)."""
    if e <= scale:
        units, exact = m * 10 ** (scale - e), True
    else:
        d = 10 ** (e - scale)
        q, r = divmod(-m if m < 0 else m, d)
        if 2 * r >= d:
            q += 1
        units, exact = (-q if m < 0 else q), r == 0
    if -MAX_UNITS < units < MAX_UNITS:
        return units, exact
    return None, False


def to_units(value: Any, scale: int) -> tuple[int | None, bool]:
    """A stored decimal as an integer count of ``10**-scale`` units, rounded
    half up, and whether that was exact. (None, False) for a value too large
    for SQLite's 64-bit integers."""
    m, e = parse_decimal(value)
    return rescale(m, e, scale)


def units_sql(expr: str, scale: int) -> str:
    """SQL showing an integer count of ``10**-scale`` units as exact decimal
    text (``-1234.50``); NULL stays NULL. ``expr`` must be a plain column."""
    if scale == 0:
        return f"CAST({expr} AS TEXT)"
    mod = 10**scale
    zeros = "0" * scale
    return (
        f"(CASE WHEN {expr} < 0 THEN '-' ELSE '' END || (abs({expr}) / {mod}) || '.' || "
        f"substr('{zeros}' || (abs({expr}) % {mod}), -{scale}))"
    )


def units_text(units: int | None, scale: int) -> str | None:
    """Python twin of ``units_sql``."""
    if units is None:
        return None
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), 10**scale)
    return f"{sign}{whole}.{frac:0{scale}d}" if scale else f"{sign}{whole}"


def digest(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def conflict_row(
    adapter: str,
    rule: str,
    level: str,
    collection: str,
    records: Sequence[str],
    field: str,
    values: list[dict[str, Any]],
    explanation: str,
    names: dict[str, tuple[str, str]] | None = None,
) -> ConflictRow:
    """A row of ``adapter_conflicts`` (kind ``invariant``). Its id hashes the
    rule and the records, so every node with the same data has the same one.
    ``{placeholder}`` in the explanation is shown as the current key (code)
    of ``names[placeholder] = (collection, id)``."""
    cid = digest("invariant", adapter, rule, collection, *records)
    data = orjson.dumps({"values": values, "names": names or {}}, option=orjson.OPT_SORT_KEYS)
    return (
        adapter,
        cid,
        "invariant",
        rule,
        level,
        collection,
        orjson.dumps(list(records)).decode(),
        field,
        data.decode(),
        explanation,
    )


INSERT_CONFLICT = "INSERT OR REPLACE INTO adapter_conflicts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


def value_of(change: RecordChange, field: str) -> Any:
    return change.values.get(field)


def option(options: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    """An adapter option of the right type, or its default. Raises AdapterConfigError."""
    value = options.get(name, default)
    if not isinstance(value, kind):
        raise AdapterConfigError(
            f"adapter option '{name}': expected {kind.__name__}, got {type(value).__name__}"
        )
    return value


def drop_objects(conn: sqlite3.Connection, views: Sequence[str], tables: Sequence[str]) -> None:
    for view in views:
        conn.execute(f'DROP VIEW IF EXISTS "{view}"')
    for table in tables:
        conn.execute(f'DROP TABLE IF EXISTS "{table}"')
