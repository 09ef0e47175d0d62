"""Group commit: writes that arrive together run in one transaction, each
in a savepoint of its own (``Node.batch``), and are answered after that one
commit (``engine.server.writes``); a write that fails is undone alone."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from engine.errors import ValidationError
from engine.node import Node
from engine.relay.sqlite_store import SqliteRelayStore
from engine.relay.testing import push
from engine.server.writes import WriteGroup
from engine.transport.client import NodeThread


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def test_a_failing_call_in_a_batch_is_undone_alone(tmp_path: Path) -> None:
    def half_then_fail(node: Node) -> None:
        node.put("customers", {"code": "HALF", "name": "written, then undone"})
        raise ValidationError("refused after a write")

    with Node.create(tmp_path / "h", dataset="acme", node="HN") as node:
        before = len(node.outbox())
        results = node.batch(
            [
                lambda n: n.put("customers", {"code": "A", "name": "a"}),
                half_then_fail,
                lambda n: n.put("customers", {"code": "B", "name": "b"}),
            ]
        )
        assert [ok for ok, _ in results] == [True, False, True]
        assert isinstance(results[1][1], ValidationError)
        assert len(node.outbox()) == before + 2
    with Node.open(tmp_path / "h") as again:  # durable, and the undone write is gone
        assert [r["code"] for r in again.list("customers")] == ["A", "B"]
        assert again.get("customers", "HALF") is None
        # What goes up builds on nothing that was undone: the relay takes
        # every update (a write over an undone one would wait for it forever).
        with SqliteRelayStore.create(tmp_path / "relay.db") as store:
            store.enroll("acme", "HN")
            assert push(store, again, "HN") == ["stored"] * len(again.outbox())


def test_writes_arriving_together_share_one_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "h"
    Node.create(home, dataset="acme", node="HN").close()
    sizes: list[int] = []
    batch = Node.batch

    def counted(self: Node, calls: Any) -> Any:
        calls = list(calls)
        sizes.append(len(calls))
        return batch(self, calls)

    monkeypatch.setattr(Node, "batch", counted)

    async def main() -> list[Any]:
        async with NodeThread(home, dataset="acme", wall_ms=_wall_ms) as nt:
            group = WriteGroup(nt)
            return await asyncio.gather(
                group.run(Node.put, "customers", {"code": "A", "name": "a"}),
                group.run(Node.put, "customers", {"code": "X", "bogus": 1}),
                group.run(Node.put, "customers", {"code": "B", "name": "b"}),
                return_exceptions=True,
            )

    first, bad, last = asyncio.run(main())
    assert isinstance(first, str) and isinstance(last, str)
    assert isinstance(bad, ValidationError) and "bogus" in str(bad)
    assert sizes == [3]
    with Node.open(home) as node:
        assert [r["code"] for r in node.list("customers")] == ["A", "B"]
