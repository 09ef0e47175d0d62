"""SyncDriver against the in-memory relay of test_sync_driver (the real
``SqliteRelayStore``, which checks authorship, behind a ``RelaySession``, no
sockets): a node that is not a carrier answers the relay's states with
own-only diffs, a carrier with whole ones, and a ``not_author`` refusal gets
one more pass, then is retried on the next connection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pycrdt import Doc, Map
from test_sync_driver import START_MS, MemRelay, make_node, relay

from engine.crdt.document import ROOT
from engine.node import Node
from engine.protocol import codes
from engine.relay.store import UpdateIn
from engine.sync import failures

__all__ = ["relay"]  # the fixture, imported for pytest

DOC = "customers"


def relay_entries(relay: MemRelay, doc: str = DOC) -> dict[str, str]:
    """The entries (root ``r``) the relay holds of ``doc``."""
    replica: Doc[Any] = Doc()
    replica.apply_update(relay.store.diff("acme", doc))
    return dict(replica.get(ROOT, type=Map).items())


def of(node: str, found: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in found.items() if k.endswith(f"|{node}")}


def entries(node: Node, doc: str = DOC) -> dict[str, str]:
    replica: Doc[Any] = Doc()
    replica.apply_update(node.export_updates()[doc])
    return dict(replica.get(ROOT, type=Map).items())


def carried_by_file(tmp_path: Path, relay: MemRelay) -> tuple[Node, Node, str]:
    """A synced an old value, then overwrote it offline; B got A's newer
    entries by file and wrote its own. Returns A, B and A's token."""
    a, b = make_node(tmp_path, "A"), make_node(tmp_path, "B")
    token_a = relay.store.enroll("acme", "A").token
    a.put(DOC, {"code": "KA", "name": "old"})
    link = relay.connect(a, token_a)
    relay.pump()
    assert link.driver.synced
    link.cut()
    a.put(DOC, {"code": "KA", "name": "new"})
    a.put("items", {"code": "IA", "name": "Trà", "unit": "kg", "price": "1"})
    b.import_updates(a.export_updates())
    b.put(DOC, {"code": "KB", "name": "b1"})
    b.put(DOC, {"code": "KB", "name": "b2"})
    b.put(DOC, {"code": "KA", "address": "Huế"})  # B's own entry of A's record
    return a, b, token_a


def test_a_node_that_is_not_a_carrier_uploads_only_its_own_entries(
    tmp_path: Path, relay: MemRelay
) -> None:
    a, b, token_a = carried_by_file(tmp_path, relay)
    old_a = of("A", relay_entries(relay))
    link = relay.connect(b, relay.store.enroll("acme", "B").token)
    relay.pump()
    assert link.driver.opened is not None and not link.driver.opened.carrier
    assert link.driver.synced and relay.refusals == []
    assert failures.list_failures(b) == [] and b.outbox() == []
    assert of("A", relay_entries(relay)) == old_a  # A's newer entry is A's to publish
    assert of("B", relay_entries(relay)) == of("B", entries(b))
    assert "items" not in relay.store.documents("acme")  # only A's entries there
    # A publishes its own; everyone converges.
    link_a = relay.connect(a, token_a)
    relay.pump()
    assert link_a.driver.synced and relay.refusals == []
    assert relay_entries(relay) == entries(a) == entries(b)
    assert a.get(DOC, "KA")["address"] == "Huế"  # type: ignore[index]


def test_a_carrier_uploads_the_entries_it_carries(tmp_path: Path, relay: MemRelay) -> None:
    a, b, _ = carried_by_file(tmp_path, relay)
    link = relay.connect(b, relay.store.enroll("acme", "B", carrier=True).token)
    relay.pump()
    assert link.driver.opened is not None and link.driver.opened.carrier
    assert link.driver.synced and relay.refusals == []
    assert relay_entries(relay) == entries(a) | of("B", entries(b))
    assert "items" in relay.store.documents("acme")


def test_not_author_refusals_are_retried_on_the_next_connection(
    tmp_path: Path, relay: MemRelay
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
    link.cut()

    again = relay.connect(b, token)
    relay.pump()
    assert again.driver.synced and again.driver.held == frozenset()
    assert failures.list_failures(b) == [] and b.outbox() == []
    assert of("B", relay_entries(relay)) == of("B", entries(b))


def test_a_not_author_refusal_gets_one_more_pass_on_the_same_connection(
    tmp_path: Path, relay: MemRelay
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
    assert of("B", relay_entries(relay)) == of("B", entries(b))


def test_a_retried_not_author_failure_with_nothing_left_to_send_is_resolved(
    tmp_path: Path, relay: MemRelay
) -> None:
    """The relay got the document's changes another way (a carrier): the
    retried answer is empty, and the failure goes."""
    b = make_node(tmp_path, "B")
    b.put(DOC, {"code": "KB", "name": "b1"})
    head = relay.store.enroll("acme", "HO", carrier=True)
    relay.store.append_updates("acme", [UpdateIn(DOC, b.export_updates()[DOC], "HO")])
    b.ack([seq for seq, _, _ in b.outbox()])
    failures.record_failure(b, failures.UPLOAD, DOC, codes.NOT_AUTHOR, "waits", START_MS)
    assert head.carrier
    link = relay.connect(b, relay.store.enroll("acme", "B").token)
    relay.pump()
    assert link.driver.synced and failures.list_failures(b) == []


def test_other_failures_are_not_retried_by_themselves(tmp_path: Path, relay: MemRelay) -> None:
    b = make_node(tmp_path, "B")
    b.put(DOC, {"code": "KB", "name": "b1"})
    failures.record_failure(b, failures.UPLOAD, DOC, codes.LOCKED_PERIOD, "locked (test)", START_MS)
    link = relay.connect(b, relay.store.enroll("acme", "B").token)
    relay.pump()
    (failure,) = failures.list_failures(b)
    assert failure.code == codes.LOCKED_PERIOD and not failure.retrying
    assert link.driver.held == {DOC} and b.pending()[DOC] == 1


def test_an_unreadable_relay_state_is_answered_with_everything_of_its_own(
    tmp_path: Path, relay: MemRelay
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
    tmp_path: Path, relay: MemRelay
) -> None:
    """The relay lost what it had acknowledged (restored from an older
    backup): the answer holds the node's changes but no outbox row, and its
    acknowledgement resolves the retried failure."""
    b = make_node(tmp_path, "B")
    b.put(DOC, {"code": "KB", "name": "b1"})
    b.ack([seq for seq, _, _ in b.outbox()])
    failures.record_failure(b, failures.UPLOAD, DOC, codes.NOT_AUTHOR, "waits", START_MS)
    link = relay.connect(b, relay.store.enroll("acme", "B").token)
    relay.pump()
    assert link.driver.synced and failures.list_failures(b) == []
    assert of("B", relay_entries(relay)) == of("B", entries(b))
