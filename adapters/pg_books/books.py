"""The accounting books on PostgreSQL: the ``accounting`` adapter's postings
(``AccountingAdapter``: one place turns a voucher into lines, ledger entries
and stock moves) written through a second SQL back end.

What differs from SQLite: the DDL (BIGINT minor units, TEXT), upserts
(``ON CONFLICT ... DO UPDATE``), ``%s`` placeholders (``PgConn`` translates
the books' ``?``), and a ``branch`` column on every voucher-made row (the
voucher's ``created_node``: the node that booked it). The views are the
SQLite ones plus per-branch ones and a readable ``ledger``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import psycopg

from adapters.accounting import (
    MONEY_SCALE,
    QTY_SCALE,
    RECEIVABLE,
    TABLES,
    AccountingAdapter,
    _Built,
)
from engine.plugins import RecordChange

# Rows made from a voucher carry the branch that booked it, as a last column.
BRANCH_TABLES = ("vouchers", "voucher_lines", "ledger_entries", "stock_moves")
CONFLICTS_DDL = (
    "CREATE TABLE IF NOT EXISTS adapter_conflicts (adapter TEXT NOT NULL, id TEXT NOT NULL, "
    "kind TEXT NOT NULL, rule TEXT NOT NULL, level TEXT NOT NULL, collection TEXT NOT NULL, "
    "records TEXT NOT NULL, field TEXT NOT NULL, data TEXT NOT NULL, explanation TEXT NOT NULL, "
    "PRIMARY KEY (adapter, id))"
)
_CONFLICT_COLUMNS = (
    "adapter", "id", "kind", "rule", "level", "collection", "records", "field", "data",
    "explanation",
)  # fmt: skip


def branch_of(change: RecordChange) -> str:
    """The branch a voucher came from: the node that created it (its first
    write), the same on every replica whoever relayed it."""
    return change.created_node


class PgConn:
    """A psycopg connection behind the two calls the books make of a
    sqlite3 connection (``execute``, ``executemany``, ``?`` placeholders)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        cur = self.conn.cursor()
        if params:
            cur.execute(_placeholders(sql), params)
        else:
            cur.execute(sql.encode())  # no parameters: '%' is literal
        return cur

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        batch = list(rows)
        if batch:
            self.conn.cursor().executemany(_placeholders(sql), batch)

    def copy_rows(self, table: str, rows: Sequence[Sequence[Any]]) -> None:
        """Append ``rows`` to ``table`` with COPY (one round trip; executemany
        costs about a millisecond per voucher on the feed's hot path)."""
        if not rows:
            return
        with self.conn.cursor().copy(f'COPY "{table}" FROM STDIN') as copy:
            for row in rows:
                copy.write_row(row)


def _placeholders(sql: str) -> str:
    # The books' SQL never holds '?' or '%' inside a literal it binds.
    return sql.replace("%", "%%").replace("?", "%s")


def _ddl_type(kind: type) -> str:
    return "BIGINT" if kind is int else "TEXT"


def pg_units(expr: str, scale: int) -> str:
    """``adapters.base.units_sql`` in PostgreSQL: integer units (BIGINT, or
    the NUMERIC of a SUM: no overflow) as exact decimal text."""
    mod = 10**scale
    whole = f"div(abs({expr}), {mod})::numeric(1000, 0)::text"
    frac = f"lpad(mod(abs({expr}), {mod})::numeric(1000, 0)::text, {scale}, '0')"
    return f"(CASE WHEN {expr} < 0 THEN '-' ELSE '' END || {whole} || '.' || {frac})"


class PgBooks(AccountingAdapter):
    """The accounting books in the current PostgreSQL schema (search_path)."""

    insert_conflict = (
        f"INSERT INTO adapter_conflicts VALUES ({', '.join('?' * len(_CONFLICT_COLUMNS))}) "
        "ON CONFLICT (adapter, id) DO UPDATE SET "
        + ", ".join(f"{c} = EXCLUDED.{c}" for c in _CONFLICT_COLUMNS[2:])
    )

    def __init__(self, schema: Any) -> None:
        super().__init__(schema, {})
        self._columns_checked = True  # no store from before the provisional column

    def tables(self) -> Sequence[str]:
        return [*super().tables(), "adapter_conflicts"]

    def views(self) -> Sequence[str]:
        return list(_views())

    @staticmethod
    def _insert_sql(table: str, columns: Sequence[str], pk: str, replace: bool) -> str:
        sql = (
            f'INSERT INTO "{table}" ({", ".join(columns)}) VALUES ({", ".join("?" * len(columns))})'
        )
        if replace:
            rest = [c for c in columns if c != pk]
            sql += f" ON CONFLICT ({pk}) DO UPDATE SET " + ", ".join(
                f"{c} = EXCLUDED.{c}" for c in rest
            )
        return sql

    def setup(self, conn: Any) -> None:
        self._create_tables(conn)
        self._create_indexes_and_views(conn)

    def drop(self, conn: Any) -> None:
        for view in _views():
            conn.execute(f'DROP VIEW IF EXISTS "{view}"')
        for table in self.tables():
            conn.execute(f'DROP TABLE IF EXISTS "{table}" CASCADE')

    def _create_tables(self, conn: Any) -> None:
        for coll in self.catalogs:
            _create(conn, coll.name, self._catalog_columns[coll.name], "id")
        for name, (columns, pk) in TABLES.items():
            extra = {"branch": str} if name in BRANCH_TABLES else {}
            _create(conn, name, {**columns, **extra}, pk)
        conn.execute(CONFLICTS_DDL)

    def _add_provisional_column(self, conn: Any) -> None:
        self._columns_checked = True

    def _create_indexes_and_views(self, conn: Any) -> None:
        for sql in _views().values():
            conn.execute(sql)

    def _insert_built(self, conn: Any, built: list[_Built]) -> None:
        if not isinstance(conn, PgConn):
            raise TypeError("PgBooks writes through a PgConn")
        conn.copy_rows("vouchers", [b.voucher for b in built])
        conn.copy_rows("voucher_lines", [row for b in built for row in b.lines])
        conn.copy_rows("ledger_entries", [row for b in built for row in b.entries])
        conn.copy_rows("stock_moves", [row for b in built for row in b.moves])
        conn.executemany(self.insert_conflict, [row for b in built for row in b.conflicts])

    def _build(self, change: RecordChange) -> _Built:
        built = super()._build(change)
        branch = (branch_of(change),)
        built.voucher = built.voucher + branch
        built.lines = [row + branch for row in built.lines]
        built.entries = [row + branch for row in built.entries]
        built.moves = [row + branch for row in built.moves]
        return built


def _create(conn: Any, table: str, columns: dict[str, type], pk: str | Sequence[str]) -> None:
    keys = (pk,) if isinstance(pk, str) else tuple(pk)
    cols = ", ".join(
        f'"{name}" {_ddl_type(kind)}{" NOT NULL" if name in keys else ""}'
        for name, kind in columns.items()
    )
    conn.execute(f'CREATE TABLE IF NOT EXISTS "{table}" ({cols}, PRIMARY KEY ({", ".join(keys)}))')


def _views() -> dict[str, str]:
    """The SQLite books' views (catalog records by code, an alias under its
    survivor), each also per branch, and ``ledger``."""
    m, q = MONEY_SCALE, QTY_SCALE
    out: dict[str, str] = {}
    for suffix, b in (("", ""), ("_by_branch", "branch, ")):
        out[f"stock_on_hand{suffix}"] = (
            f"CREATE OR REPLACE VIEW stock_on_hand{suffix} AS SELECT {b}item, warehouse, "
            f"{pg_units('qty', q)} AS qty FROM ("
            f"SELECT {b}MIN(COALESCE(si.code, i.code, s.item)) AS item, "
            "MIN(COALESCE(sw.code, w.code, s.warehouse)) AS warehouse, "
            "SUM(s.qty) AS qty "
            f"FROM {'stock_moves' if b else 'stock_balances'} s "
            "LEFT JOIN items i ON i.id = s.item LEFT JOIN items si ON si.id = i.alias_of "
            "LEFT JOIN warehouses w ON w.id = s.warehouse "
            "LEFT JOIN warehouses sw ON sw.id = w.alias_of "
            f"GROUP BY {b}COALESCE(i.alias_of, s.item), COALESCE(w.alias_of, s.warehouse)"
            f") t ORDER BY {b}item, warehouse"
        )
        out[f"account_balances{suffix}"] = (
            f"CREATE OR REPLACE VIEW account_balances{suffix} AS SELECT {b}account, "
            f"{pg_units('d', m)} AS debit, {pg_units('c', m)} AS credit, "
            f"{pg_units('d - c', m)} AS balance FROM ("
            f"SELECT {b}account, SUM(d) AS d, SUM(c) AS c FROM ("
            f"SELECT {b}COALESCE(sa.code, a.code, e.account_code, e.account_id) AS account, "
            "e.debit AS d, e.credit AS c FROM ledger_entries e "
            "LEFT JOIN accounts a ON a.id = e.account_id "
            "LEFT JOIN accounts sa ON sa.id = a.alias_of) x "
            f"GROUP BY {b}account) t ORDER BY {b}account"
        )
        out[f"receivables{suffix}"] = (
            f"CREATE OR REPLACE VIEW receivables{suffix} AS SELECT {b}customer, "
            f"{pg_units('inv', m)} AS invoiced, {pg_units('rec', m)} AS received, "
            f"{pg_units('inv - rec', m)} AS balance FROM ("
            f"SELECT {b}MIN(COALESCE(sc.code, c.code, e.customer)) AS customer, "
            "SUM(e.debit) AS inv, SUM(e.credit) AS rec "
            "FROM ledger_entries e LEFT JOIN customers c ON c.id = e.customer "
            "LEFT JOIN customers sc ON sc.id = c.alias_of "
            f"WHERE e.account_code = '{RECEIVABLE}' AND e.customer IS NOT NULL "
            f"GROUP BY {b}COALESCE(c.alias_of, e.customer)) t ORDER BY {b}customer"
        )
    out["contract_progress"] = (
        "CREATE OR REPLACE VIEW contract_progress AS SELECT contract, "
        f"{pg_units('val', m)} AS value, {pg_units('inv', m)} AS invoiced, "
        f"{pg_units('rec', m)} AS received FROM ("
        "SELECT k.code AS contract, k.value AS val, COALESCE(s.inv, 0) AS inv, "
        "COALESCE(s.rec, 0) AS rec FROM contracts k LEFT JOIN ("
        "SELECT COALESCE(x.alias_of, e.contract) AS contract, SUM(e.debit) AS inv, "
        "SUM(e.credit) AS rec FROM ledger_entries e "
        "LEFT JOIN contracts x ON x.id = e.contract "
        f"WHERE e.account_code = '{RECEIVABLE}' AND e.contract IS NOT NULL "
        "GROUP BY COALESCE(x.alias_of, e.contract)"
        ") s ON s.contract = k.id WHERE k.alias_of IS NULL) t ORDER BY contract"
    )
    out["ledger"] = (
        "CREATE OR REPLACE VIEW ledger AS SELECT e.branch, e.date, v.number, e.type, "
        "e.entry, COALESCE(sa.code, a.code, e.account_code, e.account_id) AS account, "
        f"{pg_units('e.debit', m)} AS debit, {pg_units('e.credit', m)} AS credit, "
        "COALESCE(c.code, e.customer) AS customer, COALESCE(s.code, e.supplier) AS supplier, "
        "COALESCE(k.code, e.contract) AS contract, e.voucher FROM ledger_entries e "
        "JOIN vouchers v ON v.id = e.voucher "
        "LEFT JOIN accounts a ON a.id = e.account_id LEFT JOIN accounts sa ON sa.id = a.alias_of "
        "LEFT JOIN customers c ON c.id = e.customer LEFT JOIN suppliers s ON s.id = e.supplier "
        "LEFT JOIN contracts k ON k.id = e.contract"
    )
    return out
