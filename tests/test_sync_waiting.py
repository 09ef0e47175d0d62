"""Records that refer to one not here yet, through a real relay: a voucher
whose customer arrives later is released when it does; one whose customer
never reaches the relay is shown after a full sync, as a dangling reference.

Node C carries A's voucher to the relay by file (export/import), without the
customer it refers to: the relay then serves a voucher whose target it lacks.
C is enrolled as a carrier: only a carrier may publish another node's entries.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from test_sync_live import ThreadRelay, free_port, init_home

from engine.node import Node
from engine.relay.sqlite_store import SqliteRelayStore
from engine.transport import node_sync

SALE = {
    "date": "2026-03-10",
    "customer": "KH01",
    "warehouse": "K1",
    "lines": [{"item": "TRA", "qty": "1", "price": "10"}],
}


def test_a_voucher_without_its_customer_waits_then_settles_as_dangling(tmp_path: Path) -> None:
    store_path = tmp_path / "relay.db"
    store = SqliteRelayStore.create(store_path)
    tokens = {n: store.enroll("acme", n, carrier=n == "C").token for n in ("B", "C")}
    store.close()
    port = free_port()
    homes = {n: tmp_path / n for n in ("A", "B", "C")}
    for n in ("B", "C"):
        init_home(homes[n], n, port, tokens[n])
    with Node.create(homes["A"], dataset="acme", node="A") as a:
        a.put("customers", {"code": "KH01", "name": "An"})
        a.put("warehouses", {"code": "K1", "name": "Kho"})
        a.put("items", {"code": "TRA", "name": "Trà", "unit": "kg", "price": "10"})
        sale = a.post_voucher("sales_invoice", SALE).id
        catalogs = {d: u for d, u in a.export_updates().items() if not d.startswith("sales")}
        vouchers = {d: u for d, u in a.export_updates().items() if d.startswith("sales")}
        without_customer = {d: u for d, u in catalogs.items() if d != "customers"}
    with Node.open(homes["C"]) as c:
        c.import_updates({**without_customer, **vouchers})
        assert c.waiting() == 1  # C itself holds the voucher back
    relay = ThreadRelay(store_path, port)
    relay.start()
    try:
        with Node.open(homes["C"]) as c:
            asyncio.run(node_sync(c, timeout=60))
        with Node.open(homes["B"]) as b:
            asyncio.run(node_sync(b, timeout=60))
            # A full sync ended without the customer: shown, as a conflict.
            assert b.waiting() == 0
            assert b.get("sales_invoice", sale) is not None
            (conflict,) = b.conflicts()
            assert conflict["kind"] == "dangling_reference"
            assert conflict["target"]["state"] == "missing"
        # The customer reaches the relay after all (C gets it by file).
        with Node.open(homes["C"]) as c:
            c.import_updates({"customers": catalogs["customers"]})
            assert c.waiting() == 0 and c.get("sales_invoice", sale) is not None
            asyncio.run(node_sync(c, timeout=60))
        with Node.open(homes["B"]) as b:
            asyncio.run(node_sync(b, timeout=60))
            assert b.conflicts() == []
            assert b.get("sales_invoice", sale, codes=True)["customer"] == "KH01"
    finally:
        relay.stop()
