"""Voucher numbering (DESIGN §4): the ``node`` and ``blocks`` strategies.

A number is durable with its voucher, never reused, never shared by two
nodes; gaps (voids) are journalled; yearly series restart each year.
"""

from __future__ import annotations

import itertools
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import Node
from engine.clock import ManualClock
from engine.errors import SeriesError, UnknownReference, ValidationError


def make(home: Path, node: str, schema: Any = "accounting", seed: int = 1) -> Node:
    return Node.create(
        home,
        dataset="books",
        node=node,
        schema=schema,
        clock=ManualClock(),
        rng=random.Random(seed),
    )


def reopen(node: Node, seed: int = 99) -> Node:
    home, clock = node.home, node._clock
    node.close()
    return Node.open(home, clock=clock, rng=random.Random(seed))


def setup_catalogs(node: Node) -> None:
    node.put("customers", {"code": "KH1", "name": "Khách 1"})
    node.put("warehouses", {"code": "K1", "name": "Kho 1"})
    node.put("items", {"code": "VT1", "name": "Vật tư 1", "price": "100"})


def invoice(date: str = "2026-01-05", customer: str = "KH1") -> dict[str, Any]:
    return {
        "date": date,
        "customer": customer,
        "warehouse": "K1",
        "paid": False,
        "lines": [{"item": "VT1", "qty": "1", "price": "100"}],
    }


def receipt(date: str = "2026-01-05", customer: str = "KH1") -> dict[str, Any]:
    return {"date": date, "customer": customer, "amount": "100"}


def journal(node: Node, event: str | None = None) -> list[tuple[str, str, str | None]]:
    sql = "SELECT series, number, event, record_id FROM series_journal"
    rows = node.store.conn.execute(sql + " ORDER BY seq").fetchall()
    return [(s, n, r) for s, n, e, r in rows if event is None or e == event]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = make(tmp_path / "a", "CN1")
    setup_catalogs(n)
    yield n
    n.close()


# -- node strategy ---------------------------------------------------------------


def test_node_numbers_follow_the_template_per_voucher_type(node: Node) -> None:
    numbers = [node.post_voucher("sales_invoice", invoice()).number for _ in range(3)]
    assert numbers == ["HDCN1-2026-000001", "HDCN1-2026-000002", "HDCN1-2026-000003"]
    # Another voucher type has its own series; months do not split a series.
    assert node.post_voucher("cash_receipt", receipt("2026-02-01")).number == "PTCN1-2026-000001"
    assert node.post_voucher("cash_receipt", receipt("2026-03-01")).number == "PTCN1-2026-000002"
    posted = node.post_voucher("sales_invoice", invoice())
    assert not posted.provisional
    assert node.get("sales_invoice", posted.id)["number"] == "HDCN1-2026-000004"
    assert node.get("sales_invoice", "HDCN1-2026-000004")["id"] == posted.id  # number is the key
    issued = journal(node, "issued")
    assert [n for _, n, _ in issued] == [
        *numbers,
        "PTCN1-2026-000001",
        "PTCN1-2026-000002",
        "HDCN1-2026-000004",
    ]


def test_numbers_survive_close_and_reopen(node: Node) -> None:
    first = [node.post_voucher("sales_invoice", invoice()).number for _ in range(2)]
    node = reopen(node)
    try:
        third = node.post_voucher("sales_invoice", invoice()).number
        assert [*first, third] == ["HDCN1-2026-000001", "HDCN1-2026-000002", "HDCN1-2026-000003"]
        assert sorted(v["number"] for v in node.list("sales_invoice")) == [*first, third]
    finally:
        node.close()


def test_rolled_back_bookings_consume_no_number(node: Node) -> None:
    with pytest.raises(UnknownReference):
        node.post_voucher("sales_invoice", invoice(customer="NOBODY"))
    bad_lines = {**invoice(), "lines": [{"item": "VT1", "qty": "x", "price": "1"}]}
    with pytest.raises(ValidationError):
        node.post_voucher("sales_invoice", bad_lines)
    with pytest.raises(ValidationError):
        node.post_voucher("sales_invoice", {"date": "2026-01-05", "customer": "KH1"})
    with pytest.raises(ValidationError):
        node.post_voucher("sales_invoice", {**invoice(), "date": "2026-13-01"})
    assert journal(node) == []
    assert node.post_voucher("sales_invoice", invoice()).number == "HDCN1-2026-000001"
    assert node.list("sales_invoice")[0]["number"] == "HDCN1-2026-000001"


def test_a_hand_typed_number_uses_no_series_number(node: Node) -> None:
    posted = node.post_voucher("sales_invoice", {**invoice(), "number": "MANUAL-7"})
    assert posted.number == "MANUAL-7"
    assert node.post_voucher("sales_invoice", invoice()).number == "HDCN1-2026-000001"


def test_delete_journals_a_void_and_the_number_is_not_reused(node: Node) -> None:
    a = node.post_voucher("sales_invoice", invoice())
    b = node.post_voucher("sales_invoice", invoice())
    node.delete("sales_invoice", a.id)
    assert journal(node, "void") == [("sales_invoice@2026", "HDCN1-2026-000001", a.id)]
    node.restore("sales_invoice", a.id)
    node.delete("sales_invoice", "HDCN1-2026-000001")  # by number
    assert len(journal(node, "void")) == 2
    c = node.post_voucher("sales_invoice", invoice())
    assert (b.number, c.number) == ("HDCN1-2026-000002", "HDCN1-2026-000003")


YEARLY = """
schema = "yearly"
version = 1

[collections.customers]
kind = "catalog"
fields.code = "text"
fields.name = "text"

[collections.receipts]
kind = "voucher"
partition = "year"
series = { prefix = "PT", reset = "yearly", template = "{prefix}{year}-{node}-{seq:04}" }
fields.date = { type = "date", required = true }
fields.customer = { type = "ref", to = "customers", required = true }
"""


def test_yearly_series_restart_every_year(tmp_path: Path) -> None:
    schema = tmp_path / "yearly.toml"
    schema.write_text(YEARLY, "utf-8")
    node = make(tmp_path / "home", "B2", schema)
    node.put("customers", {"code": "C", "name": "c"})

    def post(date: str) -> str:
        return node.post_voucher("receipts", {"date": date, "customer": "C"}).number

    assert post("2025-12-30") == "PT2025-B2-0001"
    assert post("2025-12-31") == "PT2025-B2-0002"
    assert post("2026-01-01") == "PT2026-B2-0001"
    assert post("2025-06-01") == "PT2025-B2-0003"  # a late booking into last year
    node = reopen(node)
    try:
        assert post("2026-01-02") == "PT2026-B2-0002"
        assert post("2027-01-01") == "PT2027-B2-0001"
        with pytest.raises(ValidationError):
            node.post_voucher("receipts", {"customer": "C"})  # no date: no year
        assert post("2026-12-31") == "PT2026-B2-0003"
        keys = {s for s, _, _ in journal(node, "issued")}
        assert keys == {"receipts@2025", "receipts@2026", "receipts@2027"}
    finally:
        node.close()


# -- node strategy under any interleaving (Hypothesis) ----------------------------

NODES = ("A", "B", "CN3")
DATES = ("2025-12-31", "2026-01-01", "2026-02-15")


@st.composite
def schedules(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    ops = st.one_of(
        st.tuples(
            st.just("post"),
            st.integers(0, 2),
            st.sampled_from(["sales_invoice", "cash_receipt"]),
            st.sampled_from(DATES),
        ),
        st.tuples(st.just("fail"), st.integers(0, 2)),
        st.tuples(st.just("reopen"), st.integers(0, 2)),
        st.tuples(st.just("sync"), st.integers(0, 2), st.integers(0, 2)),
        st.tuples(st.just("delete"), st.integers(0, 2)),
    )
    return draw(st.lists(ops, min_size=1, max_size=30))


@settings(max_examples=30, deadline=None)
@given(schedules())
def test_numbers_never_repeat_across_nodes_under_any_interleaving(
    schedule: list[tuple[Any, ...]],
) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="series-"))
    nodes = [make(tmp / name, name, seed=i) for i, name in enumerate(NODES)]
    try:
        setup_catalogs(nodes[0])
        for other in nodes[1:]:
            other.import_updates(nodes[0].export_updates())
        # series "type/node/year" -> numbers in issue order
        posted: dict[str, list[str]] = {}
        for op in schedule:
            i = op[1]
            n = nodes[i]
            if op[0] == "post":
                body = invoice(op[3]) if op[2] == "sales_invoice" else receipt(op[3])
                p = n.post_voucher(op[2], body)
                posted.setdefault(f"{op[2]}/{n.node_id}/{op[3][:4]}", []).append(p.number)
            elif op[0] == "fail":
                with pytest.raises(UnknownReference):
                    n.post_voucher("cash_receipt", receipt(customer="GHOST"))
            elif op[0] == "reopen":
                nodes[i] = reopen(n, seed=1000 + i)
            elif op[0] == "sync":
                dst = nodes[op[2]]
                dst.import_updates(n.export_updates(dst.state()))
            elif op[0] == "delete":
                live = n.list("cash_receipt")
                if live:
                    n.delete("cash_receipt", live[0]["id"])
        all_numbers = [x for numbers in posted.values() for x in numbers]
        assert len(all_numbers) == len(set(all_numbers))
        for series, numbers in posted.items():
            kind, node_id, year = series.split("/")
            prefix = "HD" if kind == "sales_invoice" else "PT"
            # Each node's sub-series counts 1, 2, 3, ... in each year (the
            # built-in schema resets yearly), with no gap and no repeat.
            expected = [f"{prefix}{node_id}-{year}-{k:06d}" for k in range(1, len(numbers) + 1)]
            assert numbers == expected
        for src in nodes:
            for dst in nodes:
                if src is not dst:
                    dst.import_updates(src.export_updates(dst.state()))
        for kind in ("sales_invoice", "cash_receipt"):
            seen = [
                sorted(
                    r[0]
                    for r in n.store.conn.execute(
                        "SELECT json_extract(data, '$.number') AS number FROM records "
                        "WHERE collection = ?",
                        (kind,),
                    ).fetchall()
                )
                for n in nodes
            ]
            assert seen[0] == seen[1] == seen[2]
            assert len(seen[0]) == len(set(seen[0]))
            expected = sorted(x for s, v in posted.items() if s.startswith(kind + "/") for x in v)
            assert seen[0] == expected
        assert all(
            c["kind"] != "duplicate_key" or c["collection"] not in ("sales_invoice", "cash_receipt")
            for c in nodes[0].conflicts()
        )
    finally:
        for n in nodes:
            n.close()
        shutil.rmtree(tmp, ignore_errors=True)


# -- blocks strategy ---------------------------------------------------------------

BLOCKS = """
schema = "blocks"
version = 1

[collections.customers]
kind = "catalog"
fields.code = "text"

[collections.invoices]
kind = "voucher"
series = { prefix = "IV", strategy = "blocks", template = "{prefix}{seq:06}", reserve = 3, block_size = 5 }
fields.date = { type = "date", required = true }
fields.customer = { type = "ref", to = "customers", required = true }
"""  # noqa: E501


class Relay:
    """A BlockSource handing out ascending, never overlapping ranges per series."""

    def __init__(self) -> None:
        self.next: dict[str, int] = {}
        self.leases: list[tuple[str, int, int]] = []

    def lease(self, series_key: str, count: int) -> tuple[int, int]:
        first = self.next.get(series_key, 1)
        self.next[series_key] = first + count
        self.leases.append((series_key, first, first + count - 1))
        return first, first + count - 1


@pytest.fixture
def blocks_schema(tmp_path: Path) -> Path:
    path = tmp_path / "blocks.toml"
    path.write_text(BLOCKS, "utf-8")
    return path


def blocks_node(home: Path, name: str, schema: Path, seed: int) -> Node:
    n = make(home, name, schema, seed)
    n.put("customers", {"code": "C"})
    return n


def post(n: Node, date: str = "2026-01-05") -> Any:
    return n.post_voucher("invoices", {"date": date, "customer": "C"})


def provisional_rows(n: Node) -> list[tuple[str, str, str | None]]:
    return n.store.conn.execute(
        "SELECT record_id, provisional, final FROM provisional ORDER BY provisional"
    ).fetchall()


def test_blocks_issue_provisional_numbers_when_the_reserve_is_empty(
    tmp_path: Path, blocks_schema: Path
) -> None:
    n = blocks_node(tmp_path / "till", "T1", blocks_schema, 3)
    assert n.reserve_left("invoices") == 0
    posted = [post(n) for _ in range(4)]  # same millisecond: order must not depend on ids
    assert [p.number for p in posted] == [f"IV-T1-P{k:06d}" for k in range(1, 5)]
    assert all(p.provisional for p in posted)
    assert [n.get("invoices", p.id)["number"] for p in posted] == [p.number for p in posted]
    n.add_block("invoices", 101, 103)
    # Finalized in the order they were issued, as far as the block reaches.
    assert [n.get("invoices", p.id)["number"] for p in posted] == [
        "IV000101",
        "IV000102",
        "IV000103",
        "IV-T1-P000004",
    ]
    assert n.reserve_left("invoices") == 0
    n.add_block("invoices", 201, 205)
    assert n.get("invoices", posted[3].id)["number"] == "IV000201"
    # The provisional -> final mapping is kept for audit.
    assert provisional_rows(n) == [
        (posted[0].id, "IV-T1-P000001", "IV000101"),
        (posted[1].id, "IV-T1-P000002", "IV000102"),
        (posted[2].id, "IV-T1-P000003", "IV000103"),
        (posted[3].id, "IV-T1-P000004", "IV000201"),
    ]
    assert [(num, rid) for _, num, rid in journal(n, "finalized")] == [
        ("IV000101", posted[0].id),
        ("IV000102", posted[1].id),
        ("IV000103", posted[2].id),
        ("IV000201", posted[3].id),
    ]
    # With numbers in reserve, bookings get final numbers at once.
    nxt = post(n)
    assert (nxt.number, nxt.provisional) == ("IV000202", False)
    assert n.reserve_left("invoices") == 3
    with pytest.raises(SeriesError, match="overlaps"):
        n.add_block("invoices", 205, 210)
    with pytest.raises(SeriesError):
        n.add_block("invoices", 0, 3)
    n = reopen(n)
    try:
        assert n.reserve_left("invoices") == 3
        assert post(n).number == "IV000203"
        assert len(provisional_rows(n)) == 4
    finally:
        n.close()


def test_refill_blocks_from_a_block_source_never_issues_a_number_twice(
    tmp_path: Path, blocks_schema: Path
) -> None:
    seed = 424242
    print(f"seed={seed}")
    rng = random.Random(seed)
    relay = Relay()
    nodes = [blocks_node(tmp_path / f"n{i}", f"N{i}", blocks_schema, seed + i) for i in range(3)]
    posted: list[tuple[Node, Any]] = []
    try:
        for _ in range(120):
            n = rng.choice(nodes)
            action = rng.random()
            if action < 0.75:
                posted.append((n, post(n)))
            elif action < 0.9:
                n.refill_blocks(relay)
                assert n.reserve_left("invoices") >= 3
                assert not n._has_provisional(n.collection("invoices"))
            else:
                i = nodes.index(n)
                nodes[i] = reopen(n, seed=seed + 100 + len(posted))
                posted = [(nodes[i] if m is n else m, p) for m, p in posted]
        for n in nodes:
            n.refill_blocks(relay)
        final = []
        for n, p in posted:
            number = n.get("invoices", p.id)["number"]
            assert re.fullmatch(r"IV\d{6}", number), number
            if not p.provisional:
                assert number == p.number  # a final number never changes
            final.append(int(number[2:]))
        assert len(final) == len(set(final)), "a number was issued twice"
        leased = {k for _, first, last in relay.leases for k in range(first, last + 1)}
        assert set(final) <= leased
        # Leased ranges themselves never overlap.
        spans = sorted((first, last) for _, first, last in relay.leases)
        assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))
        # Each node uses its numbers in ascending order of issue.
        for n in nodes:
            mine = [int(n.get("invoices", p.id)["number"][2:]) for m, p in posted if m is n]
            assert mine == sorted(mine)
    finally:
        for n in nodes:
            n.close()
