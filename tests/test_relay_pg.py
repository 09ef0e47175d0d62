"""What only the PostgreSQL relay store has: its URL, opening errors, the
format version, and going on after its connections are cut (a restarted
server) without acknowledging anything that was not committed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from engine.errors import (
    FormatVersionError,
    RelayStoreExists,
    RelayStoreNotFound,
    StoreError,
    UserError,
)
from engine.node import Node
from engine.relay import UpdateIn
from engine.relay.pg_store import PgRelayStore, parse_url
from engine.relay.server import RelayServer
from engine.relay.testing import customers, map_updates
from engine.sync import SyncError
from engine.transport import node_sync


def test_url_names_database_and_schema() -> None:
    where = parse_url("postgresql://postgres@127.0.0.1:5432/hq?schema=relay_1&sslmode=disable")
    assert where.schema == "relay_1" and where.channel == "branchline_relay_1"
    assert "schema" not in where.conninfo and "sslmode=disable" in where.conninfo
    assert str(where) == "postgresql://postgres@127.0.0.1:5432/hq?schema=relay_1"
    assert parse_url("postgresql://h/db").schema == "branchline"
    for bad in ("postgresql://h/", "postgresql://h/db?schema=Bad-Name", "relay.db"):
        with pytest.raises(UserError):
            parse_url(bad)


def test_opening_errors_are_one_clear_kind(pg_url: str) -> None:
    with pytest.raises(RelayStoreNotFound, match="relay init"):
        PgRelayStore.open(pg_url)
    missing = pg_url.rsplit("/", 1)[0] + "/bl_no_such_database"
    with pytest.raises(RelayStoreNotFound, match="does not exist"):
        PgRelayStore.open(missing)
    with pytest.raises(StoreError, match="cannot connect"):
        PgRelayStore.open("postgresql://postgres@127.0.0.1:1/test")
    PgRelayStore.create(pg_url).close()
    with pytest.raises(RelayStoreExists):
        PgRelayStore.create(pg_url)
    schema = parse_url(pg_url).schema
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"UPDATE {schema}.meta SET value = '99' WHERE key = 'format'")
    with pytest.raises(FormatVersionError, match="format 99"):
        PgRelayStore.open(pg_url)


def test_tokens_are_stored_hashed(pg_url: str) -> None:
    with PgRelayStore.create(pg_url) as store:
        tokens = [store.enroll("acme", f"n{i}").token for i in range(3)]
    schema = parse_url(pg_url).schema
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(f"SELECT salt, token_hash FROM {schema}.nodes").fetchall()
    raw = b"".join(bytes(v) for row in rows for v in row)
    for token in tokens:
        assert token.encode() not in raw and token[:16].encode() not in raw


def _terminate(database: str, pid: int) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_cut_connection_fails_the_call_and_the_next_one_reconnects(pg_url: str) -> None:
    store = PgRelayStore.create(pg_url)
    store.enroll("acme", "X")
    u = map_updates(3, client_id=61)
    assert store.append_updates("acme", [UpdateIn("customers", u[0], "X")])[0].ok
    assert store._conn is not None
    _terminate(pg_url, store._conn.info.backend_pid)
    # The server is gone for this connection: the batch is not acknowledged.
    with pytest.raises(StoreError, match="connection lost"):
        store.append_updates("acme", [UpdateIn("customers", u[1], "X")])
    # The next call connects again; the refused batch can be sent again.
    results = store.append_updates("acme", [UpdateIn("customers", u[1], "X")])
    assert [r.status for r in results] == ["stored"] and store.head("acme") == 2
    # The listener too: once cut, wait_changes reconnects and reports what
    # it missed meanwhile (by comparing heads).
    store.wait_changes(0.05)
    assert store._listener is not None
    _terminate(pg_url, store._listener.info.backend_pid)
    store.wait_changes(0.5)  # notices the cut
    other = PgRelayStore.open(pg_url)
    other.append_updates("acme", [UpdateIn("customers", u[2], "X")])
    seen: set[str] = set()
    for _ in range(20):
        seen |= store.wait_changes(0.5)
        if "acme" in seen:
            break
    assert "acme" in seen
    other.close()
    store.close()


def test_a_relay_serves_from_postgresql_and_goes_on_after_a_cut(
    pg_url: str, tmp_path: Path
) -> None:
    """Nodes sync through a RelayServer on the PostgreSQL store; a cut
    server connection fails at most the sync that meets it (nothing
    acknowledged that was not committed), and the relay goes on by itself."""
    store = PgRelayStore.create(pg_url)
    ta, tb = store.enroll("acme", "A").token, store.enroll("acme", "B").token
    a = Node.create(tmp_path / "a", dataset="acme", node="A")
    b = Node.create(tmp_path / "b", dataset="acme", node="B")

    async def body() -> None:
        server = RelayServer(store, port=0)
        await server.start()
        try:
            a.put("customers", {"code": "K1", "name": "one"})
            await node_sync(a, url=server.url, token=ta, timeout=30)
            await node_sync(b, url=server.url, token=tb, timeout=30)
            assert customers(b) == {"K1": "one"}
            assert store._conn is not None
            _terminate(pg_url, store._conn.info.backend_pid)
            a.put("customers", {"code": "K2", "name": "two"})
            for _ in range(5):
                try:
                    await node_sync(a, url=server.url, token=ta, timeout=30)
                except SyncError:
                    continue
                if not a.outbox():
                    break
            assert not a.outbox()  # everything acknowledged, after the relay reconnected
            await node_sync(b, url=server.url, token=tb, timeout=30)
        finally:
            await server.stop()

    asyncio.run(asyncio.wait_for(body(), 120))
    assert customers(b) == {"K1": "one", "K2": "two"}
    assert store.head("acme") >= 2
    a.close()
    b.close()
    store.close()
