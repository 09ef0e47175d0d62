"""The conflict index (engine.store.conflict_index) equals a rebuild from the
records table after any history: edits, deletes and restores of referenced
records, vouchers whose customer has not arrived, duplicate codes from
several nodes and their resolutions, partial and full deliveries. A store of
format 5 is upgraded and its index built when first opened."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_formats import downgrade
from test_conflicts import invoice, make, send, setup_catalogs

from engine import Node, writes
from engine.errors import BranchlineError
from engine.store import conflict_index
from engine.store.conflict_index import ConflictIndex
from engine.store.node_store import FORMAT_VERSION

CODES = ("KH01", "KH02", "KH03")
DOCS = ("customers", "suppliers", "items", "warehouses", "sales_invoice/2026-03")


def assert_index_true(node: Node) -> None:
    added, dropped = ConflictIndex(node.schema).compare(node.store.conn)
    assert (added, dropped) == (set(), set()), f"{node.node_id}: index differs from a rebuild"


def live_id(node: Node, collection: str, code: str, deleted: int) -> str | None:
    row = node.store.conn.execute(
        "SELECT id FROM records WHERE collection = ? AND key = ? AND deleted = ? LIMIT 1",
        (collection, code, deleted),
    ).fetchone()
    return None if row is None else str(row[0])


def act(nodes: list[Node], who: int, op: int, arg: int) -> None:
    node = nodes[who]
    code = CODES[arg % len(CODES)]
    if op == 0:
        node.put("customers", {"code": code, "name": f"n{arg}"})
    elif op == 1:
        node.delete("customers", code)
    elif op == 2:
        rid = live_id(node, "customers", code, 1)
        if rid is not None:
            node.restore("customers", rid)
    elif op == 3:
        invoice(node, customer=code)
    elif op == 4:
        node.put("suppliers", {"code": code, "name": f"s{who}"})
    elif op == 5:
        dup = [c for c in node.conflicts() if c["kind"] == "duplicate_key"]
        if dup:
            c = dup[arg % len(dup)]
            if arg % 2:
                node.resolve(c["id"], rename=f"R{arg}")
            else:
                node.resolve(c["id"], merge_into=c["records"][0])
    elif op == 6:
        send(nodes[arg % len(nodes)], node, [DOCS[arg % len(DOCS)]])
    elif op == 7:
        send(nodes[arg % len(nodes)], node)
    elif op == 8:
        node.delete("items", "TRA")
    elif op == 9:
        node.settle_waiting()
    else:
        rid = live_id(node, "items", "TRA", 1)
        if rid is not None:
            node.restore("items", rid)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 10), st.integers(0, 2**16)), max_size=30
    )
)
@pytest.mark.parametrize("bulk", [False, True], ids=["small", "bulk-paths"])
def test_the_index_equals_a_rebuild_after_any_history(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[int, int, int]], bulk: bool
) -> None:
    """``bulk``: the paths a bulk import takes, at any size: received records
    materialized two at a time, shared keys found by one scan of the key
    index instead of IN-lists."""
    with pytest.MonkeyPatch.context() as mp:
        if bulk:
            mp.setattr(conflict_index, "SCAN_KEYS", 0)
            mp.setattr(writes, "MATERIALIZE_SLICE", 2)
        history(tmp_path_factory.mktemp("index"), steps)


def history(tmp: Path, steps: list[tuple[int, int, int]]) -> None:
    nodes = [make(tmp, n, 1_790_000_000_000 + i) for i, n in enumerate(["A", "B", "C"])]
    try:
        setup_catalogs(nodes[0])
        for who, op, arg in steps:
            # A refused step (a deleted record, a code in use) changes nothing.
            with contextlib.suppress(BranchlineError):
                act(nodes, who, op, arg)
            assert_index_true(nodes[who])
        for src in nodes:
            for dst in nodes:
                if src is not dst:
                    send(src, dst)
        lists = []
        for node in nodes:
            assert_index_true(node)
            lists.append(node.conflicts())
        assert lists[0] == lists[1] == lists[2]
    finally:
        for n in nodes:
            n.close()


def test_a_format_5_store_gets_its_index_when_first_opened(tmp_path: Path) -> None:
    a, b = make(tmp_path, "A"), make(tmp_path, "B")
    setup_catalogs(a)
    send(a, b)
    a.put("suppliers", {"code": "NCC1", "name": "A's"})
    b.put("suppliers", {"code": "NCC1", "name": "B's"})
    invoice(a)
    a.delete("items", "TRA")
    send(b, a)
    before = a.conflicts()
    assert sorted(c["kind"] for c in before) == ["dangling_reference", "duplicate_key"]
    a.close()
    b.close()
    downgrade(tmp_path / "A", 5)
    a = Node.open(tmp_path / "A")
    try:
        assert a.conflicts() == before
        assert_index_true(a)
        version = a.store.conn.execute("PRAGMA user_version").fetchone()[0]
        assert version == FORMAT_VERSION
    finally:
        a.close()


def test_a_voucher_for_a_missing_customer_lists_once_it_settles_and_clears_when_it_comes(
    tmp_path: Path,
) -> None:
    a, b = make(tmp_path, "A"), make(tmp_path, "B")
    try:
        setup_catalogs(a)
        send(a, b, ["warehouses", "items"])
        inv = invoice(a)
        send(a, b, ["sales_invoice/2026-03"])
        assert b.conflicts() == []
        b.settle_waiting()
        (c,) = b.conflicts()
        assert (c["kind"], c["records"], c["target"]["state"]) == (
            "dangling_reference",
            [inv],
            "missing",
        )
        send(a, b)
        assert b.conflicts() == []
        assert_index_true(b)
    finally:
        a.close()
        b.close()
