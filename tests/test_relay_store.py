"""The relay's SQLite store beyond the store contract (engine.relay.testing, run
by test_relay_contract.py): hashed tokens on disk, foreign files, the fold
point, the memory budget, leases across restarts and processes, format
upgrades, and crash safety under SIGKILL.

Run as a script (``python test_relay_store.py child STORE ROUND``) it is the
child process of the crash test.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map

from engine.errors import (
    FormatVersionError,
    RelayStoreExists,
    RelayStoreNotFound,
    StoreError,
)
from engine.node import Node
from engine.relay import RelayLimits, SqliteRelayStore, UpdateIn
from engine.relay.testing import check_disjoint, map_updates, node_updates, push

CRASH_ROUNDS = 24


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = SqliteRelayStore.create(tmp_path / "relay.db")
    yield s
    s.close()


# -- nodes and tokens ---------------------------------------------------------


def test_tokens_are_stored_hashed(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    s = SqliteRelayStore.create(path)
    tokens = [s.enroll("acme", f"n{i}").token for i in range(5)]
    tokens.append(s.enroll("acme", "n0").token)
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("relay.db"))
    s.close()
    raw += path.read_bytes()
    for token in tokens:
        assert token.encode() not in raw
        assert token[:16].encode() not in raw


def test_open_refuses_missing_foreign_and_newer_files(tmp_path: Path) -> None:
    with pytest.raises(RelayStoreNotFound):
        SqliteRelayStore.open(tmp_path / "none.db")
    SqliteRelayStore.create(tmp_path / "r.db").close()
    with pytest.raises(RelayStoreExists):
        SqliteRelayStore.create(tmp_path / "r.db")
    Node.create(tmp_path / "home", dataset="acme", node="HN").close()
    with pytest.raises(StoreError, match="not a Branchline relay store"):
        SqliteRelayStore.open(tmp_path / "home" / "branchline.db")
    (tmp_path / "junk.db").write_bytes(b"hello, not sqlite" * 100)
    with pytest.raises(StoreError):
        SqliteRelayStore.open(tmp_path / "junk.db")
    conn = sqlite3.connect(tmp_path / "r.db")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(FormatVersionError, match="format 99"):
        SqliteRelayStore.open(tmp_path / "r.db")


# -- updates --------------------------------------------------------------------


def _fold_point(limits: RelayLimits, path: Path) -> tuple[int, int, int]:
    """Log a 300-key document, compact it, then append small updates one by
    one until the store folds its log: (snapshot bytes, updates appended,
    their bytes) at that point."""
    store = SqliteRelayStore.create(path, limits)
    store.enroll("acme", "X")
    doc: Doc[Any] = Doc(client_id=5)
    m = doc.get("r", type=Map)
    for i in range(300):
        m[f"seed{i}|X"] = "x" * 40
    store.append_updates("acme", [UpdateIn("customers", doc.get_update(), "X")])
    store.compact("acme")
    snapshot = len(store.diff("acme", "customers"))
    logged = 0
    try:
        for n, update in enumerate(map_updates(2000, client_id=6), 1):
            store.append_updates("acme", [UpdateIn("customers", update, "X")])
            logged += len(update)
            if store.status()[0].documents[0].log_rows < n:
                return snapshot, n, logged
    finally:
        store.close()
    raise AssertionError("the log was never folded")


def test_compaction_waits_for_log_bytes_relative_to_the_snapshot(tmp_path: Path) -> None:
    # A big snapshot is not rewritten every compact_after small updates: only
    # once the log's bytes reach compact_ratio of the snapshot's...
    limits = RelayLimits(compact_after=10, compact_ratio=0.5, compact_max=5000)
    snapshot, n, logged = _fold_point(limits, tmp_path / "ratio.db")
    assert n > 10 * limits.compact_after
    assert logged >= 0.5 * snapshot > logged - 40  # the update that crossed the ratio folded it
    # ... or once the log has compact_max rows, whatever their bytes.
    limits = RelayLimits(compact_after=10, compact_ratio=100.0, compact_max=50)
    assert _fold_point(limits, tmp_path / "max.db")[1] == 50


def test_documents_in_memory_stay_under_the_budget(tmp_path: Path) -> None:
    limits = RelayLimits(max_loaded_docs=3, memory_budget_bytes=1 << 20)
    store = SqliteRelayStore.create(tmp_path / "r.db", limits)
    store.enroll("acme", "X")
    names = [f"doc{i}" for i in range(10)]
    expected = {}
    for i, name in enumerate(names):
        (data,) = map_updates(1, client_id=1000 + i)
        expected[name] = data
        store.append_updates("acme", [UpdateIn(name, data, "X")])
        assert store.loaded_documents() <= 3
    for name in reversed(names):
        assert store.state_vector("acme", name) != b"\x00"
        doc: Doc[Any] = Doc()
        doc.apply_update(store.diff("acme", name))
        assert dict(doc.get("r", type=Map)) == {"k0|X": "v0"}
        assert store.loaded_documents() <= 3
    # A tiny byte budget keeps only the document in use.
    small = SqliteRelayStore.open(tmp_path / "r.db", RelayLimits(memory_budget_bytes=1))
    for name in names:
        small.diff("acme", name)
        assert small.loaded_documents() == 1
    small.close()
    store.close()


# -- series leases ----------------------------------------------------------------


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    plan=st.lists(
        st.tuples(st.sampled_from(["s1", "s2@2026"]), st.integers(1, 500), st.booleans()),
        min_size=1,
        max_size=30,
    )
)
def test_leases_never_repeat_across_restarts(tmp_path_factory: Any, plan: Any) -> None:
    path = tmp_path_factory.mktemp("lease") / "r.db"
    store = SqliteRelayStore.create(path)
    store.enroll("acme", "A")
    got: dict[str, list[tuple[int, int]]] = {}
    for key, count, reopen in plan:
        first, last = store.lease("acme", key, count, node="A")
        assert last - first + 1 == count
        got.setdefault(key, []).append((first, last))
        if reopen:
            store.close()
            store = SqliteRelayStore.open(path)
    store.close()
    for ranges in got.values():
        check_disjoint(ranges)


def _lease_in_process(path: str, seed: int, out: Any) -> None:
    rng = random.Random(seed)
    store = SqliteRelayStore.open(path)
    got = [store.lease("acme", "sales", rng.randint(1, 50)) for _ in range(30)]
    store.close()
    out.put(got)


def test_concurrent_leases_from_processes(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    s = SqliteRelayStore.create(path)
    s.enroll("acme", "A")
    s.close()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_lease_in_process, args=(str(path), i, out)) for i in range(4)]
    for p in procs:
        p.start()
    ranges = [r for _ in procs for r in out.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(ranges) == 120
    check_disjoint(ranges)


# -- crash safety -----------------------------------------------------------------


def child(path: str, round_no: int) -> None:
    """Append updates and take leases until killed; report each after it returned."""
    store = SqliteRelayStore.open(path, RelayLimits(compact_after=25))
    rng = random.Random(round_no)
    doc: Doc[Any] = Doc(client_id=rng.getrandbits(40) + 1)
    doc.apply_update(store.diff("acme", "customers"))  # continue where the last round stopped
    m = doc.get("r", type=Map)
    i = 0
    while True:
        i += 1
        batch, keys = [], {}
        for _ in range(rng.randint(1, 5)):
            sv = doc.get_state()
            key, value = f"r{round_no}-{i}-{len(keys)}|N", f"v{rng.random()}"
            m[key] = value
            keys[key] = value
            batch.append(UpdateIn("customers", doc.get_update(sv), "N"))
        if rng.random() < 0.3:
            batch.append(batch[0])  # a re-send in the same batch
        results = store.append_updates("acme", batch)
        assert all(r.ok for r in results)
        print("D " + orjson.dumps({"keys": keys}).decode(), flush=True)
        if rng.random() < 0.3:
            first, last = store.lease("acme", "sales", rng.randint(1, 9))
            print("L " + orjson.dumps([first, last]).decode(), flush=True)
        if rng.random() < 0.05:
            store.compact("acme")


def test_sigkill_loses_nothing_reported(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    s = SqliteRelayStore.create(path)
    s.enroll("acme", "N")
    s.close()
    rng = random.Random(int(os.environ.get("BRANCHLINE_CRASH_SEED", "7")))
    expected: dict[str, str] = {}
    leases: list[tuple[int, int]] = []
    for round_no in range(CRASH_ROUNDS):
        proc = subprocess.Popen(
            [sys.executable, __file__, "child", str(path), str(round_no)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=Path(__file__).parent.parent,
        )
        assert proc.stdout is not None
        lines = []
        # Kill after a random number of reports: mid-batch most of the time.
        for _ in range(rng.randint(1, 60)):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        proc.send_signal(signal.SIGKILL)
        rest, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err.decode()
        lines += rest.splitlines(keepends=True)
        for line in lines:
            if not line.endswith(b"\n"):
                continue  # cut by the kill: not reported
            tag, payload = line.decode().rstrip("\n").split(" ", 1)
            if tag == "D":
                expected.update(orjson.loads(payload)["keys"])
            elif tag == "L":
                first, last = orjson.loads(payload)
                leases.append((first, last))

        store = SqliteRelayStore.open(path)
        assert store.integrity_check() == "ok"
        doc: Doc[Any] = Doc()
        doc.apply_update(store.diff("acme", "customers"))
        held = dict(doc.get("r", type=Map))
        missing = {k for k in expected if held.get(k) != expected[k]}
        assert not missing, f"round {round_no}: lost {sorted(missing)[:5]}"
        store.close()
    assert len(expected) > CRASH_ROUNDS
    if leases:
        ranges = sorted(leases)
        for (_, last), (first, _) in itertools.pairwise(ranges):
            assert first > last, f"lease numbers handed out twice: {ranges}"
    # Numbers leased after all the kills still come after everything reported.
    store = SqliteRelayStore.open(path)
    first, _ = store.lease("acme", "sales", 1)
    assert all(first > last for _, last in leases)
    store.close()


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "child":
    child(sys.argv[2], int(sys.argv[3]))


def test_an_update_that_waits_for_an_earlier_one_is_kept_across_reopen(tmp_path: Path) -> None:
    """The second update of a client, arriving first, waits; it must be
    stored (not taken for a duplicate) and survive a restart until the first
    one arrives. (Regression: waiting was judged from ``get_state(update)``,
    which omits clients whose items do not start at clock 0.)"""
    a = Node.create(tmp_path / "a", dataset="acme", node="A")
    a.put("customers", {"code": "KH1", "name": "An"})
    a.put("customers", {"code": "KH1", "name": "An Phát"})  # replaces the first entry
    (_, _, first), (_, _, second) = a.outbox()
    s = SqliteRelayStore.create(tmp_path / "relay.db")
    s.enroll("acme", "A", carrier=True)  # only a carrier's updates may wait
    [res] = s.append_updates("acme", [UpdateIn("customers", second, "A")])
    assert res.status == "stored"
    s.close()
    s = SqliteRelayStore.open(tmp_path / "relay.db")
    [res] = s.append_updates("acme", [UpdateIn("customers", first, "A")])
    assert res.status == "stored"
    fresh = Node.create(tmp_path / "b", dataset="acme", node="B")
    fresh.import_updates({"customers": s.diff("acme", "customers")})
    assert [r["name"] for r in fresh.list("customers")] == ["An Phát"]
    s.close()


# -- period locks --------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2, 3])
def test_an_older_store_is_upgraded_when_opened(tmp_path: Path, version: int) -> None:
    """Format 1 lacks period locks, 2 the carrier flag, 3 the positions: all
    open as 4, the nodes enrolled before are not carriers, and the log rows
    get positions in their order (after one standing for the snapshots)."""
    path = tmp_path / "r.db"
    node = Node.create(tmp_path / "n", dataset="acme", node="X")
    with SqliteRelayStore.create(path) as store:
        store.enroll("acme", "X")
        store.enroll("beta", "X")
        node.put("customers", {"code": "C1", "name": "One"})
        push(store, node, "X")
        node.ack([s for s, _, _ in node.outbox()])
        store.compact("acme")
        node.put("customers", {"code": "C2", "name": "Two"})
        push(store, node, "X")
        node.ack([s for s, _, _ in node.outbox()])
    conn = sqlite3.connect(path)
    conn.execute("DROP INDEX updates_position")
    conn.execute("DELETE FROM updates WHERE position = 1")  # folded rows of format 3 are gone
    for table, column in [("updates", "position"), ("datasets", "head"), ("datasets", "folded")]:
        conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    if version < 3:
        conn.execute("ALTER TABLE nodes DROP COLUMN carrier")
    if version == 1:
        conn.execute("DROP TABLE locks")
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()
    with SqliteRelayStore.open(path) as store:
        assert store.lock_period("acme", "2026")
        assert store.status()[0].locks == ["2026"]
        assert [n.carrier for n in store.status()[0].nodes] == [False]
        assert store.enroll("acme", "HO", carrier=True).carrier
        assert store.head("acme") == 2 and store.head("beta") == 0
        assert store.logged_after("acme", 0, 10) is None  # C1 is in the snapshot only
        logged = store.logged_after("acme", 1, 10)
        assert logged is not None and [r.position for r in logged] == [2]
        node.put("customers", {"code": "C3", "name": "Three"})
        assert [r.position for r in store.append_updates("acme", node_updates(node, "X"))] == [3]
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 4
    conn.close()
