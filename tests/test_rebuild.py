"""A node over its whole life: a home rebuilt from its export, numbering that
never issues a number twice nor changes a final number (issue 18)."""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from store_formats import downgrade
from test_sync_driver import START_MS, MemRelay

from engine.clock import ManualClock
from engine.exchange import export_to_file, import_from_file
from engine.node import Node

RELAY_URL = "ws://127.0.0.1:9/"


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[MemRelay]:
    r = MemRelay(tmp_path / "relay.db")
    yield r
    r.store.close()


def home_of(tmp: Path, name: str, seed: str, **kw: Any) -> Node:
    return Node.create(
        tmp,
        dataset="acme",
        node=name,
        clock=ManualClock(START_MS),
        rng=random.Random(seed),
        **kw,
    )


def catalogs(n: Node, tag: str) -> None:
    n.put("customers", {"code": f"C-{tag}", "name": f"Customer {tag}"})
    n.put("items", {"code": f"I-{tag}", "name": "Item", "unit": "pcs", "price": "10"})
    n.put("warehouses", {"code": f"W-{tag}", "name": "Store"})


def invoice(tag: str) -> dict[str, Any]:
    return {
        "date": "2026-02-10",
        "customer": f"C-{tag}",
        "warehouse": f"W-{tag}",
        "paid": False,
        "lines": [{"item": f"I-{tag}", "qty": "1", "price": "10", "vat_rate": "10"}],
    }


def sync(relay: MemRelay, n: Node, token: str) -> None:
    link = relay.connect(n, token)
    relay.pump()
    assert link.driver.synced
    link.cut()


def numbers(n: Node) -> dict[str, str]:
    return {r["id"]: r["number"] for r in n.list("sales_invoice")}


def test_reported_rebuild_never_reissues_nor_changes_a_final_number(
    tmp_path: Path, relay: MemRelay
) -> None:
    """The report: a home rebuilt from ``export --unsynced`` -> ``node init``
    -> ``import``, booking before its first sync, issued HDDN-2026-000001 again,
    and the next sync renumbered it to HDDN-2026-000003."""
    token = relay.store.enroll("acme", "DN").token
    old = home_of(tmp_path / "old", "DN", "old")
    catalogs(old, "a")
    first = old.post_voucher("sales_invoice", invoice("a"))
    sync(relay, old, token)
    catalogs(old, "b")  # never uploaded, like the voucher below
    second = old.post_voucher("sales_invoice", invoice("b"))
    assert (first.number, second.number) == ("HDDN-2026-000001", "HDDN-2026-000002")
    export_to_file(old, tmp_path / "unsynced.blx", created_ms=START_MS, unsynced=True)
    old.close()
    shutil.rmtree(tmp_path / "old")  # the disk is lost

    new = home_of(tmp_path / "new", "DN", "new", relay=RELAY_URL, token=token)
    import_from_file(new, tmp_path / "unsynced.blx")
    third = new.post_voucher("sales_invoice", invoice("b"))
    assert third.number not in (first.number, second.number)
    sync(relay, new, token)
    held = numbers(new)
    assert held[first.id] == first.number and held[second.id] == second.number
    if not third.provisional:
        assert held[third.id] == third.number  # a final number never changes
    assert len(set(held.values())) == 3
    assert all(number.startswith("HDDN-") for number in held.values())


def rebuilt_before_first_sync(
    tmp_path: Path, relay: MemRelay, *, carry: bool
) -> tuple[Node, str, list[Any]]:
    """Old home DN books HDDN-2026-000001 (synced) and HDDN-2026-000002 (not), then its
    disk is lost; the new home of DN imports the unsynced export (``carry``)
    or not, and is not synced yet."""
    token = relay.store.enroll("acme", "DN").token
    old = home_of(tmp_path / "old", "DN", "old")
    catalogs(old, "a")
    posted = [old.post_voucher("sales_invoice", invoice("a"))]
    sync(relay, old, token)
    catalogs(old, "b")
    posted.append(old.post_voucher("sales_invoice", invoice("b")))
    export_to_file(old, tmp_path / "unsynced.blx", created_ms=START_MS, unsynced=True)
    old.close()
    shutil.rmtree(tmp_path / "old")
    new = home_of(tmp_path / "new", "DN", "new", relay=RELAY_URL, token=token)
    if carry:
        import_from_file(new, tmp_path / "unsynced.blx")
    else:
        catalogs(new, "b")
    return new, token, posted


def test_a_rebuilt_home_numbers_provisionally_until_its_first_sync(
    tmp_path: Path, relay: MemRelay
) -> None:
    new, token, posted = rebuilt_before_first_sync(tmp_path, relay, carry=True)
    assert not new.numbering_known()
    assert new.series_state()["counters"]["sales_invoice@2026"] == 3  # restored from the export
    third = new.post_voucher("sales_invoice", invoice("b"))
    assert third.provisional and third.number == "HD-DN-P000001"
    assert new.get("sales_invoice", third.id)["number"] == "HD-DN-P000001"  # type: ignore[index]
    sync(relay, new, token)
    assert new.numbering_known()
    held = numbers(new)
    assert held == {
        posted[0].id: "HDDN-2026-000001",
        posted[1].id: "HDDN-2026-000002",
        third.id: "HDDN-2026-000003",
    }
    (row,) = new.store.conn.execute("SELECT provisional, final FROM provisional").fetchall()
    assert row == ("HD-DN-P000001", "HDDN-2026-000003")  # the mapping is kept for audit
    # Known now: the next booking is final at once, and sync changes nothing.
    fourth = new.post_voucher("sales_invoice", invoice("b"))
    assert (fourth.number, fourth.provisional) == ("HDDN-2026-000004", False)
    sync(relay, new, token)
    assert numbers(new)[fourth.id] == "HDDN-2026-000004"


def test_without_the_export_the_relay_state_teaches_the_high_water_mark(
    tmp_path: Path, relay: MemRelay
) -> None:
    """Nothing carried over: the first sync brings HDDN-2026-000001 back, the
    provisional voucher becomes HDDN-2026-000002 (the lost home's unsynced
    HDDN-2026-000002 is gone with its disk: nothing anywhere knows it)."""
    new, token, posted = rebuilt_before_first_sync(tmp_path, relay, carry=False)
    third = new.post_voucher("sales_invoice", invoice("b"))
    assert third.provisional
    sync(relay, new, token)
    assert numbers(new) == {posted[0].id: "HDDN-2026-000001", third.id: "HDDN-2026-000002"}


def test_a_node_new_by_declaration_numbers_at_once(tmp_path: Path, relay: MemRelay) -> None:
    token = relay.store.enroll("acme", "NEW").token
    n = home_of(tmp_path / "n", "NEW", "n", relay=RELAY_URL, token=token, new_node=True)
    catalogs(n, "a")
    assert n.post_voucher("sales_invoice", invoice("a")).number == "HDNEW-2026-000001"
    assert n.numbering_known()
    standalone = home_of(tmp_path / "s", "S", "s")  # no relay: a new node
    assert standalone.numbering_known()
    rebuilt = home_of(tmp_path / "r", "R", "r", new_node=False)
    catalogs(rebuilt, "a")
    assert rebuilt.post_voucher("sales_invoice", invoice("a")).provisional


def test_series_state_travels_in_exports_and_never_lowers(tmp_path: Path) -> None:
    a = home_of(tmp_path / "a", "A", "a")
    catalogs(a, "a")
    for _ in range(3):
        a.post_voucher("sales_invoice", invoice("a"))
    a.delete("sales_invoice", "HDA-2026-000002")  # a gap, journalled as void
    full = export_to_file(a, tmp_path / "full.blx", created_ms=START_MS)
    unsynced = export_to_file(a, tmp_path / "u.blx", created_ms=START_MS, unsynced=True)
    assert full.documents and unsynced.documents
    state = a.series_state()
    assert state["counters"] == {"sales_invoice@2026": 4}
    assert [(j["number"], j["event"]) for j in state["journal"]] == [("HDA-2026-000002", "void")]

    b = home_of(tmp_path / "b", "A", "b", new_node=False)
    b.store.conn.execute("INSERT INTO series_counters VALUES ('sales_invoice@2026', 9)")
    report = import_from_file(b, tmp_path / "u.blx").report
    assert report.series == 1  # the journal entry; the counter stays at 9, never lowered
    assert b.series_state()["counters"] == {"sales_invoice@2026": 9}
    again = import_from_file(b, tmp_path / "u.blx").report
    assert again.series == 0 and again.documents == 0  # idempotent
    assert len(b.series_state()["journal"]) == 1

    other = home_of(tmp_path / "o", "O", "o")  # another node: the state is not its own
    assert import_from_file(other, tmp_path / "full.blx").report.series == 0
    assert other.series_state()["counters"] == {}
    catalogs(other, "o")
    assert other.post_voucher("sales_invoice", invoice("o")).number == "HDO-2026-000001"


def test_imported_unsynced_work_counts_as_pending_per_record(tmp_path: Path) -> None:
    old = home_of(tmp_path / "old", "DN", "old")
    catalogs(old, "a")  # three records, never uploaded
    export_to_file(old, tmp_path / "u.blx", created_ms=START_MS, unsynced=True)
    new = home_of(tmp_path / "new", "DN", "new", new_node=False)
    report = import_from_file(new, tmp_path / "u.blx").report
    assert report.records == 3
    pending = {k: v for k, v in new.pending().items() if v}
    assert pending == {"customers": 1, "items": 1, "warehouses": 1}
    new.ack([seq for seq, _, _ in new.outbox()])
    assert not any(new.pending().values())
    assert new.store.conn.execute("SELECT COUNT(*) FROM outbox_records").fetchone()[0] == 0


def test_a_format_3_store_is_upgraded(tmp_path: Path) -> None:
    from engine.store import FORMAT_VERSION

    n = home_of(tmp_path / "h", "A", "a")
    catalogs(n, "a")
    n.close()
    downgrade(tmp_path / "h", 3)
    n = Node.open(tmp_path / "h")
    assert n.store.conn.execute("PRAGMA user_version").fetchone()[0] == FORMAT_VERSION
    assert n.pending()["customers"] == 1
    n.close()


def _lost_mapping(tmp_path: Path) -> tuple[Node, Node, str]:
    """Life 1 of DN (rebuilt, numbering unknown) books a provisional voucher
    that reaches a peer as bare CRDT updates (no series state), then its disk
    is lost; life 2 starts from nothing."""
    life1 = home_of(tmp_path / "life1", "DN", "l1", new_node=False)
    catalogs(life1, "a")
    posted = life1.post_voucher("sales_invoice", invoice("a"))
    assert posted.provisional and posted.number == "HD-DN-P000001"
    peer = home_of(tmp_path / "peer", "HN", "p")
    peer.import_updates(life1.export_updates(peer.state()))
    life1.close()
    shutil.rmtree(tmp_path / "life1")
    return home_of(tmp_path / "life2", "DN", "l2", new_node=False), peer, posted.id


def test_a_provisional_voucher_back_without_its_mapping_is_adopted(tmp_path: Path) -> None:
    life2, peer, rid = _lost_mapping(tmp_path)
    life2.import_updates(peer.export_updates(life2.state()))
    assert numbers(life2)[rid] == "HD-DN-P000001"  # numbering unknown yet: it waits
    assert life2.confirm_numbering() == 1
    assert numbers(life2)[rid] == "HDDN-2026-000001"
    row = life2.store.conn.execute(
        "SELECT provisional, final FROM provisional WHERE record_id = ?", (rid,)
    ).fetchone()
    assert row == ("HD-DN-P000001", "HDDN-2026-000001")


def test_a_provisional_voucher_back_after_the_first_sync_is_numbered_as_it_arrives(
    tmp_path: Path,
) -> None:
    life2, peer, rid = _lost_mapping(tmp_path)
    life2.confirm_numbering()  # a first sync that did not bring it (it came later)
    assert life2.numbering_known()
    life2.import_updates(peer.export_updates(life2.state()))
    assert numbers(life2)[rid] == "HDDN-2026-000001"
    peer.import_updates(life2.export_updates(peer.state()))
    assert numbers(peer)[rid] == "HDDN-2026-000001"
