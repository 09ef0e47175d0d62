"""SyncDriver against an in-memory relay (the relay core RelayHub + SqliteRelayStore,
no sockets, no asyncio): convergence after offline work on two nodes, upload
order, outbox cleared only on ack, re-send after a cut, dataset mismatch,
corrupt fan-out recorded as a download failure, blocks leases."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from engine.clock import ManualClock
from engine.errors import AuthError, DatasetMismatch, NotAuthor, UpdateError
from engine.node import Node
from engine.protocol import (
    ClientSession,
    Limits,
    RelaySession,
    SessionState,
    codes,
    decode_message,
    encode_message,
)
from engine.protocol import messages as m
from engine.relay.calls import Authenticate, Batch, BatchOutcome, HelloAnswer, Lease, LeaseAnswer
from engine.relay.hub import RelayHub
from engine.relay.runner import StoreRunner
from engine.relay.sqlite_store import SqliteRelayStore
from engine.relay.store import Appended, UpdateIn, refusal_code
from engine.status import node_status
from engine.sync import SyncDriver, failure_counts, upload_order

START_MS = 1_767_225_600_000 + 40 * 86_400_000  # 2026-02-10


class RefusingStore(SqliteRelayStore):
    """The real relay store, except that ``refuse`` maps documents to how
    many of their next updates it rejects ``NotAuthor`` whatever they hold
    (as if it lacked changes they build on); those are not stored."""

    refuse: dict[str, int]

    def append_updates(self, dataset: str, updates: Sequence[UpdateIn]) -> list[Appended]:
        refuse = getattr(self, "refuse", {})
        rejected: dict[int, Appended] = {}
        for i, u in enumerate(updates):
            if refuse.get(u.doc, 0) > 0:
                refuse[u.doc] -= 1
                rejected[i] = Appended(u.doc, "rejected", error=NotAuthor("waits (test)"))
        kept = iter(
            super().append_updates(dataset, [u for i, u in enumerate(updates) if i not in rejected])
        )
        return [rejected[i] if i in rejected else next(kept) for i in range(len(updates))]


class MemRelay:
    """A driver of the relay core (``RelayHub`` + ``StoreRunner`` over the
    real relay store), without sockets: every frame received is handled at
    once, and the updates it holds are committed and settled right after it
    (acks, refusals, fan-out all the core's). ``hold_acks`` keeps committed
    batches unsettled (stored, not acked, not fanned out) until
    ``release_acks``; ``serves`` answers a hello for another dataset with
    ``wrong_dataset`` as a relay serving one dataset would; ``deny_leases``
    denies leases; ``refuse``: see ``RefusingStore``."""

    def __init__(self, path: Path, serves: str | None = None) -> None:
        self.store = RefusingStore.create(path)
        self.store.refuse = {}
        self.hub = RelayHub()
        self.runner = StoreRunner(self.store)
        self.serves = serves
        self.links: list[Link] = []
        self.hold_acks = False
        self.held: list[tuple[Batch, BatchOutcome]] = []
        self.received: list[tuple[str, str]] = []  # (node, doc) of updates in arrival order
        self.deny_leases = False
        self.lease_requests: list[str] = []  # series of lease requests in arrival order
        self.refusals: list[tuple[str, str]] = []  # (node, code) of refused updates

    @property
    def refuse(self) -> dict[str, int]:
        return self.store.refuse

    @refuse.setter
    def refuse(self, value: dict[str, int]) -> None:
        self.store.refuse = value

    def receive(self, link: Link, frame: bytes) -> None:
        hub, cid = self.hub, link.cid
        for call in hub.receive(cid, frame, START_MS):
            if isinstance(call, Authenticate) and self.serves not in (None, call.dataset):
                hub.answer(
                    call,
                    HelloAnswer(
                        None,
                        (),
                        codes.WRONG_DATASET,
                        f"this relay serves dataset {self.serves!r}, not {call.dataset!r}",
                    ),
                )
            elif isinstance(call, Lease):
                self.lease_requests.append(call.series)
                denied = LeaseAnswer(denied="no numbers for you")
                hub.answer(call, denied if self.deny_leases else self.runner.run(call))
            else:
                hub.answer(call, self.runner.run(call))
        while (diff := hub.next_sync(cid)) is not None:
            hub.answer(diff, self.runner.diff(diff))
        while (batch := hub.take_batch()) is not None:
            outcome = self.runner.commit(batch)
            for append in batch.appends:
                results = outcome.results[append.dataset]
                assert isinstance(results, list)
                for u, r in zip(append.updates, results, strict=True):
                    if r.ok:
                        self.received.append((u.node, u.doc))
                    elif (code := refusal_code(r.error)) is not None:
                        self.refusals.append((u.node, code))
            if self.hold_acks:
                self.held.append((batch, outcome))
            else:
                hub.settle(batch, outcome)

    def release_acks(self) -> None:
        for batch, outcome in self.held:
            self.hub.settle(batch, outcome)
        self.held.clear()

    def connect(self, node: Node, token: str) -> Link:
        link = Link(self, node, token)
        self.links.append(link)
        return link

    def pump(self, rounds: int = 10_000) -> None:
        """Move frames both ways on every link until nothing moves."""
        for _ in range(rounds):
            moved = False
            for link in list(self.links):
                moved |= link.step()
            if not moved:
                return
        raise AssertionError("the network did not settle")


class Link:
    """One connection: a driver with its client session, and the relay core's
    connection (``relay``: its session)."""

    def __init__(self, relay: MemRelay, node: Node, token: str) -> None:
        self.network = relay
        self.node = node
        self.cid = relay.hub.connect(START_MS, f"link of {node.node_id}")
        self.progress: list[tuple[str, int, int]] = []
        self.driver = SyncDriver(
            node,
            ClientSession(dataset=node.dataset, node=node.node_id, token=token),
            wall_ms=lambda: START_MS,
            on_progress=lambda c, d, t: self.progress.append((c, d, t)),
        )
        self.up_frames: list[bytes] = []  # every frame the node sent

    @property
    def relay(self) -> RelaySession:
        return self.network.hub.session(self.cid)

    def step(self) -> bool:
        hub = self.network.hub
        if hub.closed(self.cid):
            return False
        moved = False
        for frame in self.driver.data_to_send():
            moved = True
            self.up_frames.append(frame)
            self.network.receive(self, frame)
        for link in self.network.links:  # a commit may have given any link frames
            for frame in hub.data_to_send(link.cid):
                moved = True
                link.driver.receive(frame)
        return moved

    def cut(self) -> None:
        """The link dies: frames in flight are lost, both sessions end."""
        self.driver.data_to_send()
        self.network.hub.data_to_send(self.cid)
        self.driver.session.close()
        self.network.hub.disconnect(self.cid)
        self.network.links.remove(self)


def make_node(tmp: Path, name: str, dataset: str = "acme") -> Node:
    return Node.create(
        tmp / name,
        dataset=dataset,
        node=name,
        clock=ManualClock(START_MS),
        rng=random.Random(name),
    )


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[MemRelay]:
    r = MemRelay(tmp_path / "relay.db")
    yield r
    r.store.close()


def book_day(n: Node, tag: str) -> None:
    n.put("customers", {"code": f"C-{tag}", "name": f"Customer {tag}"})
    n.put("items", {"code": f"I-{tag}", "name": f"Item {tag}", "unit": "pcs", "price": "10"})
    n.put("warehouses", {"code": f"W-{tag}", "name": f"Store {tag}"})
    for i in range(3):
        n.post_voucher(
            "sales_invoice",
            {
                "date": "2026-02-10" if i else "2026-01-05",
                "customer": f"C-{tag}",
                "warehouse": f"W-{tag}",
                "paid": False,
                "lines": [{"item": f"I-{tag}", "qty": "1", "price": "10", "vat_rate": "10"}],
            },
        )


def books(n: Node) -> dict[str, list[str]]:
    out = {}
    for coll in ("customers", "items", "warehouses", "sales_invoice"):
        out[coll] = sorted(str(r.get("number") or r.get("code")) for r in n.list(coll))
    return out


def test_two_nodes_converge_after_offline_work(tmp_path: Path, relay: MemRelay) -> None:
    a, b = make_node(tmp_path, "A"), make_node(tmp_path, "B")
    book_day(a, "a")
    book_day(b, "b")
    la = relay.connect(a, relay.store.enroll("acme", "A").token)
    relay.pump()
    assert la.driver.synced and la.driver.stats.passes_completed == 1
    lb = relay.connect(b, relay.store.enroll("acme", "B").token)
    relay.pump()
    assert lb.driver.synced
    # Live: A gets B's changes by fan-out; B got A's in its pass.
    assert books(a) == books(b)
    assert len(books(a)["sales_invoice"]) == 6
    assert a.pending() == dict.fromkeys(a.schema.collections, 0)
    assert b.store.meta()["last_sync"] == str(START_MS)
    # Progress: every collection ends with done == total.
    final = {c: (d, t) for c, d, t in lb.progress}
    assert final and all(d == t for d, t in final.values())
    # A later write by another process on A's home is shipped live by poll().
    other = Node.open(tmp_path / "A")
    other.put("customers", {"code": "C-late", "name": "Late"})
    other.close()
    assert la.driver.poll() == 1
    relay.pump()
    assert b.get("customers", "C-late") is not None
    assert la.driver.synced


def test_catalogs_before_vouchers_current_period_first(tmp_path: Path, relay: MemRelay) -> None:
    a = make_node(tmp_path, "A")
    book_day(a, "a")
    order = upload_order(a, a.documents(), dt.date(2026, 2, 10))
    kinds = [a.collection(d.partition("/")[0]).kind for d in order]
    assert kinds == sorted(kinds, key=lambda k: k != "catalog")
    vouchers = [d for d in order if d.startswith("sales_invoice/")]
    assert vouchers == ["sales_invoice/2026-02", "sales_invoice/2026-01"]
    link = relay.connect(a, relay.store.enroll("acme", "A").token)
    relay.pump()
    # What the relay received, in order: every catalog before any voucher.
    docs = [doc for _, doc in relay.received]
    first_voucher = min(i for i, d in enumerate(docs) if d.startswith("sales_invoice"))
    assert all(not d.startswith("sales_invoice") for d in docs[:first_voucher])
    assert {"customers", "items", "warehouses"} <= set(docs[:first_voucher])
    assert docs[first_voucher] == "sales_invoice/2026-02"
    sync1 = [
        msg.doc
        for msg in (decode_message(f, max_frame=1 << 30) for f in link.up_frames)
        if isinstance(msg, m.Sync1)
    ]
    assert sync1 == order


def test_urgent_documents_first_with_what_they_refer_to(tmp_path: Path, relay: MemRelay) -> None:
    """An unpaid invoice (urgent_when paid = false; ``paid`` absent counts as
    false) and the customer made offline for it go up before the catalogs
    and books that have only ordinary changes; status counts it apart."""
    a = make_node(tmp_path, "A")
    book_day(a, "a")
    token = relay.store.enroll("acme", "A").token
    link = relay.connect(a, token)
    relay.pump()
    assert link.driver.synced and a.urgent_pending() == {"sales_invoice": 0}
    link.cut()
    # Offline: ordinary work in several documents, then one unpaid sale.
    for i in range(5):
        a.put("items", {"code": f"I{i}", "name": f"Item {i}", "unit": "pcs", "price": "1"})
    paid = {"warehouse": "W-a", "paid": True}
    line = [{"item": "I-a", "qty": "1", "price": "10", "vat_rate": "10"}]
    a.post_voucher(
        "sales_invoice", {"date": "2026-01-20", "customer": "C-a", **paid, "lines": line}
    )
    a.put("customers", {"code": "C-new", "name": "Walk-in"})
    fields = {"date": "2026-02-11", "customer": "C-new", "warehouse": "W-a", "lines": line}
    a.post_voucher("sales_invoice", fields)
    assert a.urgent_pending() == {"sales_invoice": 1}
    assert a.urgent_docs() == {"sales_invoice/2026-02", "customers"}
    assert node_status(a, START_MS)["urgent_pending"] == {"sales_invoice": 1}
    order = upload_order(a, a.documents(), dt.date(2026, 2, 10), a.urgent_docs())
    assert order[:2] == ["customers", "sales_invoice/2026-02"]
    relay.received.clear()
    link2 = relay.connect(a, token)
    relay.pump()
    assert link2.driver.synced
    assert [doc for _, doc in relay.received][:2] == ["customers", "sales_invoice/2026-02"]
    assert {"items", "sales_invoice/2026-01"} <= {doc for _, doc in relay.received[2:]}
    assert a.urgent_pending() == {"sales_invoice": 0}  # acknowledged: ordinary again


def test_outbox_cleared_only_on_ack_and_resend_after_cut_is_harmless(
    tmp_path: Path, relay: MemRelay
) -> None:
    a = make_node(tmp_path, "A")
    book_day(a, "a")
    token = relay.store.enroll("acme", "A").token
    pending_before = len(a.outbox())
    relay.hold_acks = True
    link = relay.connect(a, token)
    relay.pump()
    # The relay stored everything but acked nothing: the outbox is intact.
    assert relay.received and len(a.outbox()) == pending_before
    assert not link.driver.synced
    link.cut()
    relay.held.clear()  # the acks die with the link
    stored = {d.name: d.updates for d in relay.store.status()[0].documents}
    relay.hold_acks = False
    link2 = relay.connect(a, token)
    relay.pump()
    assert link2.driver.synced
    assert a.outbox() == []
    # Nothing new was stored by the re-send (duplicates are not stored twice).
    assert {d.name: d.updates for d in relay.store.status()[0].documents} == stored
    # A third node gets exactly A's books.
    c = make_node(tmp_path, "C")
    relay.connect(c, relay.store.enroll("acme", "C").token)
    relay.pump()
    assert books(c) == books(a)


def test_live_rows_wait_for_acks_within_inflight_room(tmp_path: Path, relay: MemRelay) -> None:
    a = make_node(tmp_path, "A")
    link = relay.connect(a, relay.store.enroll("acme", "A").token)
    relay.pump()
    relay.hold_acks = True
    for i in range(5):
        a.put("customers", {"code": f"K{i}", "name": "x"})
    assert link.driver.poll() == 5
    assert link.driver.poll() == 0  # not sent twice while in flight
    relay.pump()
    assert len(a.outbox()) == 5
    relay.release_acks()
    relay.pump()
    assert a.outbox() == []


def test_live_rows_go_up_several_per_frame_in_seq_order(tmp_path: Path, relay: MemRelay) -> None:
    a = make_node(tmp_path, "A")
    link = relay.connect(a, relay.store.enroll("acme", "A").token)
    relay.pump()
    relay.hold_acks = True
    for i in range(40):
        a.put("customers", {"code": f"K{i}", "name": "x"})
    seqs = [int(s) for (s,) in a.store.conn.execute("SELECT seq FROM updates WHERE pending = 1")]
    before = len(link.up_frames)
    assert link.driver.poll() == 40
    relay.pump()
    sent = [decode_message(f, max_frame=1 << 30) for f in link.up_frames[before:]]
    batches = [msg for msg in sent if isinstance(msg, m.Updates)]
    assert len(batches) == 1  # one frame for the 40 rows
    assert [u.ref for u in batches[0].items] == sorted(seqs)  # ref = seq, in seq order
    relay.release_acks()
    relay.pump()
    assert a.outbox() == []


def test_dataset_mismatch_refused_naming_both(tmp_path: Path) -> None:
    relay = MemRelay(tmp_path / "relay.db", serves="globex")
    a = make_node(tmp_path, "A")
    relay.connect(a, relay.store.enroll("acme", "A").token)
    with pytest.raises(DatasetMismatch) as err:
        relay.pump()
    assert "globex" in str(err.value) and "acme" in str(err.value)
    relay.store.close()
    # A relay that welcomes the node into another dataset is refused by the client.
    b = make_node(tmp_path, "B")
    driver = SyncDriver(
        b, ClientSession(dataset="acme", node="B", token="t"), wall_ms=lambda: START_MS
    )
    driver.data_to_send()
    welcome = encode_message(m.Welcome(1, "globex", "B", False, Limits(), 1500), max_frame=1 << 20)
    with pytest.raises(DatasetMismatch) as err2:
        driver.receive(welcome)
    assert "globex" in str(err2.value) and "acme" in str(err2.value)


def test_wrong_token_raises_auth_error(tmp_path: Path, relay: MemRelay) -> None:
    a = make_node(tmp_path, "A")
    relay.store.enroll("acme", "A")
    relay.connect(a, "not-the-token")
    with pytest.raises(AuthError):
        relay.pump()


def test_corrupt_fanout_is_a_download_failure_and_sync_goes_on(
    tmp_path: Path, relay: MemRelay
) -> None:
    a, b = make_node(tmp_path, "A"), make_node(tmp_path, "B")
    la = relay.connect(a, relay.store.enroll("acme", "A").token)
    lb = relay.connect(b, relay.store.enroll("acme", "B").token)
    relay.pump()
    lb.relay.send_update("customers", b"\xff\xfe garbage")
    lb.relay.send_update("no_such_collection", b"\x01\x02\x03")
    a.put("customers", {"code": "C1", "name": "One"})
    la.driver.poll()
    relay.pump()
    assert b.get("customers", "C1") is not None
    assert failure_counts(b) == {"upload": 0, "download": 2}
    rows = b.store.conn.execute(
        "SELECT direction, doc, reason, attempts FROM sync_failures ORDER BY doc"
    ).fetchall()
    assert rows[0][1] == "customers" and "not a valid update" in rows[0][2]
    with pytest.raises(UpdateError):  # the node itself still refuses the bytes
        b.import_updates({"customers": b"\xff\xfe garbage"})
    assert lb.relay.state is SessionState.OPEN


def test_a_frame_of_live_updates_is_one_commit_and_a_bad_one_fails_alone(
    tmp_path: Path, relay: MemRelay
) -> None:
    a, b = make_node(tmp_path, "A"), make_node(tmp_path, "B")  # A stays offline
    lb = relay.connect(b, relay.store.enroll("acme", "B").token)
    relay.pump()
    updates = []
    for i in range(5):
        before = a.state()
        a.put("customers", {"code": f"C{i}", "name": f"Customer {i}"})
        updates.append(("customers", a.export_updates(before, docs=["customers"])["customers"]))
    commits = []
    b.store.commit_points = lambda point: commits.append(point) if point == "after_commit" else None
    lb.relay.send_updates(updates)  # one frame, one document
    relay.pump()
    b.store.commit_points = None
    assert len(commits) == 1
    assert [r["code"] for r in b.list("customers")] == [f"C{i}" for i in range(5)]
    assert lb.driver.stats.imported == 5
    # One bad update in a frame: the others still arrive, it alone is recorded.
    before = a.state()
    a.put("customers", {"code": "C9", "name": "Nine"})
    good = a.export_updates(before, docs=["customers"])["customers"]
    lb.relay.send_updates([("customers", b"\xff\xfe garbage"), ("customers", good)])
    relay.pump()
    assert b.get("customers", "C9") is not None
    assert failure_counts(b) == {"upload": 0, "download": 1}
    assert lb.relay.state is SessionState.OPEN


def test_blocks_series_reserve_leased_on_connect(tmp_path: Path, relay: MemRelay) -> None:
    a = blocks_node(tmp_path, "A")
    coll = a.collection("sales_invoice")
    assert coll.series is not None and coll.series.strategy == "blocks"
    assert a.reserve_left("sales_invoice") == 0
    relay.connect(a, relay.store.enroll("acme", "A").token)
    relay.pump()
    assert a.reserve_left("sales_invoice") >= coll.series.reserve


def test_a_diff_larger_than_one_update_goes_up_in_parts(
    tmp_path: Path, relay: MemRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog bigger than the largest update the relay takes (100k offline
    records are ~40 MB) is answered in parts made of the outbox rows."""
    import engine.sync.driver as driver_mod

    monkeypatch.setattr(driver_mod, "MAX_ANSWER_BYTES", 4096)
    a, b = make_node(tmp_path, "A"), make_node(tmp_path, "B")
    for i in range(120):
        a.put("customers", {"code": f"KH{i:04}", "name": f"Khách hàng số {i}", "address": "x" * 40})
    whole = a.export_updates(docs=["customers"])["customers"]
    assert len(whole) > 4096 * 4
    la = relay.connect(a, relay.store.enroll("acme", "A").token)
    relay.pump()
    assert la.driver.synced
    assert la.driver.stats.diffs_sent > 4  # several parts for one document
    assert a.pending()["customers"] == 0  # every part acknowledged clears its rows
    lb = relay.connect(b, relay.store.enroll("acme", "B").token)
    relay.pump()
    assert lb.driver.synced
    assert books(a) == books(b)
    assert len(b.list("customers")) == 120


def test_acknowledged_work_the_relay_lost_goes_up_whole_when_too_big_for_parts(
    tmp_path: Path, relay: MemRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay restored from an older backup lacks work whose outbox rows
    were cleared: the diff cannot be split by rows, so it goes up whole
    (before, nothing went up and the sync called itself complete)."""
    import engine.sync.driver as driver_mod

    monkeypatch.setattr(driver_mod, "MAX_ANSWER_BYTES", 4096)
    a = make_node(tmp_path, "A")
    for i in range(120):
        a.put("customers", {"code": f"KH{i:04}", "name": f"Khách hàng số {i}", "address": "x" * 40})
    la = relay.connect(a, relay.store.enroll("acme", "A").token)
    relay.pump()
    assert la.driver.synced and a.pending()["customers"] == 0
    restored = MemRelay(tmp_path / "restored.db")  # the backup from before A's work
    token = restored.store.enroll("acme", "A").token
    lr = restored.connect(a, token)
    restored.pump()
    assert lr.driver.synced and lr.driver.stats.diffs_sent >= 1
    assert failure_counts(a) == {"upload": 0, "download": 0}
    b = make_node(tmp_path, "B")
    lb = restored.connect(b, restored.store.enroll("acme", "B").token)
    restored.pump()
    assert lb.driver.synced
    assert len(b.list("customers")) == 120 and books(a) == books(b)


def test_export_parts_cover_the_outbox_and_converge(tmp_path: Path) -> None:
    a, b = make_node(tmp_path, "A"), make_node(tmp_path, "B")
    for i in range(60):
        a.put("items", {"code": f"SP{i:03}", "name": f"Hàng {i}", "price": f"{i}.50"})
    seqs = [seq for seq, doc, _ in a.outbox() if doc == "items"]
    parts = a.export_parts("items", None, 2048)
    assert len(parts) > 2
    assert all(len(data) <= 2048 for _, data in parts[:-1])
    assert [s for carried, _ in parts for s in carried] == seqs
    for _, data in parts:
        b.import_updates({"items": data})
    assert b.list("items") == a.list("items")
    # When the diff fits, it is one part carrying every pending row.
    [(carried, data)] = a.export_parts("items", None, 1 << 30)
    assert carried == seqs and data


def blocks_node(tmp_path: Path, name: str) -> Node:
    """A node whose sales invoices are numbered from blocks leased by the relay."""
    schema = tmp_path / "blocks.toml"
    text = (Path(__file__).parents[1] / "engine/schema/accounting.toml").read_text()
    schema.write_text(
        text.replace('prefix = "HD", strategy = "node"', 'prefix = "HD", strategy = "blocks"')
    )
    n = Node.create(
        tmp_path / name,
        dataset="acme",
        node=name,
        schema=schema,
        clock=ManualClock(START_MS),
        rng=random.Random(name),
    )
    n.put("customers", {"code": "C1", "name": "One"})
    n.put("warehouses", {"code": "W1", "name": "Main"})
    n.put("items", {"code": "I1", "name": "Item", "unit": "pcs", "price": "10"})
    return n


def sell(n: Node, count: int) -> None:
    for _ in range(count):
        n.post_voucher(
            "sales_invoice",
            {
                "date": "2026-02-10",
                "customer": "C1",
                "warehouse": "W1",
                "lines": [{"item": "I1", "qty": "1", "price": "10"}],
            },
        )


def test_reserve_refilled_while_live_and_refusals_back_off(tmp_path: Path, relay: MemRelay) -> None:
    import engine.sync.driver as driver_mod

    a = blocks_node(tmp_path, "A")
    target = a.collection("sales_invoice").series.reserve  # type: ignore[union-attr]
    link = relay.connect(a, relay.store.enroll("acme", "A").token)
    relay.pump()
    now = 0

    def at(ms: int) -> None:
        """Move the driver's clock to ``ms``, poll, and let the frames move."""
        link.driver.tick(ms)
        link.driver.poll()
        relay.pump()

    at(now)
    assert a.reserve_left("sales_invoice") >= target
    # Bookings use the reserve up to below its target: refilled while live,
    # without waiting for the next connection.
    sell(a, a.reserve_left("sales_invoice") - target + 1)
    assert a.reserve_left("sales_invoice") < target
    now += driver_mod.LEASE_CHECK_MS
    at(now)
    assert a.reserve_left("sales_invoice") >= target
    assert len(relay.lease_requests) == 2

    # Refused: asked again only after a backoff that doubles, then granted.
    relay.deny_leases = True
    sell(a, a.reserve_left("sales_invoice") - target + 1)
    now += driver_mod.LEASE_CHECK_MS
    at(now)
    assert len(relay.lease_requests) == 3  # refused
    base = driver_mod.LEASE_RETRY_BASE_MS
    at(now + base - 1)
    assert len(relay.lease_requests) == 3  # still backing off
    at(now + base)
    assert len(relay.lease_requests) == 4  # refused again: now waits 2 * base
    at(now + base + 2 * base - 1)
    assert len(relay.lease_requests) == 4
    relay.deny_leases = False
    at(now + base + 2 * base)
    assert len(relay.lease_requests) == 5
    assert a.reserve_left("sales_invoice") >= target
    assert link.driver.stats.extra["leases_denied"] == 2


def test_progress_counts_records_both_ways(tmp_path: Path, relay: MemRelay) -> None:
    a, b = make_node(tmp_path, "A"), make_node(tmp_path, "B")
    book_day(a, "x")  # 1 customer, 1 item, 1 warehouse, 3 invoices in 2 periods
    a.put("customers", {"code": "C-y", "name": "Y"})
    a.put("customers", {"code": "C-y", "name": "Y again"})  # 2 updates, 1 record
    la = relay.connect(a, relay.store.enroll("acme", "A").token)
    relay.pump()
    lb = relay.connect(b, relay.store.enroll("acme", "B").token)
    relay.pump()
    expected = {"customers": 2, "items": 1, "warehouses": 1, "sales_invoice": 3}
    for link in (la, lb):
        last = {c: (d, t) for c, d, t in link.progress}
        assert {c: last[c] for c in expected} == {c: (n, n) for c, n in expected.items()}
        assert all(d <= t for _, d, t in link.progress)
        assert {c: p.docs_done for c, p in link.driver.progress.items()} == {
            c: p.docs_total for c, p in link.driver.progress.items()
        }


def test_document_this_schema_lacks_waits_for_retry(tmp_path: Path, relay: MemRelay) -> None:
    """A received document of a collection the node's schema lacks is a
    download failure; it is left out of later passes until ``retry``, which
    a connected driver picks up from another connection (e.g. the CLI)."""
    from engine.sync import list_failures, retry

    text = (Path(__file__).parents[1] / "engine/schema/accounting.toml").read_text()
    start = text.index("[collections.tasks]")
    end = text.index("[collections.", start + 1)
    narrow = tmp_path / "narrow.toml"
    narrow.write_text(text[:start] + text[end:])
    a = make_node(tmp_path, "A")
    b = Node.create(tmp_path / "B", dataset="acme", node="B", schema=narrow)
    a.put("tasks", {"code": "T1", "title": "Count the stock"})
    a.put("customers", {"code": "C1", "name": "One"})
    relay.connect(a, relay.store.enroll("acme", "A").token)
    relay.pump()
    token_b = relay.store.enroll("acme", "B").token
    lb = relay.connect(b, token_b)
    relay.pump()
    assert lb.driver.synced and b.get("customers", "C1") is not None
    [failure] = list_failures(b)
    assert (failure.direction, failure.doc, failure.code) == ("download", "tasks", "schema")
    assert "does not have" in failure.reason and failure.attempts == 1

    lb.cut()  # a new connection does not ask for it again
    lb = relay.connect(b, token_b)
    relay.pump()
    assert lb.driver.synced and list_failures(b)[0].attempts == 1

    with Node.open(b.home) as other:  # `branchline retry` in another process
        retry(other)
    assert lb.driver.poll() == 0
    relay.pump()
    [again] = list_failures(b)
    assert again.id == failure.id and again.attempts == 2 and not again.retrying
    assert lb.driver.synced


def test_yearly_blocks_restart_per_year_and_late_vouchers_get_numbers(
    tmp_path: Path, relay: MemRelay
) -> None:
    """Two offline nodes book vouchers dated 31 Dec and 1 Jan of a yearly
    ``blocks`` series: the relay leases per series key (``sales_invoice@2027``
    starts at 1), each node asks for the years its provisional vouchers wait
    in, and no number is used twice."""
    nodes = [blocks_node(tmp_path, name) for name in ("A", "B")]
    tokens = {n.node_id: relay.store.enroll("acme", n.node_id).token for n in nodes}
    for n in nodes:
        for day in ("2026-12-31", "2027-01-01", "2026-12-31", "2027-01-01"):
            n.post_voucher(
                "sales_invoice",
                {"date": day, "customer": "C1", "warehouse": "W1",
                 "lines": [{"item": "I1", "qty": "1", "price": "10"}]},
            )  # fmt: skip
    for n in nodes:
        relay.connect(n, tokens[n.node_id])
        relay.pump()
    for n in nodes:
        relay.connect(n, tokens[n.node_id])
        relay.pump()
    assert "sales_invoice@2027" in relay.lease_requests
    numbers = {r["number"]: r["date"] for r in nodes[0].list("sales_invoice")}
    assert sorted(numbers) == sorted(r["number"] for r in nodes[1].list("sales_invoice"))
    assert len(numbers) == 8 and not any("-P" in n for n in numbers)  # all final
    for number, date in numbers.items():
        assert f"-{str(date)[:4]}-" in number  # each in its own year's series
    new_year = sorted(n for n in numbers if "-2027-" in n)
    assert new_year[0].endswith("-2027-000001")  # the new year starts at 1
