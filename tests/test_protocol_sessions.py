"""Client and relay sessions driven against each other through an in-memory
link (no sockets, no asyncio): handshake, versions, auth failures, every error
frame, sync of real Nodes both ways, chunking, acks, duplicates, out-of-order
chunks, heartbeats and leases."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.clock import ManualClock
from engine.errors import LocalProtocolError, PeerRejected, RemoteProtocolError
from engine.node import EMPTY_UPDATE, Node
from engine.protocol import (
    EMPTY_STATE_VECTOR,
    Acked,
    ClientSession,
    DiffReceived,
    ErrorReceived,
    Event,
    HeartbeatTimeout,
    HelloReceived,
    LeaseDenied,
    LeaseGranted,
    LeaseRequested,
    Limits,
    Opened,
    RelaySession,
    RemoteState,
    SessionState,
    SyncComplete,
    SyncRequested,
    UpdateReceived,
    UpdateRefused,
    codes,
    decode_message,
    encode_updates,
)
from engine.protocol import messages as m
from engine.protocol.limits import MAX_BATCH_ITEMS, MIN_FRAME_BYTES

DIFF_REF_BASE = 1 << 40  # refs of state-diff uploads; outbox seqs stay below


def make_node(tmp: Path, name: str, dataset: str = "acme", seed: int = 0) -> Node:
    return Node.create(
        tmp / name,
        dataset=dataset,
        node=name,
        clock=ManualClock(1_767_225_600_000 + seed),
        rng=random.Random(seed),
    )


class Relay:
    """A test relay driver: tokens in a dict, a Node as its CRDT store."""

    def __init__(self, tmp: Path, auto_ack: bool = True) -> None:
        self.store = make_node(tmp, "relay", seed=99)
        self.tokens: dict[tuple[str, str], tuple[str, bool]] = {}
        self.sessions: list[RelaySession] = []
        self.auto_ack = auto_ack
        self.unacked: list[tuple[RelaySession, int]] = []
        self.stored = 0
        self.received = 0
        self.events: list[Event] = []
        self.next_block = 1

    def enroll(self, dataset: str, node: str, token: str, read_only: bool = False) -> None:
        self.tokens[(dataset, node)] = (token, read_only)

    def handle(self, session: RelaySession, events: list[Event]) -> None:
        for ev in events:
            self.events.append(ev)
            if isinstance(ev, HelloReceived):
                if ev.dataset != self.store.dataset:
                    session.reject(codes.WRONG_DATASET, f"relay serves {self.store.dataset!r}")
                    continue
                entry = self.tokens.get((ev.dataset, ev.node))
                if entry is None or entry[0] != ev.token:
                    session.reject(codes.AUTH_FAILED, f"token of node {ev.node!r} is not valid")
                    continue
                session.accept(read_only=entry[1], documents=self.store.documents())
            elif isinstance(ev, SyncRequested):
                sv = self.store.state().get(ev.doc, EMPTY_STATE_VECTOR)
                diff = self.store.export_updates({ev.doc: ev.state_vector}).get(ev.doc, b"")
                session.sync_reply(ev.doc, diff, sv)
            elif isinstance(ev, UpdateReceived):
                assert ev.ref is not None
                report = self.store.import_updates({ev.doc: ev.data})
                self.stored += report.stored
                self.received += 1
                for other in self.sessions:
                    if other is not session and other.state is SessionState.OPEN:
                        other.send_update(ev.doc, ev.data)
                if self.auto_ack:
                    session.ack([ev.ref])
                else:
                    self.unacked.append((session, ev.ref))
            elif isinstance(ev, LeaseRequested):
                if ev.series != "sales_invoice":
                    session.deny_lease(ev.ref, f"no blocks series {ev.series!r}")
                else:
                    first = self.next_block
                    self.next_block += ev.count
                    session.grant_lease(ev.ref, first, first + ev.count - 1)

    def ack_all(self) -> None:
        for session, ref in self.unacked:
            session.ack([ref])
        self.unacked.clear()


class Client:
    """A test client driver over a real Node, following docs/protocol.md §6."""

    def __init__(self, node: Node, token: str, **kwargs: Any) -> None:
        self.node = node
        self.session = ClientSession(
            dataset=kwargs.pop("dataset", node.dataset), node=node.node_id, token=token, **kwargs
        )
        self.events: list[Event] = []
        self.ref_seqs: dict[int, list[int]] = {}
        self.next_diff_ref = DIFF_REF_BASE
        self.sent_seqs: set[int] = set()

    def upload_order(self, relay_docs: tuple[str, ...]) -> list[tuple[str, bytes]]:
        rank = {c.name: i for i, c in enumerate(self.node.schema.ordered())}
        states = self.node.state()
        docs = set(states) | set(relay_docs)
        # Catalogs before vouchers, then priority; the current period first.
        ordered = sorted(docs, key=lambda d: d.partition("/")[2], reverse=True)
        ordered.sort(key=lambda d: rank[d.partition("/")[0]])
        return [(d, states.get(d, EMPTY_STATE_VECTOR)) for d in ordered]

    def handle(self, events: list[Event]) -> None:
        for ev in events:
            self.events.append(ev)
            if isinstance(ev, Opened):
                self.session.start_sync(self.upload_order(ev.documents))
            elif isinstance(ev, DiffReceived | UpdateReceived):
                if ev.data not in (b"", EMPTY_UPDATE):
                    self.node.import_updates({ev.doc: ev.data})
            elif isinstance(ev, RemoteState):
                seqs = [s for s, d, _ in self.node.outbox() if d == ev.doc]
                diff = self.node.export_updates({ev.doc: ev.state_vector}).get(ev.doc)
                if diff is None or self.session.read_only:
                    self.session.answer_state(ev.doc, [])
                    if diff is None:
                        self.node.ack(seqs)  # the relay already holds all of it
                else:
                    ref = self.next_diff_ref
                    self.next_diff_ref += 1
                    self.ref_seqs[ref] = seqs
                    self.session.answer_state(ev.doc, [(ref, diff)])
            elif isinstance(ev, Acked):
                for ref in ev.refs:
                    self.node.ack(self.ref_seqs.pop(ref, [ref]))

    def push_outbox(self) -> None:
        """Live mode: send what the outbox holds and was not sent yet."""
        for seq, doc, data in self.node.outbox():
            if seq not in self.sent_seqs:
                self.session.send_update(doc, data, seq)
                self.sent_seqs.add(seq)


class Net:
    """Clients linked to one relay; ``pump`` moves frames until all is quiet."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.links: list[tuple[Client, RelaySession]] = []
        self.wire: list[tuple[str, bytes]] = []  # (direction, frame) log

    def connect(self, client: Client, **relay_kwargs: Any) -> RelaySession:
        rs = RelaySession(**relay_kwargs)
        self.relay.sessions.append(rs)
        self.links.append((client, rs))
        return rs

    def pump(self) -> None:
        for _ in range(100_000):
            moved = False
            for client, rs in self.links:
                for frame in client.session.data_to_send():
                    moved = True
                    self.wire.append(("up", frame))
                    self.relay.handle(rs, deliver(rs, frame))
                for frame in rs.data_to_send():
                    moved = True
                    self.wire.append(("down", frame))
                    client.handle(deliver(client.session, frame))
            if not moved:
                return
        raise AssertionError("the link never went quiet")

    def types(self, direction: str) -> list[str]:
        return [
            m.header_of(decode_message(f, max_frame=1 << 30))["t"]
            for d, f in self.wire
            if d == direction
        ]


def deliver(session: ClientSession | RelaySession, frame: bytes) -> list[Event]:
    """Feed a frame; a RemoteProtocolError leaves the error frame queued."""
    try:
        return session.receive_frame(frame)
    except RemoteProtocolError:
        return []


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    r = Relay(tmp_path)
    r.enroll("acme", "hn", "tok-hn")
    r.enroll("acme", "sg", "tok-sg")
    r.enroll("acme", "audit", "tok-audit", read_only=True)
    yield r
    r.store.close()


def book_day(node: Node, tag: str, customers: int = 3) -> None:
    """Catalog entries and vouchers, as a branch books them offline."""
    node.put("warehouses", {"code": f"KHO-{tag}", "name": f"Kho {tag}"})
    node.put("items", {"code": f"SP-{tag}", "name": "Gạo", "unit": "kg", "price": "12000"})
    for i in range(customers):
        node.put("customers", {"code": f"KH-{tag}-{i:04}", "name": f"Khách {tag} {i}"})
    for day in ("2026-01-05", "2026-02-07"):
        node.post_voucher(
            "sales_invoice",
            {
                "date": day,
                "customer": f"KH-{tag}-0000",
                "warehouse": f"KHO-{tag}",
                "lines": [{"item": f"SP-{tag}", "qty": "2", "price": "12000"}],
            },
        )


def books(node: Node) -> dict[str, Any]:
    return {c.name: sorted(map(repr, node.list(c.name))) for c in node.schema.ordered()}


# -- handshake ------------------------------------------------------------------


def test_handshake_selects_the_highest_common_version_and_merges_limits(
    relay: Relay, tmp_path: Path
) -> None:
    client = Client(
        make_node(tmp_path, "hn"), "tok-hn", versions=(1, 2, 3), limits=Limits(max_inflight=8)
    )
    net = Net(relay)
    rs = net.connect(client, versions=(2, 3, 4), limits=Limits(max_syncs=5), heartbeat_ms=2000)
    net.pump()
    opened = [e for e in client.events if isinstance(e, Opened)]
    assert len(opened) == 1
    assert opened[0].version == 3 and rs.version == 3 and client.session.version == 3
    assert opened[0].limits == Limits(max_inflight=8, max_syncs=5) == rs.limits
    assert opened[0].heartbeat_ms == 2000 and client.session.heartbeat_ms == 2000
    assert client.session.state is SessionState.OPEN and rs.state is SessionState.OPEN
    hello = next(e for e in relay.events if isinstance(e, HelloReceived))
    assert (hello.dataset, hello.node, hello.token, hello.versions) == (
        "acme",
        "hn",
        "tok-hn",
        (1, 2, 3),
    )
    assert net.types("down")[:2] == ["welcome", "docs"]


def test_no_common_version_is_refused_with_unsupported_version(
    relay: Relay, tmp_path: Path
) -> None:
    client = Client(make_node(tmp_path, "hn"), "tok-hn", versions=(7, 8))
    net = Net(relay)
    rs = net.connect(client, versions=(1,))
    net.pump()
    assert client.events == [ErrorReceived(codes.UNSUPPORTED_VERSION, client.events[0].message)]  # type: ignore[union-attr]
    assert "[7, 8]" in client.events[0].message  # type: ignore[union-attr]
    assert not any(isinstance(e, HelloReceived) for e in relay.events)
    assert client.session.state is SessionState.CLOSED and rs.state is SessionState.CLOSED
    assert isinstance(client.session.error, PeerRejected)


@pytest.mark.parametrize(
    ("dataset", "token", "code"),
    [("acme", "wrong-token", codes.AUTH_FAILED), ("globex", "tok-hn", codes.WRONG_DATASET)],
)
def test_auth_failures_end_the_session_before_anything_is_stored(
    relay: Relay, tmp_path: Path, dataset: str, token: str, code: str
) -> None:
    node = make_node(tmp_path, "hn", dataset=dataset)
    book_day(node, "HN")
    client = Client(node, token)
    net = Net(relay)
    rs = net.connect(client)
    net.pump()
    assert [type(e) for e in client.events] == [ErrorReceived]
    assert client.events[0].code == code  # type: ignore[union-attr]
    assert client.session.state is SessionState.CLOSED and rs.state is SessionState.CLOSED
    assert relay.store.documents() == [] and relay.received == 0
    with pytest.raises(LocalProtocolError):
        client.session.start_sync([])


def test_client_refuses_a_relay_of_another_dataset(tmp_path: Path) -> None:
    session = ClientSession(dataset="acme", node="hn", token="t")
    session.data_to_send()
    welcome = m.encode_message(
        m.Welcome(1, "globex", "hn", False, Limits(), 1500), max_frame=1 << 20
    )
    with pytest.raises(RemoteProtocolError) as info:
        session.receive_frame(welcome)
    assert info.value.code == codes.WRONG_DATASET
    assert "'globex'" in info.value.message and "'acme'" in info.value.message
    out = session.data_to_send()
    assert decode_message(out[0], max_frame=1 << 20) == m.Error(
        codes.WRONG_DATASET, info.value.message
    )
    assert session.state is SessionState.CLOSED


def test_handshake_times_out_when_the_relay_never_answers() -> None:
    session = ClientSession(dataset="acme", node="hn", token="t", heartbeat_ms=1000)
    session.data_to_send()
    assert session.tick(0) == []
    assert session.tick(2999) == []
    assert session.tick(3000) == [HeartbeatTimeout(3000)]
    assert session.state is SessionState.CLOSED and session.data_to_send() == []


# -- error frames ------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(codes.CODES))
def test_every_error_code_reaches_the_peer_both_ways(
    relay: Relay, tmp_path: Path, code: str
) -> None:
    client = Client(make_node(tmp_path, "hn"), "tok-hn")
    net = Net(relay)
    rs = net.connect(client)
    net.pump()
    rs.fail(code, f"because {code}")
    assert rs.state is SessionState.CLOSING
    net.pump()
    assert client.events[-1] == ErrorReceived(code, f"because {code}")
    assert client.session.state is SessionState.CLOSED and rs.state is SessionState.CLOSED
    assert isinstance(client.session.error, PeerRejected) and client.session.error.code == code

    other = Client(make_node(tmp_path, "sg"), "tok-sg")
    rs2 = net.connect(other)
    net.pump()
    other.session.fail(code, "client gives up")
    net.pump()
    assert relay.events[-1] == ErrorReceived(code, "client gives up")
    assert rs2.state is SessionState.CLOSED


def opened_pair(**limits: Any) -> tuple[ClientSession, RelaySession]:
    c = ClientSession(dataset="acme", node="hn", token="t", limits=Limits(**limits))
    r = RelaySession(limits=Limits(**limits))
    for f in c.data_to_send():
        r.receive_frame(f)
    r.accept(read_only=False, documents=["customers"])
    for f in r.data_to_send():
        c.receive_frame(f)
    assert c.state is r.state is SessionState.OPEN
    return c, r


def raises_code(session: ClientSession | RelaySession, frame: bytes) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        session.receive_frame(frame)
    assert session.state is SessionState.CLOSING
    sent = session.data_to_send()
    err = decode_message(sent[-1], max_frame=1 << 20)
    assert isinstance(err, m.Error) and err.code == info.value.code
    assert session.state is SessionState.CLOSED
    assert session.receive_frame(frame) == []  # closed sessions ignore frames
    return info.value.code


def enc(msg: m.Message) -> bytes:
    return m.encode_message(msg, max_frame=1 << 30)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x00\x00\x00\x05garbage", codes.BAD_FRAME),
        (enc(m.Update("items", b"x" * (MIN_FRAME_BYTES + 1), ref=1)), codes.FRAME_TOO_LARGE),
        (enc(m.Sync2("items", b"")), codes.PROTOCOL_VIOLATION),  # relay-only frame
        (enc(m.Hello((1,), "acme", "hn", "t")), codes.PROTOCOL_VIOLATION),  # second hello
        (enc(m.Update("items", b"\x00\x00")), codes.PROTOCOL_VIOLATION),  # update without ref
        (enc(m.SyncEnd(1)), codes.PROTOCOL_VIOLATION),  # while a sync1 is pending
        (enc(m.Chunk(5, 1, 3, b"x")), codes.PROTOCOL_VIOLATION),  # no first chunk
    ],
)
def test_relay_refuses_bad_frames_with_codes(frame: bytes, code: str) -> None:
    _c, r = opened_pair(max_frame=MIN_FRAME_BYTES)
    r.receive_frame(enc(m.Sync1("customers", b"\x00")))
    assert raises_code(r, frame) == code


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (enc(m.Ack((42,))), codes.PROTOCOL_VIOLATION),  # never sent
        (enc(m.Synced(1)), codes.PROTOCOL_VIOLATION),  # no pass ended
        (enc(m.Sync2("items", b"")), codes.PROTOCOL_VIOLATION),  # no sync1 sent
        (enc(m.Update("items", b"", ref=3)), codes.PROTOCOL_VIOLATION),  # relay updates have no ref
        (enc(m.LeaseGrant(1, "s", 1, 2)), codes.PROTOCOL_VIOLATION),
        (enc(m.Lease("s", 1, 1)), codes.PROTOCOL_VIOLATION),  # client-only frame
        (enc(m.Welcome(1, "acme", "hn", False, Limits(), 1500)), codes.PROTOCOL_VIOLATION),
    ],
)
def test_client_refuses_bad_frames_with_codes(frame: bytes, code: str) -> None:
    c, _r = opened_pair()
    assert raises_code(c, frame) == code


def test_frames_before_the_handshake_are_violations() -> None:
    r = RelaySession()
    assert raises_code(r, enc(m.Ping())) == codes.PROTOCOL_VIOLATION
    r = RelaySession()
    assert raises_code(r, enc(m.Update("items", b"", ref=1))) == codes.PROTOCOL_VIOLATION
    c = ClientSession(dataset="acme", node="hn", token="t")
    assert raises_code(c, enc(m.Docs((), True))) == codes.PROTOCOL_VIOLATION  # docs before welcome
    with pytest.raises(LocalProtocolError):
        ClientSession(dataset="acme", node="hn", token="t").send_update("items", b"", 1)


def test_in_flight_limits_are_enforced_on_both_sides() -> None:
    c, r = opened_pair(max_inflight=2)
    c.send_update("customers", b"a", 1)
    c.send_update("customers", b"b", 2)
    with pytest.raises(LocalProtocolError) as info:
        c.send_update("customers", b"c", 3)
    assert info.value.code == codes.LIMIT_EXCEEDED and c.inflight_room == 0
    with pytest.raises(LocalProtocolError):
        c.send_update("customers", b"c", 2)  # ref in flight
    for f in c.data_to_send():
        r.receive_frame(f)
    # A client ignoring the limit is cut off.
    assert raises_code(r, enc(m.Update("customers", b"c", ref=3))) == codes.LIMIT_EXCEEDED


# -- read-only -------------------------------------------------------------------


def test_read_only_node_receives_but_cannot_write(relay: Relay, tmp_path: Path) -> None:
    hn = Client(make_node(tmp_path, "hn"), "tok-hn")
    book_day(hn.node, "HN")
    audit_node = make_node(tmp_path, "audit", seed=3)
    audit_node.put("customers", {"code": "KH-AUDIT", "name": "local only"})
    audit = Client(audit_node, "tok-audit")
    net = Net(relay)
    net.connect(hn)
    rs = net.connect(audit)
    net.pump()
    assert audit.session.read_only and rs.read_only
    assert any(isinstance(e, SyncComplete) for e in audit.events)
    assert audit.node.get("customers", "KH-HN-0000") is not None  # received
    assert relay.store.get("customers", "KH-AUDIT") is None  # nothing of its own went up
    with pytest.raises(LocalProtocolError) as info:
        audit.session.send_update("customers", b"\x00\x00", 1)
    assert info.value.code == codes.READ_ONLY
    with pytest.raises(LocalProtocolError):
        audit.session.request_lease("sales_invoice", 10, 1)
    # A client that sends anyway is refused and nothing is emitted or stored.
    before, received = len(relay.events), relay.received
    seq, doc, data = audit.node.outbox()[0]
    relay.handle(rs, deliver(rs, enc(m.Update(doc, data, ref=seq))))
    assert len(relay.events) == before and relay.received == received
    net.pump()
    assert audit.events[-1].code == codes.READ_ONLY  # type: ignore[union-attr]
    assert relay.store.get("customers", "KH-AUDIT") is None


# -- sync ------------------------------------------------------------------------


def test_sync_of_several_documents_both_ways_converges(relay: Relay, tmp_path: Path) -> None:
    hn = Client(make_node(tmp_path, "hn", seed=1), "tok-hn", limits=Limits(max_syncs=2))
    sg = Client(make_node(tmp_path, "sg", seed=2), "tok-sg")
    book_day(hn.node, "HN")
    book_day(sg.node, "SG")
    net = Net(relay)
    net.connect(hn)
    net.pump()
    assert [e for e in hn.events if isinstance(e, SyncComplete)] == [SyncComplete(1)]
    assert hn.session.synced and hn.node.outbox() == []
    # Upload order: catalogs first, vouchers (current period first) last.
    ups = [decode_message(f, max_frame=1 << 30) for d, f in net.wire if d == "up"]
    sync_docs = [x.doc for x in ups if isinstance(x, m.Sync1)]
    assert sync_docs == [
        "customers",
        "items",
        "warehouses",
        "sales_invoice/2026-02",
        "sales_invoice/2026-01",
    ]

    net.connect(sg)
    net.pump()  # sg gets hn's books, the relay gets sg's
    assert sg.session.synced and sg.node.outbox() == []
    hn.session.start_sync(hn.upload_order(()))
    net.pump()  # hn gets sg's books
    assert hn.session.synced
    assert books(hn.node) == books(sg.node) == books(relay.store)
    assert len(hn.node.list("customers")) == 6
    assert len(hn.node.list("sales_invoice")) == 4
    assert "sync_end" in net.types("up") and "synced" in net.types("down")


def test_catch_up_of_documents_the_client_does_not_hold(relay: Relay, tmp_path: Path) -> None:
    hn = Client(make_node(tmp_path, "hn", seed=1), "tok-hn")
    book_day(hn.node, "HN")
    net = Net(relay)
    net.connect(hn)
    net.pump()
    fresh = Client(make_node(tmp_path, "sg", seed=2), "tok-sg")  # holds nothing
    net.connect(fresh)
    net.pump()
    opened = next(e for e in fresh.events if isinstance(e, Opened))
    assert set(opened.documents) == set(relay.store.documents())
    assert books(fresh.node) == books(hn.node)
    assert any(isinstance(e, SyncComplete) for e in fresh.events)


def test_live_updates_are_acked_and_fanned_out(relay: Relay, tmp_path: Path) -> None:
    hn = Client(make_node(tmp_path, "hn", seed=1), "tok-hn")
    sg = Client(make_node(tmp_path, "sg", seed=2), "tok-sg")
    net = Net(relay)
    net.connect(hn)
    net.connect(sg)
    net.pump()
    hn.node.put("customers", {"code": "KH-LIVE", "name": "mới"})
    hn.push_outbox()
    net.pump()
    assert sg.node.get("customers", "KH-LIVE") is not None
    assert next(e for e in sg.events if isinstance(e, UpdateReceived)).ref is None
    assert hn.node.outbox() == [] and hn.session.unacked == {}
    assert any(isinstance(e, Acked) for e in hn.events)
    assert not any(isinstance(e, UpdateReceived) for e in hn.events)  # no echo to the sender


def test_acks_come_only_after_the_driver_commits(tmp_path: Path) -> None:
    relay = Relay(tmp_path, auto_ack=False)
    relay.enroll("acme", "hn", "tok-hn")
    hn = Client(make_node(tmp_path, "hn", seed=1), "tok-hn")
    book_day(hn.node, "HN", customers=1)
    net = Net(relay)
    net.connect(hn)
    net.pump()
    assert relay.unacked and hn.session.unacked  # uploads sent, not acked
    assert not hn.session.synced and not any(isinstance(e, SyncComplete) for e in hn.events)
    assert "synced" not in net.types("down")  # synced waits for the pass's acks
    assert hn.node.outbox() != []
    # The link breaks: a new session resends what was not acked; the relay
    # driver deduplicates, so the second delivery stores nothing.
    stored = relay.stored
    hn.session.close()
    hn2 = Client(hn.node, "tok-hn")
    relay.unacked.clear()
    relay.auto_ack = True
    net2 = Net(relay)
    net2.connect(hn2)
    net2.pump()
    assert hn2.session.synced and hn.node.outbox() == []
    assert relay.stored == stored  # all of it was already there
    assert books(relay.store) == books(hn.node)
    relay.store.close()


def test_duplicate_updates_are_harmless(relay: Relay, tmp_path: Path) -> None:
    hn = Client(make_node(tmp_path, "hn", seed=1), "tok-hn")
    sg = Client(make_node(tmp_path, "sg", seed=2), "tok-sg")
    net = Net(relay)
    net.connect(hn)
    net.connect(sg)
    net.pump()
    hn.node.put("customers", {"code": "KH-DUP", "name": "twice"})
    seq, doc, data = hn.node.outbox()[0]
    hn.session.send_update(doc, data, seq)
    hn.session.send_update(doc, data, seq + 1000)
    net.pump()
    acked = [r for e in hn.events if isinstance(e, Acked) for r in e.refs]
    assert sorted(acked) == [seq, seq + 1000]
    assert relay.received == 2 and relay.stored == 1
    assert len(sg.node.list("customers")) == 1
    assert books(sg.node) == books(hn.node) == books(relay.store)


# -- chunking --------------------------------------------------------------------


def test_diffs_bigger_than_the_frame_limit_are_chunked_both_ways(
    relay: Relay, tmp_path: Path
) -> None:
    small = Limits(max_frame=MIN_FRAME_BYTES)
    hn = Client(make_node(tmp_path, "hn", seed=1), "tok-hn", limits=small)
    sg = Client(make_node(tmp_path, "sg", seed=2), "tok-sg", limits=small)
    book_day(hn.node, "HN", customers=1600)
    size = len(hn.node.export_updates()["customers"])
    assert size > 2 * MIN_FRAME_BYTES
    net = Net(relay)
    net.connect(hn)
    net.pump()
    assert net.types("up").count("chunk") >= 3  # the upload was chunked
    assert all(len(f) <= MIN_FRAME_BYTES for _, f in net.wire)
    net.connect(sg)
    net.pump()
    assert net.types("down").count("chunk") >= 3  # and the download
    assert len(sg.node.list("customers")) == 1600
    assert books(sg.node) == books(hn.node)
    assert sg.session.synced


def chunk_frames(size: int) -> list[bytes]:
    c, _ = opened_pair(max_frame=MIN_FRAME_BYTES)
    c.send_update("customers", bytes(random.Random(1).randbytes(size)), 7)
    frames = c.data_to_send()
    assert all(len(f) <= MIN_FRAME_BYTES for f in frames)
    return frames


def test_chunks_reassemble_in_order() -> None:
    frames = chunk_frames(3 * MIN_FRAME_BYTES)
    assert len(frames) == 4
    _, r = opened_pair(max_frame=MIN_FRAME_BYTES)
    events: list[Event] = []
    for f in frames:
        events += r.receive_frame(f)
    assert events == [
        UpdateReceived("customers", random.Random(1).randbytes(3 * MIN_FRAME_BYTES), 7)
    ]


@pytest.mark.parametrize("order", [[0, 2, 1, 3], [1, 0, 2, 3], [0, 1, 1, 2, 3]])
def test_out_of_order_or_repeated_chunks_are_refused(order: list[int]) -> None:
    frames = chunk_frames(3 * MIN_FRAME_BYTES)
    _, r = opened_pair(max_frame=MIN_FRAME_BYTES)
    with pytest.raises(RemoteProtocolError) as info:
        for i in order:
            r.receive_frame(frames[i])
    assert info.value.code == codes.PROTOCOL_VIOLATION
    assert "order" in info.value.message or "first chunk" in info.value.message


def test_transfer_limits_are_enforced() -> None:
    frames = chunk_frames(3 * MIN_FRAME_BYTES)
    _, r = opened_pair(max_frame=MIN_FRAME_BYTES, max_transfer=2 * MIN_FRAME_BYTES)
    assert raises_code(r, frames[0]) == codes.FRAME_TOO_LARGE
    c, _ = opened_pair(max_frame=MIN_FRAME_BYTES, max_transfer=2 * MIN_FRAME_BYTES)
    with pytest.raises(LocalProtocolError) as info:
        c.send_update("customers", b"x" * 3 * MIN_FRAME_BYTES, 1)
    assert info.value.code == codes.FRAME_TOO_LARGE and c.data_to_send() == []
    # Too many transfers at once.
    _, r = opened_pair(max_frame=MIN_FRAME_BYTES, max_transfers=1)
    first = chunk_frames(2 * MIN_FRAME_BYTES)[0]
    second = enc(m.Chunk(99, 0, 2, b"x", size=2, head=m.Update("items", b"", ref=8)))
    r.receive_frame(first)
    assert raises_code(r, second) == codes.LIMIT_EXCEEDED
    # A transfer whose parts do not add up to the announced size.
    _, r = opened_pair()
    r.receive_frame(enc(m.Chunk(1, 0, 2, b"ab", size=3, head=m.Update("items", b"", ref=8))))
    assert raises_code(r, enc(m.Chunk(1, 1, 2, b"cd"))) == codes.BAD_FRAME


# -- heartbeats --------------------------------------------------------------------


def test_heartbeats_keep_a_live_link_and_detect_a_dead_one() -> None:
    c = ClientSession(dataset="acme", node="hn", token="t", heartbeat_ms=1000)
    r = RelaySession(heartbeat_ms=1000)
    c.tick(0), r.tick(0)
    for f in c.data_to_send():
        r.receive_frame(f)
    r.accept(read_only=False)
    for f in r.data_to_send():
        c.receive_frame(f)
    # Both sides idle: each pings once per interval, the other answers.
    for now in range(250, 10_001, 250):
        assert c.tick(now) == [] and r.tick(now) == []
        for f in c.data_to_send():
            r.receive_frame(f)
        for f in r.data_to_send():
            c.receive_frame(f)
    assert c.state is r.state is SessionState.OPEN
    # The link dies: nothing is delivered any more.
    now = 10_000
    events: list[Event] = []
    while not events:
        now += 250
        events = c.tick(now)
        c.data_to_send()
    # Receptions are dated by the next tick, so detection is within 3
    # intervals plus one tick period of the last frame.
    assert events == [HeartbeatTimeout(3000)] and now - 10_000 <= 3000 + 250
    assert c.state is SessionState.CLOSED and c.error is not None and c.error.code == "timeout"


def test_ping_is_sent_only_when_idle() -> None:
    c, r = opened_pair()
    c.tick(0)
    c.send_update("customers", b"x", 1)
    c.data_to_send()
    c.tick(1000)  # something was sent since the last tick: no ping
    assert c.data_to_send() == []
    c.tick(2500)
    assert [decode_message(f, max_frame=1 << 20) for f in c.data_to_send()] == [m.Ping()]
    r.receive_frame(enc(m.Ping()))
    assert [decode_message(f, max_frame=1 << 20) for f in r.data_to_send()] == [m.Pong()]


# -- leases ------------------------------------------------------------------------


def test_lease_round_trip(relay: Relay, tmp_path: Path) -> None:
    hn = Client(make_node(tmp_path, "hn"), "tok-hn")
    net = Net(relay)
    net.connect(hn)
    net.pump()
    hn.session.request_lease("sales_invoice", 100, 1)
    hn.session.request_lease("sales_invoice", 50, 2)
    hn.session.request_lease("journal", 10, 3)
    with pytest.raises(LocalProtocolError):
        hn.session.request_lease("sales_invoice", 5, 1)  # ref pending
    net.pump()
    granted = [e for e in hn.events if isinstance(e, LeaseGranted)]
    assert granted == [
        LeaseGranted(1, "sales_invoice", 1, 100),
        LeaseGranted(2, "sales_invoice", 101, 150),
    ]
    denied = [e for e in hn.events if isinstance(e, LeaseDenied)]
    assert denied == [LeaseDenied(3, "journal", "no blocks series 'journal'")]
    assert hn.session.state is SessionState.OPEN  # a denial does not end the session


# -- batched updates (`updates` frames) ---------------------------------------------


def frames_of(frames: list[bytes]) -> list[m.Message]:
    return [m.decode_message(f, max_frame=1 << 30) for f in frames]


def test_client_batch_round_trip_keeps_order_refs_and_acks() -> None:
    c, r = opened_pair()
    updates = [
        ("customers" if i % 3 else "items", bytes([i % 256]) * (i % 7), 100 + i) for i in range(300)
    ]
    c.send_updates(updates)
    assert c.inflight_room == c.limits.max_inflight - 300
    assert set(c.unacked) == {ref for _, _, ref in updates}
    frames = c.data_to_send()
    assert len(frames) == 1 and isinstance(frames_of(frames)[0], m.Updates)
    events = [e for f in frames for e in r.receive_frame(f)]
    assert events == [UpdateReceived(doc, data, ref) for doc, data, ref in updates]
    assert r.pending_refs == {ref for _, _, ref in updates}
    r.ack([ref for _, _, ref in updates])
    acks = [e for f in r.data_to_send() for e in c.receive_frame(f)]
    assert acks == [Acked(tuple(ref for _, _, ref in updates))]
    assert c.unacked == {} and c.inflight_room == c.limits.max_inflight


def test_relay_batch_reaches_the_client_as_single_updates_in_order() -> None:
    c, r = opened_pair()
    updates = [("customers", f"u{i}".encode()) for i in range(50)]
    r.send_updates(updates)
    frames = r.data_to_send()
    assert [type(x) for x in frames_of(frames)] == [m.Updates]
    events = [e for f in frames for e in c.receive_frame(f)]
    assert events == [UpdateReceived(doc, data) for doc, data in updates]
    r.send_updates([])  # nothing to send
    assert r.data_to_send() == []


def test_batches_split_at_the_frame_limit_and_big_updates_go_alone() -> None:
    c, r = opened_pair(max_frame=MIN_FRAME_BYTES)
    small, big, huge = b"s" * 1000, b"b" * (MIN_FRAME_BYTES - 200), b"h" * (3 * MIN_FRAME_BYTES)
    updates = [("items", small, 1), ("items", small, 2), ("items", huge, 3)]
    updates += [("items", small, 10 + i) for i in range(150)]  # > one frame of smalls
    updates += [("items", big, 4), ("items", small, 5)]
    c.send_updates(updates)
    frames = c.data_to_send()
    assert all(len(f) <= MIN_FRAME_BYTES for f in frames)
    kinds = [type(x).__name__ for x in frames_of(frames)]
    # 2 smalls batched; the huge one chunked alone; the 150 smalls in 3 batches
    # (64 per frame); the big one alone; a lone small one as a plain update.
    assert kinds[0] == "Updates" and kinds[1:5] == ["Chunk"] * 4
    assert kinds[5:8] == ["Updates"] * 3 and kinds[8:] == ["Update", "Update"]
    events = [e for f in frames for e in r.receive_frame(f)]
    assert events == [UpdateReceived(doc, data, ref) for doc, data, ref in updates]
    # The other way too.
    r.send_updates([(doc, data) for doc, data, _ in updates])
    events = [e for f in r.data_to_send() for e in c.receive_frame(f)]
    assert events == [UpdateReceived(doc, data) for doc, data, _ in updates]


def test_batch_header_stays_under_its_limit_and_the_item_limit() -> None:
    c, r = opened_pair(max_frame=64 << 20, max_inflight=4096)
    long_doc = "d" * 63
    updates = [(long_doc, b"", (1 << 52) + i) for i in range(3000)]
    c.send_updates(updates)
    frames = c.data_to_send()
    msgs = frames_of(frames)
    assert all(isinstance(x, m.Updates) and len(x.items) <= MAX_BATCH_ITEMS for x in msgs)
    assert len(msgs) > 3  # the 32 KiB header bound, not the item count, split these
    events = [e for f in frames for e in r.receive_frame(f)]
    assert [e.ref for e in events if isinstance(e, UpdateReceived)] == [
        ref for _, _, ref in updates
    ]
    # Many tiny items are bounded by MAX_BATCH_ITEMS.
    r.send_updates([("items", b"") for _ in range(2500)])
    msgs = frames_of(r.data_to_send())
    assert [len(x.items) for x in msgs if isinstance(x, m.Updates)] == [1024, 1024, 452]


def test_send_updates_is_all_or_nothing_and_checks_in_flight_room() -> None:
    c, r = opened_pair(max_inflight=4)
    c.send_update("customers", b"a", 1)
    for bad, code in [
        ([("customers", b"x", i) for i in range(2, 6)], codes.LIMIT_EXCEEDED),  # 1 + 4 > 4
        ([("customers", b"x", 2), ("customers", b"y", 2)], codes.PROTOCOL_VIOLATION),
        ([("customers", b"x", 2), ("customers", b"y", 1)], codes.PROTOCOL_VIOLATION),
        ([("customers", b"x", 2), ("Bad Name", b"y", 3)], codes.BAD_FRAME),
        ([("customers", b"x", -1)], codes.BAD_FRAME),
    ]:
        with pytest.raises(LocalProtocolError) as info:
            c.send_updates(bad)
        assert info.value.code == code
        assert set(c.unacked) == {1}
    c.send_updates([("customers", b"b", 2), ("customers", b"c", 3), ("customers", b"d", 4)])
    assert c.inflight_room == 0
    for f in c.data_to_send():
        r.receive_frame(f)
    assert r.pending_refs == {1, 2, 3, 4}
    # Over the transfer limits: nothing queued on either side.
    c2, r2 = opened_pair(max_frame=MIN_FRAME_BYTES, max_transfer=MIN_FRAME_BYTES)
    too_big = b"x" * (MIN_FRAME_BYTES + 1)
    with pytest.raises(LocalProtocolError):
        c2.send_updates([("items", b"ok", 1), ("items", too_big, 2)])
    assert c2.data_to_send() == [] and c2.unacked == {}
    with pytest.raises(LocalProtocolError):
        r2.send_updates([("items", b"ok"), ("items", too_big)])
    assert r2.data_to_send() == []


def updates_frame(items: list[tuple[str, bytes, int | None]]) -> bytes:
    return enc(m.Updates(tuple(m.Update(doc, data, ref) for doc, data, ref in items)))


@pytest.mark.parametrize(
    ("items", "code"),
    [
        ([("items", b"a", 1), ("items", b"b", None)], codes.PROTOCOL_VIOLATION),  # no ref
        ([("items", b"a", 1), ("items", b"b", 1)], codes.PROTOCOL_VIOLATION),  # ref repeated
        ([("items", b"a", i) for i in range(1, 4)], codes.LIMIT_EXCEEDED),  # 3 > max_inflight
    ],
)
def test_relay_refuses_bad_batches_whole(
    items: list[tuple[str, bytes, int | None]], code: str
) -> None:
    _c, r = opened_pair(max_inflight=2)
    assert raises_code(r, updates_frame(items)) == code
    assert r.pending_refs == frozenset()


def test_client_refuses_a_relay_batch_with_refs() -> None:
    c, _r = opened_pair()
    frame = updates_frame([("items", b"a", None), ("items", b"b", 3)])
    assert raises_code(c, frame) == codes.PROTOCOL_VIOLATION


def test_read_only_client_cannot_send_batches_and_relay_refuses_them() -> None:
    c = ClientSession(dataset="acme", node="hn", token="t")
    r = RelaySession()
    for f in c.data_to_send():
        r.receive_frame(f)
    r.accept(read_only=True, documents=[])
    for f in r.data_to_send():
        c.receive_frame(f)
    with pytest.raises(LocalProtocolError) as info:
        c.send_updates([("items", b"a", 1)])
    assert info.value.code == codes.READ_ONLY
    assert raises_code(r, updates_frame([("items", b"a", 1), ("items", b"b", 2)])) == (
        codes.READ_ONLY
    )


@pytest.mark.parametrize(
    "item",
    [
        m.Update("a", b""),
        m.Update("items", b"x" * 9, ref=0),
        m.Update("sales_invoice/2026-01", b"x" * 12345, ref=(1 << 53) - 1),
    ],
)
def test_packing_computes_the_item_header_bytes_exactly(item: m.Update) -> None:
    from engine.protocol.session import _entry_bytes

    encoded = orjson.dumps(m.batch_item(item.doc, len(item.payload), item.ref))
    assert _entry_bytes((item.doc, item.payload, item.ref)) == len(encoded) + 1  # and its comma


# -- fan-out encoded once (encode_updates / send_encoded) ----------------------------


def test_encoded_fan_out_is_what_send_updates_sends_to_every_session() -> None:
    updates = [("customers" if i % 4 else "items", f"u{i}".encode() * (i % 9)) for i in range(700)]
    updates.insert(300, ("items", b"b" * (MIN_FRAME_BYTES - 100)))  # too big to share a frame
    encoded = encode_updates(updates, max_frame=MIN_FRAME_BYTES)
    assert encoded.count == len(updates) and encoded.max_frame == MIN_FRAME_BYTES
    assert encoded.nbytes == sum(len(f) for f in encoded.frames)
    clients = [opened_pair(max_frame=frame) for frame in (MIN_FRAME_BYTES, 1 << 20)]
    for c, r in clients:
        r.send_encoded(encoded)
        frames = r.data_to_send()
        assert frames == list(encoded.frames)  # the same bytes, not copies per session
        assert all(len(f) <= MIN_FRAME_BYTES for f in frames)
        events = [e for f in frames for e in c.receive_frame(f)]
        assert events == [UpdateReceived(doc, data) for doc, data in updates]
    # Exactly the frames send_updates queues for a session with that limit.
    _c, r = clients[0]
    r.send_updates(updates)
    assert r.data_to_send() == list(encoded.frames)


def test_encoded_fan_out_refuses_what_a_session_cannot_take() -> None:
    big = encode_updates([("items", b"x" * 100_000)], max_frame=1 << 20)
    _c, r = opened_pair(max_frame=MIN_FRAME_BYTES)
    with pytest.raises(LocalProtocolError) as info:
        r.send_encoded(big)  # packed for a larger frame limit than this session's
    assert info.value.code == codes.FRAME_TOO_LARGE and r.data_to_send() == []
    with pytest.raises(LocalProtocolError) as info:  # chunks belong to one session
        encode_updates([("items", b"x" * MIN_FRAME_BYTES)], max_frame=MIN_FRAME_BYTES)
    assert info.value.code == codes.FRAME_TOO_LARGE
    for bad in ([("Bad Name", b"x")], [("items", "not bytes")]):
        with pytest.raises(LocalProtocolError) as info:
            encode_updates(bad, max_frame=MIN_FRAME_BYTES)  # type: ignore[arg-type]
        assert info.value.code == codes.BAD_FRAME
    r.fail(codes.UNAVAILABLE, "bye")
    r.data_to_send()
    r.send_encoded(big)  # ignored once closing or closed, like every send
    assert r.data_to_send() == []


# -- refused updates (locked periods) -------------------------------------------------


def test_refused_updates_leave_flight_and_the_session_and_pass_go_on() -> None:
    c, r = opened_pair()
    c.start_sync([("customers", EMPTY_STATE_VECTOR)])
    for f in c.data_to_send():
        r.receive_frame(f)
    r.sync_reply("customers", EMPTY_UPDATE, EMPTY_STATE_VECTOR)
    for f in r.data_to_send():
        c.receive_frame(f)
    c.answer_state("customers", [(1, b"diff")])
    c.send_updates([("journal/2026-11", b"a", 2), ("customers", b"b", 3)])
    c.send_update("journal/2026-11", b"c", 4)
    for f in c.data_to_send():  # ... and sync_end
        r.receive_frame(f)
    r.ack([1, 3])
    message = "document 'journal/2026-11' is in period '2026-11', locked on the relay"
    r.refuse("journal/2026-11", [2, 4], codes.LOCKED_PERIOD, message)
    assert r.pending_refs == frozenset() and r.state is SessionState.OPEN
    events = [e for f in r.data_to_send() for e in c.receive_frame(f)]
    assert events == [
        Acked((1, 3)),
        UpdateRefused("journal/2026-11", (2, 4), codes.LOCKED_PERIOD, message),
        SyncComplete(1),  # refused updates are answered: the pass completes
    ]
    assert c.unacked == {} and c.state is SessionState.OPEN
    c.send_update("customers", b"d", 5)  # the session goes on
    assert [e for f in c.data_to_send() for e in r.receive_frame(f)] == [
        UpdateReceived("customers", b"d", 5)
    ]


def test_refuse_is_only_for_refusal_codes_and_pending_refs() -> None:
    c, r = opened_pair()
    c.send_update("journal/2026", b"a", 1)
    for f in c.data_to_send():
        r.receive_frame(f)
    for bad in [
        ("journal/2026", [1], codes.READ_ONLY),  # ends the session: fail(), not refuse()
        ("journal/2026", [2], codes.LOCKED_PERIOD),  # not pending
        ("journal/2026", [], codes.LOCKED_PERIOD),
        ("Bad", [1], codes.LOCKED_PERIOD),
    ]:
        with pytest.raises(LocalProtocolError):
            r.refuse(bad[0], bad[1], bad[2], "no")
    assert r.data_to_send() == [] and r.pending_refs == {1}


def test_client_refuses_a_refusal_of_refs_not_in_flight_for_that_document() -> None:
    c, _r = opened_pair()
    c.send_update("journal/2026", b"a", 1)
    c.data_to_send()
    frame = m.encode_message(
        m.Refused("customers", (1,), codes.LOCKED_PERIOD, "no"), max_frame=1 << 20
    )
    assert raises_code(c, frame) == codes.PROTOCOL_VIOLATION
    # A code this client does not know is still a refusal, not an error.
    c, _r = opened_pair()
    c.send_update("journal/2026", b"a", 1)
    c.data_to_send()
    frame = m.encode_message(
        m.Refused("journal/2026", (1,), "future_reason", "no"), max_frame=1 << 20
    )
    assert c.receive_frame(frame) == [UpdateRefused("journal/2026", (1,), "future_reason", "no")]


def test_relay_refuses_a_batch_reusing_a_ref_in_flight_from_an_earlier_frame() -> None:
    _c, r = opened_pair(max_inflight=8)
    assert len(r.receive_frame(updates_frame([("items", b"a", 1), ("items", b"b", 2)]))) == 2
    assert raises_code(r, updates_frame([("items", b"c", 3), ("items", b"d", 2)])) == (
        codes.PROTOCOL_VIOLATION
    )
    assert r.pending_refs == {1, 2}  # nothing of the refused batch was taken
