"""The relay core (engine.relay.hub) on its own: no sockets, no asyncio;
store calls run inline by a StoreRunner over a real SqliteRelayStore."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pycrdt import Doc, Map

from engine.errors import RemoteProtocolError, StoreError
from engine.protocol import ClientSession, Event, SessionState, codes
from engine.protocol.events import Acked, ErrorReceived, Opened, UpdateReceived
from engine.relay import SqliteRelayStore
from engine.relay.calls import BatchOutcome
from engine.relay.doccache import RelayLimits
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
        self.node, self.token = node, token
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


# -- several relays on one store --------------------------------------------------


def received(peer: Peer) -> list[bytes]:
    return [e.data for e in peer.events if isinstance(e, UpdateReceived)]


def follow(hub: RelayHub, runner: StoreRunner) -> list[int]:
    """What a driver does when the store says heads moved: read each followed dataset."""
    touched: list[int] = []
    for dataset in hub.followed():
        while (call := hub.follow(dataset)) is not None:
            touched += hub.remote_committed(call, runner.follow(call))
            if not hub.behind(dataset):
                break
    return touched


@pytest.fixture
def two_relays(
    tmp_path: Path,
) -> Iterator[tuple[tuple[RelayHub, StoreRunner], tuple[RelayHub, StoreRunner], dict[str, str]]]:
    path = tmp_path / "relay.db"
    first = SqliteRelayStore.create(path)
    tokens = {n: first.enroll(DATASET, n).token for n in ("A", "B", "C")}
    second = SqliteRelayStore.open(path)
    yield (RelayHub(), StoreRunner(first)), (RelayHub(), StoreRunner(second)), tokens
    first.close()
    second.close()


def test_a_commit_of_one_relay_reaches_the_connections_of_another_and_not_its_sender(
    two_relays: tuple[tuple[RelayHub, StoreRunner], tuple[RelayHub, StoreRunner], dict[str, str]],
) -> None:
    (hub1, run1), (hub2, run2), tokens = two_relays
    a = Peer(hub1, run1, "A", tokens["A"])
    b, c = Peer(hub2, run2, "B", tokens["B"]), Peer(hub2, run2, "C", tokens["C"])
    assert hub1.followed() == [DATASET] == hub2.followed()
    a.write("k1", 1)
    commit(hub1, run1)
    a.down()
    assert acked(a) == [1]
    assert follow(hub1, run1) == []  # its own commit: not read back to anyone
    assert sorted(follow(hub2, run2)) == sorted([b.cid, c.cid])
    for peer in (a, b, c):
        peer.down()
    assert received(a) == [] and len(received(b)) == 1 == len(received(c))
    assert follow(hub2, run2) == []  # read once
    # And back: B's write on relay 2 reaches A on relay 1 and C beside it.
    b.write("k2", 1)
    commit(hub2, run2)
    assert follow(hub1, run1) == [a.cid]
    a.down()
    c.down()
    assert len(received(a)) == 1 and len(received(c)) == 2
    assert hub2.metrics.updates_followed == 1 and hub1.metrics.updates_followed == 1


def test_a_read_taken_while_own_batch_is_in_flight_is_held_until_it_is_settled(
    two_relays: tuple[tuple[RelayHub, StoreRunner], tuple[RelayHub, StoreRunner], dict[str, str]],
) -> None:
    (hub1, run1), (hub2, run2), tokens = two_relays
    a, b = Peer(hub1, run1, "A", tokens["A"]), Peer(hub1, run1, "B", tokens["B"])
    c = Peer(hub2, run2, "C", tokens["C"])
    c.write("remote", 1)
    commit(hub2, run2)
    a.write("mine", 1)
    batch = hub1.take_batch()
    assert batch is not None
    outcome = run1.commit(batch)  # stored, not settled: its position is unknown to the core
    call = hub1.follow(DATASET)
    assert call is not None and hub1.follow(DATASET) is None  # one read at a time
    assert hub1.remote_committed(call, run1.follow(call)) == []  # held
    b.down()
    assert received(b) == []
    touched = hub1.settle(batch, outcome)
    assert sorted(touched) == sorted([a.cid, b.cid])
    a.down()
    b.down()
    # A gets C's update only; B gets A's (local fan-out) and C's (followed), once each.
    assert len(received(a)) == 1 and len(received(b)) == 2
    assert follow(hub1, run1) == []


@pytest.fixture
def compacted(
    tmp_path: Path,
) -> Iterator[tuple[tuple[RelayHub, StoreRunner, Peer], tuple[RelayHub, StoreRunner, Peer]]]:
    """Two relays on one store that keeps 1 folded row: A on relay 1 wrote
    5 updates, compacted away before relay 2 (B on it) read them."""
    path = tmp_path / "relay.db"
    limits = RelayLimits(compact_after=2, compact_ratio=0, keep_positions=1)
    first = SqliteRelayStore.create(path, limits)
    tokens = {n: first.enroll(DATASET, n).token for n in ("A", "B")}
    second = SqliteRelayStore.open(path, limits)
    hub1, run1, hub2, run2 = RelayHub(), StoreRunner(first), RelayHub(), StoreRunner(second)
    a, b = Peer(hub1, run1, "A", tokens["A"]), Peer(hub2, run2, "B", tokens["B"])
    for ref in range(1, 6):
        a.write(f"k{ref}", ref)
        commit(hub1, run1)
    first.compact(DATASET)
    yield (hub1, run1, a), (hub2, run2, b)
    first.close()
    second.close()


def test_a_follower_that_lost_its_place_closes_the_datasets_connections(
    compacted: tuple[tuple[RelayHub, StoreRunner, Peer], tuple[RelayHub, StoreRunner, Peer]],
) -> None:
    _, (hub2, run2, b) = compacted
    assert follow(hub2, run2) == [b.cid]
    b.down()
    (error,) = [e for e in b.events if isinstance(e, ErrorReceived)]
    assert error.code == codes.UNAVAILABLE and hub2.close_code(b.cid)[0] == CLOSE_TRY_AGAIN
    assert hub2.followed() == [] and hub2.metrics.follow_resyncs == 1
    # Reconnected, it syncs by state vector and follows from the head again.
    again = Peer(hub2, run2, "B", b.token)
    assert hub2.followed() == [DATASET] and follow(hub2, run2) == []
    assert any(isinstance(e, Opened) for e in again.events)


def test_a_compacted_answer_held_behind_a_batch_still_resyncs_when_it_settles(
    compacted: tuple[tuple[RelayHub, StoreRunner, Peer], tuple[RelayHub, StoreRunner, Peer]],
) -> None:
    _, (hub2, run2, b) = compacted
    b.write("mine", 1)
    batch = hub2.take_batch()
    assert batch is not None
    outcome = run2.commit(batch)
    call = hub2.follow(DATASET)
    assert call is not None and hub2.remote_committed(call, None) == []  # held
    assert hub2.followed() == [DATASET]
    assert b.cid in hub2.settle(batch, outcome)
    assert hub2.followed() == [] and hub2.metrics.follow_resyncs == 1
