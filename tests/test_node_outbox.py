"""The outbox: local updates stay pending until acknowledged, through
compaction and reopening, and ``pending()`` counts records per collection."""

from __future__ import annotations

import random
from pathlib import Path

from engine import Node
from engine.clock import ManualClock


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
