"""Period locks end to end: a real relay (``ThreadRelay``, the real
``RelayServer`` in a thread) and real nodes syncing with ``LiveSync``. The
lock is set with the CLI on the relay's store file, as an operator would.

The relay side (refusal, nothing stored, nothing fanned out, the connection
and the other documents going on) is checked here, and that the node lists
the refusal among its sync failures (engine/sync handles the protocol's
``UpdateRefused`` event).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from test_sync_live import ThreadRelay, cli, free_port, init_home

from engine.node import Node
from engine.protocol import codes
from engine.relay.sqlite_store import SqliteRelayStore
from engine.sync import list_failures
from engine.transport import LiveSync

LOCKED_DOC = "cash_receipt/2026-11"


def start(tmp_path: Path) -> tuple[ThreadRelay, dict[str, Path], Path]:
    """A relay store with nodes A and B and period 2026-11 locked (by the
    CLI), their homes, and the relay (started)."""
    store_path = tmp_path / "relay.db"
    with SqliteRelayStore.create(store_path) as store:
        tokens = {n: store.enroll("acme", n).token for n in ("A", "B")}
    locked = cli("relay", "lock", str(store_path), "acme", "2026-11")
    assert locked.returncode == 0, locked.stderr
    port = free_port()
    homes = {n: tmp_path / n for n in ("A", "B")}
    for n, home in homes.items():
        init_home(home, n, port, tokens[n])
    relay = ThreadRelay(store_path, port)
    relay.start()
    return relay, homes, store_path


def write(a: Node) -> None:
    """A customer, a receipt in the locked month and one in the next month."""
    a.put("customers", {"code": "KH1", "name": "Lan"})
    a.post_voucher("cash_receipt", {"date": "2026-11-05", "customer": "KH1", "amount": "10"})
    a.post_voucher("cash_receipt", {"date": "2026-12-01", "customer": "KH1", "amount": "20"})


async def until(predicate: object, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.05)


def test_a_locked_month_holds_back_only_its_document(tmp_path: Path) -> None:
    relay, homes, store_path = start(tmp_path)

    async def scenario(a: Node, b: Node) -> None:
        async with LiveSync(a, write_status=False), LiveSync(b, write_status=False):
            write(a)
            await until(lambda: b.count("cash_receipt") == 1 and b.count("customers") == 1)
            a.put("customers", {"code": "KH2", "name": "Minh"})  # later writes still flow
            await until(lambda: b.count("customers") == 2)
        pending = a.store.conn.execute(
            "SELECT DISTINCT doc FROM updates WHERE pending = 1"
        ).fetchall()
        assert pending == [(LOCKED_DOC,)]  # kept in A's outbox, not acknowledged

    try:
        with Node.open(homes["A"]) as a, Node.open(homes["B"]) as b:
            asyncio.run(scenario(a, b))
            assert b.count("cash_receipt") == 1  # December's only
        server = relay.server
        assert server is not None
        assert server.metrics.updates_refused[codes.LOCKED_PERIOD] >= 1
        assert not server.metrics.protocol_errors  # refused, nobody cut off
    finally:
        relay.stop()
    with SqliteRelayStore.open(store_path) as store:
        assert LOCKED_DOC not in store.documents("acme")


def test_a_locked_period_refusal_is_listed_as_a_sync_failure(tmp_path: Path) -> None:
    relay, homes, _ = start(tmp_path)

    async def scenario(a: Node) -> None:
        async with LiveSync(a, write_status=False):
            write(a)
            await until(lambda: bool(list_failures(a)), timeout=10)

    try:
        with Node.open(homes["A"]) as a:
            asyncio.run(scenario(a))
            [failure] = list_failures(a)
            assert failure.direction == "upload" and failure.doc == LOCKED_DOC
            assert failure.code == codes.LOCKED_PERIOD
            assert "'2026-11'" in failure.reason and "locked" in failure.reason
    finally:
        relay.stop()
