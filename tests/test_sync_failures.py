"""Sync failures end to end (docs/sync.md "Failures"): an update the real
relay refuses holds back only its document, the rest arrives, the failure is
listed with its reason, records and attempts, and ``retry`` re-queues it.

The relay runs in a thread (``ThreadRelay``) with a small update-size limit
so one record is too large for it: the relay's refusal is real, not mocked.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_sync_live import ThreadRelay, cli, free_port, init_home

from engine.node import Node
from engine.relay.sqlite_store import RelayLimits, SqliteRelayStore
from engine.sync import list_failures, retry
from engine.transport import LiveSync, node_sync

TOTAL = 1000  # items written on A, one of them poisoned


@dataclass
class Setup:
    """Two node homes A and B enrolled on a relay store, the relay's update
    limit (``limit_for``) and a relay with that limit (not started)."""

    homes: dict[str, Path]
    store_path: Path
    port: int
    limit: int
    relay: ThreadRelay


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    store_path = tmp_path / "relay.db"
    store = SqliteRelayStore.create(store_path)
    tokens = {n: store.enroll("acme", n).token for n in ("A", "B")}
    store.close()
    limit = limit_for(tmp_path)
    port = free_port()
    homes = {n: tmp_path / n for n in ("A", "B")}
    for n, home in homes.items():
        init_home(home, n, port, tokens[n])
    relay = ThreadRelay(store_path, port, store_limits=RelayLimits(max_update_bytes=limit))
    return Setup(homes, store_path, port, limit, relay)


def customer(i: int) -> dict[str, str]:
    return {"code": f"KH{i:05}", "name": f"Khách hàng {i}", "address": f"{i} Lê Lợi"}


def write_with_poison(a: Node, limit: int) -> str:
    """TOTAL - 1 customers and, in the middle of the outbox, one supplier
    whose update is larger than ``limit``: returns the supplier's id."""
    rng = random.Random(7)
    poisoned = ""
    for i in range(TOTAL - 1):
        if i == TOTAL // 2:
            big = "".join(rng.choice("0123456789") for _ in range(2 * limit))
            poisoned = a.put("suppliers", {"code": "NCC-BIG", "name": "Big", "tax_code": big})
        a.put("customers", customer(i))
    return poisoned


def limit_for(tmp_path: Path) -> int:
    """An update limit the TOTAL - 1 customers fit under as one diff (so the
    catch-up of that document is accepted) with room to spare."""
    probe = Node.create(tmp_path / "probe", dataset="acme", node="P")
    with probe:
        for i in range(TOTAL - 1):
            probe.put("customers", customer(i))
        return 2 * len(probe.export_updates()["customers"])


def test_one_refused_item_among_1000_does_not_hold_the_others(setup: Setup) -> None:
    homes = setup.homes
    with Node.open(homes["A"]) as a:
        poisoned = write_with_poison(a, setup.limit)
    relay = setup.relay
    relay.start()
    try:
        with Node.open(homes["A"]) as a:
            driver = asyncio.run(node_sync(a, timeout=60))
            assert driver.quarantined == ["suppliers"]
            assert driver.failures == {"upload": 1, "download": 0}
            assert a.pending()["customers"] == 0  # every other item went up
            [failure] = list_failures(a)
        assert failure.direction == "upload" and failure.doc == "suppliers"
        assert failure.records == [poisoned]
        assert failure.code == "frame_too_large"
        assert "larger than the relay accepts" in failure.reason
        assert failure.attempts == 1 and failure.held == 1 and not failure.retrying
        assert failure.first_at == failure.last_at > 0

        # The other 999 arrive; the poisoned one does not.
        with Node.open(homes["B"]) as b:
            asyncio.run(node_sync(b, timeout=60))
            assert b.count("customers") == TOTAL - 1
            assert b.count("suppliers") == 0

        # The CLI: listed with its reason; sync says what waits (exit 1).
        listed = json.loads(cli("failures", "--home", str(homes["A"]), "--json").stdout)
        assert [(f["id"], f["records"], f["code"]) for f in listed] == [
            (failure.id, [poisoned], "frame_too_large")
        ]
        again = cli("sync", "--home", str(homes["A"]), "--json")
        assert again.returncode == 1, again.stderr
        assert "1 failed to go up" in again.stderr and again.stderr.count("\n") == 1
        assert json.loads(again.stdout)["failures"] == {"upload": 1, "download": 0}

        # retry re-queues it: refused again while the relay's limit stands.
        out = cli("retry", "--home", str(homes["A"]), str(failure.id), "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"retrying": [failure.id]}
        with Node.open(homes["A"]) as a:
            [marked] = list_failures(a)
            assert marked.retrying
            asyncio.run(node_sync(a, timeout=60))
            [twice] = list_failures(a)
        assert twice.id == failure.id and twice.attempts == 2 and not twice.retrying
        assert twice.last_at >= failure.last_at
    finally:
        relay.stop()

    # The operator raises the limit: after retry, the item goes up and is gone
    # from the failures.
    relay = ThreadRelay(setup.store_path, setup.port)
    relay.start()
    try:
        assert cli("retry", "--home", str(homes["A"]), "--all").returncode == 0
        done = cli("sync", "--home", str(homes["A"]), "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["synced"] is True
        assert json.loads(cli("failures", "--home", str(homes["A"]), "--json").stdout) == []
        assert cli("sync", "--home", str(homes["B"])).returncode == 0
        with Node.open(homes["B"]) as b:
            assert b.get("suppliers", "NCC-BIG") is not None
    finally:
        relay.stop()


def test_live_refusal_sets_the_document_aside_and_live_writes_go_on(setup: Setup) -> None:
    """``node run``'s loop (LiveSync): a refused live update holds its
    document, the connection comes back at once and later writes of other
    documents still arrive live; ``retry`` from another process is picked up
    by the running sync (refused again here, so counted again)."""
    homes, limit, relay = setup.homes, setup.limit, setup.relay
    relay.start()

    async def scenario(a: Node, b: Node) -> None:
        async with LiveSync(a, write_status=False) as live_a, LiveSync(b, write_status=False):
            await live_a.wait_synced(timeout=30)
            write_with_poison(a, limit)
            async with asyncio.timeout(60):
                while b.count("customers") < TOTAL - 1:
                    await asyncio.sleep(0.05)
                while not list_failures(a):
                    await asyncio.sleep(0.05)
            a.put("customers", customer(TOTAL))  # after the refusal: still flows
            async with asyncio.timeout(30):
                while b.get("customers", f"KH{TOTAL:05}") is None:
                    await asyncio.sleep(0.05)
            [failure] = list_failures(a)
            assert failure.doc == "suppliers" and failure.code == "frame_too_large"
            retry(a, [failure.id])
            async with asyncio.timeout(30):
                while list_failures(a)[0].attempts < 2:
                    await asyncio.sleep(0.05)
            assert not list_failures(a)[0].retrying
            assert b.count("suppliers") == 0

    try:
        with Node.open(homes["A"]) as a, Node.open(homes["B"]) as b:
            asyncio.run(scenario(a, b))
    finally:
        relay.stop()


def test_locked_period_refused_without_cutting_the_link_and_retried_after_unlock(
    setup: Setup,
) -> None:
    """A ``refused`` frame (period lock) keeps the connection: the failure is
    recorded, the document held; after the operator unlocks, ``retry`` from
    another process sends it again on the same connection and clears it."""
    homes, relay = setup.homes, ThreadRelay(setup.store_path, setup.port)
    locked = cli("relay", "lock", str(setup.store_path), "acme", "2026-11")
    assert locked.returncode == 0, locked.stderr
    relay.start()

    async def until(predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(30):
            while not predicate():
                await asyncio.sleep(0.05)

    async def scenario(a: Node) -> None:
        async with LiveSync(a, write_status=False) as live:
            await live.wait_synced(timeout=30)
            a.put("customers", {"code": "KH1", "name": "Lan"})
            fields = {"date": "2026-11-05", "customer": "KH1", "amount": "10"}
            rid = a.post_voucher("cash_receipt", fields).id
            await until(lambda: bool(list_failures(a)))
            [failure] = list_failures(a)
            assert (failure.doc, failure.code, failure.records) == (
                "cash_receipt/2026-11",
                "locked_period",
                [rid],
            )
            await until(lambda: a.pending()["customers"] == 0)
            out = cli("relay", "unlock", str(setup.store_path), "acme", "2026-11")
            assert out.returncode == 0, out.stderr
            assert cli("retry", "--home", str(homes["A"]), "--all").returncode == 0
            await until(lambda: not list_failures(a))
            assert a.pending()["cash_receipt"] == 0

    try:
        with Node.open(homes["A"]) as a:
            asyncio.run(scenario(a))
        assert relay.server is not None
        assert relay.server.metrics.connections_total == 1  # never cut off
    finally:
        relay.stop()
