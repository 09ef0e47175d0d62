"""The accounting adapter: acceptance suite, a hand-checked day of books,
exact money on large sums, the invariant checks, and the CLI (rebuild,
query, adapters)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from adapters.testing import assert_rebuild_identical, make_node, run_acceptance, snapshot
from engine import Node
from engine.cli import cli
from engine.errors import AdapterConfigError, AdapterNotFound, QueryError
from engine.schema import parse_schema
from engine.series import set_numbering

ACCOUNTS = ("111", "131", "156", "331", "511", "3331", "632")


def test_accounting_acceptance(tmp_path: Path) -> None:
    run_acceptance("accounting", tmp_path, seed=1, steps=120)


def books(tmp_path: Path, name: str = "n", node: str = "HN") -> Node:
    n = make_node(tmp_path / name, node, adapters={"accounting": {}})
    for code in ACCOUNTS:
        n.put("accounts", {"code": code, "name": f"TK {code}"})
    n.put("customers", {"code": "KH01", "name": "Công ty An Phát"})
    n.put("customers", {"code": "KH02", "name": "Bình Minh"})
    n.put("suppliers", {"code": "NCC01", "name": "Trà Thái Nguyên"})
    n.put("items", {"code": "TRA", "name": "Trà", "unit": "kg"})
    n.put("items", {"code": "CAFE", "name": "Cà phê", "unit": "kg"})
    n.put("warehouses", {"code": "KHO1", "name": "Kho chính"})
    n.put("warehouses", {"code": "KHO2", "name": "Kho phụ"})
    n.put("contracts", {"code": "HD01", "customer": "KH01", "value": "2000000000"})
    return n


def view(node: Node, name: str) -> list[tuple[Any, ...]]:
    return node.query(f"SELECT * FROM {name}").rows


def a_day(n: Node) -> None:
    """Purchases, sales, receipts, a payment, a transfer and a journal."""
    n.post_voucher(
        "purchase_invoice",
        {
            "date": "2026-03-02",
            "supplier": "NCC01",
            "warehouse": "KHO1",
            "lines": [
                {"item": "TRA", "qty": "1000", "price": "1234567"},
                {"item": "CAFE", "qty": "500", "price": "98765"},
            ],
        },
    )
    n.post_voucher(
        "sales_invoice",
        {
            "date": "2026-03-03",
            "customer": "KH01",
            "warehouse": "KHO1",
            "contract": "HD01",
            "lines": [
                {"item": "TRA", "qty": "400", "price": "2500000", "vat_rate": "0.1"},
                {"item": "CAFE", "qty": "3", "price": "333333.33", "vat_rate": "0.08"},
            ],
        },
    )
    n.post_voucher(
        "sales_invoice",
        {
            "date": "2026-03-03",
            "customer": "KH02",
            "warehouse": "KHO1",
            "lines": [{"item": "TRA", "qty": "12.5", "price": "2600000", "vat_rate": "0.1"}],
        },
    )
    n.post_voucher(
        "cash_receipt",
        {"date": "2026-03-04", "customer": "KH01", "amount": "1000000000", "contract": "HD01"},
    )
    n.post_voucher("cash_receipt", {"date": "2026-03-04", "customer": "KH02", "amount": "35750000"})
    n.post_voucher("cash_payment", {"date": "2026-03-04", "supplier": "NCC01", "amount": "1e9"})
    n.post_voucher(
        "stock_transfer",
        {
            "date": "2026-03-05",
            "from_warehouse": "KHO1",
            "to_warehouse": "KHO2",
            "lines": [{"item": "TRA", "qty": "100"}, {"item": "CAFE", "qty": "0.125"}],
        },
    )
    n.post_voucher(
        "journal",
        {
            "date": "2026-03-05",
            "lines": [
                {"account": "632", "debit": "500000000"},
                {"account": "156", "credit": "500000000"},
            ],
        },
    )


def test_hand_checked_day(tmp_path: Path) -> None:
    with books(tmp_path) as n:
        a_day(n)
        # Sales 1: 400 x 2,500,000 = 1,000,000,000 + VAT 10% 100,000,000;
        # 3 x 333,333.33 = 999,999.99 + VAT 8% 79,999.9992 -> 80,000.00.
        # Sales 2: 12.5 x 2,600,000 = 32,500,000 + VAT 3,250,000.
        assert view(n, "account_balances") == [
            ("111", "1035750000.00", "1000000000.00", "35750000.00"),
            ("131", "1136829999.99", "1035750000.00", "101079999.99"),
            ("156", "1283949500.00", "500000000.00", "783949500.00"),
            ("331", "1000000000.00", "1283949500.00", "-283949500.00"),
            ("3331", "0.00", "103330000.00", "-103330000.00"),
            ("511", "0.00", "1033499999.99", "-1033499999.99"),
            ("632", "500000000.00", "0.00", "500000000.00"),
        ]
        assert view(n, "receivables") == [
            ("KH01", "1101079999.99", "1000000000.00", "101079999.99"),
            ("KH02", "35750000.00", "35750000.00", "0.00"),
        ]
        assert view(n, "contract_progress") == [
            ("HD01", "2000000000.00", "1101079999.99", "1000000000.00"),
        ]
        assert view(n, "stock_on_hand") == [
            ("CAFE", "KHO1", "496.875"),
            ("CAFE", "KHO2", "0.125"),
            ("TRA", "KHO1", "487.500"),
            ("TRA", "KHO2", "100.000"),
        ]
        # Double entry: the whole ledger balances to the last unit.
        assert n.query("SELECT SUM(debit) - SUM(credit) FROM ledger_entries").rows == [(0,)]
        assert n.invariant_conflicts() == []
        assert_rebuild_identical(n)


def test_exact_on_large_sums(tmp_path: Path) -> None:
    """Sums a binary float gets wrong (16+ significant digits) come out exact."""
    with books(tmp_path) as n:
        for _ in range(3):
            n.post_voucher(
                "cash_receipt",
                {"date": "2026-03-04", "customer": "KH01", "amount": "12345678901234.57"},
            )
        n.post_voucher(
            "sales_invoice",
            {
                "date": "2026-03-03",
                "customer": "KH01",
                "warehouse": "KHO1",
                "lines": [
                    {"item": "TRA", "qty": "1", "price": "98765432109876.43", "vat_rate": "0.1"}
                ],
            },
        )
        # 3 x 12,345,678,901,234.57 = 37,037,036,703,703.71
        # VAT 9,876,543,210,987.643 -> 9,876,543,210,987.64; total 108,641,975,320,864.07
        assert view(n, "receivables") == [
            ("KH01", "108641975320864.07", "37037036703703.71", "71604938617160.36"),
        ]
        assert n.invariant_conflicts()[0]["rule"] == "negative_stock"


def rules(n: Node) -> list[tuple[str, str, str]]:
    return sorted((c["rule"], c["level"], c["collection"]) for c in n.invariant_conflicts())


def test_invariants(tmp_path: Path) -> None:
    with books(tmp_path) as n:
        sale = n.post_voucher(
            "sales_invoice",
            {
                "date": "2026-03-03",
                "customer": "KH01",
                "warehouse": "KHO1",
                "lines": [{"item": "TRA", "qty": "2", "price": "10"}],
            },
        )
        # Sold before anything came in: negative stock, a warning.
        assert rules(n) == [("negative_stock", "warning", "items")]
        (c,) = n.invariant_conflicts()
        assert c["kind"] == "invariant" and "TRA" in c["explanation"]
        assert "KHO1" in c["explanation"] and "-2.000" in c["explanation"]
        n.post_voucher(
            "purchase_invoice",
            {
                "date": "2026-03-03",
                "supplier": "NCC01",
                "warehouse": "KHO1",
                "lines": [{"item": "TRA", "qty": "5", "price": "7"}],
            },
        )
        assert rules(n) == []
        # Marking it paid is not a change of the books; editing its lines is.
        n.put("sales_invoice", {"id": sale.id, "paid": True})
        assert rules(n) == []
        n.put(
            "sales_invoice", {"id": sale.id, "lines": [{"item": "TRA", "qty": "3", "price": "10"}]}
        )
        assert rules(n) == [("posted_changed", "error", "sales_invoice")]
        # A journal whose debits differ from its credits.
        j = n.post_voucher(
            "journal",
            {
                "date": "2026-03-05",
                "lines": [{"account": "632", "debit": "100"}, {"account": "156", "credit": "90"}],
            },
        )
        assert ("unbalanced", "error", "journal") in rules(n)
        # A quantity finer than the books keep.
        n.post_voucher(
            "stock_transfer",
            {
                "date": "2026-03-05",
                "from_warehouse": "KHO1",
                "to_warehouse": "KHO2",
                "lines": [{"item": "TRA", "qty": "0.0005"}],
            },
        )
        assert ("precision", "warning", "stock_transfer") in rules(n)
        assert_rebuild_identical(n)
        # Deleting (voiding) the journal clears its conflict.
        n.delete("journal", j.id)
        assert ("unbalanced", "error", "journal") not in rules(n)
        assert_rebuild_identical(n)


def test_replicas_agree_on_books_and_invariants(tmp_path: Path) -> None:
    with books(tmp_path, "a", "HN") as a, make_node(tmp_path / "b", "HCM") as b:
        b.enable_adapter("accounting")
        a_day(a)
        b.import_updates(a.export_updates())
        a.put("customers", {"code": "KH01", "name": "An Phát (đổi tên)"})
        a.put("items", {"code": "TRA", "name": "Trà xanh"})
        b.import_updates(a.export_updates(b.state()))
        assert snapshot(a) == snapshot(b)
        assert a.invariant_conflicts() == b.invariant_conflicts()
        assert_rebuild_identical(b)


def test_accounting_needs_its_schema(tmp_path: Path) -> None:
    other = parse_schema(
        'schema = "x"\nversion = 1\n[collections.things]\nfields.code = "text"\n', origin="x"
    )
    with make_node(tmp_path / "n", "N", other) as n:
        with pytest.raises(AdapterConfigError, match="lacks accounts"):
            n.enable_adapter("accounting")
        with pytest.raises(AdapterConfigError, match="takes no options"):
            Node.create(tmp_path / "m", dataset="d", node="M", adapters={"accounting": {"x": 1}})


def test_query_is_read_only(tmp_path: Path) -> None:
    with books(tmp_path) as n:
        for sql in (
            "DELETE FROM records",
            "UPDATE vouchers SET total = 0",
            "DROP VIEW receivables",
            "CREATE TABLE x (a)",
            "ATTACH DATABASE 'other.db' AS o",
            "PRAGMA user_version = 9",
        ):
            with pytest.raises(QueryError, match="read-only"):
                n.query(sql)
        with pytest.raises(QueryError, match="no such table"):
            n.query("SELECT * FROM nope")
        assert n.count("customers") == 2
        assert not (tmp_path / "n" / "other.db").exists()


def run(*args: str) -> Any:
    result = CliRunner().invoke(cli, list(args))
    return result


def test_cli_query_rebuild_adapters(tmp_path: Path) -> None:
    home = str(tmp_path / "n")
    with books(tmp_path) as n:
        a_day(n)
    r = run("query", "--home", home, "SELECT * FROM receivables", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == [
        {
            "customer": "KH01",
            "invoiced": "1101079999.99",
            "received": "1000000000.00",
            "balance": "101079999.99",
        },
        {
            "customer": "KH02",
            "invoiced": "35750000.00",
            "received": "35750000.00",
            "balance": "0.00",
        },
    ]
    r = run("query", "--home", home, "SELECT 1.5 AS x, 2 AS n, 'a' AS t", "--json")
    assert json.loads(r.output) == [{"x": "1.5", "n": 2, "t": "a"}]
    r = run("query", "--home", home, "DELETE FROM vouchers")
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and r.output.startswith("error: query: refused")
    r = run("query", "--home", home, "SELECT account, balance FROM account_balances")
    assert r.exit_code == 0 and "101079999.99" in r.output
    r = run("rebuild", "--home", home)
    assert r.exit_code == 0, r.output
    assert "accounting: rebuilt" in r.output and "identical" in r.output
    r = run("rebuild", "--home", home, "--json")
    (report,) = json.loads(r.output)
    assert report["same"] and report["records"] > 0
    r = run("adapters", "list", "--home", home, "--json")
    assert {"adapter": "accounting", "enabled": True} in [
        {k: row[k] for k in ("adapter", "enabled")} for row in json.loads(r.output)
    ]
    r = run(
        "adapters", "enable", "--home", home, "mirror", "--options", '{"collections": ["items"]}'
    )
    assert r.exit_code == 0, r.output
    r = run("query", "--home", home, "SELECT code FROM mirror_items ORDER BY code", "--json")
    assert json.loads(r.output) == [{"code": "CAFE"}, {"code": "TRA"}]
    r = run("adapters", "enable", "--home", home, "nope")
    assert r.exit_code == 2 and "no adapter named 'nope'" in r.output
    r = run("adapters", "disable", "--home", home, "mirror")
    assert r.exit_code == 0
    r = run("query", "--home", home, "SELECT * FROM mirror_items")
    assert r.exit_code == 2 and "no such table" in r.output


def test_missing_adapter_refuses_writes_until_disabled(tmp_path: Path) -> None:
    with books(tmp_path) as n, n.store.transaction():
        n.store.set_meta("adapters", '{"accounting": {}, "gone": {}}')
    with Node.open(tmp_path / "n") as n:
        assert n.get("customers", "KH01") is not None  # reads still work
        assert n.query("SELECT COUNT(*) FROM customers").rows == [(2,)]
        with pytest.raises(AdapterNotFound, match="writes are refused"):
            n.put("customers", {"code": "KH03", "name": "Chi"})
        assert n.count("customers") == 2
        n.disable_adapter("gone")
        n.put("customers", {"code": "KH03", "name": "Chi"})
        assert n.query("SELECT COUNT(*) FROM customers").rows == [(3,)]
        assert_rebuild_identical(n)


def test_interrupted_rebuild_leaves_tables_as_they_were(tmp_path: Path) -> None:
    """Ctrl-C half-way through a rebuild (tables dropped, some rows written)
    rolls back: the incremental tables are untouched and still right."""
    with books(tmp_path) as n:
        a_day(n)
        before = snapshot(n)
        assert n._adapters is not None
        (adapter,) = n._adapters.adapters
        real = adapter._insert_built  # type: ignore[attr-defined]

        def interrupted(conn: Any, built: Any) -> None:
            real(conn, built)
            raise KeyboardInterrupt

        adapter._insert_built = interrupted  # type: ignore[attr-defined]
        with pytest.raises(KeyboardInterrupt):
            n.rebuild_adapters()
        del adapter._insert_built  # type: ignore[attr-defined]
        assert snapshot(n) == before
        assert_rebuild_identical(n)


def test_cli_rebuild_reports_and_repairs_differences(tmp_path: Path) -> None:
    home = str(tmp_path / "n")
    with books(tmp_path) as n:
        a_day(n)
        with n.store.transaction() as conn:  # damage the books behind the adapter's back
            conn.execute("UPDATE vouchers SET total = total + 1 WHERE type = 'cash_receipt'")
            conn.execute("DELETE FROM stock_moves WHERE move = 1")
    r = run("rebuild", "--home", home)
    assert r.exit_code == 1
    assert "DIFFERED" in r.output and "vouchers: 2 missing, 2 extra rows" in r.output
    assert "stock_moves: 4 missing, 0 extra rows" in r.output
    r = run("rebuild", "--home", home, "--json")
    assert r.exit_code == 0 and json.loads(r.output)[0]["same"]


def test_an_adapter_enabled_by_another_process_is_fed_by_an_open_node(tmp_path: Path) -> None:
    from adapters.testing import assert_rebuild_identical

    home = tmp_path / "shared"
    Node.create(home, dataset="acme", node="HN").close()
    with Node.open(home) as running, Node.open(home) as admin:
        running.put("customers", {"code": "KH1", "name": "An"})
        admin.enable_adapter("accounting")
        running.put("customers", {"code": "KH2", "name": "Bình"})  # after the enable
        names = running.query("SELECT code FROM customers ORDER BY code").rows
        assert [r[0] for r in names] == ["KH1", "KH2"]
        assert_rebuild_identical(running)
        admin.disable_adapter("accounting")
        running.put("customers", {"code": "KH3", "name": "Chi"})  # no adapter tables now
        assert running.adapters() == {}


# -- provisional numbers (issue 18) --------------------------------------------


def test_vouchers_carry_provisional_until_the_number_is_final(tmp_path: Path) -> None:
    """A rebuilt home numbers provisionally until its first completed sync;
    the books say so per voucher, and stop saying it once the number is final."""
    n = books(tmp_path)
    with n.store.transaction() as conn:
        set_numbering(conn, False)  # as in a home rebuilt before its first sync
    assert not n.numbering_known()
    a_day(n)
    rows = n.query("SELECT type, number, provisional FROM vouchers ORDER BY number").rows
    assert rows and all(p == 1 and "-P0" in number for _, number, p in rows)
    assert_rebuild_identical(n)
    assert n.confirm_numbering() == len(rows)
    rows = n.query("SELECT type, number, provisional FROM vouchers ORDER BY number").rows
    assert all(p == 0 and "-P0" not in number for _, number, p in rows), rows
    assert_rebuild_identical(n)
    n.close()


def test_a_vouchers_table_from_before_the_column_gets_it(tmp_path: Path) -> None:
    n = books(tmp_path)
    a_day(n)
    n.close()
    with Node.open(tmp_path / "n") as old, old.store.transaction() as conn:
        conn.execute("ALTER TABLE vouchers DROP COLUMN provisional")  # a store from before it
    with Node.open(tmp_path / "n") as n:
        n.post_voucher("cash_receipt", {"date": "2026-03-09", "customer": "KH02", "amount": "5"})
        rows = n.query("SELECT provisional FROM vouchers").rows
        assert rows and set(rows) == {(0,)}
        assert_rebuild_identical(n)
