"""The acceptance suite every ``RelayStore`` passes; a store's tests run it in
a few lines::

    import pytest
    from engine.relay.testing import CHECKS, StoreMaker

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    def test_contract(check, tmp_path):
        check(MyMaker(...), tmp_path)

A ``StoreMaker`` creates one new empty store and opens more handles on it,
as other processes would. The checks cover, on real nodes and raw Yjs
updates: enrollment and hashed tokens, refusals and their error kinds,
duplicates, waiting updates, compaction, document limits, period locks,
leases (exact under concurrent callers), revocations seen by another
handle, last seen, positions (``head``, ``logged_after``, ``wait_changes``),
two handles appending to one dataset at once (positions gapless and in
commit order, no row twice, authorship still checked), and two processes
appending and leasing at once. The maker must survive a fork (the last
check opens stores in child processes).
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Doc, Map

from ..errors import (
    AuthError,
    NodeRevoked,
    NotAuthor,
    PeriodLocked,
    ReadOnlyNode,
    RelayLimitError,
    StoreError,
    UnknownDataset,
    UnknownNode,
    UpdateError,
    UpdateTooLarge,
    UserError,
)
from ..node import Node
from .doccache import RelayLimits
from .store import EMPTY_UPDATE, Logged, RelayStore, UpdateIn


class StoreMaker(ABC):
    """Makes the stores of one check."""

    @abstractmethod
    def create(self, limits: RelayLimits | None = None) -> RelayStore:
        """A new, empty store (called once per maker, first)."""

    @abstractmethod
    def open(self, limits: RelayLimits | None = None) -> RelayStore:
        """Another handle on the store ``create`` made, as another process
        would open it (its own connections and caches)."""


Check = Callable[[StoreMaker, Path], None]
CHECKS: list[Check] = []


def _check(fn: Check) -> Check:
    CHECKS.append(fn)
    return fn


# -- helpers --------------------------------------------------------------------


def node_updates(node: Node, author: str) -> list[UpdateIn]:
    """The node's whole outbox as updates sent by ``author``."""
    return [UpdateIn(doc, data, author) for _, doc, data in node.outbox(100_000)]


def push(store: RelayStore, node: Node, author: str) -> list[str]:
    """Append the node's outbox to dataset acme; every update must be taken."""
    results = store.append_updates("acme", node_updates(node, author))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    return [r.status for r in results]


def pull(store: RelayStore, node: Node) -> None:
    """Bring ``node`` up to date from the store's diffs."""
    state = node.state()
    node.import_updates(
        {doc: store.diff("acme", doc, state.get(doc)) for doc in store.documents("acme")}
    )


def customers(node: Node) -> dict[str, str]:
    return {r["code"]: r["name"] for r in node.list("customers")}


def map_updates(n: int, client_id: int, author: str = "X") -> list[bytes]:
    """``n`` updates of one client, each setting one entry ``k<i>|author``."""
    doc: Doc[Any] = Doc(client_id=client_id)
    m = doc.get("r", type=Map)
    out = []
    for i in range(n):
        sv = doc.get_state()
        m[f"k{i}|{author}"] = f"v{i}"
        out.append(doc.get_update(sv))
    return out


def check_disjoint(ranges: list[tuple[int, int]]) -> None:
    """The leased ranges tile 1..N with no gap and no overlap."""
    ranges = sorted(ranges)
    for (_, last), (first, _) in itertools.pairwise(ranges):
        assert first == last + 1, f"gap or overlap: {ranges}"
    assert ranges[0][0] == 1


def _entries(data: bytes) -> dict[str, Any]:
    doc: Doc[Any] = Doc()
    doc.apply_update(data)
    return dict(doc.get("r", type=Map))


# -- nodes and tokens -------------------------------------------------------------


@_check
def check_enroll_authenticate_revoke(maker: StoreMaker, tmp: Path) -> None:
    store = maker.create()
    first = store.enroll("acme", "HN")
    assert first.dataset_created and not first.replaced
    assert first.token not in repr(first)
    grant = store.authenticate("acme", "HN", first.token)
    assert (grant.dataset, grant.node, grant.read_only) == ("acme", "HN", False)
    ro = store.enroll("acme", "till1", read_only=True)
    assert not ro.dataset_created
    assert store.authenticate("acme", "till1", ro.token).read_only
    assert store.enroll("acme", "HO", carrier=True).carrier
    # Wrong token, unknown node, unknown dataset, another node's token: one
    # message shape that does not say which part was wrong.
    messages = set()
    wrong = ("y" if first.token[0] == "x" else "x") + first.token[1:]
    for dataset, node, token in [
        ("acme", "HN", wrong),
        ("acme", "nobody", first.token),
        ("other", "HN", first.token),
        ("acme", "HN", ro.token),
    ]:
        with pytest.raises(AuthError) as info:
            store.authenticate(dataset, node, token)
        assert not isinstance(info.value, NodeRevoked)
        assert first.token not in str(info.value) and ro.token not in str(info.value)
        messages.add(str(info.value).split(":", 1)[1])
    assert len(messages) == 1
    assert store.revoke("acme", "HN") is True
    assert store.revoke("acme", "HN") is False
    with pytest.raises(NodeRevoked):
        store.authenticate("acme", "HN", first.token)
    with pytest.raises(UnknownNode):
        store.revoke("acme", "nobody")
    with pytest.raises(UnknownDataset):
        store.revoke("other", "HN")
    again = store.enroll("acme", "HN")
    assert again.replaced and again.token != first.token
    assert store.authenticate("acme", "HN", again.token).node == "HN"
    with pytest.raises(AuthError):
        store.authenticate("acme", "HN", first.token)
    nodes = {n.name: n for n in store.status()[0].nodes}
    assert nodes["HO"].carrier and nodes["till1"].read_only and not nodes["HN"].revoked
    store.close()


@_check
def check_names_are_validated(maker: StoreMaker, tmp: Path) -> None:
    store = maker.create()
    for dataset, node in [("", "HN"), ("a b", "HN"), ("acme", "x" * 33), ("acme", "a.b")]:
        with pytest.raises(UserError):
            store.enroll(dataset, node)
    assert store.status() == []
    store.close()


@_check
def check_revocations_counter_and_lapsed_grants_across_handles(
    maker: StoreMaker, tmp: Path
) -> None:
    serving = maker.create()
    a, b = serving.enroll("acme", "A"), serving.enroll("acme", "B")
    grants = [serving.authenticate("acme", n, e.token) for n, e in (("A", a), ("B", b))]
    assert a.token not in repr(grants[0])
    start = serving.revocations()
    assert serving.lapsed(grants) == {}
    admin = maker.open()
    admin.revoke("acme", "A")
    assert admin.revoke("acme", "A") is False
    admin.enroll("acme", "B")
    admin.enroll("acme", "C")  # a new node replaces no token
    admin.close()
    assert serving.revocations() == start + 2
    lapsed = serving.lapsed(grants)
    assert "revoked" in lapsed[grants[0]] and "enrolled again" in lapsed[grants[1]]
    assert a.token not in str(lapsed) and b.token not in str(lapsed)
    serving.close()


@_check
def check_last_seen_keeps_the_latest(maker: StoreMaker, tmp: Path) -> None:
    store = maker.create()
    store.enroll("acme", "A")
    store.enroll("acme", "B")
    assert store.last_seen() == {}
    store.note_seen("acme", "A", 2000)
    store.note_seen("acme", "A", 1000)  # older: ignored
    other = maker.open()
    other.note_seen("acme", "B", 500)
    other.close()
    assert store.last_seen() == {("acme", "A"): 2000, ("acme", "B"): 500}
    store.close()


# -- updates ----------------------------------------------------------------------


@_check
def check_append_dedupes_and_diff_gives_what_a_client_lacks(maker: StoreMaker, tmp: Path) -> None:
    store = maker.create()
    store.enroll("acme", "A")
    store.enroll("acme", "B")
    a = Node.create(tmp / "a", dataset="acme", node="A")
    b = Node.create(tmp / "b", dataset="acme", node="B")
    for i in range(30):
        a.put("customers", {"code": f"K{i}", "name": f"a{i}"})
    assert set(push(store, a, "A")) == {"stored"}
    assert set(push(store, a, "A")) == {"duplicate"}  # re-sent: nothing stored twice
    assert store.status()[0].documents[0].updates == 30
    pull(store, b)
    assert customers(b) == customers(a)
    state = b.state()
    for doc in store.documents("acme"):
        assert store.diff("acme", doc, state[doc]) == EMPTY_UPDATE
    whole = [UpdateIn(d, u, "B") for d, u in b.export_updates().items()]
    assert {r.status for r in store.append_updates("acme", whole)} == {"duplicate"}
    a.ack([s for s, _, _ in a.outbox()])
    b.put("customers", {"code": "K1", "name": "from B"})
    a.put("customers", {"code": "K2", "name": "from A"})
    push(store, b, "B")
    push(store, a, "A")
    pull(store, a)
    pull(store, b)
    assert customers(a) == customers(b)
    assert customers(a)["K1"] == "from B" and customers(a)["K2"] == "from A"
    c = Node.create(tmp / "c", dataset="acme", node="C")
    pull(store, c)
    assert customers(c) == customers(a)
    for n in (a, b, c):
        n.close()
    store.close()


@_check
def check_rejections_leave_the_rest_of_the_batch(maker: StoreMaker, tmp: Path) -> None:
    limits = RelayLimits(max_update_bytes=4096)
    store = maker.create(limits)
    store.enroll("acme", "A")
    store.enroll("acme", "RO", read_only=True)
    store.enroll("acme", "GONE")
    store.revoke("acme", "GONE")
    a = Node.create(tmp / "a", dataset="acme", node="A")
    a.put("customers", {"code": "K1", "name": "x"})
    good = node_updates(a, "A")[0]
    batch = [
        UpdateIn(good.doc, b"\x01\x02garbage", "A"),
        UpdateIn(good.doc, good.data, "RO"),
        UpdateIn(good.doc, good.data, "GONE"),
        UpdateIn(good.doc, good.data, "stranger"),
        UpdateIn("Bad Doc!", good.data, "A"),
        UpdateIn(good.doc, b"\x00" * 5000, "A"),
        good,
    ]
    results = store.append_updates("acme", batch)
    assert [type(r.error) for r in results] == [
        UpdateError,
        ReadOnlyNode,
        NodeRevoked,
        AuthError,
        UpdateError,
        UpdateTooLarge,
        type(None),
    ]
    assert results[-1].status == "stored"
    assert store.status()[0].documents[0].updates == 1
    with pytest.raises(UnknownDataset):
        store.append_updates("other", [good])
    with pytest.raises(RelayLimitError):
        store.append_updates("acme", [good] * (limits.max_batch + 1))
    with pytest.raises(UpdateError):
        store.diff("acme", good.doc, b"\xff\xff\xff")
    assert store.diff("acme", "vendors", None) == EMPTY_UPDATE
    assert store.state_vector("acme", "vendors") == b"\x00"
    a.close()
    store.close()


@_check
def check_durable_across_reopen_and_compaction(maker: StoreMaker, tmp: Path) -> None:
    limits = RelayLimits(compact_after=7, compact_ratio=0)  # every 7 rows
    store = maker.create(limits)
    store.enroll("acme", "A")
    a = Node.create(tmp / "a", dataset="acme", node="A")
    for i in range(50):
        a.put("customers", {"code": f"K{i}", "name": f"n{i}"})
        push(store, a, "A")
        a.ack([s for s, _, _ in a.outbox()])
    before = store.diff("acme", "customers")
    info = store.status()[0].documents[0]
    assert info.updates == 50 and info.log_rows < 7  # folded by automatic compaction
    store.close()
    store = maker.open(limits)
    b = Node.create(tmp / "b", dataset="acme", node="B")
    pull(store, b)
    assert customers(b) == customers(a)
    store.compact("acme")
    assert store.status()[0].documents[0].log_rows == 0
    store.close()
    store = maker.open()
    c = Node.create(tmp / "c", dataset="acme", node="C")
    pull(store, c)
    assert customers(c) == customers(a)
    d: Doc[Any] = Doc()
    d.apply_update(before)
    e: Doc[Any] = Doc()
    e.apply_update(store.diff("acme", "customers"))
    assert d.get_state() == e.get_state()
    for n in (a, b, c):
        n.close()
    store.close()


@_check
def check_out_of_order_updates_wait_and_survive_compaction(maker: StoreMaker, tmp: Path) -> None:
    store = maker.create()
    store.enroll("acme", "X")
    u = map_updates(4, client_id=77)
    late = [UpdateIn("customers", u[2], "X"), UpdateIn("customers", u[3], "X")]
    # From a node that is not a carrier a waiting update is refused: what it
    # will change cannot be checked.
    refused = store.append_updates("acme", late)
    assert [type(r.error) for r in refused] == [NotAuthor, NotAuthor]
    assert "waits for changes" in str(refused[0].error)
    store.enroll("acme", "X", carrier=True)
    assert [r.status for r in store.append_updates("acme", late)] == ["stored", "stored"]
    assert [r.status for r in store.append_updates("acme", late)] == ["duplicate", "duplicate"]
    store.compact("acme")
    store.close()
    store = maker.open()
    early = [UpdateIn("customers", u[0], "X"), UpdateIn("customers", u[1], "X")]
    assert [r.status for r in store.append_updates("acme", early)] == ["stored", "stored"]
    store.compact("acme")
    assert store.status()[0].documents[0].log_rows == 0  # the waiting rows are covered now
    store.close()
    store = maker.open()
    assert _entries(store.diff("acme", "customers")) == {f"k{i}|X": f"v{i}" for i in range(4)}
    store.close()


@_check
def check_document_count_limit(maker: StoreMaker, tmp: Path) -> None:
    store = maker.create(RelayLimits(max_documents_per_dataset=2))
    store.enroll("acme", "X")
    (data,) = map_updates(1, client_id=5)
    results = store.append_updates(
        "acme", [UpdateIn(n, data, "X") for n in ("customers", "vendors", "items")]
    )
    assert [r.status for r in results] == ["stored", "stored", "rejected"]
    assert isinstance(results[2].error, RelayLimitError)
    assert store.documents("acme") == ["customers", "vendors"]
    store.close()


@_check
def check_revoke_by_another_handle_takes_effect_on_next_write(maker: StoreMaker, tmp: Path) -> None:
    server = maker.create()
    server.enroll("acme", "X")
    u = map_updates(2, client_id=9)
    assert server.append_updates("acme", [UpdateIn("customers", u[0], "X")])[0].ok
    admin = maker.open()
    admin.revoke("acme", "X")
    admin.close()
    result = server.append_updates("acme", [UpdateIn("customers", u[1], "X")])[0]
    assert isinstance(result.error, NodeRevoked)
    server.close()


@_check
def check_period_locks_refuse_updates_of_their_documents_only(maker: StoreMaker, tmp: Path) -> None:
    store = maker.create()
    store.enroll("acme", "X")
    docs = ["customers", "journal/2025", "journal/2026", "journal/2026-11", "journal/2026-12"]
    docs += ["sales_invoice/2026-11"]
    updates = {d: map_updates(1, client_id=100 + i)[0] for i, d in enumerate(docs)}

    def refused(names: list[str]) -> set[str]:
        results = store.append_updates("acme", [UpdateIn(d, updates[d], "X") for d in names])
        out = set()
        for name, r in zip(names, results, strict=True):
            if r.status == "rejected":
                assert isinstance(r.error, PeriodLocked)
                assert repr(name) in str(r.error) and "locked" in str(r.error)
                out.add(name)
        return out

    assert store.lock_period("acme", "2026-11") is True
    assert store.lock_period("acme", "2026-11") is False
    assert refused(docs) == {"journal/2026-11", "sales_invoice/2026-11"}
    assert store.status()[0].locks == ["2026-11"]
    assert store.unlock_period("acme", "2026-11") is True
    assert store.unlock_period("acme", "2026-11") is False
    assert store.lock_period("acme", "2026")
    updates = {d: map_updates(1, client_id=200 + i)[0] for i, d in enumerate(docs)}
    assert refused(docs) == {
        "journal/2026",
        "journal/2026-11",
        "journal/2026-12",
        "sales_invoice/2026-11",
    }
    assert store.diff("acme", "journal/2026") != EMPTY_UPDATE  # stored before the year lock
    assert store.diff("acme", "journal/2026-11") == EMPTY_UPDATE
    with pytest.raises(UserError, match="YYYY or YYYY-MM"):
        store.lock_period("acme", "2026-13")
    with pytest.raises(UnknownDataset):
        store.lock_period("nope", "2026")
    store.close()


# -- series leases ----------------------------------------------------------------


@_check
def check_lease_arguments(maker: StoreMaker, tmp: Path) -> None:
    store = maker.create()
    store.enroll("acme", "A")
    for bad in (0, -1, True):
        with pytest.raises(UserError):
            store.lease("acme", "s", bad)
    with pytest.raises(UserError):
        store.lease("acme", "bad key!", 1)
    with pytest.raises(RelayLimitError):
        store.lease("acme", "s", RelayLimits().max_lease + 1)
    with pytest.raises(UnknownDataset):
        store.lease("other", "s", 1)
    assert store.lease("acme", "s", 1) == (1, 1)
    assert store.lease("acme", "s", 3, node="A") == (2, 4)
    assert store.status()[0].series == {"s": 5}
    store.close()


@_check
def check_concurrent_leases_are_exact(maker: StoreMaker, tmp: Path) -> None:
    """Threads on one handle and on handles of their own never get the same
    number (and leave no gap)."""
    shared = maker.create()
    shared.enroll("acme", "A")
    ranges: list[tuple[int, int]] = []
    lock = threading.Lock()
    failures: list[BaseException] = []

    def worker(own: bool, seed: int) -> None:
        rng = random.Random(seed)
        try:
            store = maker.open() if own else shared
            for _ in range(30):
                r = store.lease("acme", "sales", rng.randint(1, 20))
                with lock:
                    ranges.append(r)
            if own:
                store.close()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i % 2 == 0, i)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shared.close()
    assert not failures, failures
    assert len(ranges) == 180
    check_disjoint(ranges)


# -- positions ----------------------------------------------------------------------


@_check
def check_positions_head_and_logged_after(maker: StoreMaker, tmp: Path) -> None:
    store = maker.create(RelayLimits(compact_after=5, compact_ratio=0, keep_positions=8))
    with pytest.raises(UnknownDataset):
        store.head("acme")
    with pytest.raises(UnknownDataset):
        store.logged_after("acme", 0, 10)
    store.enroll("acme", "X")
    store.enroll("beta", "X")
    assert store.head("acme") == 0 and store.logged_after("acme", 0, 10) == []
    for bad in (-1, True):
        with pytest.raises(UserError):
            store.logged_after("acme", bad, 10)
    with pytest.raises(UserError):
        store.logged_after("acme", 0, 0)
    u = map_updates(4, client_id=31)
    results = store.append_updates(
        "acme",
        [
            UpdateIn("customers", u[0], "X"),
            UpdateIn("customers", u[0], "X"),  # duplicate: no position
            UpdateIn("vendors", u[0], "X"),
            UpdateIn("customers", b"junk", "X"),  # rejected: no position
            UpdateIn("customers", u[1], "X"),
        ],
    )
    assert [r.position for r in results] == [1, None, 2, None, 3]
    assert store.head("acme") == 3 and store.head("beta") == 0  # datasets apart
    logged = store.logged_after("acme", 0, 10)
    assert logged == [
        Logged(1, "customers", u[0], "X"),
        Logged(2, "vendors", u[0], "X"),
        Logged(3, "customers", u[1], "X"),
    ]
    assert store.logged_after("acme", 1, 1) == logged[1:2]
    assert store.logged_after("acme", 3, 10) == []
    # Compaction keeps folded rows within keep_positions of the head: a
    # follower close behind still reads rows; one far behind gets None.
    more = map_updates(30, client_id=32)
    for i, data in enumerate(more):
        store.append_updates("acme", [UpdateIn("items", data, "X")])
        assert store.head("acme") == 4 + i
    store.compact("acme")
    head = store.head("acme")
    recent = store.logged_after("acme", head - 8, 100)
    assert recent is not None and [r.position for r in recent] == list(range(head - 7, head + 1))
    assert store.logged_after("acme", 0, 100) is None
    # The folded rows' content is in the snapshot: the diff still has all.
    assert len(_entries(store.diff("acme", "items"))) == 30
    other = maker.open()
    assert other.head("acme") == head
    other.close()
    store.close()


@_check
def check_wait_changes_sees_commits_of_every_handle(maker: StoreMaker, tmp: Path) -> None:
    store = maker.create()
    store.enroll("acme", "X")
    store.enroll("beta", "X")
    store.wait_changes(0.05)  # whatever happened since opening
    assert store.wait_changes(0.05) == set()  # nothing since the previous call
    u = map_updates(2, client_id=41)
    store.append_updates("acme", [UpdateIn("customers", u[0], "X")])
    assert "acme" in _wait_for(store, "acme")
    other = maker.open()
    other.append_updates("beta", [UpdateIn("customers", u[0], "X")])
    assert "beta" in _wait_for(store, "beta")
    # A waiter blocked in another thread wakes for another handle's commit.
    got: list[set[str]] = []
    waiter = threading.Thread(target=lambda: got.append(_wait_for(store, "acme")))
    waiter.start()
    other.append_updates("acme", [UpdateIn("customers", u[1], "X")])
    waiter.join(30)
    assert got and "acme" in got[0]
    other.close()
    store.close()


@_check
def check_close_ends_a_wait_at_once(maker: StoreMaker, tmp: Path) -> None:
    store = maker.create()
    store.wait_changes(0.01)
    done = threading.Event()

    def wait() -> None:
        with contextlib.suppress(StoreError):  # "closed" is a fine answer too
            store.wait_changes(30)
        done.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.1)
    store.close()
    waiter.join(5)
    assert done.is_set(), "close() left wait_changes blocked"


def _wait_for(store: RelayStore, dataset: str, seconds: float = 10.0) -> set[str]:
    """Datasets ``wait_changes`` named until it named ``dataset`` (at most
    ``seconds`` of 0.5 s waits)."""
    seen: set[str] = set()
    for _ in range(int(seconds / 0.5)):
        seen |= store.wait_changes(0.5)
        if dataset in seen:
            break
    return seen


@_check
def check_two_handles_append_to_one_dataset_at_once(maker: StoreMaker, tmp: Path) -> None:
    """Two handles (two relay processes' view) append concurrently: every
    update is stored once, positions are 1..N without gap in commit order,
    both handles serve everything, and authorship is still checked."""
    first = maker.create()
    for name in ("A", "B", "C"):
        first.enroll("acme", name)
    second = maker.open()
    per = 40
    updates = {n: map_updates(per, client_id=50 + i, author=n) for i, n in enumerate("AB")}
    failures: list[BaseException] = []
    positions: dict[str, list[int]] = {"A": [], "B": []}

    def writer(store: RelayStore, node: str) -> None:
        try:
            for data in updates[node]:
                (r,) = store.append_updates("acme", [UpdateIn("customers", data, node)])
                assert r.status == "stored" and r.position is not None, r
                positions[node].append(r.position)
        except BaseException as exc:
            failures.append(exc)

    threads = [
        threading.Thread(target=writer, args=(first, "A")),
        threading.Thread(target=writer, args=(second, "B")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert first.head("acme") == second.head("acme") == 2 * per
    for node in "AB":  # each writer's own updates in its order
        assert positions[node] == sorted(positions[node])
    logged = first.logged_after("acme", 0, 1000)
    assert logged is not None
    assert [r.position for r in logged] == list(range(1, 2 * per + 1))
    assert sorted(r.data for r in logged) == sorted(updates["A"] + updates["B"])
    expected = {f"k{i}|{n}": f"v{i}" for n in "AB" for i in range(per)}
    assert _entries(first.diff("acme", "customers")) == expected
    assert _entries(second.diff("acme", "customers")) == expected
    # Re-sent through the other handle: duplicates, no new position.
    again = second.append_updates("acme", [UpdateIn("customers", updates["A"][0], "A")])
    assert again[0].status == "duplicate" and second.head("acme") == 2 * per
    # C may not change A's entry, whichever handle it goes through (each
    # handle's document must hold A's entries written through the other).
    doc: Doc[Any] = Doc()
    doc.apply_update(first.diff("acme", "customers"))
    sv = doc.get_state()
    doc.get("r", type=Map)["k0|A"] = "stolen"
    theft = doc.get_update(sv)
    for store in (first, second):
        (r,) = store.append_updates("acme", [UpdateIn("customers", theft, "C")])
        assert isinstance(r.error, NotAuthor), r
    first.close()
    second.close()


def _process_writer(maker: StoreMaker, node: str, client_id: int, out: Any) -> None:
    """In a child process: append ``node``'s updates one by one through a
    store of its own, leasing numbers between them; report what it got."""
    try:
        store = maker.open()
        rng = random.Random(client_id)
        positions, leases = [], []
        for data in map_updates(25, client_id=client_id, author=node):
            (r,) = store.append_updates("acme", [UpdateIn("customers", data, node)])
            assert r.status == "stored" and r.position is not None, r
            positions.append(r.position)
            leases.append(store.lease("acme", "sales", rng.randint(1, 9)))
        store.close()
        out.put((node, positions, leases, None))
    except BaseException as exc:
        out.put((node, [], [], repr(exc)))


@_check
def check_two_processes_append_and_lease_at_once(maker: StoreMaker, tmp: Path) -> None:
    """Two processes with stores of their own: positions gapless in commit
    order, every update stored once, leases exact."""
    store = maker.create()
    for name in ("A", "B"):
        store.enroll("acme", name)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_process_writer, args=(maker, n, 70 + i, out))
        for i, n in enumerate("AB")
    ]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert [g[3] for g in got] == [None, None], got
    assert all(p == sorted(p) for _, p, _, _ in got)
    assert store.head("acme") == 50
    logged = store.logged_after("acme", 0, 100)
    assert logged is not None and [r.position for r in logged] == list(range(1, 51))
    expected = {f"k{i}|{n}": f"v{i}" for n in "AB" for i in range(25)}
    assert _entries(store.diff("acme", "customers")) == expected
    check_disjoint([r for _, _, leases, _ in got for r in leases])
    store.close()
