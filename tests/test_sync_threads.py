"""Node calls of a sync run off the event loop (engine/transport/client.py,
"Threads"): while a large update is imported on the node thread, the loop
stays responsive and keeps the link alive, so a relay with a heartbeat
shorter than the import does not drop the connection.

The heartbeat is derived from the import time measured on this machine, so
the import always lasts longer than the relay's dead-link time."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest
from test_sync_live import ThreadRelay, free_port

from engine.clock import HybridClock, SystemClock
from engine.crdt import RecordDoc
from engine.ids import new_id, node_salt
from engine.merge import CREATED, new_state
from engine.node import Node
from engine.protocol import DEAD_AFTER_INTERVALS
from engine.protocol.limits import MIN_HEARTBEAT_MS
from engine.relay.server import ServerLimits
from engine.relay.sqlite_store import SqliteRelayStore
from engine.relay.store import UpdateIn
from engine.transport import node_sync

RECORDS = 20_000  # one catalog update of this many records takes about a second to import


def catalog_update(n: int, node: str) -> bytes:
    """The update of a ``customers`` document holding ``n`` records written
    at ``node`` (what its export would send), built without a store."""
    rng = random.Random(n)
    hlc = HybridClock(SystemClock())
    salt = node_salt(node)
    doc = RecordDoc("customers", rng.getrandbits(52) + 1)
    for i in range(n):
        values = {"code": f"KH{i:06}", "name": f"Khách hàng {i}", CREATED: True}
        doc.write(new_id(hlc.tick(), salt, rng), node, new_state(None, values, hlc.tick(), {}))
    return doc.diff()


def test_loop_and_heartbeats_keep_going_during_a_large_import(tmp_path: Path) -> None:
    update = catalog_update(RECORDS, "A")
    with Node.create(tmp_path / "probe", dataset="acme", node="P") as probe:
        started = time.perf_counter()
        probe.import_updates({"customers": update})
        import_ms = (time.perf_counter() - started) * 1000
    heartbeat_ms = max(MIN_HEARTBEAT_MS, int(import_ms / (DEAD_AFTER_INTERVALS + 1)))
    if DEAD_AFTER_INTERVALS * heartbeat_ms >= import_ms:
        pytest.fail(f"the import ({import_ms:.0f} ms) is too fast to outlast a heartbeat here")

    store_path = tmp_path / "relay.db"
    store = SqliteRelayStore.create(store_path)
    token = store.enroll("acme", "B").token
    store.enroll("acme", "A")
    [stored] = store.append_updates("acme", [UpdateIn("customers", update, "A")])
    assert stored.ok
    store.close()
    port = free_port()
    # A relay that drops a node silent for less than the import takes.
    relay = ThreadRelay(store_path, port, limits=ServerLimits(heartbeat_ms=heartbeat_ms))
    relay.start()
    b = Node.create(
        tmp_path / "B",
        dataset="acme",
        node="B",
        relay=f"ws://127.0.0.1:{port}/",
        token=token,
    )

    async def sync_and_watch() -> tuple[float, int]:
        loop = asyncio.get_running_loop()
        period = heartbeat_ms / 4 / 1000
        late: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            due = loop.time()
            while not stop.is_set():
                due += period
                await asyncio.sleep(max(0.0, due - loop.time()))
                late.append(loop.time() - due)
                due = max(due, loop.time())

        task = asyncio.create_task(ticker())
        driver = await node_sync(b, timeout=120, heartbeat_ms=heartbeat_ms)
        stop.set()
        await task
        return max(late), driver.stats.extra.get("keepalives", 0)

    try:
        worst, keepalives = asyncio.run(sync_and_watch())
        assert relay.server is not None
        connections = relay.server.metrics.connections_total
    finally:
        relay.stop()
        b.close()
    print(
        f"\nimport {import_ms:.0f} ms, heartbeat {heartbeat_ms} ms, worst timer lateness "
        f"{worst * 1000:.0f} ms, {keepalives} keepalive pings, {connections} connection(s)"
    )
    with Node.open(tmp_path / "B") as check:
        assert check.count("customers") == RECORDS
    assert connections == 1  # never dropped by the relay, never reconnected
    assert keepalives >= 1  # the loop pinged while the node thread imported
    # A blocked loop would be late by about the whole import.
    assert worst * 1000 < import_ms / 2
