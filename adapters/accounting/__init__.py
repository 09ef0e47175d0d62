"""The ``accounting`` adapter: books and reports of the built-in schema (DESIGN §9).

Tables: one per catalog (``customers``, ``items``...), ``vouchers``,
``voucher_lines``, ``ledger_entries`` (double entry), ``stock_moves`` and
``stock_balances`` (per item and warehouse: sum and count of its moves) and
``number_gaps`` (the replicated gap journal: numbers voided or restored).
Views name catalog records by code: ``stock_on_hand``, ``account_balances``,
``receivables``, ``contract_progress``.

Money is exact: amounts are integers of 1/100 (``MONEY_SCALE``) and
quantities integers of 1/1000 (``QTY_SCALE``) in the tables; the views show
them as exact decimal text. A line's amount (qty x price) and its VAT
(amount x vat_rate) are rounded half up to the money unit, line by line, as an
invoice does. A typed-in value the books cannot hold exactly (a quantity with
four decimals, an amount beyond 2**62 units) is reported as an ``invariant``
conflict (rule ``precision``).

Checks after every merge, as conflicts of kind ``invariant`` in
``adapter_conflicts``: ``unbalanced`` (a voucher whose debits differ from its
credits), ``negative_stock`` (warning), ``posted_changed`` (a voucher's
accounting fields written after it was posted: correct it by a reversal or a
new version instead).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import orjson

from engine.errors import AdapterConfigError
from engine.plugins import RecordChange
from engine.schema import GAPS, Collection, Schema

from ..base import (
    INSERT_CONFLICT,
    ConflictRow,
    SqlConn,
    conflict_row,
    db,
    digest,
    drop_objects,
    parse_decimal,
    rescale,
    to_units,
    units_sql,
    units_text,
)

NAME = "accounting"
MONEY_SCALE = 2
QTY_SCALE = 3
BATCH = 5000  # records per executemany batch in a rebuild

VOUCHER_BOOKS = (
    "sales_invoice",
    "purchase_invoice",
    "cash_receipt",
    "cash_payment",
    "stock_transfer",
    "journal",
)
REQUIRED_CATALOGS = ("accounts", "customers", "suppliers", "items", "warehouses", "contracts")
# Catalog decimals that are money and are summed or compared in views; other
# catalog decimals (an item's list price) stay exact decimal text.
MONEY_FIELDS = {("contracts", "value")}
# Fields whose change after posting does not touch the books: the number
# (a provisional number finalized) and the paid flag.
NOT_POSTING = {"number", "paid"}
RULES = ("unbalanced", "posted_changed", "precision")

# Accounts of the postings (DESIGN §9).
CASH, RECEIVABLE, GOODS, PAYABLE, REVENUE, OUTPUT_VAT = "111", "131", "156", "331", "511", "3331"

VOUCHER_COLUMNS = {
    "id": str,
    "type": str,
    "number": str,
    "date": str,
    "customer": str,
    "supplier": str,
    "warehouse": str,
    "from_warehouse": str,
    "to_warehouse": str,
    "contract": str,
    "paid": int,
    "amount": int,
    "vat": int,
    "total": int,
    # 1 while the number is provisional (booked before the node knew its
    # series' high-water mark, docs/conflicts.md), 0 once it is final. Last,
    # as ALTER TABLE ADD COLUMN puts it in stores made before it existed.
    "provisional": int,
}
LINE_COLUMNS = {
    "voucher": str,
    "line": int,
    "item": str,
    "account": str,
    "qty": int,
    "price": str,
    "vat_rate": str,
    "amount": int,
    "vat": int,
    "debit": int,
    "credit": int,
}
ENTRY_COLUMNS = {
    "voucher": str,
    "entry": int,
    "date": str,
    "type": str,
    "account_code": str,
    "account_id": str,
    "debit": int,
    "credit": int,
    "customer": str,
    "supplier": str,
    "contract": str,
}
# Per (item, warehouse): the sum of its moves and how many there are, kept
# with the moves so the stock check after a merge reads one row.
BALANCE_COLUMNS = {"item": str, "warehouse": str, "qty": int, "moves": int}
MOVE_COLUMNS = {
    "voucher": str,
    "move": int,
    "date": str,
    "item": str,
    "warehouse": str,
    "qty": int,
}
# One row per entry of the gap journal (engine.schema.model.gaps_collection).
GAP_COLUMNS: dict[str, Any] = {
    "id": str,
    "series": str,
    "collection": str,
    "number": str,
    "reason": str,
    "voucher": str,
    "node": str,
    "at": str,
}
TABLES = {
    "vouchers": (VOUCHER_COLUMNS, "id"),
    "voucher_lines": (LINE_COLUMNS, ("voucher", "line")),
    "ledger_entries": (ENTRY_COLUMNS, ("voucher", "entry")),
    "stock_moves": (MOVE_COLUMNS, ("voucher", "move")),
    "stock_balances": (BALANCE_COLUMNS, ("item", "warehouse")),
    "number_gaps": (GAP_COLUMNS, "id"),
}
# The views scan whole tables and the stock check reads stock_balances: no
# secondary index (each one costs ~5-10 % of a rebuild).
INDEXES: tuple[tuple[str, tuple[str, ...]], ...] = ()
VIEWS = ("stock_on_hand", "account_balances", "receivables", "contract_progress")

_M = MONEY_SCALE


def _view_sql() -> dict[str, str]:
    q = QTY_SCALE
    return {
        # A catalog record merged into another (alias_of) counts under the
        # survivor: rows group by the survivor's id and show its code.
        "stock_on_hand": (
            "CREATE VIEW stock_on_hand AS SELECT item, warehouse, "
            f"{units_sql('qty', q)} AS qty FROM ("
            "SELECT COALESCE(si.code, i.code, b.item) AS item, "
            "COALESCE(sw.code, w.code, b.warehouse) AS warehouse, SUM(b.qty) AS qty "
            "FROM stock_balances b "
            "LEFT JOIN items i ON i.id = b.item LEFT JOIN items si ON si.id = i.alias_of "
            "LEFT JOIN warehouses w ON w.id = b.warehouse "
            "LEFT JOIN warehouses sw ON sw.id = w.alias_of "
            "GROUP BY COALESCE(i.alias_of, b.item), COALESCE(w.alias_of, b.warehouse)"
            ") ORDER BY item, warehouse"
        ),
        "account_balances": (
            "CREATE VIEW account_balances AS SELECT account, "
            f"{units_sql('d', _M)} AS debit, {units_sql('c', _M)} AS credit, "
            f"{units_sql('b', _M)} AS balance FROM ("
            "SELECT account, SUM(d) AS d, SUM(c) AS c, SUM(d) - SUM(c) AS b FROM ("
            "SELECT COALESCE(sa.code, a.code, e.account_code, e.account_id) AS account, "
            "e.debit AS d, e.credit AS c FROM ledger_entries e "
            "LEFT JOIN accounts a ON a.id = e.account_id "
            "LEFT JOIN accounts sa ON sa.id = a.alias_of) GROUP BY account) ORDER BY account"
        ),
        "receivables": (
            "CREATE VIEW receivables AS SELECT customer, "
            f"{units_sql('inv', _M)} AS invoiced, {units_sql('rec', _M)} AS received, "
            f"{units_sql('bal', _M)} AS balance FROM ("
            "SELECT COALESCE(sc.code, c.code, e.customer) AS customer, SUM(e.debit) AS inv, "
            "SUM(e.credit) AS rec, SUM(e.debit) - SUM(e.credit) AS bal FROM ledger_entries e "
            "LEFT JOIN customers c ON c.id = e.customer "
            "LEFT JOIN customers sc ON sc.id = c.alias_of "
            f"WHERE e.account_code = '{RECEIVABLE}' AND e.customer IS NOT NULL "
            "GROUP BY COALESCE(c.alias_of, e.customer)) ORDER BY customer"
        ),
        "contract_progress": (
            "CREATE VIEW contract_progress AS SELECT contract, "
            f"{units_sql('val', _M)} AS value, {units_sql('inv', _M)} AS invoiced, "
            f"{units_sql('rec', _M)} AS received FROM ("
            "SELECT k.code AS contract, k.value AS val, COALESCE(s.inv, 0) AS inv, "
            "COALESCE(s.rec, 0) AS rec FROM contracts k LEFT JOIN ("
            "SELECT COALESCE(x.alias_of, e.contract) AS contract, SUM(e.debit) AS inv, "
            "SUM(e.credit) AS rec FROM ledger_entries e "
            "LEFT JOIN contracts x ON x.id = e.contract "
            f"WHERE e.account_code = '{RECEIVABLE}' AND e.contract IS NOT NULL "
            "GROUP BY COALESCE(x.alias_of, e.contract)"
            ") s ON s.contract = k.id WHERE k.alias_of IS NULL) ORDER BY contract"
        ),
    }


@dataclass
class _Built:
    """The rows one voucher makes."""

    voucher: tuple[Any, ...]
    lines: list[tuple[Any, ...]] = field(default_factory=list)
    entries: list[tuple[Any, ...]] = field(default_factory=list)
    moves: list[tuple[Any, ...]] = field(default_factory=list)
    conflicts: list[ConflictRow] = field(default_factory=list)


class _Units:
    """Converts typed-in decimals of one voucher, noting what was not exact."""

    def __init__(self) -> None:
        self.inexact: list[str] = []
        self.too_large: list[str] = []

    def __call__(self, value: Any, scale: int, where: str) -> int | None:
        if value is None:
            return 0
        units, exact = to_units(value, scale)
        if units is None:
            self.too_large.append(where)
        elif not exact:
            self.inexact.append(where)
        return units


class AccountingAdapter:
    """Books of the built-in ``accounting`` schema (module docstring)."""

    name = NAME
    # The SQL that differs between back ends (the PostgreSQL books,
    # adapters.pg_books, override these and the table and view creation).
    insert_conflict = INSERT_CONFLICT

    def __init__(self, schema: Schema, options: dict[str, Any]) -> None:
        if options:
            raise AdapterConfigError(
                f"adapter '{NAME}' takes no options (got {', '.join(sorted(options))})"
            )
        missing = [c for c in (*REQUIRED_CATALOGS, *VOUCHER_BOOKS) if c not in schema.collections]
        if missing:
            raise AdapterConfigError(
                f"adapter '{NAME}' needs the built-in accounting schema; schema "
                f"'{schema.name}' lacks {', '.join(missing)}"
            )
        self.schema = schema
        self.catalogs: list[Collection] = [
            c for c in schema.ordered() if c.kind == "catalog" and not c.system
        ]
        gaps = [GAPS] if GAPS in schema.collections else []
        self.collections = frozenset([c.name for c in self.catalogs] + list(VOUCHER_BOOKS) + gaps)
        self._catalog_columns = {c.name: self._columns_of(c) for c in self.catalogs}
        self._provisional = {
            name: _provisional_pattern(schema.collections[name]) for name in VOUCHER_BOOKS
        }
        self._columns_checked = False
        self._gaps_checked = False

    # -- the Adapter protocol ----------------------------------------------

    def tables(self) -> Sequence[str]:
        return [*(c.name for c in self.catalogs), *TABLES]

    def setup(self, conn: SqlConn) -> None:
        self._create_tables(conn)
        self._create_indexes_and_views(conn)

    def drop(self, conn: SqlConn) -> None:
        assert isinstance(conn, sqlite3.Connection)  # PgBooks has its own
        drop_objects(conn, VIEWS, self.tables())

    def apply(self, conn: SqlConn, changes: Sequence[RecordChange]) -> None:
        vouchers = [c for c in changes if c.collection in VOUCHER_BOOKS]
        if vouchers and not self._columns_checked:
            self._add_provisional_column(conn)
        gaps = [c for c in changes if c.collection == GAPS]
        if gaps:
            self._apply_gaps(conn, gaps)
        for coll in self.catalogs:
            mine = [c for c in changes if c.collection == coll.name]
            if not mine:
                continue
            conn.executemany(
                f'DELETE FROM "{coll.name}" WHERE id = ?',
                [(c.id,) for c in mine if c.kind == "deleted"],
            )
            live = [c for c in mine if c.kind != "deleted"]
            self._insert_catalog(conn, coll, live, replace=True)
            self._catalog_conflicts(conn, coll, mine, live)
        if not vouchers:
            return
        # An inserted voucher was not live before, so it has no rows here yet
        # (a delete removed them): only updates and deletes clear old rows.
        replaced = [c for c in vouchers if c.kind != "inserted"]
        ids = [(c.id,) for c in replaced]
        # Balance deltas: minus the moves being replaced, plus the new ones.
        delta: dict[tuple[str, str], list[int]] = {}
        for (vid,) in ids:
            for item, warehouse, qty, count in conn.execute(
                "SELECT item, warehouse, CAST(COALESCE(SUM(qty), 0) AS BIGINT), COUNT(*) "
                "FROM stock_moves WHERE voucher = ? GROUP BY item, warehouse",
                (vid,),
            ):
                d = delta.setdefault((item, warehouse), [0, 0])
                d[0] -= qty
                d[1] -= count
        if ids:
            conn.executemany("DELETE FROM vouchers WHERE id = ?", ids)
            for table in ("voucher_lines", "ledger_entries", "stock_moves"):
                conn.executemany(f"DELETE FROM {table} WHERE voucher = ?", ids)
            conn.executemany(
                "DELETE FROM adapter_conflicts WHERE adapter = ? AND id = ?",
                [
                    (NAME, digest("invariant", NAME, rule, c.collection, c.id))
                    for c in replaced
                    for rule in RULES
                ],
            )
        built = [self._build(c) for c in vouchers if c.kind != "deleted"]
        self._insert_built(conn, built)
        for b in built:
            for m in b.moves:
                d = delta.setdefault((m[3], m[4]), [0, 0])
                d[0] += m[5] or 0
                d[1] += 1
        self._update_stock(conn, delta)

    def rebuild(self, conn: SqlConn, records: Iterable[RecordChange]) -> None:
        self.drop(conn)
        self._create_tables(conn)
        catalogs = {c.name: c for c in self.catalogs}
        it = iter(records)
        while batch := list(islice(it, BATCH)):
            by_coll: dict[str, list[RecordChange]] = {}
            for change in batch:
                by_coll.setdefault(change.collection, []).append(change)
            built: list[_Built] = []
            for name, group in by_coll.items():
                if name in catalogs:
                    self._insert_catalog(conn, catalogs[name], group, replace=False)
                    self._catalog_conflicts(conn, catalogs[name], [], group)
                elif name in VOUCHER_BOOKS:
                    built += [self._build(c) for c in group]
                elif name == GAPS:
                    conn.executemany(_INSERT_GAP, [_gap_row(c) for c in group])
            self._insert_built(conn, built)
        conn.execute(
            "INSERT INTO stock_balances SELECT item, warehouse, COALESCE(SUM(qty), 0), COUNT(*) "
            "FROM stock_moves GROUP BY item, warehouse"
        )
        self._create_indexes_and_views(conn)
        negative = conn.execute(
            "SELECT item, warehouse, qty FROM stock_balances WHERE qty < 0"
        ).fetchall()
        conn.executemany(self.insert_conflict, [self._stock_conflict(*row) for row in negative])

    # -- tables --------------------------------------------------------------

    @staticmethod
    def _insert_sql(table: str, columns: Sequence[str], pk: str, replace: bool) -> str:
        """INSERT of ``columns`` (``?`` placeholders); with ``replace`` a row
        with the same ``pk`` is replaced."""
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        return (
            f'{verb} INTO "{table}" ({", ".join(columns)}) VALUES ({", ".join("?" * len(columns))})'
        )

    def _columns_of(self, coll: Collection) -> dict[str, type]:
        cols: dict[str, type] = {"id": str}
        for name, fld in coll.fields.items():
            if fld.type in ("int", "bool") or (coll.name, name) in MONEY_FIELDS:
                cols[name] = int
            else:
                cols[name] = str
        cols["alias_of"] = str  # merged into that record (resolve --merge-into)
        return cols

    def _create_tables(self, conn: SqlConn) -> None:
        assert isinstance(conn, sqlite3.Connection)  # PgBooks has its own
        d = db(conn)
        for coll in self.catalogs:
            table = d.table(coll.name)
            table.create(self._catalog_columns[coll.name], pk="id", if_not_exists=True)
            # A store made before a column existed (alias_of): add it.
            have = set(table.columns_dict)
            for name, kind in self._catalog_columns[coll.name].items():
                if name not in have:
                    table.add_column(name, kind)
        for name, (columns, pk) in TABLES.items():
            d.table(name).create(columns, pk=pk, if_not_exists=True)

    def _add_provisional_column(self, conn: SqlConn) -> None:
        assert isinstance(conn, sqlite3.Connection)  # PgBooks has its own
        """Give a vouchers table made before the ``provisional`` column the
        column, filled as a rebuild would fill it (once per adapter)."""
        have = {str(row[1]) for row in conn.execute("PRAGMA table_info(vouchers)")}
        if "provisional" not in have:
            conn.execute("ALTER TABLE vouchers ADD COLUMN provisional INTEGER")
            conn.executemany(
                "UPDATE vouchers SET provisional = ? WHERE id = ?",
                [
                    (self._is_provisional(kind, number), vid)
                    for vid, kind, number in conn.execute("SELECT id, type, number FROM vouchers")
                ],
            )
        self._columns_checked = True

    def _apply_gaps(self, conn: SqlConn, changes: Sequence[RecordChange]) -> None:
        if not self._gaps_checked:
            if isinstance(conn, sqlite3.Connection):
                # Books enabled before the gap journal existed have no table yet.
                db(conn).table("number_gaps").create(GAP_COLUMNS, pk="id", if_not_exists=True)
            self._gaps_checked = True
        conn.executemany(
            "DELETE FROM number_gaps WHERE id = ?",
            [(c.id,) for c in changes if c.kind == "deleted"],
        )
        conn.executemany(
            self._insert_sql("number_gaps", list(GAP_COLUMNS), "id", True),
            [_gap_row(c) for c in changes if c.kind != "deleted"],
        )

    def _is_provisional(self, kind: str, number: object) -> int:
        pattern = self._provisional.get(kind)
        return int(isinstance(number, str) and pattern is not None and bool(pattern.match(number)))

    def _create_indexes_and_views(self, conn: SqlConn) -> None:
        assert isinstance(conn, sqlite3.Connection)  # PgBooks has its own
        d = db(conn)
        for table, columns in INDEXES:
            d.table(table).create_index(columns, if_not_exists=True)
        existing = set(d.view_names())
        for view, sql in _view_sql().items():
            if view not in existing:
                conn.execute(sql)

    def _insert_catalog(
        self,
        conn: SqlConn,
        coll: Collection,
        changes: Sequence[RecordChange],
        replace: bool,
    ) -> None:
        if not changes:
            return
        columns = list(self._catalog_columns[coll.name])
        rows = [self._catalog_row(coll, c) for c in changes]
        conn.executemany(self._insert_sql(coll.name, columns, "id", replace), rows)

    def _catalog_row(self, coll: Collection, change: RecordChange) -> tuple[Any, ...]:
        v = change.values
        row: list[Any] = [change.id]
        for name, fld in coll.fields.items():
            value = v.get(name)
            if value is None:
                row.append(None)
            elif (coll.name, name) in MONEY_FIELDS:
                row.append(to_units(value, MONEY_SCALE)[0])
            elif fld.type == "bool":
                row.append(int(value))
            elif fld.type == "lines":
                row.append(orjson.dumps(value).decode())
            else:
                row.append(value)
        row.append(change.alias_of)
        return tuple(row)

    def _catalog_conflicts(
        self,
        conn: SqlConn,
        coll: Collection,
        changed: Sequence[RecordChange],
        live: Sequence[RecordChange],
    ) -> None:
        money = [name for (c, name) in MONEY_FIELDS if c == coll.name]
        if not money:
            return
        conn.executemany(
            "DELETE FROM adapter_conflicts WHERE adapter = ? AND id = ?",
            [(NAME, digest("invariant", NAME, "precision", coll.name, c.id)) for c in changed],
        )
        rows = []
        for change in live:
            units = _Units()
            for name in money:
                if change.values.get(name) is not None:
                    units(change.values[name], MONEY_SCALE, name)
            if units.inexact or units.too_large:
                rows.append(self._precision_conflict(change, units))
        conn.executemany(self.insert_conflict, rows)

    def _insert_built(self, conn: SqlConn, built: list[_Built]) -> None:
        for table, rows in (
            ("vouchers", [b.voucher for b in built]),
            ("voucher_lines", [row for b in built for row in b.lines]),
            ("ledger_entries", [row for b in built for row in b.entries]),
            ("stock_moves", [row for b in built for row in b.moves]),
            (None, [row for b in built for row in b.conflicts]),
        ):
            if not rows:
                continue
            if table is None:
                conn.executemany(self.insert_conflict, rows)
            else:
                marks = ", ".join("?" * len(rows[0]))
                conn.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)

    # -- postings (DESIGN §9) -------------------------------------------------

    def _build(self, change: RecordChange) -> _Built:
        """The rows of one live voucher and the invariants it breaks.

        Runs once per voucher in a rebuild: integer arithmetic on exact
        decimals (``parse_decimal``/``rescale``), no Decimal objects."""
        v = change.values
        kind = change.collection
        vid = change.id
        date = v.get("date")
        units = _Units()
        lines: list[tuple[Any, ...]] = []
        moves: list[tuple[Any, ...]] = []
        # (account code, account id, debit, credit, customer, supplier, contract)
        posts: list[tuple[Any, ...]] = []
        amount = vat = 0
        customer, supplier, contract = v.get("customer"), v.get("supplier"), v.get("contract")
        if kind == "sales_invoice" or kind == "purchase_invoice":
            sale = kind == "sales_invoice"
            warehouse = v.get("warehouse")
            for i, line in enumerate(v.get("lines") or (), 1):
                qm, qe = parse_decimal(line["qty"])
                pm, pe = parse_decimal(line["price"])
                qty, exact = rescale(qm, qe, QTY_SCALE)
                if not exact:
                    (units.inexact if qty is not None else units.too_large).append(f"line {i} qty")
                line_amount = rescale(qm * pm, qe + pe, MONEY_SCALE)[0]
                if line_amount is None:
                    units.too_large.append(f"line {i} amount")
                    line_amount = 0
                rate = line.get("vat_rate")
                line_vat = 0
                if rate is not None:
                    rm, re_ = parse_decimal(rate)
                    line_vat = rescale(line_amount * rm, MONEY_SCALE + re_, MONEY_SCALE)[0] or 0
                amount += line_amount
                vat += line_vat
                item = line["item"]
                price = line["price"]
                lines.append(
                    (vid, i, item, None, qty, price, rate, line_amount, line_vat, None, None)
                )
                out = None if qty is None else (-qty if sale else qty)
                moves.append((vid, i, date, item, warehouse, out))
            if sale:
                posts.append((RECEIVABLE, None, amount + vat, 0, customer, None, contract))
                posts.append((REVENUE, None, 0, amount, customer, None, contract))
                if vat:
                    posts.append((OUTPUT_VAT, None, 0, vat, customer, None, contract))
            else:
                posts.append((GOODS, None, amount, 0, None, supplier, None))
                posts.append((PAYABLE, None, 0, amount, None, supplier, None))
        elif kind == "cash_receipt":
            amount = units(v.get("amount"), MONEY_SCALE, "amount") or 0
            posts.append((CASH, None, amount, 0, customer, None, contract))
            posts.append((RECEIVABLE, None, 0, amount, customer, None, contract))
        elif kind == "cash_payment":
            amount = units(v.get("amount"), MONEY_SCALE, "amount") or 0
            posts.append((PAYABLE, None, amount, 0, None, supplier, None))
            posts.append((CASH, None, 0, amount, None, supplier, None))
        elif kind == "stock_transfer":
            for i, line in enumerate(v.get("lines") or (), 1):
                qty = units(line["qty"], QTY_SCALE, f"line {i} qty")
                lines.append((vid, i, line["item"], None, qty, None, None, None, None, None, None))
                moves.append(
                    (
                        vid,
                        2 * i - 1,
                        date,
                        line["item"],
                        v.get("from_warehouse"),
                        None if qty is None else -qty,
                    )
                )
                moves.append((vid, 2 * i, date, line["item"], v.get("to_warehouse"), qty))
        elif kind == "journal":
            for i, line in enumerate(v.get("lines") or (), 1):
                debit = units(line.get("debit"), MONEY_SCALE, f"line {i} debit") or 0
                credit = units(line.get("credit"), MONEY_SCALE, f"line {i} credit") or 0
                lines.append(
                    (vid, i, None, line["account"], None, None, None, None, None, debit, credit)
                )
                posts.append((None, line["account"], debit, credit, None, None, None))
                amount += debit
        paid = v.get("paid")
        voucher = (
            vid, kind, v.get("number"), date, customer, supplier, v.get("warehouse"),
            v.get("from_warehouse"), v.get("to_warehouse"), contract,
            None if paid is None else int(paid), amount, vat, amount + vat,
            self._is_provisional(kind, v.get("number")),
        )  # fmt: skip
        entries = [(vid, n, date, kind, *post) for n, post in enumerate(posts, 1)]
        built = _Built(voucher, lines, entries, moves)
        debits = sum(p[2] for p in posts)
        credits = sum(p[3] for p in posts)
        if debits != credits or change.edited or units.inexact or units.too_large:
            self._voucher_conflicts(change, built, debits, credits, units)
        return built

    def _voucher_conflicts(
        self, change: RecordChange, built: _Built, debits: int, credits: int, units: _Units
    ) -> None:
        kind, vid = change.collection, change.id
        number = change.values.get("number") or vid
        if debits != credits:
            d, c = units_text(debits, MONEY_SCALE), units_text(credits, MONEY_SCALE)
            built.conflicts.append(
                conflict_row(
                    NAME,
                    "unbalanced",
                    "error",
                    kind,
                    [vid],
                    "lines",
                    [self._value(change, {"debit": d, "credit": c})],
                    f"{kind} {number}: debits {d} differ from credits {c}; "
                    "correct it with a new version",
                )
            )
        posting = [f for f in change.edited if f not in NOT_POSTING]
        if posting:
            built.conflicts.append(
                conflict_row(
                    NAME,
                    "posted_changed",
                    "error",
                    kind,
                    [vid],
                    ",".join(posting),
                    [self._value(change, posting)],
                    f"{kind} {number} was changed after it was posted ({', '.join(posting)}); "
                    "book a reversal or a new version instead of editing a posted voucher",
                )
            )
        if units.inexact or units.too_large:
            built.conflicts.append(self._precision_conflict(change, units))

    @staticmethod
    def _value(change: RecordChange, value: Any) -> dict[str, Any]:
        return {
            "node": change.created_node,
            "hlc": change.updated_hlc,
            "value": value,
            "in_force": True,
        }

    def _precision_conflict(self, change: RecordChange, units: _Units) -> ConflictRow:
        where = units.too_large + units.inexact
        label = change.values.get("number") or change.values.get("code") or change.id
        if units.too_large:
            text = (
                f"{change.collection} {label}: {', '.join(units.too_large)} too large for "
                "the books (over 2**62 units); it is left out of them"
            )
        else:
            text = (
                f"{change.collection} {label}: {', '.join(units.inexact)} has more decimals "
                f"than the books keep ({MONEY_SCALE} for money, {QTY_SCALE} for quantities); "
                "rounded half up"
            )
        return conflict_row(
            NAME,
            "precision",
            "error" if units.too_large else "warning",
            change.collection,
            [change.id],
            ",".join(where),
            [self._value(change, where)],
            text,
        )

    # -- stock ----------------------------------------------------------------

    def _update_stock(self, conn: SqlConn, delta: dict[tuple[str, str], list[int]]) -> None:
        """Apply balance deltas and re-check the (item, warehouse) pairs they touch."""
        changed = sorted((k, v) for k, v in delta.items() if v != [0, 0])
        if not changed:
            return
        conn.executemany(
            "INSERT INTO stock_balances VALUES (?, ?, ?, ?) ON CONFLICT (item, warehouse) "
            # Qualified: PostgreSQL finds a bare column ambiguous here.
            "DO UPDATE SET qty = stock_balances.qty + excluded.qty, "
            "moves = stock_balances.moves + excluded.moves",
            [(item, wh, qty, count) for (item, wh), (qty, count) in changed],
        )
        stale, fresh = [], []
        for (item, warehouse), (dq, dc) in changed:
            qty, moves = conn.execute(
                "SELECT qty, moves FROM stock_balances WHERE item = ? AND warehouse = ?",
                (item, warehouse),
            ).fetchone()
            if moves == 0:  # no moves left: as a rebuild, no balance row
                conn.execute(
                    "DELETE FROM stock_balances WHERE item = ? AND warehouse = ?",
                    (item, warehouse),
                )
            if moves and qty < 0:
                fresh.append(self._stock_conflict(item, warehouse, qty))
            elif moves - dc and qty - dq < 0:
                # It was negative before this change, so it had a conflict row.
                stale.append((NAME, self._stock_id(item, warehouse)))
        if stale:
            conn.executemany("DELETE FROM adapter_conflicts WHERE adapter = ? AND id = ?", stale)
        if fresh:
            conn.executemany(self.insert_conflict, fresh)

    @staticmethod
    def _stock_id(item: str, warehouse: str | None) -> str:
        return digest("invariant", NAME, "negative_stock", "items", item, warehouse or "")

    def _stock_conflict(self, item: str, warehouse: str | None, total: int) -> ConflictRow:
        qty = units_text(total, QTY_SCALE)
        return conflict_row(
            NAME,
            "negative_stock",
            "warning",
            "items",
            [item, warehouse or ""],
            "qty",
            [{"node": "", "hlc": 0, "value": qty, "in_force": True}],
            f"stock of item {{item}} in warehouse {{warehouse}} is {qty}: more went out "
            "than came in (a sale recorded before its purchase, or a missing receipt)",
            names={"item": ("items", item), "warehouse": ("warehouses", warehouse or "")},
        )


_INSERT_GAP = f"INSERT INTO number_gaps VALUES ({', '.join('?' * len(GAP_COLUMNS))})"


def _gap_row(change: RecordChange) -> tuple[Any, ...]:
    return (change.id, *(change.values.get(name) for name in list(GAP_COLUMNS)[1:]))


def _provisional_pattern(coll: Collection) -> re.Pattern[str] | None:
    """What ``engine.series.PROVISIONAL_TEMPLATE`` makes for this book, from
    any node (a node name is letters, digits, '_' and '-')."""
    if coll.series is None:
        return None
    return re.compile(rf"{re.escape(coll.series.prefix)}-[A-Za-z0-9_-]{{1,32}}-P\d{{6,}}\Z")


def factory(schema: Schema, options: dict[str, Any]) -> AccountingAdapter:
    """Entry point of ``branchline.adapters``: ``accounting``."""
    return AccountingAdapter(schema, options)
