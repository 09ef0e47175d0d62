"""The relay core (engine.relay.hub) on its own: no sockets, no asyncio;
store calls run inline by a StoreRunner over a real SqliteRelayStore."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pycrdt import Doc, Map

from engine.errors import RemoteProtocolError, StoreError
from engine.protocol import ClientSession, Event, SessionState, codes
from engine.protocol.events import Acked, ErrorReceived, Opened
from engine.relay import SqliteRelayStore
from engine.relay.calls import BatchOutcome
from engine.relay.hub import CLOSE_TRY_AGAIN, HubLimits, RelayHub
from engine.relay.runner import StoreRunner

DATASET = "acme"


class Peer:
    """A client session linked to one connection of the core."""

    def __init__(self, hub: RelayHub, runner: StoreRunner, node: str, token: str) -> None:
        self.hub, self.runner = hub, runner
        self.session = ClientSession(dataset=DATASET, node=node, token=token)
        self.cid = hub.connect(0)
        self.events: list[Event] = []
        self.doc: Doc[object] = Doc()
        self.map: Map[object] = self.doc.get("r", type=Map)
        self.node = node
        self.pump()

    def pump(self) -> None:
        for frame in self.session.data_to_send():
            for call in self.hub.receive(self.cid, frame, 0):
                self.hub.answer(call, self.runner.run(call))
        self.down()

    def down(self) -> None:
        for frame in self.hub.data_to_send(self.cid):
            try:
                self.events.extend(self.session.receive_frame(frame))
            except RemoteProtocolError:  # the events so far are what the tests read
                break

    def write(self, key: str, ref: int) -> None:
        before = self.doc.get_state()
        self.map[f"{key}|{self.node}"] = key
        self.session.send_update("customers", self.doc.get_update(before), ref)
        self.pump()


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[tuple[RelayHub, StoreRunner, dict[str, str]]]:
    store = SqliteRelayStore.create(tmp_path / "relay.db")
    tokens = {n: store.enroll(DATASET, n).token for n in ("A", "B", "C")}
    yield RelayHub(HubLimits(max_subscribers=2)), StoreRunner(store), tokens
    store.close()


def commit(hub: RelayHub, runner: StoreRunner) -> list[int]:
    touched: list[int] = []
    while (batch := hub.take_batch()) is not None:
        touched += hub.settle(batch, runner.commit(batch))
    return touched


def acked(peer: Peer) -> list[int]:
    return [r for e in peer.events if isinstance(e, Acked) for r in e.refs]


def test_acks_follow_the_settled_commit_and_updates_of_a_gone_connection_are_dropped(
    relay: tuple[RelayHub, StoreRunner, dict[str, str]],
) -> None:
    hub, runner, tokens = relay
    a, b = Peer(hub, runner, "A", tokens["A"]), Peer(hub, runner, "B", tokens["B"])
    assert all(any(isinstance(e, Opened) for e in p.events) for p in (a, b))
    a.write("k1", 1)
    b.write("k2", 1)
    assert hub.queued == 2 and acked(a) == []  # received, not committed: no ack
    hub.disconnect(b.cid)  # B is gone before the batch is taken
    batch = hub.take_batch()
    assert batch is not None and [len(x.updates) for x in batch.appends] == [1]
    a.down()
    assert acked(a) == []  # committed maybe, but not settled: still no ack
    hub.settle(batch, runner.commit(batch))
    a.down()
    assert acked(a) == [1]
    assert hub.idle and runner.store.documents(DATASET) == ["customers"]
    assert b"k2" not in runner.store.diff(DATASET, "customers")  # dropped, never stored


def test_a_failed_commit_ends_its_senders_only(
    relay: tuple[RelayHub, StoreRunner, dict[str, str]],
) -> None:
    hub, runner, tokens = relay
    a, b = Peer(hub, runner, "A", tokens["A"]), Peer(hub, runner, "B", tokens["B"])
    a.write("k1", 1)
    batch = hub.take_batch()
    assert batch is not None
    touched = hub.settle(batch, BatchOutcome({DATASET: StoreError("disk full")}))
    assert touched == [a.cid]
    a.down()
    (error,) = [e for e in a.events if isinstance(e, ErrorReceived)]
    assert error.code == codes.INTERNAL and "nothing of them was kept" in error.message
    assert hub.session(b.cid).state is SessionState.OPEN


def test_subscribers_of_a_dataset_are_bounded(
    relay: tuple[RelayHub, StoreRunner, dict[str, str]],
) -> None:
    hub, runner, tokens = relay
    peers = [Peer(hub, runner, n, tokens[n]) for n in ("A", "B", "C")]
    assert [hub.is_open(p.cid) for p in peers] == [True, True, False]
    (error,) = [e for e in peers[2].events if isinstance(e, ErrorReceived)]
    assert error.code == codes.UNAVAILABLE and "2 connections" in error.message
    assert hub.close_code(peers[2].cid)[0] == CLOSE_TRY_AGAIN


def test_a_slow_consumer_is_closed_past_the_send_queue_limits(
    relay: tuple[RelayHub, StoreRunner, dict[str, str]],
) -> None:
    hub, runner, tokens = relay
    a = Peer(hub, runner, "A", tokens["A"])
    limit = hub.limits.send_queue_frames
    assert not hub.slow(a.cid, limit, 0) and hub.is_open(a.cid)
    assert hub.slow(a.cid, limit + 1, 0) and hub.closed(a.cid)
    assert hub.metrics.slow_consumers_dropped == 1


def test_shutting_down_refuses_connections_and_stores_no_new_update(
    relay: tuple[RelayHub, StoreRunner, dict[str, str]],
) -> None:
    hub, runner, tokens = relay
    a = Peer(hub, runner, "A", tokens["A"])
    a.write("k1", 1)
    hub.shut_down()
    a.write("k2", 2)  # after the shutdown began: dropped, never acked
    assert hub.queued == 1
    commit(hub, runner)
    assert hub.idle
    late = Peer(hub, runner, "B", tokens["B"])
    assert [e.code for e in late.events if isinstance(e, ErrorReceived)] == [codes.UNAVAILABLE]
    assert hub.close_all() == [a.cid, late.cid]
    a.down()
    assert acked(a) == [1]
    assert [e.code for e in a.events if isinstance(e, ErrorReceived)] == [codes.UNAVAILABLE]
