"""A bulk import of received updates is one durable transaction: a process
killed inside its materialization (``mid_materialize``, records written,
conflicts, index and adapters not yet) leaves nothing of it, and importing
the same updates again gives what a node that never crashed has. Imported in
slices (``Node.import_sliced``, as a sync does), each slice is such a
transaction: a kill keeps the slices before it, whole."""

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


def two_nodes(tmp: Path) -> tuple[Node, bytes, list[tuple[object, ...]], bytes]:
    """A (open) with RECORDS records, B (closed) with some of the same codes:
    A's update, saved as ``update.bin``, B's records and B's own update."""
    a, b = make(tmp, "A"), make(tmp, "B")
    for i in range(RECORDS):
        a.put(DOC, {"code": f"K{i:04d}", "name": f"from A {i}"})
        if i % 50 == 0:
            b.put(DOC, {"code": f"K{i:04d}", "name": f"from B {i}"})  # duplicate keys
    update = a.export_updates()[DOC]
    (tmp / "update.bin").write_bytes(update)
    b_before, b_own = shown(b), b.export_updates()[DOC]
    b.close()
    return a, update, b_before, b_own


def killed_importing(script: str, tmp: Path) -> None:
    """Run ``script`` on B's home and ``update.bin``; it must die with 9."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp / "B"), str(tmp / "update.bin")],
        env=env,
        capture_output=True,
    )
    assert done.returncode == 9, done.stderr


def test_a_kill_inside_the_bulk_materialization_leaves_nothing(tmp_path: Path) -> None:
    a, update, b_before, _ = two_nodes(tmp_path)
    killed_importing(CRASH, tmp_path)
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


SLICED_CRASH = """
import os, random, sys
from pathlib import Path
from engine.node import Node

commits = 0

def die(point):
    global commits
    if point == "after_commit":
        commits += 1
        if commits == 3:
            os._exit(9)

node = Node.open(sys.argv[1], rng=random.Random(3))
node.store.commit_points = die
node.import_sliced("customers", Path(sys.argv[2]).read_bytes(), 2048)
"""


def test_a_sliced_import_equals_one_import_and_a_kill_leaves_slices_before_it(
    tmp_path: Path,
) -> None:
    a, update, _, b_own = two_nodes(tmp_path)
    killed_importing(SLICED_CRASH, tmp_path)
    with Node.open(tmp_path / "B", rng=random.Random(4)) as again:
        # Two slices durable, each whole: some of A's records, none half there.
        kept = again.count(DOC) - RECORDS // 50
        assert 0 < kept < RECORDS
        assert again.store.conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        report = again.import_sliced(DOC, update, 2048)
        assert report.records == RECORDS - kept
        crashed, crashed_conflicts = shown(again), again.conflicts()
    never = make(tmp_path, "C")
    never.import_updates({DOC: b_own})
    whole = never.import_updates({DOC: update})
    assert whole.records == RECORDS
    assert shown(never) == crashed
    assert never.conflicts() == crashed_conflicts
    a.close()
    never.close()


def test_a_sliced_import_of_bad_bytes_keeps_the_slices_before_them(tmp_path: Path) -> None:
    """Slices are cut as they are imported (``split.iter_parts``): a bad
    tail raises once the slices before it are durable, as a crash there would
    leave them; the whole update imported later brings the rest."""
    from engine.errors import UpdateError

    a, update, _, _ = two_nodes(tmp_path)
    a.close()
    damaged = update[: len(update) // 2]
    with Node.open(tmp_path / "B", rng=random.Random(4)) as b:
        before = b.count(DOC)
        try:
            b.import_sliced(DOC, damaged, 2048)
        except UpdateError:
            pass
        else:
            raise AssertionError("a truncated update must raise")
        kept = b.count(DOC) - before
        assert 0 < kept < RECORDS
        b.import_sliced(DOC, update, 2048)
        assert b.count(DOC) == before + RECORDS  # B's duplicate codes stay: conflicts
