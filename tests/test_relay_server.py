"""Relay server tests: a real ``RelayServer`` on a loopback port (0 = any free
port) with a temporary SQLite store, driven by raw ``websockets`` clients that
speak the protocol through ``engine.protocol.ClientSession``.

No sleeps as assertions: "X did not arrive" is checked by a round trip on the
same connection that the relay must answer after X would have been queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pycrdt import Doc, Map
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from engine.protocol import (
    EMPTY_STATE_VECTOR,
    Acked,
    ClientSession,
    DiffReceived,
    EncodedUpdates,
    ErrorReceived,
    Event,
    LeaseGranted,
    Limits,
    Opened,
    RemoteState,
    SyncComplete,
    UpdateReceived,
    UpdateRefused,
    codes,
    encode_message,
    encode_updates,
)
from engine.protocol.limits import MIN_FRAME_BYTES
from engine.protocol.messages import Update, Updates, decode_message
from engine.relay import EMPTY_UPDATE, SqliteRelayStore, UpdateIn
from engine.relay import hub as hub_module
from engine.relay.calls import HelloAnswer
from engine.relay.hub import RelayHub, _Pending
from engine.relay.server import RelayServer, ServerLimits
from engine.relay.store import NodeGrant
from harness.net import free_port as _free_port

BRANCHLINE = str(Path(sys.executable).parent / "branchline")
TIMEOUT = 20.0  # generous: only a hang reaches it
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 120))


@dataclass
class Tokens:
    a1: str  # dataset "acme", node A1
    a2: str  # dataset "acme", node A2
    ro: str  # dataset "acme", node RO, read-only
    gone: str  # dataset "acme", node GONE, revoked
    b1: str  # dataset "beta", node B1


@pytest.fixture
def relay_db(tmp_path: Path) -> tuple[Path, Tokens]:
    path = tmp_path / "relay.db"
    with SqliteRelayStore.create(path) as store:
        tokens = Tokens(
            a1=store.enroll("acme", "A1").token,
            a2=store.enroll("acme", "A2").token,
            ro=store.enroll("acme", "RO", read_only=True).token,
            gone=store.enroll("acme", "GONE").token,
            b1=store.enroll("beta", "B1").token,
        )
        store.revoke("acme", "GONE")
    return path, tokens


class Client:
    """A protocol client over a real websocket."""

    def __init__(self, ws: ClientConnection, session: ClientSession) -> None:
        self.ws = ws
        self.session = session
        self.events: list[Event] = []  # everything received, in order

    @classmethod
    async def connect(
        cls, url: str, dataset: str, node: str, token: str, tls: ssl.SSLContext | None = None
    ) -> Client:
        ws = await connect(url, max_size=None, compression=None, open_timeout=TIMEOUT, ssl=tls)
        client = cls(ws, ClientSession(dataset=dataset, node=node, token=token))
        await client.flush()
        return client

    @classmethod
    async def opened(
        cls, url: str, dataset: str, node: str, token: str, tls: ssl.SSLContext | None = None
    ) -> tuple[Client, Opened]:
        client = await cls.connect(url, dataset, node, token, tls)
        opened = await client.wait(Opened)
        return client, opened

    async def flush(self) -> None:
        for frame in self.session.data_to_send():
            await self.ws.send(frame)

    async def wait(self, kind: type[T], where: Callable[[T], bool] = lambda _: True) -> T:
        """Read until an event of ``kind`` matching ``where`` arrives."""

        async def loop() -> T:
            while True:
                message = await self.ws.recv()
                assert isinstance(message, bytes)
                events = self.session.receive_frame(message)
                self.events.extend(events)
                # The relay may close right after its last frame (an error):
                # what we would answer then has nowhere to go.
                with contextlib.suppress(ConnectionClosed):
                    await self.flush()
                for event in events:
                    if isinstance(event, kind) and where(event):
                        return event

        return await asyncio.wait_for(loop(), TIMEOUT)

    async def closed(self) -> None:
        """Read until the relay closes the connection."""

        async def loop() -> None:
            with pytest.raises(ConnectionClosed):
                while True:
                    message = await self.ws.recv()
                    if isinstance(message, bytes):
                        self.events.extend(self.session.receive_frame(message))

        await asyncio.wait_for(loop(), TIMEOUT)

    async def error(self) -> ErrorReceived:
        """The error frame the relay sends before closing, then the close."""
        err = await self.wait(ErrorReceived)
        await self.closed()
        return err

    async def round_trip(self, doc: str) -> bytes:
        """A full sync pass of ``doc`` (as an empty replica): everything the
        relay queued to us before answering arrives before the answer."""
        self.session.start_sync([(doc, EMPTY_STATE_VECTOR)])
        await self.flush()
        diff = await self.wait(DiffReceived, lambda e: e.doc == doc)
        await self.wait(RemoteState, lambda e: e.doc == doc)
        self.session.answer_state(doc, [])
        await self.flush()
        await self.wait(SyncComplete)
        return diff.data

    async def put(self, doc: str, data: bytes, ref: int) -> None:
        self.session.send_update(doc, data, ref)
        await self.flush()

    async def acked(self, *refs: int) -> None:
        wanted = set(refs)
        while wanted:
            ack = await self.wait(Acked)
            wanted -= set(ack.refs)

    async def close(self) -> None:
        await self.ws.close()


class Writer:
    """A pycrdt document producing incremental updates."""

    def __init__(self) -> None:
        self.doc: Doc[Any] = Doc()
        self.map: Map[Any] = self.doc.get("m", type=Map)

    def put(self, key: str, value: Any) -> bytes:
        before = self.doc.get_state()
        self.map[key] = value
        update: bytes = self.doc.get_update(before)
        return update


def keys_of(update: bytes) -> dict[str, Any]:
    doc: Doc[Any] = Doc()
    doc.apply_update(update)
    return dict(doc.get("m", type=Map).to_py() or {})


def stored_keys(path: Path, dataset: str, doc: str) -> dict[str, Any]:
    """What a fresh store instance on the same file holds of ``doc``."""
    with SqliteRelayStore.open(path) as store:
        return keys_of(store.diff(dataset, doc))


def update_count(path: Path, dataset: str) -> int:
    with SqliteRelayStore.open(path) as store:
        for info in store.status():
            if info.name == dataset:
                return sum(d.updates for d in info.documents)
    return 0


async def with_server(
    path: Path,
    body: Callable[[RelayServer], Awaitable[None]],
    **kwargs: Any,
) -> RelayServer:
    store = SqliteRelayStore.open(path)
    server = RelayServer(store, port=0, **kwargs)
    await server.start()
    try:
        await body(server)
    finally:
        await server.stop()
        store.close()
    return server


def http_get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


# -- handshake and auth --------------------------------------------------------------


def test_handshake_lists_documents_and_access(relay_db: tuple[Path, Tokens]) -> None:
    path, tok = relay_db
    w = Writer()
    with SqliteRelayStore.open(path) as store:
        store.append_updates("acme", [UpdateIn("customers", w.put("c1", "Ada"), "A1")])

    async def body(server: RelayServer) -> None:
        assert server.url == f"ws://127.0.0.1:{server.port}/"
        a1, opened = await Client.opened(server.url, "acme", "A1", tok.a1)
        assert opened.dataset == "acme" and opened.node == "A1"
        assert not opened.read_only
        assert opened.documents == ("customers",)
        ro, opened_ro = await Client.opened(server.url, "acme", "RO", tok.ro)
        assert opened_ro.read_only
        assert keys_of(await ro.round_trip("customers")) == {"c1": "Ada"}
        assert server.connections == 2
        await a1.close()
        await ro.close()

    run(with_server(path, body))


@pytest.mark.parametrize(
    ("dataset", "node", "which", "code", "says"),
    [
        ("acme", "A1", "a2", codes.AUTH_FAILED, "authentication failed"),
        ("acme", "GONE", "gone", codes.AUTH_FAILED, "revoked"),
        ("beta", "A1", "a1", codes.WRONG_DATASET, "enrolled in dataset 'acme', not 'beta'"),
        ("nosuch", "A1", "a1", codes.WRONG_DATASET, "enrolled in dataset 'acme'"),
        ("acme", "B1", "b1", codes.WRONG_DATASET, "enrolled in dataset 'beta', not 'acme'"),
        ("nosuch", "X", "a1", codes.AUTH_FAILED, "authentication failed"),
    ],
)
def test_refused_hello_gets_error_frame_then_close(
    relay_db: tuple[Path, Tokens], dataset: str, node: str, which: str, code: str, says: str
) -> None:
    path, tok = relay_db
    token = getattr(tok, which)

    async def body(server: RelayServer) -> None:
        client = await Client.connect(server.url, dataset, node, token)
        err = await client.error()
        assert err.code == code
        assert says in err.message
        assert token not in err.message

    server = run(with_server(path, body))
    assert server.metrics.connections_rejected[code] == 1
    assert update_count(path, "acme") == 0 and update_count(path, "beta") == 0


def test_read_only_node_writing_is_refused_and_nothing_stored(
    relay_db: tuple[Path, Tokens],
) -> None:
    path, tok = relay_db

    async def body(server: RelayServer) -> None:
        ro, opened = await Client.opened(server.url, "acme", "RO", tok.ro)
        assert opened.read_only
        # ClientSession refuses locally; a hostile client sends the frame anyway.
        frame = encode_message(
            Update("customers", Writer().put("x", 1), 1), max_frame=ro.session.limits.max_frame
        )
        await ro.ws.send(frame)
        err = await ro.error()
        assert err.code == codes.READ_ONLY

    run(with_server(path, body))
    assert update_count(path, "acme") == 0
    assert stored_keys(path, "acme", "customers") == {}


# -- updates, acks, fan-out ----------------------------------------------------------


def test_ack_comes_after_the_update_is_in_the_store(relay_db: tuple[Path, Tokens]) -> None:
    path, tok = relay_db

    async def body(server: RelayServer) -> None:
        a1, _ = await Client.opened(server.url, "acme", "A1", tok.a1)
        w = Writer()
        for i in range(20):
            await a1.put("customers", w.put(f"c{i}", i), ref=i)
            await a1.acked(i)
            # Read by another store instance while the server still runs.
            assert stored_keys(path, "acme", "customers")[f"c{i}"] == i
        await a1.close()

    server = run(with_server(path, body))
    assert server.metrics.updates_in["stored"] == 20
    assert server.metrics.batches_committed >= 1


def test_fan_out_reaches_the_dataset_only_and_never_the_sender(
    relay_db: tuple[Path, Tokens],
) -> None:
    path, tok = relay_db

    async def body(server: RelayServer) -> None:
        a1, _ = await Client.opened(server.url, "acme", "A1", tok.a1)
        a2, _ = await Client.opened(server.url, "acme", "A2", tok.a2)
        ro, _ = await Client.opened(server.url, "acme", "RO", tok.ro)
        b1, _ = await Client.opened(server.url, "beta", "B1", tok.b1)
        w = Writer()
        update = w.put("c1", "Ada")
        await a1.put("customers", update, ref=7)
        await a1.acked(7)
        for peer in (a2, ro):
            got = await peer.wait(UpdateReceived)
            assert got.doc == "customers" and got.data == update and got.ref is None
        # A fan-out to b1 or a1 would have been queued before a1's ack was
        # sent; a later round trip on each proves none came.
        assert await b1.round_trip("customers") == EMPTY_UPDATE
        await a1.round_trip("customers")
        for lonely in (a1, b1):
            assert not [e for e in lonely.events if isinstance(e, UpdateReceived)]
        for c in (a1, a2, ro, b1):
            await c.close()

    server = run(with_server(path, body))
    assert server.metrics.updates_fanned_out == 2


def test_fan_out_to_a_subscriber_arrives_batched_complete_and_in_order(
    relay_db: tuple[Path, Tokens],
) -> None:
    path, tok = relay_db
    n = 200

    async def body(server: RelayServer) -> None:
        a1, _ = await Client.opened(server.url, "acme", "A1", tok.a1)
        a2, _ = await Client.opened(server.url, "acme", "A2", tok.a2)
        w = Writer()
        updates = [w.put(f"c{i}", i) for i in range(n)]
        # One batch frame up: the relay commits the updates together.
        a1.session.send_updates([("customers", u, i + 1) for i, u in enumerate(updates)])
        sent = a1.session.data_to_send()
        assert len(sent) == 1
        await a1.ws.send(sent[0])
        await a1.acked(*range(1, n + 1))
        got: list[bytes] = []
        frames = 0
        while len(got) < n:
            message = await asyncio.wait_for(a2.ws.recv(), TIMEOUT)
            assert isinstance(message, bytes)
            msg = decode_message(message, max_frame=a2.session.limits.max_frame)
            if isinstance(msg, Updates | Update):
                frames += 1
            for event in a2.session.receive_frame(message):
                if isinstance(event, UpdateReceived):
                    assert event.doc == "customers" and event.ref is None
                    got.append(event.data)
        assert got == updates  # complete, in the sender's order
        assert frames < n / 10  # several updates per frame
        # Never to the sender: a later round trip proves none was queued to a1.
        await a1.round_trip("customers")
        assert not [e for e in a1.events if isinstance(e, UpdateReceived)]
        for c in (a1, a2):
            await c.close()

    server = run(with_server(path, body))
    assert server.metrics.updates_fanned_out == n
    assert server.metrics.frames_out < 2 * n / 10 + 20


def test_fan_out_skips_only_an_update_over_a_subscribers_limits(
    relay_db: tuple[Path, Tokens], caplog: pytest.LogCaptureFixture
) -> None:
    path, tok = relay_db
    small = Limits(max_frame=MIN_FRAME_BYTES, max_transfer=MIN_FRAME_BYTES)

    async def body(server: RelayServer) -> None:
        a1, _ = await Client.opened(server.url, "acme", "A1", tok.a1)
        ws = await connect(server.url, max_size=None, compression=None, open_timeout=TIMEOUT)
        a2 = Client(ws, ClientSession(dataset="acme", node="A2", token=tok.a2, limits=small))
        await a2.flush()
        await a2.wait(Opened)
        w = Writer()
        first, big, last = w.put("c1", 1), w.put("c2", "x" * 2 * MIN_FRAME_BYTES), w.put("c3", 3)
        a1.session.send_updates([("customers", first, 1), ("customers", big, 2)])
        a1.session.send_updates([("customers", last, 3)])
        await a1.flush()
        await a1.acked(1, 2, 3)
        got = [(await a2.wait(UpdateReceived)).data for _ in range(2)]
        assert got == [first, last]  # the one a2 cannot take is left out, the rest arrive
        for c in (a1, a2):
            await c.close()

    run(with_server(path, body))
    assert "cannot fan out 'customers'" in caplog.text


def _open_session(hub: RelayHub, name: str, limits: Limits) -> tuple[ClientSession, int]:
    """A client admitted by ``hub`` (no store: the hello is answered by hand)."""
    client = ClientSession(dataset="acme", node=name, token="t", limits=limits)
    cid = hub.connect(0)
    calls = [c for frame in client.data_to_send() for c in hub.receive(cid, frame, 0)]
    (hello,) = calls
    hub.answer(hello, HelloAnswer(NodeGrant("acme", name, False), ()))
    for frame in hub.data_to_send(cid):
        client.receive_frame(frame)
    return client, cid


@pytest.mark.parametrize("run", [40, 3])  # long runs share frames; short ones are packed per peer
def test_fan_out_batch_encodes_once_and_gives_each_peer_the_others_updates_in_order(
    run: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[EncodedUpdates] = []

    def encode_counted(updates: list[tuple[str, bytes]], *, max_frame: int) -> EncodedUpdates:
        made.append(encode_updates(updates, max_frame=max_frame))
        return made[-1]

    monkeypatch.setattr(hub_module, "encode_updates", encode_counted)
    hub = RelayHub()
    small = Limits(max_frame=MIN_FRAME_BYTES)
    pairs = [
        _open_session(hub, f"N{i}", limits)
        for i, limits in enumerate((Limits(), Limits(), Limits(), small))
    ]
    # The core only queues into the sessions: no socket, no store.
    conns = [hub._conns[cid] for _, cid in pairs]
    a, b = conns[:2]  # the senders; conns[2:] only subscribe
    w = Writer()
    senders = [a, b, a, b] * 3
    stored = [
        _Pending(sender, "acme", f"N{sender.id}", "customers", w.put(f"k{k}-{i}", i), i)
        for k, sender in enumerate(senders)
        for i in range(run)
    ]
    queued = hub.fan_out(stored, conns)
    frames = [hub.data_to_send(c.id) for c in conns]
    for (client, _), conn, got in zip(pairs, conns, frames, strict=True):
        events = [e for f in got for e in client.receive_frame(f)]
        expected = [p.data for p in stored if p.conn is not conn]
        assert [e.data for e in events if isinstance(e, UpdateReceived)] == expected
    assert queued == 2 * len(stored) + 2 * (len(stored) // 2)
    # Encoded once: with long runs each run once, and every peer gets the
    # runs of the others as the very same bytes objects; with short runs
    # the whole batch once for the subscriber that sent nothing, and the
    # senders get their share packed for them. The peer with a smaller
    # max_frame always gets frames packed for it.
    once = {id(f) for encoded in made for f in encoded.frames}
    assert frames[2] and all(id(f) in once for f in frames[2])
    assert len(frames[2]) <= len(stored) / 10
    assert not any(id(f) in once for f in frames[3])
    if run >= 16:
        assert len(made) == len(senders)
        assert all(id(f) in once for f in frames[0] + frames[1])
    else:
        assert len(made) == 1 and len(frames[2]) == 1
        assert not any(id(f) in once for f in frames[0] + frames[1])


def test_duplicate_update_is_acked_but_stored_once(relay_db: tuple[Path, Tokens]) -> None:
    path, tok = relay_db

    async def body(server: RelayServer) -> None:
        a1, _ = await Client.opened(server.url, "acme", "A1", tok.a1)
        a2, _ = await Client.opened(server.url, "acme", "A2", tok.a2)
        update = Writer().put("c1", "Ada")
        await a1.put("customers", update, ref=1)
        await a1.put("customers", update, ref=2)
        await a1.acked(1, 2)
        await a2.put("customers", update, ref=1)  # another node re-delivers it
        await a2.acked(1)
        await a1.close()
        await a2.close()

    server = run(with_server(path, body))
    assert update_count(path, "acme") == 1
    assert server.metrics.updates_in["stored"] == 1
    assert server.metrics.updates_in["duplicate"] == 2
    assert server.metrics.updates_fanned_out == 1  # the stored one, to A2


def test_revoked_while_connected_gets_auth_failed_and_nothing_stored(
    relay_db: tuple[Path, Tokens],
) -> None:
    path, tok = relay_db

    async def body(server: RelayServer) -> None:
        a2, _ = await Client.opened(server.url, "acme", "A2", tok.a2)
        await asyncio.to_thread(_revoke, path, "acme", "A2")
        await a2.put("customers", Writer().put("x", 1), ref=1)
        err = await a2.error()
        assert err.code == codes.AUTH_FAILED and "revoked" in err.message

    run(with_server(path, body))
    assert update_count(path, "acme") == 0


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BRANCHLINE, "relay", *args], capture_output=True, text=True, check=True, timeout=60
    )


@pytest.mark.parametrize("command", ["revoke", "enroll"])
def test_cli_revoke_or_reenroll_closes_the_open_connection_within_a_second(
    relay_db: tuple[Path, Tokens], command: str
) -> None:
    """``branchline relay revoke`` (another process, same store file) ends a
    connection that is open and idle, not just its next write; so does
    enrolling the node again (its old token no longer works)."""
    path, tok = relay_db

    async def body(server: RelayServer) -> None:
        a1, _ = await Client.opened(server.url, "acme", "A1", tok.a1)
        a2, _ = await Client.opened(server.url, "acme", "A2", tok.a2)
        await asyncio.to_thread(_cli, command, str(path), "acme", "A2")
        done = asyncio.get_running_loop().time()
        err = await a2.error()  # A2 sends nothing: the relay notices on its own
        took = asyncio.get_running_loop().time() - done
        assert err.code == codes.AUTH_FAILED
        assert ("revoked" if command == "revoke" else "enrolled again") in err.message
        assert took < 1.5  # polled every 0.5 s
        # Nothing more reaches A2 (closed); A1 goes on and its writes are stored.
        update = Writer().put("after", 1)
        await a1.put("customers", update, ref=1)
        await a1.acked(1)
        assert not [e for e in a2.events if isinstance(e, UpdateReceived)]
        await a1.close()

    server = run(with_server(path, body))
    assert server.metrics.protocol_errors[codes.AUTH_FAILED] == 1
    assert server.metrics.updates_fanned_out == 0  # A2 was gone before A1 wrote
    assert stored_keys(path, "acme", "customers") == {"after": 1}


def test_locked_period_refuses_its_updates_and_the_connection_goes_on(
    relay_db: tuple[Path, Tokens],
) -> None:
    """A period locked with the CLI while the relay serves: live, chunked and
    sync-upload updates of its document are refused (``refused`` frame naming
    document and period), nothing is stored or fanned out, the same
    connection keeps carrying other documents, and downloads still work."""
    path, tok = relay_db
    small = Limits(max_frame=MIN_FRAME_BYTES)
    locked = "journal/2026-11"

    async def body(server: RelayServer) -> None:
        ws = await connect(server.url, max_size=None, compression=None, open_timeout=TIMEOUT)
        a1 = Client(ws, ClientSession(dataset="acme", node="A1", token=tok.a1, limits=small))
        await a1.flush()
        await a1.wait(Opened)
        a2, _ = await Client.opened(server.url, "acme", "A2", tok.a2)
        w, j = Writer(), Writer()
        before = j.put("j0", "kept")
        await a1.put(locked, before, ref=1)
        await a1.acked(1)
        await a2.wait(UpdateReceived)
        await asyncio.to_thread(_cli, "lock", str(path), "acme", "2026")
        # Live: a batch mixing both documents, then one too big for a frame (chunked).
        c1, j1, c2 = w.put("c1", 1), j.put("j1", 1), w.put("c2", 2)
        a1.session.send_updates([("customers", c1, 2), (locked, j1, 3), ("customers", c2, 4)])
        a1.session.send_update(locked, j.put("j2", "x" * 2 * MIN_FRAME_BYTES), 5)
        await a1.flush()
        await a1.acked(2, 4)
        refused = [await a1.wait(UpdateRefused) for _ in range(2)]
        assert sorted(r for e in refused for r in e.refs) == [3, 5]
        for event in refused:
            assert event.doc == locked and event.code == codes.LOCKED_PERIOD
            assert repr(locked) in event.message and "'2026'" in event.message
        # A sync upload of the locked document is refused too; the pass completes.
        a1.session.start_sync([(locked, EMPTY_STATE_VECTOR)])
        await a1.flush()
        await a1.wait(RemoteState)
        a1.session.answer_state(locked, [(6, j.doc.get_update())])
        await a1.flush()
        assert (await a1.wait(UpdateRefused)).refs == (6,)
        await a1.wait(SyncComplete)
        # The connection goes on: another document is stored and fanned out.
        c3 = w.put("c3", 3)
        await a1.put("customers", c3, ref=7)
        await a1.acked(7)
        # Downloads of the locked document work; A2 got only the unlocked updates.
        assert keys_of(await a2.round_trip(locked)) == {"j0": "kept"}
        got = [e.data for e in a2.events if isinstance(e, UpdateReceived)]
        assert got == [before, c1, c2, c3]
        for c in (a1, a2):
            await c.close()

    server = run(with_server(path, body))
    assert stored_keys(path, "acme", locked) == {"j0": "kept"}
    assert server.metrics.updates_refused[codes.LOCKED_PERIOD] == 3
    assert not server.metrics.protocol_errors  # no error frame: nobody was cut off


def _revoke(path: Path, dataset: str, node: str) -> None:
    with SqliteRelayStore.open(path) as store:
        store.revoke(dataset, node)


# -- robustness ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x00\x00", codes.BAD_FRAME),
        (b"\x00\x00\x00\x02{}", codes.BAD_FRAME),
        (b"\xff" * 64, codes.FRAME_TOO_LARGE),
        (b"\x00" * ((1 << 20) + 100), codes.FRAME_TOO_LARGE),
        ("text frame", codes.BAD_FRAME),
    ],
    ids=["short", "no-type", "huge-header-length", "over-max-frame", "text"],
)
def test_bad_frame_closes_only_its_connection(
    relay_db: tuple[Path, Tokens], frame: bytes | str, code: str
) -> None:
    path, tok = relay_db

    async def body(server: RelayServer) -> None:
        good, _ = await Client.opened(server.url, "acme", "A1", tok.a1)
        for opened in (False, True):  # before and after the handshake
            bad = (
                (await Client.opened(server.url, "acme", "A2", tok.a2))[0]
                if opened
                else await Client.connect(server.url, "acme", "A2", tok.a2)
            )
            await bad.ws.send(frame)
            # Before the handshake the hello already went: the relay may
            # welcome first, then see the bad frame.
            err = await bad.error()
            assert err.code == code
        w = Writer()
        await good.put("customers", w.put("still", "ok"), ref=1)
        await good.acked(1)
        await good.close()

    run(with_server(path, body))
    assert stored_keys(path, "acme", "customers") == {"still": "ok"}


def test_frame_beyond_twice_the_limit_is_cut_by_websockets(relay_db: tuple[Path, Tokens]) -> None:
    path, tok = relay_db

    async def body(server: RelayServer) -> None:
        good, _ = await Client.opened(server.url, "acme", "A1", tok.a1)
        bad, _ = await Client.opened(server.url, "acme", "A2", tok.a2)
        await bad.ws.send(b"\x00" * (3 << 20))
        await bad.closed()
        assert bad.ws.close_code == 1009  # message too big
        await good.put("customers", Writer().put("k", 1), ref=1)
        await good.acked(1)
        await good.close()

    run(with_server(path, body))


def test_abrupt_disconnects_do_not_disturb_others(relay_db: tuple[Path, Tokens]) -> None:
    path, tok = relay_db

    async def body(server: RelayServer) -> None:
        good, _ = await Client.opened(server.url, "acme", "A1", tok.a1)
        w = Writer()
        for i in range(5):
            gone, _ = await Client.opened(server.url, "acme", "A2", tok.a2)
            await gone.put("customers", Writer().put(f"gone{i}", i), ref=1)
            gone.ws.transport.abort()  # no close frame, maybe before the ack
            await good.put("customers", w.put(f"k{i}", i), ref=i)
            await good.acked(i)
        await good.close()

    run(with_server(path, body))
    keys = stored_keys(path, "acme", "customers")
    assert all(keys[f"k{i}"] == i for i in range(5))


def test_rate_limit_ends_the_connection(relay_db: tuple[Path, Tokens]) -> None:
    path, tok = relay_db
    frozen = 1_000  # the clock never moves: the bucket never refills

    async def body(server: RelayServer) -> None:
        good, _ = await Client.opened(server.url, "acme", "A1", tok.a1)
        noisy, _ = await Client.opened(server.url, "acme", "A2", tok.a2)
        w = Writer()
        for i in range(10):
            noisy.session.send_update("customers", w.put(f"n{i}", i), i)
        await noisy.flush()
        err = await noisy.error()
        assert err.code == codes.RATE_LIMITED
        await good.put("customers", Writer().put("ok", 1), ref=1)
        await good.acked(1)
        await good.close()

    run(
        with_server(
            path,
            body,
            now_ms=lambda: frozen,
            limits=ServerLimits(rate_frames_per_s=1, rate_burst=6),
        )
    )


def test_slow_consumer_is_dropped_not_buffered(relay_db: tuple[Path, Tokens]) -> None:
    path, tok = relay_db

    async def body(server: RelayServer) -> None:
        writer, _ = await Client.opened(server.url, "acme", "A1", tok.a1)
        sleeper, _ = await Client.opened(server.url, "acme", "A2", tok.a2)
        # The sleeper never reads: its socket buffers fill, then its send queue.
        w = Writer()
        blob = "x" * (256 << 10)
        for i in range(60):
            await writer.put("customers", w.put(f"k{i}", f"{i}{blob}"), ref=i)
            await writer.acked(i)
            if server.metrics.slow_consumers_dropped:
                break
        assert server.metrics.slow_consumers_dropped == 1
        await sleeper.closed()
        await writer.close()

    run(with_server(path, body, limits=ServerLimits(send_queue_frames=8)))


def test_silent_peer_is_dropped_after_three_heartbeats(relay_db: tuple[Path, Tokens]) -> None:
    path, tok = relay_db

    async def body(server: RelayServer) -> None:
        good, _ = await Client.opened(server.url, "acme", "A1", tok.a1)
        mute = await Client.connect(server.url, "acme", "A2", tok.a2)
        # The mute client never reads again, so never answers the relay's
        # pings; the good one keeps talking (and answers pings) meanwhile.
        gone = asyncio.create_task(mute.ws.wait_closed())
        while not gone.done():
            await good.round_trip("customers")
        await good.put("customers", Writer().put("k", 1), ref=1)
        await good.acked(1)
        assert server.connections == 1
        await good.close()

    run(with_server(path, body, limits=ServerLimits(heartbeat_ms=100, tick_ms=20)))


# -- leases -----------------------------------------------------------------------------


def test_lease_round_trip_never_repeats_numbers(relay_db: tuple[Path, Tokens]) -> None:
    path, tok = relay_db

    async def body(server: RelayServer) -> None:
        a1, _ = await Client.opened(server.url, "acme", "A1", tok.a1)
        a2, _ = await Client.opened(server.url, "acme", "A2", tok.a2)
        a1.session.request_lease("SI/2025", 10, ref=1)
        await a1.flush()
        g1 = await a1.wait(LeaseGranted)
        a2.session.request_lease("SI/2025", 5, ref=1)
        await a2.flush()
        g2 = await a2.wait(LeaseGranted)
        assert (g1.series, g1.first, g1.last) == ("SI/2025", 1, 10)
        assert (g2.first, g2.last) == (11, 15)
        await a1.close()
        await a2.close()

    run(with_server(path, body))
    run(with_server(path, _lease_after_restart(tok)))


def _lease_after_restart(tok: Tokens) -> Callable[[RelayServer], Awaitable[None]]:
    async def body(server: RelayServer) -> None:
        a1, _ = await Client.opened(server.url, "acme", "A1", tok.a1)
        a1.session.request_lease("SI/2025", 1, ref=9)
        await a1.flush()
        g = await a1.wait(LeaseGranted)
        assert (g.first, g.last) == (16, 16)
        await a1.close()

    return body


# -- HTTP endpoints -----------------------------------------------------------------------


def test_healthz_and_metrics(relay_db: tuple[Path, Tokens]) -> None:
    path, tok = relay_db

    async def body(server: RelayServer) -> None:
        base = f"http://127.0.0.1:{server.port}"
        status, _, text = await asyncio.to_thread(http_get, base + "/healthz")
        assert (status, text) == (200, "ok\n")
        a1, _ = await Client.opened(server.url, "acme", "A1", tok.a1)
        a2, _ = await Client.opened(server.url, "acme", "A2", tok.a2)
        await a1.put("customers", Writer().put("k", 1), ref=1)
        await a1.acked(1)
        await a2.wait(UpdateReceived)
        status, ctype, text = await asyncio.to_thread(http_get, base + "/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
        assert float(lines["branchline_relay_connections_open"]) == 2
        assert float(lines["branchline_relay_connections_total"]) == 2
        assert float(lines['branchline_relay_updates_in_total{result="stored"}']) == 1
        assert float(lines['branchline_relay_updates_in_total{result="duplicate"}']) == 0
        assert float(lines["branchline_relay_updates_fanned_out_total"]) == 1
        assert float(lines["branchline_relay_datasets_connected"]) == 1
        assert float(lines["branchline_relay_commit_seconds_count"]) == 1
        assert float(lines["branchline_relay_bytes_in_total"]) > 0
        assert float(lines["branchline_relay_documents_in_memory"]) >= 1
        for token in (tok.a1, tok.a2):
            assert token not in text
        await a1.close()
        await a2.close()

    run(with_server(path, body))


def test_healthz_reports_a_dead_store(relay_db: tuple[Path, Tokens]) -> None:
    path, _ = relay_db

    async def body(server: RelayServer) -> None:
        server.store.close()
        status, _, text = await asyncio.to_thread(
            http_get, f"http://127.0.0.1:{server.port}/healthz"
        )
        assert status == 503 and text.startswith("store unavailable")

    run(with_server(path, body))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(relay_db: tuple[Path, Tokens], tmp_path: Path) -> None:
    path, tok = relay_db
    cert, key = tmp_path / "relay.crt", tmp_path / "relay.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(cert))

    async def body(server: RelayServer) -> None:
        assert server.url.startswith("wss://")
        a1, _ = await Client.opened(server.url, "acme", "A1", tok.a1, client_tls)
        await a1.put("customers", Writer().put("k", 1), ref=1)
        await a1.acked(1)
        await a1.close()

    run(with_server(path, body, ssl_context=server_tls))
    assert stored_keys(path, "acme", "customers") == {"k": 1}


# -- shutdown -------------------------------------------------------------------------------


def test_stop_acks_what_was_received_then_says_unavailable(
    relay_db: tuple[Path, Tokens],
) -> None:
    path, tok = relay_db
    acked: set[int] = set()

    async def main() -> None:
        store = SqliteRelayStore.open(path)
        server = RelayServer(store, port=0)
        await server.start()
        a1, _ = await Client.opened(server.url, "acme", "A1", tok.a1)
        w = Writer()
        for i in range(50):
            a1.session.send_update("customers", w.put(f"k{i}", i), i)
        await a1.flush()
        await a1.acked(0)
        stopping = asyncio.create_task(server.stop())
        err = await a1.wait(ErrorReceived)
        assert err.code == codes.UNAVAILABLE
        await stopping
        store.close()
        acked.update(r for e in a1.events if isinstance(e, Acked) for r in e.refs)
        assert a1.ws.close_code in (1000, 1001)

    run(main())
    keys = stored_keys(path, "acme", "customers")
    assert acked and all(keys[f"k{r}"] == r for r in acked)


# -- the CLI, killed mid-stream ---------------------------------------------------------------


def _start_cli(path: Path | str, port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [BRANCHLINE, "relay", "serve", str(path), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert f"ws://127.0.0.1:{port}/" in line, (line, proc.stderr.read() if proc.stderr else "")
    return proc


async def stream_then_kill(client: Client, proc: subprocess.Popen[str], acked: set[int]) -> None:
    """Stream updates ``k<ref>`` = ref of customers through ``client``; once
    300 are acknowledged (more sent), SIGKILL ``proc`` (its relay) and read
    acks until the connection drops. ``acked`` gets every ref acknowledged."""
    w = Writer()
    sent = 0
    while len(acked) < 300:
        while sent < 2000 and client.session.inflight_room > 0 and sent - len(acked) < 200:
            client.session.send_update("customers", w.put(f"k{sent}", sent), sent)
            sent += 1
        await client.flush()
        acked.update((await client.wait(Acked)).refs)
    proc.send_signal(signal.SIGKILL)  # mid-stream: more sent than acked
    with pytest.raises(ConnectionClosed):
        while True:
            acked.update((await client.wait(Acked)).refs)


def test_cli_serve_killed_mid_stream_keeps_everything_acked(
    relay_db: tuple[Path, Tokens],
) -> None:
    path, tok = relay_db
    port = _free_port()
    proc = _start_cli(path, port)
    url = f"ws://127.0.0.1:{port}/"
    acked: set[int] = set()
    try:

        async def stream() -> None:
            a1, _ = await Client.opened(url, "acme", "A1", tok.a1)
            await stream_then_kill(a1, proc, acked)

        run(stream())
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    proc = _start_cli(path, port)
    try:

        async def check() -> None:
            a2, opened = await Client.opened(url, "acme", "A2", tok.a2)
            assert "customers" in opened.documents
            keys = keys_of(await a2.round_trip("customers"))
            missing = [r for r in acked if keys.get(f"k{r}") != r]
            assert not missing, f"{len(missing)} acknowledged updates lost"
            await a2.close()

        run(check())
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert "relay stopped" in out
    for token in (tok.a1, tok.a2):
        assert token not in out and token not in err


def test_cli_serve_missing_store_is_one_error_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [BRANCHLINE, "relay", "serve", str(tmp_path / "nope.db")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr


def test_cli_serve_tls_needs_cert_and_key(relay_db: tuple[Path, Tokens], tmp_path: Path) -> None:
    path, _ = relay_db
    cert = tmp_path / "c.pem"
    cert.write_text("not a certificate")
    for extra in (["--tls-cert", str(cert)], ["--tls-cert", str(cert), "--tls-key", str(cert)]):
        done = subprocess.run(
            [BRANCHLINE, "relay", "serve", str(path), "--port", "0", *extra],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
