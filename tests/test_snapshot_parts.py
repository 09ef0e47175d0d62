"""A document's snapshot in parts (store format 8): compaction stores a large
snapshot as parts of about ``SNAPSHOT_PART_BYTES``; loading applies them in
order and gets the same document; a snapshot of one part (format 7) loads as
it did, and the next compaction stores it in parts."""

from __future__ import annotations

from pathlib import Path

import pytest
from store_formats import downgrade

from engine.node import Node
from engine.store import doclog


def _home(tmp_path: Path, n: int) -> Node:
    node = Node.create(tmp_path / "h", dataset="acme", node="HN")
    node.batch(
        (lambda nd, i=i: nd.put("customers", {"code": f"C{i:05d}", "name": f"Customer {i}" * 4}))
        for i in range(n)
    )
    return node


def _parts(node: Node) -> int:
    (n,) = node.store.conn.execute(
        "SELECT COUNT(*) FROM snapshot_parts WHERE doc = 'customers'"
    ).fetchone()
    return int(n)


def test_a_large_snapshot_is_stored_in_parts_and_loads_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doclog, "SNAPSHOT_PART_BYTES", 4096)
    node = _home(tmp_path, 400)
    node.compact("customers")
    assert _parts(node) > 3
    shown = node.list("customers")
    node.put("customers", {"code": "C00001", "name": "after the snapshot"})
    node.close()
    with Node.open(tmp_path / "h") as again:
        # Loaded from the parts and the log row after them: the same document.
        again.put("customers", {"code": "C00002", "name": "loads the document"})
        assert again.get("customers", "C00001")["name"] == "after the snapshot"  # type: ignore[index]
        assert len(again.list("customers")) == len(shown)
        monkeypatch.setattr(doclog, "SNAPSHOT_PART_BYTES", 1 << 30)
        again.compact("customers")  # one part now: the old parts are gone
        assert _parts(again) == 0
        assert len(again.list("customers")) == len(shown)
        with Node.create(tmp_path / "other", dataset="acme", node="BR") as other:
            other.import_updates(again.export_updates(other.state()))
            assert other.list("customers") == again.list("customers")


def test_a_snapshot_of_format_7_loads_and_is_then_stored_in_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = _home(tmp_path, 300)
    node.compact("customers")  # one part: 4 MB is more than this document
    assert _parts(node) == 0
    shown = node.list("customers")
    node.close()
    downgrade(tmp_path / "h", 7)
    monkeypatch.setattr(doclog, "SNAPSHOT_PART_BYTES", 4096)
    with Node.open(tmp_path / "h") as again:
        assert again.list("customers") == shown
        again.put("customers", {"code": "C00003", "name": "written"})
        again.compact("customers")
        assert _parts(again) > 3
    with Node.open(tmp_path / "h") as third:
        assert third.get("customers", "C00003")["name"] == "written"  # type: ignore[index]
        assert len(third.list("customers")) == len(shown)
