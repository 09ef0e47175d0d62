"""Several processes writing to one node home at the same time.

Writers (``mp_writer.py``) create records, partially update different fields
of one shared record, and overwrite one field they all fight over, while a
long-lived Node in this process reads and writes too. No write may be lost,
no SQLite error may surface, and every write is visible to the long-lived
Node as soon as the writer reported it.
"""

from __future__ import annotations

import random
import selectors
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from engine import Node
from engine.clock import ManualClock
from engine.crdt import decode_state_vector

WRITER = Path(__file__).with_name("mp_writer.py")
WORKERS = 4
COUNT = 60

SCHEMA = """
schema = "multiprocess"
version = 1

[collections.things]
kind = "catalog"
fields.code = "text"
fields.label = "text"
fields.w0 = "text"
fields.w1 = "text"
fields.w2 = "text"
fields.w3 = "text"
fields.parent = "text"
"""


def decoded_state(node: Node) -> dict[str, dict[int, int]]:
    return {doc: decode_state_vector(sv) for doc, sv in node.state().items()}


def test_concurrent_writers_lose_nothing_and_are_seen_at_once(tmp_path: Path) -> None:
    seed = 7_2026
    print(f"seed={seed}")
    rng = random.Random(seed)
    schema = tmp_path / "schema.toml"
    schema.write_text(SCHEMA, "utf-8")
    home = tmp_path / "home"
    parent = Node.create(
        home, dataset="mp", node="SRV", schema=schema, clock=ManualClock(), rng=rng
    )
    shared = parent.put("things", {"code": "SHARED"})
    hot = parent.put("things", {"code": "HOT", "label": "start"})
    parent.refresh()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WRITER), str(home), str(w), str(COUNT), str(seed * 10 + w)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for w in range(WORKERS)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.startswith(b"ready"), (line, p.stderr.read() if p.stderr else b"")
        for p in procs:  # all start together
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            p.stdin.flush()
        sel = selectors.DefaultSelector()
        for p in procs:
            assert p.stdout is not None
            sel.register(p.stdout, selectors.EVENT_READ, p)
        created: dict[str, str] = {}
        last_field: dict[str, str] = {}
        parent_writes = 0
        last_parent = None
        open_streams = len(procs)
        buffers: dict[int, bytes] = {}
        while open_streams:
            for key, _ in sel.select():
                p = key.data
                chunk = key.fileobj.read1(65536)  # type: ignore[union-attr]
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                buffers[p.pid] = buffers.get(p.pid, b"") + chunk
                *lines, buffers[p.pid] = buffers[p.pid].split(b"\n")
                for line in lines:
                    op, _, body = line.decode().partition(" ")
                    msg: dict[str, Any] = orjson.loads(body)
                    # Reported done => visible here at once, with no waiting.
                    if op == "create":
                        created[msg["id"]] = msg["label"]
                        got = parent.get("things", msg["id"])
                        assert got is not None and got["label"] == msg["label"], msg
                    elif op == "field":
                        last_field[msg["field"]] = msg["value"]
                        got = parent.get("things", "SHARED")
                        # Later writes of the same writer may be there already.
                        w, i = msg["value"].split("-")
                        assert got is not None
                        have = got[msg["field"]].split("-")
                        assert have[0] == w and int(have[1]) >= int(i), (got, msg)
                    # Meanwhile the long-lived node writes its own field too.
                    if rng.random() < 0.15:
                        parent_writes += 1
                        last_parent = f"p-{parent_writes}"
                        parent.put("things", {"code": "SHARED", "parent": last_parent})
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode(errors="replace")
            assert err == b"", err.decode(errors="replace")
        assert len(created) == WORKERS * COUNT
        # The long-lived node sees everything, in its records and in its CRDT state.
        parent.refresh()
        things = {r["id"]: r for r in parent.list("things")}
        assert len(things) == WORKERS * COUNT + 2
        for rid, label in created.items():
            assert things[rid]["label"] == label
        final = things[shared]
        for w in range(WORKERS):
            assert final[f"w{w}"] == f"{w}-{COUNT - 1}", final  # no partial update lost
        assert final.get("parent") == last_parent
        assert things[hot]["label"] in {f"{w}-{COUNT - 1}" for w in range(WORKERS)}
        assert parent.conflicts() == []
        assert parent.store.integrity_check() == "ok"
        # The parent's in-memory documents caught up: its export carries every write.
        replica = Node.create(
            tmp_path / "replica",
            dataset="mp",
            node="COPY",
            schema=parent.schema,
            clock=ManualClock(),
            rng=random.Random(seed + 1),
        )
        replica.import_updates(parent.export_updates())
        assert replica.list("things") == parent.list("things")
        replica.close()
        fresh = Node.open(home, clock=ManualClock(), rng=random.Random(seed + 2))
        assert decoded_state(fresh) == decoded_state(parent)
        assert fresh.list("things") == parent.list("things")
        fresh.close()
        # And a write from the parent after all that keeps every worker's field.
        parent.put("things", {"code": "SHARED", "label": "after"})
        after = parent.get("things", "SHARED")
        assert after is not None
        assert [after[f"w{w}"] for w in range(WORKERS)] == [
            f"{w}-{COUNT - 1}" for w in range(WORKERS)
        ]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        parent.close()


def test_refresh_sees_another_process_write(tmp_path: Path) -> None:
    """A long-lived node learns of another process's commit through refresh()."""
    home = tmp_path / "home"
    node = Node.create(home, dataset="mp", node="SRV", clock=ManualClock(), rng=random.Random(1))
    node.put("customers", {"code": "KH1", "name": "before"})
    assert node.refresh() is False  # nothing from elsewhere yet
    before = decoded_state(node)
    script = (
        "import random, sys; from engine import Node; from engine.clock import ManualClock; "
        "n = Node.open(sys.argv[1], clock=ManualClock(), rng=random.Random(2)); "
        "n.put('customers', {'code': 'KH1', 'address': 'Đà Nẵng'}); "
        "n.put('customers', {'code': 'KH2', 'name': 'other'}); n.close()"
    )
    seen = node.changes_seen
    subprocess.run([sys.executable, "-c", script, str(home)], check=True)
    assert node.refresh() is True
    assert node.refresh() is False  # the True went to the first caller...
    assert node.changes_seen == seen + 1  # ...the count tells every reader
    assert node.get("customers", "KH1") == {
        "id": node.get("customers", "KH1")["id"],
        "code": "KH1",
        "name": "before",
        "address": "Đà Nẵng",
    }
    assert node.get("customers", "KH2")["name"] == "other"
    assert decoded_state(node) != before
    # Our next write builds on theirs: nothing of the other process is dropped.
    node.put("customers", {"code": "KH1", "name": "after"})
    assert node.get("customers", "KH1")["address"] == "Đà Nẵng"
    node.close()


class _Interleave:
    """A connection that lets another writer commit just before a given query,
    to place a race deterministically (another process could do the same)."""

    def __init__(self, conn: Any, before: str, action: Any) -> None:
        self.conn, self.before, self.action, self.fired = conn, before, action, False

    def execute(self, sql: str, *args: Any) -> Any:
        if not self.fired and sql.startswith(self.before):
            self.fired = True
            self.action()
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def test_catching_up_is_consistent_with_a_compaction_elsewhere(tmp_path: Path) -> None:
    """Another process compacts (folding remote rows into a snapshot) and
    writes while this one reads the log to catch up: this node must still
    see every update, or its next write re-materializes the record from a
    document that lacks them."""
    clock = ManualClock()
    home = tmp_path / "home"
    a = Node.create(home, dataset="mp", node="SRV", clock=clock, rng=random.Random(1))
    remote = Node.create(tmp_path / "r", dataset="mp", node="R", clock=clock, rng=random.Random(2))
    b = Node.open(home, clock=clock, rng=random.Random(3))
    try:
        rid = remote.put("customers", {"code": "K", "name": "from R"})
        a.import_updates(remote.export_updates())
        remote.put("customers", {"id": rid, "address": "Huế"})
        b.put("customers", {"code": "B0", "name": "b"})  # a commit a will notice

        def elsewhere() -> None:
            b.import_updates(remote.export_updates(since=b.state()))
            b.compact()
            b.put("customers", {"code": "B1", "name": "b"})

        real = a.store.conn
        a.store.conn = _Interleave(real, "SELECT seq, data FROM updates", elsewhere)
        try:
            assert a.refresh()
        finally:
            a.store.conn = real
        assert a.get("customers", rid)["address"] == "Huế"  # the records table has it
        fresh = Node.open(home, clock=clock, rng=random.Random(4))
        assert decoded_state(a) == decoded_state(fresh)
        fresh.close()
        a.put("customers", {"id": rid, "name": "edited here"})
        assert a.get("customers", rid) == {
            "id": rid,
            "code": "K",
            "name": "edited here",
            "address": "Huế",
        }
        assert a.conflicts() == []
    finally:
        for n in (a, b, remote):
            n.close()
