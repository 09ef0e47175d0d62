"""A bulk import of received updates is one durable transaction: a process
killed inside its materialization (``mid_materialize``, records written,
conflicts, index and adapters not yet) leaves nothing of it, and importing
the same updates again gives what a node that never crashed has."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from engine.clock import ManualClock
from engine.node import Node

START_MS = 1_767_225_600_000
RECORDS = 300
DOC = "customers"

CRASH = """
import os, random, sys
from pathlib import Path
from engine.node import Node

def die(point):
    if point == "mid_materialize":
        os._exit(9)

node = Node.open(sys.argv[1], rng=random.Random(3))
node.store.commit_points = die
node.import_updates({"customers": Path(sys.argv[2]).read_bytes()})
"""


def make(tmp: Path, name: str) -> Node:
    return Node.create(
        tmp / name,
        dataset="acme",
        node=name,
        clock=ManualClock(START_MS),
        rng=random.Random(name),
    )


def shown(node: Node) -> list[tuple[object, ...]]:
    return node.store.conn.execute(
        "SELECT collection, id, key, deleted, data FROM records ORDER BY collection, id"
    ).fetchall()


def test_a_kill_inside_the_bulk_materialization_leaves_nothing(tmp_path: Path) -> None:
    a, b = make(tmp_path, "A"), make(tmp_path, "B")
    for i in range(RECORDS):
        a.put(DOC, {"code": f"K{i:04d}", "name": f"from A {i}"})
        if i % 50 == 0:
            b.put(DOC, {"code": f"K{i:04d}", "name": f"from B {i}"})  # duplicate keys
    update = a.export_updates()[DOC]
    payload = tmp_path / "update.bin"
    payload.write_bytes(update)
    b_before = shown(b)
    b.close()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", CRASH, str(tmp_path / "B"), str(payload)],
        env=env,
        capture_output=True,
    )
    assert done.returncode == 9, done.stderr
    with Node.open(tmp_path / "B", rng=random.Random(4)) as again:
        assert shown(again) == b_before
        assert again.store.conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert again.count(DOC) == RECORDS // 50
        again.import_updates({DOC: update})
        assert again.count(DOC) == RECORDS + RECORDS // 50
        crashed, crashed_conflicts = shown(again), again.conflicts()
    never = make(tmp_path, "C")
    never.import_updates({DOC: b_update(tmp_path)})
    never.import_updates({DOC: update})
    assert len(crashed_conflicts) == RECORDS // 50  # the duplicate codes
    assert shown(never) == crashed
    assert never.conflicts() == crashed_conflicts
    a.close()
    never.close()


def b_update(tmp: Path) -> bytes:
    with Node.open(tmp / "B", rng=random.Random(5)) as b:
        return b.export_updates()[DOC]
