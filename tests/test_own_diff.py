"""Own-only diffs (``Node.export_parts(own_only=True)``) and the ``clients``
table they rest on (node store format 3).

A relay that checks authorship refuses an update from a node that is not a
carrier when it would change or remove another node's entry, or when part
of it waits for changes the relay has not seen. The real relay store
(``SqliteRelayStore``) judges here, and pycrdt replicas show what an update
would do to another node's keys.
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map, MapEvent, get_update
from store_formats import downgrade

from engine.clock import ManualClock
from engine.crdt import decode_state_vector, encode_state_vector
from engine.crdt.document import ROOT
from engine.errors import NotAuthor
from engine.node import EMPTY_UPDATE, Node
from engine.relay import authorship
from engine.relay.sqlite_store import SqliteRelayStore
from engine.relay.store import UpdateIn
from engine.store import FORMAT_VERSION, STORE_FILE
from engine.writes import Writer

START_MS = 1_767_225_600_000
BIG = 1 << 30
DOC = "customers"


def make(tmp: Path, name: str, seed: int | str | None = None) -> Node:
    return Node.create(
        tmp / name,
        dataset="acme",
        node=name,
        clock=ManualClock(START_MS),
        rng=random.Random(seed if seed is not None else name),
    )


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[SqliteRelayStore]:
    store = SqliteRelayStore.create(tmp_path / "relay.db")
    for name in ("A", "B", "C"):
        store.enroll("acme", name)
    yield store
    store.close()


def publish(relay: SqliteRelayStore, node: str, data: bytes, doc: str = DOC) -> NotAuthor | None:
    """Offer ``data`` to the relay as ``node``: None when it took it."""
    (result,) = relay.append_updates("acme", [UpdateIn(doc, data, node)])
    if result.status == "rejected":
        assert isinstance(result.error, NotAuthor), result.error
        return result.error
    return None


def entries(*updates: bytes) -> dict[str, str]:
    """The map a replica holding ``updates`` shows."""
    doc: Doc[Any] = Doc()
    for update in updates:
        if update:
            doc.apply_update(update)
    return dict(doc.get(ROOT, type=Map).items())


def of(node: str, found: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in found.items() if k.endswith(f"|{node}")}


def others(node: str, found: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in found.items() if not k.endswith(f"|{node}")}


def only_part(node: Node, since: bytes | None, *, own_only: bool) -> tuple[list[int], bytes]:
    (part,) = node.export_parts(DOC, since, BIG, own_only=own_only)
    return part


def outbox_seqs(node: Node, doc: str = DOC) -> list[int]:
    return [seq for seq, d, _ in node.outbox() if d == doc]


def clients(home: Path) -> list[int]:
    conn = sqlite3.connect(home / STORE_FILE)
    try:
        return [int(r[0]) for r in conn.execute("SELECT client FROM clients ORDER BY first_at")]
    finally:
        conn.close()


# -- own-only diffs ------------------------------------------------------------------


def test_own_only_diff_carries_own_entries_and_leaves_other_nodes_alone(
    tmp_path: Path, relay: SqliteRelayStore
) -> None:
    a, b = make(tmp_path, "A"), make(tmp_path, "B")
    a.put(DOC, {"code": "KA", "name": "a1"})
    assert publish(relay, "A", a.export_updates()[DOC]) is None  # the relay shows a1
    seed = relay.diff("acme", DOC)
    a.put(DOC, {"code": "KA", "name": "a2"})
    a.put(DOC, {"code": "KA", "name": "a3"})  # A's entry overwritten; the relay still has a1
    b.import_updates(a.export_updates())  # by file: B now holds a3
    for name in ("b1", "b2", "b3"):
        b.put(DOC, {"code": "KB", "name": name})
    b.put(DOC, {"code": "KA", "name": "edited at B"})  # B's own entry of A's record
    b.put(DOC, {"code": "KA", "address": "Huế"})
    since = relay.state_vector("acme", DOC)
    shown = entries(relay.diff("acme", DOC))
    assert of("A", shown) and not of("B", shown)

    seqs, own = only_part(b, since, own_only=True)
    assert seqs == outbox_seqs(b)  # every local row of B is in it: acked with it
    after = entries(relay.diff("acme", DOC), own)
    assert others("B", after) == others("B", shown)  # A's entry still a1 there
    assert of("B", after) == of("B", entries(b.export_updates()[DOC]))
    assert publish(relay, "B", own) is None
    assert of("B", entries(relay.diff("acme", DOC))) == of("B", after)

    # The whole diff (the old behaviour, and a carrier's) carries A's newer
    # entry too: the relay refuses it from B.
    fresh = SqliteRelayStore.create(tmp_path / "relay2.db")
    try:
        fresh.enroll("acme", "A")
        fresh.enroll("acme", "B")
        assert publish(fresh, "A", seed) is None
        seqs, whole = only_part(b, since, own_only=False)
        assert seqs == outbox_seqs(b)
        assert whole == b.export_updates({DOC: since})[DOC]
        full = entries(fresh.diff("acme", DOC), whole)
        assert others("B", full) != others("B", shown)
        assert publish(fresh, "B", whole) is not None
    finally:
        fresh.close()


def test_without_restricting_deletions_the_diff_would_remove_another_nodes_entry(
    tmp_path: Path, relay: SqliteRelayStore
) -> None:
    """Why the delete set is cut down to this node's clients: B's document
    holds A's deletion of a1 (overwritten by a2), and a diff that skips A's
    items but keeps the whole delete set removes A's entry at the relay."""
    a, b = make(tmp_path, "A"), make(tmp_path, "B")
    a.put(DOC, {"code": "KA", "name": "a1"})
    assert publish(relay, "A", a.export_updates()[DOC]) is None
    a.put(DOC, {"code": "KA", "name": "a2"})
    b.import_updates(a.export_updates())
    b.put(DOC, {"code": "KB", "name": "b1"})
    since = relay.state_vector("acme", DOC)
    loaded = b._doc(DOC).doc
    skip = decode_state_vector(since)
    mine = set(clients(tmp_path / "B"))
    for client, clock in decode_state_vector(loaded.state_vector()).items():
        if client not in mine:
            skip[client] = clock
    naive = loaded.diff(encode_state_vector(skip))
    shown = entries(relay.diff("acme", DOC))
    assert len(others("B", entries(relay.diff("acme", DOC), naive))) < len(others("B", shown))
    _, own = only_part(b, since, own_only=True)
    assert others("B", entries(relay.diff("acme", DOC), own)) == others("B", shown)
    assert publish(relay, "B", own) is None


def test_nothing_new_of_its_own_is_an_empty_answer(tmp_path: Path, relay: SqliteRelayStore) -> None:
    a, b = make(tmp_path, "A"), make(tmp_path, "B")
    a.put(DOC, {"code": "KA", "name": "a1"})
    b.import_updates(a.export_updates())
    # B holds only A's entries, which the relay lacks: nothing of B's own.
    assert b.export_parts(DOC, EMPTY_UPDATE[:1], BIG, own_only=True) == []
    assert b.export_parts(DOC, None, BIG, own_only=True) == []
    assert b.export_parts(DOC, EMPTY_UPDATE[:1], BIG) != []
    b.put(DOC, {"code": "KB", "name": "b1"})
    b.ack(outbox_seqs(b))
    assert publish(relay, "B", only_part(b, None, own_only=True)[1]) is None
    assert b.export_parts(DOC, relay.state_vector("acme", DOC), BIG, own_only=True) == []


def test_a_large_answer_is_still_the_outbox_rows(tmp_path: Path, relay: SqliteRelayStore) -> None:
    a, b = make(tmp_path, "A"), make(tmp_path, "B")
    a.put(DOC, {"code": "KA", "name": "a1"})
    b.import_updates(a.export_updates())
    for i in range(20):
        b.put(DOC, {"code": f"K{i}", "name": "x" * 200})
    parts = b.export_parts(DOC, None, 2_000, own_only=True)
    assert len(parts) > 1
    assert [s for seqs, _ in parts for s in seqs] == outbox_seqs(b)
    for _, data in parts:
        assert publish(relay, "B", data) is None
    assert of("B", entries(relay.diff("acme", DOC))) == of("B", entries(b.export_updates()[DOC]))
    assert not of("A", entries(relay.diff("acme", DOC)))


def test_unsynced_work_of_a_former_life_goes_up_with_the_answer(
    tmp_path: Path, relay: SqliteRelayStore
) -> None:
    """A rebuilt home imports its former life's unsynced rows (client ids not
    in its ``clients``), then writes on top of them before syncing: the
    answer holds those rows whole, claims them, and the relay takes it (the
    new write alone would wait at the relay for them)."""
    a, old = make(tmp_path, "A"), make(tmp_path, "B", seed="old")
    a.put(DOC, {"code": "KA", "name": "a1"})
    old.import_updates(a.export_updates())
    rid = old.put(DOC, {"code": "KB", "name": "b1"})
    assert publish(relay, "B", only_part(old, None, own_only=True)[1]) is None
    old.ack(outbox_seqs(old))
    old.put(DOC, {"id": rid, "name": "b2 (never uploaded)"})
    old.put(DOC, {"code": "KC", "name": "c1 (never uploaded)"})
    unsynced = old.unsynced_updates()
    old.close()

    new = make(tmp_path / "rebuilt", "B", seed="new")
    new.import_updates({DOC: relay.diff("acme", DOC)})
    report = new.import_updates(unsynced, unsynced=True)
    assert report.stored == 1
    new.put(DOC, {"id": rid, "name": "b3"})  # on top of b2
    since = relay.state_vector("acme", DOC)
    seqs, own = only_part(new, since, own_only=True)
    assert seqs == outbox_seqs(new) and len(seqs) == 2
    assert publish(relay, "B", new.outbox()[-1][2]) is not None  # b3 alone waits for b2
    assert publish(relay, "B", own) is None
    at_relay = entries(relay.diff("acme", DOC))
    assert of("B", at_relay) == of("B", entries(new.export_updates()[DOC]))
    assert "c1 (never uploaded)" in str(at_relay) and "b3" in str(at_relay)


def test_an_import_of_only_its_own_entries_is_adopted_as_its_own_work(
    tmp_path: Path, relay: SqliteRelayStore
) -> None:
    """Records written under this node's name elsewhere (an earlier life of
    the node, records built for it) and imported plainly are its own work:
    their clients are adopted, so the own-only diff publishes them. An import
    that also sets another node's entries adopts nothing."""
    earlier = make(tmp_path / "earlier", "A", seed="earlier")
    for i in range(3):
        earlier.put(DOC, {"code": f"K{i}", "name": f"n{i}"})
    own_work = earlier.export_updates()
    earlier.close()
    b = make(tmp_path, "B")
    b.put(DOC, {"code": "KB", "name": "b"})
    b.import_updates(own_work)
    mixed = b.export_updates()

    a = make(tmp_path, "A")
    a.import_updates(mixed)  # B's entry and A's: not adopted
    assert clients(tmp_path / "A") == []
    assert a.export_parts(DOC, None, BIG, own_only=True) == []  # nothing of its own
    a.import_updates(own_work)  # already here: nothing new, nothing adopted
    assert clients(tmp_path / "A") == []
    a.close()

    fresh = make(tmp_path / "fresh", "A", seed="fresh")
    fresh.import_updates(own_work)
    assert len(clients(tmp_path / "fresh" / "A")) == 1
    own = only_part(fresh, None, own_only=True)[1]
    assert publish(relay, "A", own) is None
    assert of("A", entries(relay.diff("acme", DOC))) == of("A", entries(own_work[DOC]))


def test_unsynced_rows_imported_before_the_first_download_also_go_up(
    tmp_path: Path, relay: SqliteRelayStore
) -> None:
    """docs/operations.md order: import the unsynced file into an empty home,
    then sync (download, then answer)."""
    old = make(tmp_path, "B", seed="old")
    rid = old.put(DOC, {"code": "KB", "name": "b1"})
    assert publish(relay, "B", only_part(old, None, own_only=True)[1]) is None
    old.ack(outbox_seqs(old))
    old.put(DOC, {"id": rid, "name": "b2"})
    unsynced = old.unsynced_updates()
    old.close()
    new = make(tmp_path / "rebuilt", "B", seed="new")
    new.import_updates(unsynced, unsynced=True)  # waits for b1
    assert new.get(DOC, "KB") is None
    new.import_updates({DOC: relay.diff("acme", DOC)})
    assert new.get(DOC, "KB")["name"] == "b2"  # type: ignore[index]
    seqs, own = only_part(new, relay.state_vector("acme", DOC), own_only=True)
    assert seqs == outbox_seqs(new)
    assert publish(relay, "B", own) is None
    assert "b2" in str(of("B", entries(relay.diff("acme", DOC))))


# -- the clients table -----------------------------------------------------------------


def test_client_id_noted_once_per_instance_in_the_first_write(tmp_path: Path) -> None:
    node = make(tmp_path, "A")
    home = tmp_path / "A"
    assert clients(home) == []  # creating a home writes no update
    statements: list[str] = []
    node.store.conn.set_trace_callback(statements.append)
    node.put(DOC, {"code": "K1", "name": "n"})
    assert sum("INTO clients" in s for s in statements) == 1
    statements.clear()
    node.put(DOC, {"code": "K1", "name": "m"})
    node.put(DOC, {"code": "K2", "name": "n"})
    node.delete(DOC, "K2")
    assert not any("clients" in s for s in statements)  # the hot path asks nothing
    assert clients(home) == [node._client_id]
    row = node.store.conn.execute("SELECT first_at FROM clients").fetchone()
    assert row == (START_MS,)
    other = Node.open(home, rng=random.Random(7))
    assert clients(home) == [node._client_id]  # opening is not writing
    other.post_voucher("cash_receipt", {"date": "2026-01-05", "customer": "K1", "amount": "10"})
    assert sorted(clients(home)) == sorted([node._client_id, other._client_id])
    other.close()
    node.close()


def test_client_row_is_part_of_the_write_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make(tmp_path, "A")
    home = tmp_path / "A"
    seen: list[tuple[list[int], list[int]]] = []
    original = Writer.materialize

    def peek(self: Writer, *args: Any, **kwargs: Any) -> int:
        inside = [int(r[0]) for r in self.txn.execute("SELECT client FROM clients")]
        seen.append((inside, clients(home)))  # another connection: only what committed
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Writer, "materialize", peek)
    node.put(DOC, {"code": "K1", "name": "n"})
    assert seen == [([node._client_id], [])]
    assert clients(home) == [node._client_id]
    node.close()


def test_a_failed_write_leaves_no_client_row_and_the_next_one_notes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make(tmp_path, "A")
    home = tmp_path / "A"

    def boom(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("disk on fire")

    with monkeypatch.context() as patch:
        patch.setattr(Writer, "materialize", boom)
        with pytest.raises(RuntimeError):
            node.put(DOC, {"code": "K1", "name": "n"})
    assert clients(home) == [] and node.outbox() == []
    node.put(DOC, {"code": "K1", "name": "n"})
    assert clients(home) == [node._client_id]
    (_, own) = only_part(node, None, own_only=True)
    assert of("A", entries(own)) == of("A", entries(node.export_updates()[DOC]))
    node.close()


CRASH = """
import os, random, sys
from engine.node import Node
from engine.writes import Writer
def die(*args, **kwargs):
    os._exit(9)  # killed after the entry, its update row and the clients row, before commit
Writer.materialize = die
node = Node.open(sys.argv[1], rng=random.Random(3))
node.put("customers", {"code": "K9", "name": "never"})
"""


def test_a_crash_before_commit_leaves_no_client_row(tmp_path: Path) -> None:
    node = make(tmp_path, "A")
    node.put(DOC, {"code": "K1", "name": "n"})
    before = clients(tmp_path / "A")
    node.close()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", CRASH, str(tmp_path / "A")], env=env, capture_output=True
    )
    assert done.returncode == 9, done.stderr
    assert clients(tmp_path / "A") == before
    with Node.open(tmp_path / "A") as again:
        assert again.get(DOC, "K9") is None and len(again.outbox()) == 1


def test_format_2_store_is_upgraded_and_its_outbox_still_goes_up(
    tmp_path: Path, relay: SqliteRelayStore
) -> None:
    """A format 2 home has no ``clients``: its pending local rows are not
    any noted client's, so the answer carries them whole."""
    a, b = make(tmp_path, "A"), make(tmp_path, "B")
    a.put(DOC, {"code": "KA", "name": "a1"})
    assert publish(relay, "A", a.export_updates()[DOC]) is None
    a.put(DOC, {"code": "KA", "name": "a2"})
    b.import_updates(a.export_updates())
    rid = b.put(DOC, {"code": "KB", "name": "b1 (format 2)"})
    b.close()
    downgrade(tmp_path / "B", 2)

    b = Node.open(tmp_path / "B", rng=random.Random("B after upgrade"))
    version = b.store.conn.execute("PRAGMA user_version").fetchone()[0]
    assert version == FORMAT_VERSION
    assert clients(tmp_path / "B") == []
    assert b.get(DOC, "KB")["name"] == "b1 (format 2)"  # type: ignore[index]
    b.put(DOC, {"id": rid, "name": "b2 (format 3)"})  # on top of the format 2 row
    assert clients(tmp_path / "B") == [b._client_id]
    since = relay.state_vector("acme", DOC)
    seqs, own = only_part(b, since, own_only=True)
    assert seqs == outbox_seqs(b) and len(seqs) == 2
    after = entries(relay.diff("acme", DOC), own)
    assert others("B", after) == others("B", entries(relay.diff("acme", DOC)))
    assert publish(relay, "B", own) is None
    assert of("B", entries(relay.diff("acme", DOC))) == of("B", entries(b.export_updates()[DOC]))
    b.close()


# -- property --------------------------------------------------------------------------

NAMES = ("A", "B", "C")
CODES = ("K1", "K2", "K3")

op = st.one_of(
    st.tuples(
        st.just("put"), st.integers(0, 2), st.sampled_from(CODES), st.text("xyz", max_size=3)
    ),
    st.tuples(st.just("delete"), st.integers(0, 2), st.sampled_from(CODES)),
    st.tuples(st.just("import"), st.integers(0, 2), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("capture"), st.integers(0, 2)),
)


def relay_verdict(replica: Doc[Any], node: str, update: bytes) -> NotAuthor | None:
    """The relay's authorship rule (engine.relay.authorship) on ``update``
    integrated into ``replica`` (which it changes)."""
    changed: dict[str, str] = {}

    def watch(event: MapEvent) -> None:
        keys: dict[str, dict[str, Any]] = event.keys  # type: ignore[attr-defined]
        changed.update({k: str(c["action"]) for k, c in keys.items()})

    entries_map = replica.get(ROOT, type=Map)
    sub = entries_map.observe(watch)
    replica.apply_update(update)
    entries_map.unobserve(sub)
    state = replica.get_state()
    return authorship.check(node, DOC, changed, state, get_update(update, state))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(op, min_size=1, max_size=20))
# The case that needs the delete set cut down: A overwrote its entry after
# the replica's state was taken, and B holds A's deletion of the older value.
@example(
    ops=[
        ("put", 0, "K1", "x"),
        ("capture", 0),
        ("put", 0, "K1", "y"),
        ("import", 1, 0, True),
        ("put", 1, "K2", "z"),
    ]
)
def test_own_only_diffs_never_touch_other_nodes_and_together_hold_everything(
    ops: list[tuple[Any, ...]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        nodes = [make(Path(tmp), name) for name in NAMES]
        captured: list[bytes] = [b""]  # replica states: the empty one, then node exports
        try:
            for step in ops:
                kind, i = step[0], step[1]
                node = nodes[i]
                if kind == "put":
                    node.put(DOC, {"code": step[2], "name": step[3] or "-"})
                elif kind == "delete":
                    if node.get(DOC, step[2]) is not None:
                        node.delete(DOC, step[2])
                elif kind == "import":
                    src = nodes[step[2]]
                    since = None if step[3] else node.state()
                    node.import_updates(src.export_updates(since))
                else:
                    captured.append(node.export_updates().get(DOC, b""))
            for k, node in enumerate(nodes):
                name = NAMES[k]
                for held in captured:
                    replica: Doc[Any] = Doc()
                    if held:
                        replica.apply_update(held)
                    before = dict(replica.get(ROOT, type=Map).items())
                    since = replica.get_state()
                    for _, data in node.export_parts(DOC, since, BIG, own_only=True):
                        assert relay_verdict(replica, name, data) is None
                    after = dict(replica.get(ROOT, type=Map).items())
                    assert others(name, after) == others(name, before)
                    assert of(name, after) == of(name, entries(node.export_updates().get(DOC, b"")))
            # Own-only diffs from every node bring a fresh replica to what the
            # full diffs do, and each passes the relay's rule on the way.
            fresh: Doc[Any] = Doc()
            full: Doc[Any] = Doc()
            for k, node in enumerate(nodes):
                for _, data in node.export_parts(DOC, None, BIG, own_only=True):
                    assert relay_verdict(fresh, NAMES[k], data) is None
                for _, data in node.export_parts(DOC, None, BIG):
                    full.apply_update(data)
            assert dict(fresh.get(ROOT, type=Map).items()) == dict(full.get(ROOT, type=Map).items())
        finally:
            for node in nodes:
                node.close()
