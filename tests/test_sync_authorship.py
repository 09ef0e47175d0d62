"""Authorship end to end, through a real relay (docs/reliability.md
"Authorship"): a node that is not a carrier publishes only its own entries,
even after importing another node's file, and its sync is not refused for
holding them; a carrier publishes what it imported; the owner's own sync
publishes its work either way, so every node converges.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from test_sync_live import ThreadRelay, free_port, init_home

from engine.node import Node
from engine.relay.sqlite_store import SqliteRelayStore
from engine.sync import failures as fl
from engine.transport import node_sync


def relay_codes(path: Path, doc: str) -> set[str]:
    """The customer codes a fresh replica of the relay's ``doc`` shows."""
    with SqliteRelayStore.open(path) as store:
        data = store.diff("acme", doc)
    with (
        tempfile.TemporaryDirectory() as tmp,
        Node.create(Path(tmp) / "probe", dataset="acme", node="P") as probe,
    ):
        probe.import_updates({doc: data})
        return {str(r["code"]) for r in probe.list(doc, codes=True)}


def test_file_moved_work_is_published_by_its_owner_or_a_carrier(tmp_path: Path) -> None:
    store_path = tmp_path / "relay.db"
    with SqliteRelayStore.create(store_path) as store:
        tokens = {n: store.enroll("acme", n, carrier=n == "HO").token for n in ("A", "B", "HO")}
    port = free_port()
    homes = {n: tmp_path / n for n in ("A", "B", "HO")}
    for n in ("A", "B", "HO"):
        init_home(homes[n], n, port, tokens[n])
    # A works offline and sends its work to B and to the head office by file.
    with Node.open(homes["A"]) as a:
        for i in range(3):
            a.put("customers", {"code": f"A{i}", "name": f"from A {i}"})
        a.put("customers", {"code": "A0", "name": "from A, renamed"})  # A overwrites its entry
        moved = a.export_updates()
    with Node.open(homes["B"]) as b:
        b.import_updates(moved)
        b.put("customers", {"code": "B0", "name": "from B"})
    relay = ThreadRelay(store_path, port)
    relay.start()
    try:
        with Node.open(homes["B"]) as b:
            asyncio.run(node_sync(b, timeout=60))
            assert fl.list_failures(b) == []  # not refused: B sent only its own entries
            assert b.outbox() == []
        assert relay_codes(store_path, "customers") == {"B0"}
        # The head office is a carrier: A's work goes up through it.
        with Node.open(homes["HO"]) as ho:
            ho.import_updates(moved)
            asyncio.run(node_sync(ho, timeout=60))
            assert fl.list_failures(ho) == []
        assert relay_codes(store_path, "customers") == {"A0", "A1", "A2", "B0"}
        # A's own sync goes through too (its entries are already there).
        with Node.open(homes["A"]) as a:
            asyncio.run(node_sync(a, timeout=60))
            assert fl.list_failures(a) == [] and a.outbox() == []
            names = {r["code"]: r["name"] for r in a.list("customers", codes=True)}
        assert names["A0"] == "from A, renamed" and names["B0"] == "from B"
    finally:
        relay.stop()


def test_the_owner_alone_publishes_what_a_branch_carried(tmp_path: Path) -> None:
    """Without a carrier, A's work reaches the relay when A syncs itself."""
    store_path = tmp_path / "relay.db"
    with SqliteRelayStore.create(store_path) as store:
        tokens = {n: store.enroll("acme", n).token for n in ("A", "B")}
    port = free_port()
    homes = {n: tmp_path / n for n in ("A", "B")}
    for n in ("A", "B"):
        init_home(homes[n], n, port, tokens[n])
    with Node.open(homes["A"]) as a:
        a.put("customers", {"code": "A0", "name": "from A"})
        moved = a.export_updates()
    with Node.open(homes["B"]) as b:
        b.import_updates(moved)
    relay = ThreadRelay(store_path, port)
    relay.start()
    try:
        with Node.open(homes["B"]) as b:
            asyncio.run(node_sync(b, timeout=60))
            assert fl.list_failures(b) == []
        assert relay_codes(store_path, "customers") == set()
        with Node.open(homes["A"]) as a:
            asyncio.run(node_sync(a, timeout=60))
        assert relay_codes(store_path, "customers") == {"A0"}
    finally:
        relay.stop()
