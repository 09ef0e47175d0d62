"""SyncDriver against an in-memory relay that checks authorship (the real
``SqliteRelayStore`` behind a ``RelaySession``, no sockets): a node that is
not a carrier answers the relay's states with own-only diffs, a carrier with
whole ones, and ``not_author`` refusals are retried on the next connection."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Doc, Map

from engine.clock import ManualClock
from engine.crdt.document import ROOT
from engine.errors import AuthError, NotAuthor, PeriodLocked
from engine.node import Node
from engine.protocol import (
    ClientSession,
    Event,
    HelloReceived,
    RelaySession,
    SessionState,
    SyncRequested,
    UpdateReceived,
    codes,
)
from engine.relay.sqlite_store import SqliteRelayStore
from engine.relay.store import UpdateIn
from engine.sync import SyncDriver, failures

START_MS = 1_767_225_600_000 + 40 * 86_400_000  # 2026-02-10
DOC = "customers"


class Relay:
    """The relay's update path over the real store, one thread, no sockets.
    ``refuse`` maps documents to how many of their next updates are refused
    ``not_author`` (as if the relay lacked changes they build on)."""

    def __init__(self, path: Path) -> None:
        self.store = SqliteRelayStore.create(path)
        self.links: list[Link] = []
        self.refuse: dict[str, int] = {}
        self.refusals: list[tuple[str, str]] = []  # (node, code) of refused updates

    def handle(self, link: Link, events: list[Event]) -> None:
        session = link.relay
        for ev in events:
            if isinstance(ev, HelloReceived):
                try:
                    grant = self.store.authenticate(ev.dataset, ev.node, ev.token)
                except AuthError as exc:
                    session.reject(codes.AUTH_FAILED, str(exc))
                    continue
                session.accept(
                    read_only=grant.read_only,
                    documents=self.store.documents(ev.dataset),
                    carrier=grant.carrier,
                )
            elif isinstance(ev, SyncRequested):
                ds = session.dataset
                assert ds is not None
                session.sync_reply(
                    ev.doc,
                    self.store.diff(ds, ev.doc, ev.state_vector),
                    self.store.state_vector(ds, ev.doc),
                )
            elif isinstance(ev, UpdateReceived):
                ds, node = session.dataset, session.node
                assert ds is not None and node is not None and ev.ref is not None
                if self.refuse.get(ev.doc, 0) > 0:
                    self.refuse[ev.doc] -= 1
                    self.refusals.append((node, codes.NOT_AUTHOR))
                    session.refuse(ev.doc, [ev.ref], codes.NOT_AUTHOR, "waits for 'A' (test)")
                    continue
                (result,) = self.store.append_updates(ds, [UpdateIn(ev.doc, ev.data, node)])
                if isinstance(result.error, NotAuthor | PeriodLocked):
                    locked = isinstance(result.error, PeriodLocked)
                    code = codes.LOCKED_PERIOD if locked else codes.NOT_AUTHOR
                    self.refusals.append((node, code))
                    session.refuse(ev.doc, [ev.ref], code, str(result.error))
                    continue
                if not result.ok:
                    session.fail(codes.BAD_UPDATE, str(result.error))
                    continue
                for other in self.links:
                    if other is not link and other.relay.state is SessionState.OPEN:
                        other.relay.send_update(ev.doc, ev.data)
                session.ack([ev.ref])

    def connect(self, node: Node, token: str) -> Link:
        link = Link(self, node, token)
        self.links.append(link)
        return link

    def pump(self) -> None:
        for _ in range(10_000):
            moved = False
            for link in list(self.links):
                moved |= link.step()
            if not moved:
                return
        raise AssertionError("the network did not settle")

    def entries(self, doc: str = DOC) -> dict[str, str]:
        replica: Doc[Any] = Doc()
        replica.apply_update(self.store.diff("acme", doc))
        return dict(replica.get(ROOT, type=Map).items())


class Link:
    def __init__(self, relay: Relay, node: Node, token: str) -> None:
        self.network = relay
        self.relay = RelaySession()
        self.driver = SyncDriver(
            node,
            ClientSession(dataset=node.dataset, node=node.node_id, token=token),
            wall_ms=lambda: START_MS,
        )

    def step(self) -> bool:
        if self.relay.state is SessionState.CLOSED:
            return False
        moved = False
        for frame in self.driver.data_to_send():
            moved = True
            self.network.handle(self, self.relay.receive_frame(frame))
        for frame in self.relay.data_to_send():
            moved = True
            self.driver.receive(frame)
        return moved

    def close(self) -> None:
        self.driver.session.close()
        self.relay.close()
        self.network.links.remove(self)


def make_node(tmp: Path, name: str) -> Node:
    return Node.create(
        tmp / name, dataset="acme", node=name, clock=ManualClock(START_MS), rng=random.Random(name)
    )


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    r = Relay(tmp_path / "relay.db")
    yield r
    r.store.close()


def of(node: str, found: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in found.items() if k.endswith(f"|{node}")}


def entries(node: Node, doc: str = DOC) -> dict[str, str]:
    replica: Doc[Any] = Doc()
    replica.apply_update(node.export_updates()[doc])
    return dict(replica.get(ROOT, type=Map).items())


def carried_by_file(tmp_path: Path, relay: Relay) -> tuple[Node, Node, str]:
    """A synced an old value, then overwrote it offline; B got A's newer
    entries by file and wrote its own. Returns A, B and A's token."""
    a, b = make_node(tmp_path, "A"), make_node(tmp_path, "B")
    token_a = relay.store.enroll("acme", "A").token
    a.put(DOC, {"code": "KA", "name": "old"})
    link = relay.connect(a, token_a)
    relay.pump()
    assert link.driver.synced
    link.close()
    a.put(DOC, {"code": "KA", "name": "new"})
    a.put("items", {"code": "IA", "name": "Trà", "unit": "kg", "price": "1"})
    b.import_updates(a.export_updates())
    b.put(DOC, {"code": "KB", "name": "b1"})
    b.put(DOC, {"code": "KB", "name": "b2"})
    b.put(DOC, {"code": "KA", "address": "Huế"})  # B's own entry of A's record
    return a, b, token_a


def test_a_node_that_is_not_a_carrier_uploads_only_its_own_entries(
    tmp_path: Path, relay: Relay
) -> None:
    a, b, token_a = carried_by_file(tmp_path, relay)
    old_a = of("A", relay.entries())
    link = relay.connect(b, relay.store.enroll("acme", "B").token)
    relay.pump()
    assert link.driver.opened is not None and not link.driver.opened.carrier
    assert link.driver.synced and relay.refusals == []
    assert failures.list_failures(b) == [] and b.outbox() == []
    assert of("A", relay.entries()) == old_a  # A's newer entry is A's to publish
    assert of("B", relay.entries()) == of("B", entries(b))
    assert "items" not in relay.store.documents("acme")  # only A's entries there
    # A publishes its own; everyone converges.
    link_a = relay.connect(a, token_a)
    relay.pump()
    assert link_a.driver.synced and relay.refusals == []
    assert relay.entries() == entries(a) == entries(b)
    assert a.get(DOC, "KA")["address"] == "Huế"  # type: ignore[index]


def test_a_carrier_uploads_the_entries_it_carries(tmp_path: Path, relay: Relay) -> None:
    a, b, _ = carried_by_file(tmp_path, relay)
    link = relay.connect(b, relay.store.enroll("acme", "B", carrier=True).token)
    relay.pump()
    assert link.driver.opened is not None and link.driver.opened.carrier
    assert link.driver.synced and relay.refusals == []
    assert relay.entries() == entries(a) | of("B", entries(b))
    assert "items" in relay.store.documents("acme")


def test_not_author_refusals_are_retried_on_the_next_connection(
    tmp_path: Path, relay: Relay
) -> None:
    """A refused document gets one more pass on the same connection (an
    own-only diff against the relay's state of then), and when that is
    refused too, it waits for the next connection."""
    b = make_node(tmp_path, "B")
    token = relay.store.enroll("acme", "B").token
    b.put(DOC, {"code": "KB", "name": "b1"})
    b.put("items", {"code": "IB", "name": "Trà", "unit": "kg", "price": "1"})
    relay.refuse = {DOC: 2}
    link = relay.connect(b, token)
    relay.pump()
    assert relay.refusals == [("B", codes.NOT_AUTHOR)] * 2  # the first pass, then one more
    (failure,) = failures.list_failures(b)
    assert (failure.doc, failure.code, failure.retrying) == (DOC, codes.NOT_AUTHOR, False)
    assert failure.attempts == 2
    assert link.driver.synced and link.driver.held == {DOC}  # the rest went on
    assert b.pending()[DOC] == 1 and b.pending()["items"] == 0
    # Still held on this connection: a later write of it stays in the outbox.
    b.put(DOC, {"code": "KB", "name": "b2"})
    assert link.driver.poll() == 0
    link.close()

    again = relay.connect(b, token)
    relay.pump()
    assert again.driver.synced and again.driver.held == frozenset()
    assert failures.list_failures(b) == [] and b.outbox() == []
    assert of("B", relay.entries()) == of("B", entries(b))


def test_a_not_author_refusal_gets_one_more_pass_on_the_same_connection(
    tmp_path: Path, relay: Relay
) -> None:
    """Updates that overtook one another (the relay refused one that waited):
    the document's second pass sends an own-only diff against the relay's
    state of then, which the relay takes, and the failure goes."""
    b = make_node(tmp_path, "B")
    b.put(DOC, {"code": "KB", "name": "b1"})
    relay.refuse = {DOC: 1}
    link = relay.connect(b, relay.store.enroll("acme", "B").token)
    relay.pump()
    assert relay.refusals == [("B", codes.NOT_AUTHOR)]
    assert link.driver.synced and link.driver.held == frozenset()
    assert failures.list_failures(b) == [] and b.outbox() == []
    assert of("B", relay.entries()) == of("B", entries(b))


def test_a_retried_not_author_failure_with_nothing_left_to_send_is_resolved(
    tmp_path: Path, relay: Relay
) -> None:
    """The relay got the document's changes another way (a carrier): the
    retried answer is empty, and the failure goes."""
    b = make_node(tmp_path, "B")
    b.put(DOC, {"code": "KB", "name": "b1"})
    head = relay.store.enroll("acme", "HO", carrier=True)
    relay.store.append_updates("acme", [UpdateIn(DOC, b.export_updates()[DOC], "HO")])
    b.ack([seq for seq, _, _ in b.outbox()])
    failures.record_failure(b, failures.UPLOAD, DOC, f"{codes.NOT_AUTHOR}: waits", START_MS)
    assert head.carrier
    link = relay.connect(b, relay.store.enroll("acme", "B").token)
    relay.pump()
    assert link.driver.synced and failures.list_failures(b) == []


def test_other_failures_are_not_retried_by_themselves(tmp_path: Path, relay: Relay) -> None:
    b = make_node(tmp_path, "B")
    b.put(DOC, {"code": "KB", "name": "b1"})
    failures.record_failure(
        b, failures.UPLOAD, DOC, f"{codes.LOCKED_PERIOD}: locked (test)", START_MS
    )
    link = relay.connect(b, relay.store.enroll("acme", "B").token)
    relay.pump()
    (failure,) = failures.list_failures(b)
    assert failure.code == codes.LOCKED_PERIOD and not failure.retrying
    assert link.driver.held == {DOC} and b.pending()[DOC] == 1


def test_an_unreadable_relay_state_is_answered_with_everything_of_its_own(
    tmp_path: Path, relay: Relay
) -> None:
    _, b, _ = carried_by_file(tmp_path, relay)
    link = relay.connect(b, relay.store.enroll("acme", "B").token)
    relay.pump()
    b.put(DOC, {"code": "KB", "name": "b3"})
    parts = link.driver._parts(DOC, b"\xff\xff")  # not a state vector
    assert parts == b.export_parts(DOC, None, 1 << 30, own_only=True)
    assert link.driver.stats.extra["unreadable_states"] == 1
    assert parts != b.export_parts(DOC, None, 1 << 30)  # the whole diff holds A's entries


def test_a_retried_failure_is_resolved_by_an_answer_that_carried_no_outbox_row(
    tmp_path: Path, relay: Relay
) -> None:
    """The relay lost what it had acknowledged (restored from an older
    backup): the answer holds the node's changes but no outbox row, and its
    acknowledgement resolves the retried failure."""
    b = make_node(tmp_path, "B")
    b.put(DOC, {"code": "KB", "name": "b1"})
    b.ack([seq for seq, _, _ in b.outbox()])
    failures.record_failure(b, failures.UPLOAD, DOC, f"{codes.NOT_AUTHOR}: waits", START_MS)
    link = relay.connect(b, relay.store.enroll("acme", "B").token)
    relay.pump()
    assert link.driver.synced and failures.list_failures(b) == []
    assert of("B", relay.entries()) == of("B", entries(b))
