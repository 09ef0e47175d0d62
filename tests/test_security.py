"""Security tests against a real ``RelayServer`` on a free loopback port.

tests/test_relay_server.py already covers: a wrong token, a revoked token, a
node of another dataset, a read-only node sending ``update``, a node revoked
while connected, oversized frames (error frame, and websockets' 1009 beyond
twice the limit), the rate limit with a frozen clock, a peer silent after
its hello, and tokens absent from /metrics after a normal exchange. This file
adds what was missing:

- a hello without a token, with an empty one, and a token of another node;
- a read-only node sending a batch and asking for a lease;
- slow-loris connections: TCP without HTTP, an HTTP upgrade trickled byte by
  byte, a websocket that never says hello, a frame trickled byte by byte,
  many of them at once while a good node keeps working;
- a flood from one connection under the real clock: the rate limit ends it,
  another node is served meanwhile;
- tokens never in any log line (every logger at DEBUG) nor in /metrics, for
  accepted and refused connections alike;
- node id spoofing inside updates: a node that is not a carrier cannot
  change, remove or set up a later change of another node's entry; a carrier
  can publish them (docs/reliability.md "Authorship").

Waits are on conditions with generous bounds; nothing asserts a duration
except as an upper bound far above the configured one.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from pycrdt import Doc, Map
from test_relay_server import (
    Client,
    Tokens,
    Writer,
    http_get,
    relay_db,
    run,
    stored_keys,
    update_count,
    with_server,
)
from websockets.asyncio.client import connect

from engine.crdt.deleteset import encode_delete_set
from engine.protocol import Limits, codes, encode_message
from engine.protocol.events import UpdateRefused
from engine.protocol.messages import Lease, Update, Updates
from engine.relay.server import RelayServer, ServerLimits
from engine.relay.sqlite_store import SqliteRelayStore

__all__ = ["relay_db"]  # the fixture, imported for pytest

HB_MS = 200  # heartbeat of the servers of this file: 3 silent intervals = 0.6 s


def raw_frame(header: dict[str, object], payload: bytes = b"") -> bytes:
    raw = orjson.dumps(header)
    return struct.pack(">I", len(raw)) + raw + payload


def hello(dataset: str, node: str, token: object = None) -> bytes:
    header: dict[str, object] = {
        "t": "hello",
        "versions": [1],
        "dataset": dataset,
        "node": node,
        "limits": Limits().to_json(),
    }
    if token is not None:
        header["token"] = token
    return raw_frame(header)


async def raw_error(url: str, frame: bytes) -> tuple[str, str]:
    """Send one frame on a fresh websocket; the relay's error (code, message)."""
    async with connect(url, max_size=None, compression=None) as ws:
        await ws.send(frame)
        reply = await asyncio.wait_for(ws.recv(), 20)
        assert isinstance(reply, bytes)
        (hlen,) = struct.unpack(">I", reply[:4])
        header = orjson.loads(reply[4 : 4 + hlen])
        assert header["t"] == "error", header
        return header["code"], header["message"]


# -- authentication ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "code"),
    [(None, codes.BAD_FRAME), ("", codes.BAD_FRAME), ("x" * 600, codes.BAD_FRAME)],
    ids=["no-token", "empty-token", "token-too-long"],
)
def test_hello_without_a_usable_token_is_refused(
    relay_db: tuple[Path, Tokens], token: str | None, code: str
) -> None:
    path, _ = relay_db

    async def body(server: RelayServer) -> None:
        got, message = await raw_error(server.url, hello("acme", "A1", token))
        assert got == code
        assert "token" in message

    server = run(with_server(path, body))
    assert server.metrics.protocol_errors[code] == 1
    assert update_count(path, "acme") == 0


def test_token_of_another_node_does_not_authenticate(relay_db: tuple[Path, Tokens]) -> None:
    path, tok = relay_db

    async def body(server: RelayServer) -> None:
        # A1's valid token presented as A2, as RO, and as B1 of the other dataset.
        for dataset, node in (("acme", "A2"), ("acme", "RO"), ("beta", "B1")):
            client = await Client.connect(server.url, dataset, node, tok.a1)
            err = await client.error()
            assert err.code == codes.AUTH_FAILED, (dataset, node, err)
            assert tok.a1 not in err.message

    run(with_server(path, body))


def test_read_only_node_batch_and_lease_are_refused(relay_db: tuple[Path, Tokens]) -> None:
    path, tok = relay_db

    async def body(server: RelayServer) -> None:
        w = Writer()
        for message in (
            Updates((Update("customers", w.put("a", 1), 1), Update("items", w.put("b", 2), 2))),
            Lease("sales_invoice", 10, 3),
        ):
            ro, _ = await Client.opened(server.url, "acme", "RO", tok.ro)
            await ro.ws.send(encode_message(message, max_frame=ro.session.limits.max_frame))
            err = await ro.error()
            assert err.code == codes.READ_ONLY

    run(with_server(path, body))
    assert update_count(path, "acme") == 0


# -- slow loris ------------------------------------------------------------------------


async def _good_node_works(server: RelayServer, tok: Tokens, key: str) -> None:
    good, _ = await Client.opened(server.url, "acme", "A1", tok.a1)
    await good.put("customers", Writer().put(key, 1), ref=1)
    await good.acked(1)
    await good.close()


def _ws_upgrade(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def _closed_by_peer(reader: asyncio.StreamReader, within: float) -> float:
    """Seconds until the relay closes the connection (EOF or reset)."""
    start = time.monotonic()

    async def drain() -> None:
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass

    await asyncio.wait_for(drain(), within)
    return time.monotonic() - start


async def _open_ws(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A websocket opened by hand (so that frames can be trickled)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_ws_upgrade(port))
    await writer.drain()
    status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    assert status.startswith(b"HTTP/1.1 101"), status
    return reader, writer


def _masked(payload: bytes) -> bytes:
    """One client websocket binary frame (FIN, masked)."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x82]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_slow_loris_connections_are_dropped_and_others_are_served(
    relay_db: tuple[Path, Tokens],
) -> None:
    path, tok = relay_db

    async def body(server: RelayServer) -> None:
        port = server.port
        # 1. Websocket open, never a hello: dropped after 3 heartbeats.
        r1, w1 = await _open_ws(port)
        # 2. A hello frame trickled one byte at a time, slower than the
        #    heartbeat: no frame ever completes, so the session hears nothing.
        r2, w2 = await _open_ws(port)
        frame = _masked(hello("acme", "A1", tok.a1))

        async def trickle() -> None:
            for byte in frame:
                w2.write(bytes([byte]))
                await w2.drain()
                await asyncio.sleep(HB_MS / 1000)

        trickler = asyncio.create_task(trickle())
        # 3. Twenty idle websockets at once.
        idle = [await _open_ws(port) for _ in range(20)]
        await _good_node_works(server, tok, "during")
        limit = 3 * HB_MS / 1000 + 10  # the rule plus a generous margin
        assert await _closed_by_peer(r1, limit) < limit
        assert await _closed_by_peer(r2, limit) < limit
        trickler.cancel()
        for reader, _ in idle:
            await _closed_by_peer(reader, limit)
        await _good_node_works(server, tok, "after")
        for writer in (w1, w2, *(w for _, w in idle)):
            writer.close()

    run(with_server(path, body, limits=ServerLimits(heartbeat_ms=HB_MS, tick_ms=20)))
    assert stored_keys(path, "acme", "customers") == {"during": 1, "after": 1}


def test_slow_loris_before_the_websocket_handshake_is_cut(relay_db: tuple[Path, Tokens]) -> None:
    """TCP without a request, and an HTTP upgrade trickled byte by byte, are
    closed by websockets' opening-handshake timeout (10 s by default)."""
    path, tok = relay_db

    async def body(server: RelayServer) -> None:
        port = server.port
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        request = _ws_upgrade(port)

        async def trickle() -> None:
            with pytest.raises(ConnectionError):
                for byte in request:
                    w2.write(bytes([byte]))
                    await w2.drain()
                    await asyncio.sleep(0.5)
                await asyncio.sleep(60)  # the request is complete: wait for the cut

        trickler = asyncio.create_task(trickle())
        await _good_node_works(server, tok, "meanwhile")
        assert await _closed_by_peer(r1, 40) < 40
        assert await _closed_by_peer(r2, 40) < 40
        trickler.cancel()
        for writer in (w1, w2):
            writer.close()

    run(with_server(path, body))


# -- flood -------------------------------------------------------------------------------


def test_flood_from_one_connection_is_rate_limited_and_others_are_served(
    relay_db: tuple[Path, Tokens],
) -> None:
    path, tok = relay_db
    rate, burst = 500.0, 1000.0

    async def body(server: RelayServer) -> None:
        good, _ = await Client.opened(server.url, "acme", "A1", tok.a1)
        noisy, _ = await Client.opened(server.url, "acme", "A2", tok.a2)
        ping = raw_frame({"t": "ping"})
        sent = 0
        flood_error: list[str] = []

        async def flood() -> None:
            nonlocal sent
            try:
                for _ in range(100 * int(burst)):
                    await noisy.ws.send(ping)
                    sent += 1
            except Exception as exc:  # the relay closed the connection
                flood_error.append(type(exc).__name__)

        flooder = asyncio.create_task(flood())
        w = Writer()
        for i in range(20):  # the good node keeps writing while the flood runs
            await good.put("customers", w.put(f"g{i}", i), ref=i)
            await good.acked(i)
        err = await noisy.error()
        await flooder
        assert err.code == codes.RATE_LIMITED
        assert sent > burst  # the flood went beyond the burst
        await good.put("customers", w.put("after", 1), ref=99)
        await good.acked(99)
        await good.close()

    server = run(
        with_server(path, body, limits=ServerLimits(rate_frames_per_s=rate, rate_burst=burst))
    )
    assert server.metrics.protocol_errors[codes.RATE_LIMITED] >= 1
    keys = stored_keys(path, "acme", "customers")
    assert all(keys[f"g{i}"] == i for i in range(20)) and keys["after"] == 1


# -- secrets in logs and metrics ------------------------------------------------------


def test_tokens_never_appear_in_logs_or_metrics(
    relay_db: tuple[Path, Tokens], caplog: pytest.LogCaptureFixture
) -> None:
    path, tok = relay_db
    caplog.set_level(logging.DEBUG)  # every logger, every level
    guessed = "Z" * 43  # a token-shaped secret that is nobody's

    async def body(server: RelayServer) -> None:
        a1, _ = await Client.opened(server.url, "acme", "A1", tok.a1)
        await a1.put("customers", Writer().put("k", 1), ref=1)
        await a1.acked(1)
        for dataset, node, token in (
            ("acme", "A2", tok.a1),  # someone else's token
            ("acme", "A1", guessed),  # wrong token
            ("acme", "GONE", tok.gone),  # revoked
            ("beta", "A1", tok.a1),  # other dataset
            ("beta", "B1", tok.a2),
        ):
            client = await Client.connect(server.url, dataset, node, token)
            await client.error()
        ro, _ = await Client.opened(server.url, "acme", "RO", tok.ro)
        await ro.ws.send(encode_message(Update("customers", b"\x00\x00", 1), max_frame=1 << 20))
        await ro.error()
        await raw_error(server.url, hello("acme", "A1", tok.a2 + "\x01"))  # bad token chars
        status, _, metrics = await asyncio.to_thread(
            http_get, f"http://127.0.0.1:{server.port}/metrics"
        )
        assert status == 200
        for secret in (tok.a1, tok.a2, tok.ro, tok.gone, tok.b1, guessed):
            assert secret not in metrics
        await a1.close()

    run(with_server(path, body))
    # What a log handler may write or keep: the formatted message, any
    # traceback, and the arguments (websockets logs each frame as one). The
    # clients here are the test's own websockets, not the node's transport
    # (test_node_sync_logs_no_token checks that one): their arguments are not
    # the relay's.
    text = "\n".join(
        f"{r.name}: {r.getMessage()} {r.exc_text or ''} "
        + (repr(r.args) if r.name != "websockets.client" else "")
        for r in caplog.records
    )
    assert "BINARY [" in text  # the relay logged frames, without their payloads
    assert "refused" in text  # the refusals were logged...
    for secret in (tok.a1, tok.a2, tok.ro, tok.gone, tok.b1, guessed):
        assert secret not in text  # ...without the token
        # websockets' DEBUG lines show frames as hex: not there either.
        assert secret.encode().hex(" ")[:48] not in text


def test_node_sync_logs_no_token(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The node side: a refused sync and an accepted one log no token."""
    from engine.errors import AuthError
    from engine.node import Node
    from engine.relay import SqliteRelayStore
    from engine.transport import node_sync

    caplog.set_level(logging.DEBUG)
    path = tmp_path / "relay.db"
    with SqliteRelayStore.create(path) as store:
        token = store.enroll("acme", "hn").token

    async def body(server: RelayServer) -> None:
        for tkn, ok in ((token, True), ("W" * 43, False)):
            home = tmp_path / ("good" if ok else "bad")
            with Node.create(home, dataset="acme", node="hn", relay=server.url, token=tkn) as n:
                n.put("customers", {"code": "K1", "name": "x"})
                if ok:
                    await node_sync(n, timeout=30)
                else:
                    with pytest.raises(AuthError):
                        await node_sync(n, timeout=30)

    run(with_server(path, body))
    # The records' arguments too: a handler may keep them (websockets logs
    # each frame as an argument; engine.wslog keeps only opcode and length).
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records)
    assert "BINARY [" in text  # frames were logged, without their payloads
    assert token not in text and "W" * 43 not in text


# -- node id spoofing ---------------------------------------------------------------------


def entries_of(path: Path, doc: str) -> dict[str, str]:
    """The entries (root ``r``) a fresh store instance on ``path`` holds of ``doc``."""
    with SqliteRelayStore.open(path) as store:
        ydoc: Doc[Any] = Doc()
        ydoc.apply_update(store.diff("acme", doc))
        return dict(ydoc.get("r", type=Map).to_py() or {})


def forge(base: list[bytes], client_id: int, edit: Callable[[Map[Any]], None]) -> bytes:
    """The update a document holding ``base`` makes when ``edit`` changes it."""
    doc: Doc[Any] = Doc(client_id=client_id)
    entries = doc.get("r", type=Map)
    for update in base:
        doc.apply_update(update)
    before = doc.get_state()
    edit(entries)
    out: bytes = doc.get_update(before)
    return out


def test_entries_of_another_node_are_refused_and_the_session_goes_on(
    relay_db: tuple[Path, Tokens],
) -> None:
    """A2 (not a carrier) tries every way to change or remove A1's entry; each
    is refused with ``not_author`` in a ``refused`` frame, nothing is stored,
    A2's own writes on the same connection go on, and A1's next change lands
    as A1 wrote it (no forged item waits at the relay to overwrite it)."""
    path, tok = relay_db
    a1: Doc[Any] = Doc(client_id=11)
    a1_entries = a1.get("r", type=Map)
    a1_entries["R1|A1"] = '{"v": 1}'
    seen = a1.get_update()  # published by A1 first
    before = a1.get_state()
    a1_entries["R1|A1"] = '{"v": 2}'
    later = a1.get_update(before)  # A1's next change, not yet at the relay

    def put(key: str, value: str) -> Callable[[Map[Any]], None]:
        return lambda m: m.__setitem__(key, value)

    def remove(key: str) -> Callable[[Map[Any]], None]:
        return lambda m: m.pop(key)

    forgeries = {
        "a new entry under A1's key": forge([], 22, put("R9|A1", "forged")),
        "A1's entry overwritten": forge([seen], 22, put("R1|A1", "forged")),
        "A1's entry overwritten under A1's client id": forge([seen], 11, put("R1|A1", "forged")),
        "A1's entry removed": forge([seen], 22, remove("R1|A1")),
        "an item waiting for A1's next change": forge([seen, later], 22, put("R1|A1", "x")),
        # Only the deletion of A1's next item (clock 1), before it arrives.
        "a deletion of A1's unseen item": b"\x00" + encode_delete_set({11: [(1, 1)]}),
        "a key without a node": forge([], 22, put("R9", "forged")),
    }
    reasons: dict[str, str] = {}

    async def body(server: RelayServer) -> None:
        c1, opened = await Client.opened(server.url, "acme", "A1", tok.a1)
        assert opened.carrier is False
        await c1.put("customers", seen, ref=1)
        await c1.acked(1)
        c2, _ = await Client.opened(server.url, "acme", "A2", tok.a2)
        for ref, (what, forged) in enumerate(forgeries.items(), start=1):
            await c2.put("customers", forged, ref=ref)
            ev = await c2.wait(UpdateRefused, lambda e, ref=ref: ref in e.refs)  # type: ignore[misc]
            assert (ev.doc, ev.code) == ("customers", codes.NOT_AUTHOR), what
            reasons[what] = ev.message
        await c2.put("customers", forge([], 22, put("R2|A2", "own")), ref=100)
        await c2.acked(100)
        await c1.put("customers", later, ref=2)
        await c1.acked(2)
        await c1.close()
        await c2.close()

    run(with_server(path, body))
    assert entries_of(path, "customers") == {"R1|A1": '{"v": 2}', "R2|A2": "own"}
    assert "of node 'A1'" in reasons["A1's entry overwritten under A1's client id"]
    assert "removes entry 'R1|A1'" in reasons["A1's entry removed"]
    assert "waits for changes" in reasons["an item waiting for A1's next change"]
    assert "has not seen" in reasons["a deletion of A1's unseen item"]
    assert all("A2" in r for r in reasons.values())


def test_a_carrier_publishes_other_nodes_entries(relay_db: tuple[Path, Tokens]) -> None:
    """A head office enrolled with ``carrier`` may publish A1's entries it
    imported from a file, also out of order; the welcome tells it so."""
    path, _ = relay_db
    with SqliteRelayStore.open(path) as store:
        ho = store.enroll("acme", "HO", carrier=True).token
    a1: Doc[Any] = Doc(client_id=11)
    a1_entries = a1.get("r", type=Map)
    a1_entries["R1|A1"] = '{"v": 1}'
    first = a1.get_update()
    before = a1.get_state()
    a1_entries["R1|A1"] = '{"v": 2}'
    second = a1.get_update(before)

    async def body(server: RelayServer) -> None:
        client, opened = await Client.opened(server.url, "acme", "HO", ho)
        assert opened.carrier is True
        await client.put("customers", second, ref=1)  # waits for the first
        await client.put("customers", first, ref=2)
        await client.acked(1, 2)
        await client.close()

    run(with_server(path, body))
    assert entries_of(path, "customers") == {"R1|A1": '{"v": 2}'}


def test_an_update_the_store_cannot_take_is_refused_and_the_session_goes_on(
    relay_db: tuple[Path, Tokens],
) -> None:
    """Bytes that are not a Yjs update, inside a well-formed frame: that one
    update is refused (``bad_update`` in a ``refused`` frame) and the next
    one on the same connection is stored."""
    path, tok = relay_db
    good = forge([], 22, lambda m: m.__setitem__("R1|A2", "own"))

    async def body(server: RelayServer) -> None:
        client, _ = await Client.opened(server.url, "acme", "A2", tok.a2)
        await client.put("customers", b"\xff\x00 not an update", ref=1)
        ev = await client.wait(UpdateRefused)
        assert (ev.doc, ev.refs, ev.code) == ("customers", (1,), codes.BAD_UPDATE)
        await client.put("customers", good, ref=2)
        await client.acked(2)
        await client.close()

    run(with_server(path, body))
    assert entries_of(path, "customers") == {"R1|A2": "own"}
