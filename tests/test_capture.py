"""Write-back capture (engine.capture): an app writes its own SQLite table in
the node store; its changes become replicated writes, other nodes' changes
are written back into it without echo, bad rows are quarantined."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import CaptureError, CaptureNotFound, SchemaError
from engine.node import Node
from engine.schema import parse_schema
from engine.store import NodeStore

SHOP = parse_schema(
    """
schema = "shop"
version = 1

[collections.customers]
kind = "catalog"
fields.code = { type = "text", required = true }
fields.name = { type = "text", required = true }
fields.credit = "decimal"
fields.vip = "bool"
fields.visits = "int"

[collections.sales]
kind = "voucher"
partition = "month"
series = { prefix = "HD", strategy = "node" }
fields.date = { type = "date", required = true }
fields.customer = { type = "ref", to = "customers", required = true }
fields.total = { type = "decimal", required = true }
fields.paid = "bool"
"""
)

CUSTOMERS_SQL = (
    "CREATE TABLE app_customers (id INTEGER PRIMARY KEY, code TEXT UNIQUE, name TEXT, "
    "credit REAL, vip INTEGER, visits INTEGER, note TEXT DEFAULT 'mine')"
)
SALES_SQL = (
    "CREATE TABLE app_sales (id INTEGER PRIMARY KEY, number TEXT, date TEXT, "
    "customer TEXT, total TEXT, paid INTEGER)"
)


def make(tmp_path: Path, name: str = "A") -> Node:
    node = Node.create(tmp_path / name, dataset="shop", node=name, schema=SHOP)
    app(node).executescript(CUSTOMERS_SQL + ";" + SALES_SQL)
    return node


def app(node: Node) -> sqlite3.Connection:
    """The app's own connection to the node store (autocommit)."""
    conn = sqlite3.connect(NodeStore.file_in(node.home), isolation_level=None, timeout=30)
    return conn


def rows(node: Node, table: str, columns: str) -> list[tuple[Any, ...]]:
    with app(node) as conn:
        return conn.execute(f"SELECT {columns} FROM {table} ORDER BY 1").fetchall()


def sync(a: Node, b: Node) -> None:
    """Both ways, until nothing is new."""
    for _ in range(3):
        b.import_updates(a.export_updates(b.state()))
        a.import_updates(b.export_updates(a.state()))


def test_app_inserts_become_records(tmp_path: Path) -> None:
    node = make(tmp_path)
    node.enable_capture("app_customers", "customers")
    with app(node) as conn:
        conn.execute(
            "INSERT INTO app_customers (code, name, credit, vip, visits) "
            "VALUES ('C1', 'An', 12.5, 1, 3)"
        )
    assert node.capture_queued() == {"app_customers": 1}
    done = node.drain_captured()
    assert (done.written, done.quarantined) == (1, 0)
    got = node.get("customers", "C1")
    assert got is not None
    assert (got["name"], str(got["credit"]), got["vip"], got["visits"]) == ("An", "12.5", True, 3)
    assert node.capture_queued() == {}
    # The node's own write-back is not captured again.
    assert node.drain_captured().changes == 0


def test_update_and_delete(tmp_path: Path) -> None:
    node = make(tmp_path)
    node.enable_capture("app_customers", "customers")
    with app(node) as conn:
        conn.execute("INSERT INTO app_customers (code, name) VALUES ('C1', 'An')")
        conn.execute("UPDATE app_customers SET name = 'Anh' WHERE code = 'C1'")
        conn.execute("UPDATE app_customers SET note = 'only mine' WHERE code = 'C1'")
    assert node.capture_queued() == {"app_customers": 2}  # the app's own column is not captured
    node.drain_captured()
    got = node.get("customers", "C1")
    assert got is not None and got["name"] == "Anh"
    with app(node) as conn:
        conn.execute("UPDATE app_customers SET code = 'C9' WHERE code = 'C1'")
    node.drain_captured()
    assert node.get("customers", "C1") is None
    assert node.get("customers", "C9") is not None
    with app(node) as conn:
        conn.execute("DELETE FROM app_customers WHERE code = 'C9'")
    node.drain_captured()
    assert node.count("customers") == 0


def test_remote_changes_are_written_back(tmp_path: Path) -> None:
    a, b = make(tmp_path, "A"), make(tmp_path, "B")
    a.enable_capture("app_customers", "customers")
    b.enable_capture("app_customers", "customers")
    with app(a) as conn:
        conn.execute("INSERT INTO app_customers (code, name, credit) VALUES ('C1', 'An', 7)")
    a.drain_captured()
    sync(a, b)
    assert rows(b, "app_customers", "code, name, credit, note") == [("C1", "An", 7.0, "mine")]
    assert b.capture_queued() == {}  # written back, not captured again
    b.put("customers", {"code": "C1", "name": "Binh"})
    assert rows(b, "app_customers", "code, name") == [("C1", "Binh")]
    sync(a, b)
    assert rows(a, "app_customers", "code, name") == [("C1", "Binh")]
    b.delete("customers", "C1")
    sync(a, b)
    assert rows(a, "app_customers", "code") == []
    assert a.capture_queued() == {} and b.capture_queued() == {}


def test_existing_rows_and_records_meet_at_enable(tmp_path: Path) -> None:
    node = make(tmp_path)
    node.put("customers", {"code": "R1", "name": "Record only"})
    node.put("customers", {"code": "B1", "name": "Both, record side"})
    with app(node) as conn:
        conn.execute("INSERT INTO app_customers (code, name) VALUES ('T1', 'Table only')")
        conn.execute("INSERT INTO app_customers (code, name) VALUES ('B1', 'Both, table side')")
    assert node.enable_capture("app_customers", "customers") == 2
    while node.drain_captured().changes:
        pass
    assert rows(node, "app_customers", "code, name") == [
        ("B1", "Both, table side"),
        ("R1", "Record only"),
        ("T1", "Table only"),
    ]
    names = {r["code"]: r["name"] for r in node.list("customers")}
    assert names == {"B1": "Both, table side", "R1": "Record only", "T1": "Table only"}


def test_voucher_rows_are_numbered_and_written_back(tmp_path: Path) -> None:
    node = make(tmp_path)
    node.enable_capture("app_customers", "customers")
    node.enable_capture("app_sales", "sales")
    with app(node) as conn:
        conn.execute("INSERT INTO app_customers (code, name) VALUES ('C1', 'An')")
        conn.execute(
            "INSERT INTO app_sales (date, customer, total, paid) "
            "VALUES ('2026-12-04', 'C1', '10', 0)"
        )
        conn.execute("UPDATE app_sales SET paid = 1")  # before the node numbered it
    node.drain_captured()
    [(number, customer, paid)] = rows(node, "app_sales", "number, customer, paid")
    assert number.startswith("HD") and customer == "C1" and paid == 1
    [sale] = node.list("sales")
    assert sale["number"] == number and sale["paid"] is True
    with app(node) as conn:
        conn.execute("UPDATE app_sales SET number = 'HD-OTHER'")
    node.drain_captured()
    [failure] = node.capture_failures()
    assert "keeps it" in failure.reason  # a printed number never changes


def test_bad_rows_are_quarantined_then_cleared(tmp_path: Path) -> None:
    node = make(tmp_path)
    node.enable_capture("app_customers", "customers")
    node.enable_capture("app_sales", "sales")
    with app(node) as conn:
        conn.execute("INSERT INTO app_customers (code, name, visits) VALUES ('C1', 'An', 'many')")
        conn.execute(
            "INSERT INTO app_sales (date, customer, total) VALUES ('2026-12-04', 'NOPE', '5')"
        )
        conn.execute("INSERT INTO app_customers (code, name) VALUES ('C2', 'Good')")
    done = node.drain_captured()
    assert (done.written, done.quarantined) == (1, 2)
    failures = {f.change.table: f for f in node.capture_failures()}
    assert "customers.visits" in failures["app_customers"].reason
    assert "NOPE" in failures["app_sales"].reason
    assert node.get("customers", "C2") is not None  # one bad row blocks nothing else
    # The app fixes its row: the later change drains and the failure is moot.
    with app(node) as conn:
        conn.execute("UPDATE app_customers SET visits = 2 WHERE code = 'C1'")
    node.drain_captured()
    assert [f.change.table for f in node.capture_failures()] == ["app_sales"]
    got = node.get("customers", "C1")
    assert got is not None and got["visits"] == 2
    # The missing customer appears; retrying the sale writes it.
    node.put("customers", {"code": "NOPE", "name": "Late"})
    assert node.retry_captured() == 1
    node.drain_captured()
    assert node.capture_failures() == [] and node.count("sales") == 1


def test_any_write_drains_first(tmp_path: Path) -> None:
    node = make(tmp_path)
    node.enable_capture("app_customers", "customers")
    with app(node) as conn:
        conn.execute("INSERT INTO app_customers (code, name) VALUES ('C1', 'An')")
    node.put("customers", {"code": "C2", "name": "Other"})
    assert node.capture_queued() == {}
    assert node.get("customers", "C1") is not None


def test_concurrent_edits_of_one_row_conflict_alike(tmp_path: Path) -> None:
    a, b = make(tmp_path, "A"), make(tmp_path, "B")
    for n in (a, b):
        n.enable_capture("app_customers", "customers")
    with app(a) as conn:
        conn.execute("INSERT INTO app_customers (code, name) VALUES ('C1', 'An')")
    a.drain_captured()
    sync(a, b)
    with app(a) as conn:
        conn.execute("UPDATE app_customers SET name = 'from A'")
    with app(b) as conn:
        conn.execute("UPDATE app_customers SET name = 'from B'")
    sync(a, b)  # each drains before it imports: the edits are concurrent
    assert rows(a, "app_customers", "code, name") == rows(b, "app_customers", "code, name")
    assert [c["field"] for c in a.conflicts()] == ["name"]
    assert a.conflicts() == b.conflicts()


def test_enable_refuses_what_cannot_work(tmp_path: Path) -> None:
    node = make(tmp_path)
    with pytest.raises(CaptureError, match="no table 'nope'"):
        node.enable_capture("nope", "customers")
    with pytest.raises(CaptureError, match="Branchline's own"):
        node.enable_capture("records", "customers")
    with pytest.raises(CaptureError, match="unknown collection"):
        node.enable_capture("app_customers", "suppliers")
    with app(node) as conn:
        conn.execute("CREATE TABLE strict_t (code TEXT, name TEXT, must TEXT NOT NULL)")
        conn.execute("CREATE TABLE nameless (code TEXT)")
    with pytest.raises(CaptureError, match="NOT NULL without a default"):
        node.enable_capture("strict_t", "customers")
    with pytest.raises(CaptureError, match="required field"):
        node.enable_capture("nameless", "customers")
    node.enable_capture("app_customers", "customers")
    with pytest.raises(CaptureError, match="captured already"):
        node.enable_capture("app_customers", "customers")
    with pytest.raises(CaptureNotFound):
        node.disable_capture("app_sales")


def test_disable_writes_the_queue_first(tmp_path: Path) -> None:
    node = make(tmp_path)
    node.enable_capture("app_customers", "customers")
    with app(node) as conn:
        conn.execute("INSERT INTO app_customers (code, name) VALUES ('C1', 'An')")
    node.disable_capture("app_customers")
    assert node.get("customers", "C1") is not None
    with app(node) as conn:
        conn.execute("INSERT INTO app_customers (code, name) VALUES ('C2', 'Not captured')")
    assert node.captures() == {} and node.capture_queued() == {}


# -- random histories on two nodes ---------------------------------------------

CODES = st.sampled_from(["C1", "C2", "C3", "C4"])
NAMES = st.sampled_from(["an", "binh", "chi", "dung"])
NODES = st.sampled_from(["A", "B"])
OPS = st.one_of(
    st.tuples(st.just("insert"), NODES, CODES, NAMES),
    st.tuples(st.just("update"), NODES, CODES, NAMES),
    st.tuples(st.just("rename"), NODES, CODES, CODES),
    st.tuples(st.just("delete"), NODES, CODES),
    st.tuples(st.just("put"), NODES, CODES, NAMES),
    st.tuples(st.just("drain_one"), NODES),  # a batched drain: later changes of a row wait
    st.tuples(st.just("sync")),
)


def _app_op(conn: sqlite3.Connection, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "insert":
        conn.execute(
            "INSERT INTO app_customers (code, name) VALUES (?, ?) ON CONFLICT (code) DO NOTHING",
            (op[2], op[3]),
        )
    elif kind == "update":
        conn.execute("UPDATE app_customers SET name = ? WHERE code = ?", (op[3], op[2]))
    elif kind == "rename":
        conn.execute("UPDATE OR IGNORE app_customers SET code = ? WHERE code = ?", (op[3], op[2]))
    elif kind == "delete":
        conn.execute("DELETE FROM app_customers WHERE code = ?", (op[2],))


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(OPS, max_size=25))
def test_random_histories_end_with_equal_tables(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[Any, ...]]
) -> None:
    root = tmp_path_factory.mktemp("h")
    nodes = {n: make(root, n) for n in ("A", "B")}
    conns = {n: app(node) for n, node in nodes.items()}
    try:
        for node in nodes.values():
            node.enable_capture("app_customers", "customers")
        for op in ops:
            if op[0] == "sync":
                sync(nodes["A"], nodes["B"])
            elif op[0] == "put":  # a write through the API, beside the app's
                nodes[op[1]].put("customers", {"code": op[2], "name": op[3]})
            elif op[0] == "drain_one":
                nodes[op[1]].drain_captured(1)
            else:
                _app_op(conns[op[1]], op)
        sync(nodes["A"], nodes["B"])
        shown = {n: rows(node, "app_customers", "code, name") for n, node in nodes.items()}
        assert shown["A"] == shown["B"]
        a = nodes["A"]
        assert a.capture_status()["queued"] == 0
        assert a.capture_failures() == [] and nodes["B"].capture_failures() == []
        # Every live key is shown once, by its record (the earliest created
        # of a duplicate key).
        codes = {r["code"] for r in a.list("customers")}
        assert dict(shown["A"]) == {c: a.get("customers", c)["name"] for c in codes}  # type: ignore[index]
    finally:
        for conn in conns.values():
            conn.close()
        for node in nodes.values():
            node.close()


def test_schema_declares_captured_tables(tmp_path: Path) -> None:
    text = SHOP.source + '\n[capture.till_customers]\ncollection = "customers"\n'
    node = Node.create(tmp_path / "A", dataset="shop", node="A", schema=parse_schema(text))
    assert list(node.captures()) == ["till_customers"]
    with app(node) as conn:
        conn.execute("INSERT INTO till_customers (code, name, vip) VALUES ('C1', 'An', 1)")
    node.drain_captured()
    got = node.get("customers", "C1")
    assert got is not None and got["vip"] is True
    node.close()
    with Node.open(tmp_path / "A") as again:  # nothing to redo
        assert list(again.captures()) == ["till_customers"]
    for bad, message in [
        ('[capture.t]\ncollection = "nope"\n', "not a collection"),
        ('[capture.t]\ncollection = "customers"\n[capture.u]\ncollection = "customers"\n',
         "captured already"),
        ('[capture."bad name"]\ncollection = "customers"\n', "letters, digits"),
    ]:  # fmt: skip
        with pytest.raises(SchemaError, match=message):
            parse_schema(SHOP.source + "\n" + bad)


def test_a_row_the_table_refuses_is_listed_and_retried(tmp_path: Path) -> None:
    a, b = make(tmp_path, "A"), make(tmp_path, "B")
    with app(b) as conn:
        conn.execute("CREATE TABLE picky (code TEXT UNIQUE, name TEXT)")
        conn.execute(
            "CREATE TRIGGER picky_rule BEFORE INSERT ON picky WHEN length(NEW.name) >= 5 "
            "BEGIN SELECT RAISE(ABORT, 'names are short here'); END"
        )
    b.enable_capture("picky", "customers")
    a.put("customers", {"code": "C1", "name": "a long name"})
    a.put("customers", {"code": "C2", "name": "ok"})
    sync(a, b)  # the import is not refused: the record is B's, only its row is not
    assert b.get("customers", "C1") is not None
    assert rows(b, "picky", "code, name") == [("C2", "ok")]
    [failure] = b.capture_failures()
    assert failure.code == "writeback" and "names are short here" in failure.reason
    with app(b) as conn:
        conn.execute("DROP TRIGGER picky_rule")
    assert b.retry_captured([failure.id]) == 1
    assert rows(b, "picky", "code, name") == [("C1", "a long name"), ("C2", "ok")]
    assert b.capture_failures() == []


# -- a batch drains as its changes one by one would ------------------------------

ONE_NODE_OPS = st.one_of(
    st.tuples(st.just("insert"), st.just("A"), CODES, NAMES),
    st.tuples(st.just("update"), st.just("A"), CODES, NAMES),
    st.tuples(st.just("rename"), st.just("A"), CODES, CODES),
    st.tuples(st.just("delete"), st.just("A"), CODES),
    st.tuples(st.just("nameless"), st.just("A"), CODES),  # refused: name is required
)


def _outcome(node: Node) -> tuple[Any, ...]:
    records = sorted((r["code"], r["name"]) for r in node.list("customers"))
    failures = sorted((f.change.row, f.code) for f in node.capture_failures())
    return records, rows(node, "app_customers", "id, code, name"), failures


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(ONE_NODE_OPS, max_size=30))
def test_a_batch_ends_as_its_changes_one_by_one(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[Any, ...]]
) -> None:
    """The drain re-resolves a run of plain inserts together (Writer.deferring);
    whatever the history, a batch ends as draining one change at a time does."""
    root = tmp_path_factory.mktemp("h")
    outcomes = []
    for limit in (None, 1):
        node = make(root, "A" if limit is None else "B")
        node.enable_capture("app_customers", "customers")
        with app(node) as conn:
            for op in ops:
                if op[0] == "nameless":
                    conn.execute(
                        "INSERT INTO app_customers (code) VALUES (?) ON CONFLICT (code) DO NOTHING",
                        (op[2],),
                    )
                else:
                    _app_op(conn, op)
        if limit is None:
            node.drain_captured()  # one batch
        else:
            while node.drain_captured(limit).changes:
                pass
        assert node.capture_queued() == {}
        outcomes.append(_outcome(node))
        node.close()
    assert outcomes[0] == outcomes[1]
