"""The outbox: local updates stay pending until acknowledged, through
compaction and reopening, and ``pending()`` counts records per collection."""

from __future__ import annotations

import random
import sqlite3
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_formats import downgrade

from engine import Node
from engine.clock import ManualClock
from engine.store import outbox


def make(home: Path, name: str = "HN") -> Node:
    return Node.create(home, dataset="acme", node=name, clock=ManualClock(), rng=random.Random(7))


def book(node: Node) -> None:
    node.put("customers", {"code": "KH1", "name": "An"})
    node.put("customers", {"code": "KH2", "name": "Bình"})
    node.put("customers", {"code": "KH1", "name": "An Phát"})  # same record again
    node.put("warehouses", {"code": "K1", "name": "Kho 1"})
    node.put("items", {"code": "SP1", "name": "Bút", "price": "5000"})
    node.post_voucher(
        "sales_invoice",
        {
            "date": "2026-11-23",
            "customer": "KH1",
            "warehouse": "K1",
            "lines": [{"item": "SP1", "qty": "1", "price": "5000"}],
        },
    )


def test_pending_counts_records_per_collection(tmp_path: Path) -> None:
    node = make(tmp_path / "a")
    book(node)
    pending = node.pending()
    assert set(pending) == set(node.schema.collections)
    assert pending["customers"] == 2
    assert pending["warehouses"] == pending["items"] == pending["sales_invoice"] == 1
    assert pending["cash_receipt"] == 0


def test_ack_clears_exactly_what_it_names_and_survives_reopen(tmp_path: Path) -> None:
    node = make(tmp_path / "a")
    book(node)
    outbox = node.outbox()
    assert len(outbox) == 6
    customers = [seq for seq, doc, _ in outbox if doc == "customers"]
    node.ack(customers)
    assert node.pending()["customers"] == 0
    assert node.pending()["items"] == 1
    node.close()
    again = Node.open(tmp_path / "a")
    assert [seq for seq, _, _ in again.outbox()] == [s for s, d, _ in outbox if d != "customers"]


def test_compaction_keeps_unacknowledged_updates_and_replicas_still_converge(
    tmp_path: Path,
) -> None:
    node = make(tmp_path / "a")
    book(node)
    node.ack([seq for seq, doc, _ in node.outbox() if doc == "items"])
    removed = node.compact()
    assert removed == 1  # only the acknowledged row; the outbox stays
    assert node.pending()["customers"] == 2
    # What the outbox holds is enough for a replica that got nothing else.
    other = make(tmp_path / "b", "HCM")
    other.import_updates({doc: data for _, doc, data in node.outbox() if doc != "items"})
    other.import_updates(node.export_updates(other.state()))
    for name in ("customers", "items", "sales_invoice"):
        assert other.list(name) == node.list(name)


def test_an_import_that_waits_for_an_earlier_update_survives_restart(tmp_path: Path) -> None:
    """Imported out of order, the later update waits; it must be logged, so
    that after a restart the earlier one completes it. (Regression: waiting
    was judged from ``get_state(update)``, which omits clients whose items
    do not start at clock 0, so the waiting update was dropped.)"""
    a = make(tmp_path / "a")
    a.put("customers", {"code": "KH1", "name": "An"})
    a.put("customers", {"code": "KH1", "name": "An Phát"})  # replaces the first entry
    (_, _, first), (_, _, second) = a.outbox()
    b = make(tmp_path / "b", "HCM")
    report = b.import_updates({"customers": second})
    assert report.stored == 1 and b.list("customers") == []
    b.close()
    b = Node.open(tmp_path / "b")
    b.import_updates({"customers": first})
    assert [r["name"] for r in b.list("customers")] == ["An Phát"]


# What the status screen counts is kept by triggers; it must always equal what
# the outbox itself holds, whatever the order of writes, acks, compactions
# and unsynced imports.
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from(["customers", "items"]), st.integers(0, 5)),
        st.tuples(st.just("delete"), st.sampled_from(["customers", "items"]), st.integers(0, 5)),
        st.tuples(st.just("ack"), st.floats(0, 1), st.integers(0, 2**16)),
        st.tuples(st.just("compact"), st.none(), st.none()),
        st.tuples(st.just("reimport"), st.none(), st.none()),
    ),
    max_size=25,
)


def counted(conn: sqlite3.Connection) -> dict[str, int]:
    """What ``outbox.records_per_doc`` must say, counted from the outbox rows."""
    return {
        str(doc): int(count)
        for doc, count in conn.execute(
            "SELECT doc, COUNT(DISTINCT record) FROM pending_records GROUP BY doc"
        )
    }


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_pending_counts_kept_by_triggers_equal_the_outbox(tmp_path: Path, ops: list) -> None:
    home = Path(tempfile.mkdtemp(dir=tmp_path)) / "h"
    node = make(home)
    fresh = 0
    try:
        for op, a, b in ops:
            if op == "put":
                node.put(a, {"code": f"K{b}", "name": f"n{b}"})
            elif op == "delete" and node.get(a, f"K{b}") is not None:
                node.delete(a, f"K{b}")
            elif op == "ack":
                seqs = [seq for seq, _, _ in node.outbox()]
                node.ack(random.Random(b).sample(seqs, int(len(seqs) * a)))
            elif op == "compact":
                node.compact()
            elif op == "reimport":  # the disk replaced: unsynced work into a new home
                unsynced = node.unsynced_updates()
                node.close()
                fresh += 1
                node = make(home.with_name(f"h{fresh}"))
                node.import_updates(unsynced, unsynced=True)
                node.import_updates(unsynced, unsynced=True)  # twice: harmless
            conn = node.store.conn
            assert outbox.records_per_doc(conn) == counted(conn)
    finally:
        node.close()


def test_an_older_store_gets_its_pending_counts(tmp_path: Path) -> None:
    node = make(tmp_path / "a")
    book(node)
    before = node.pending()
    node.close()
    downgrade(tmp_path / "a", 6)
    with Node.open(tmp_path / "a") as again:
        assert again.pending() == before
        conn = again.store.conn
        assert outbox.records_per_doc(conn) == counted(conn)
