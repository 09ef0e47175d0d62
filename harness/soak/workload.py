"""The soak's workload driver: random writes into node homes of the built-in
``accounting`` schema, through the Python API (and now and then through the
``branchline`` command), remembering every write a caller was told succeeded.

Operations (weights in ``WEIGHTS``): a node creates its own customers and
edits and deletes them (only it writes those: their final state is known
exactly); every node edits a few shared customers (``concurrent_edit``
conflicts) and sometimes deletes one (``edit_delete``); vouchers are booked
with the node's series, and sometimes with a hand-typed number that another
node may type too (a duplicate the loser's node renumbers); open conflicts
are resolved now and then. A refused operation (a record deleted meanwhile,
a number already used) is counted by error class, never retried.

After each write that returned, the writer's entry of the record is read back
from its store and kept as an ``AckedWrite``: the end-of-run check requires it
(or a newer write of the same node) on every replica.
"""

from __future__ import annotations

import datetime as dt
import random
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from engine.errors import BranchlineError
from engine.node import Node
from engine.schema import Schema

from ..sim.schema_workload import SchemaWorkload
from .checks import AckedWrite, entry_hlc

SHARED = 6  # customers every node edits
ITEMS = 4
TYPED_POOL = 8  # hand-typed receipt numbers shared by every node
MAX_OWN = 400  # own customers per node, so the workload stays bounded

WEIGHTS: dict[str, int] = {
    "create_own": 16,
    "edit_own": 18,
    "delete_own": 4,
    "edit_shared": 20,
    "delete_shared": 1,
    "sales_invoice": 18,
    "cash_receipt": 10,
    "typed_receipt": 3,
    "resolve": 6,
    "cli_put": 2,
}


# Operations that change records a rebuilt home may hold only in part.
EDITS = frozenset({"edit_own", "delete_own", "edit_shared", "delete_shared", "resolve", "cli_put"})


class Workload:
    """Random writes into ``homes`` (node name -> home), drawn from ``rng``.

    ``cli`` is the ``branchline`` command (argv prefix) for the writes that go
    through the command line. Not thread-safe: one thread calls ``step``.
    """

    def __init__(
        self,
        homes: dict[str, Path],
        rng: random.Random,
        cli: list[str],
        schema: Schema | None = None,
    ) -> None:
        """With ``schema`` (a user's own), the writes are generated from its
        fields (harness.sim.schema_workload) instead of the kinds above."""
        self.homes = homes
        self.rng = rng
        self.cli = cli
        self.nodes: dict[str, Node] = {}
        self.acked: list[AckedWrite] = []
        self.ops: Counter[str] = Counter()  # attempted, by kind
        self.refused: Counter[str] = Counter()  # by "kind: ErrorClass"
        self.own: dict[str, list[str]] = {n: [] for n in homes}  # live own codes
        self.created = 0
        # Voucher id -> (number, provisional) as post_voucher returned it.
        self.issued: dict[str, tuple[str, bool]] = {}
        self._kinds = list(WEIGHTS)
        self._weights = list(WEIGHTS.values())
        self._pause_wanted: str | None = None
        self._pause_held = threading.Event()
        self._pause_over = threading.Event()
        self.custom = SchemaWorkload(schema, rng) if schema is not None else None

    def open(self) -> None:
        """Open every home (each with its own Yjs client id from ``rng``)."""
        for name, home in self.homes.items():
            self.nodes[name] = Node.open(home, rng=random.Random(self.rng.getrandbits(64)))

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()
        self.nodes.clear()

    @contextmanager
    def paused(self, name: str, timeout: float = 120.0) -> Iterator[None]:
        """(Another thread.) Hold the workload off node ``name``'s home: its
        ``Node`` is closed while the block runs and reopened from
        ``homes[name]`` after (the home may have moved). Runs the block at
        once when the workload thread is not running."""
        self._pause_over.clear()
        self._pause_held.clear()
        self._pause_wanted = name
        try:
            if self.nodes and not self._pause_held.wait(timeout):
                raise RuntimeError(f"the workload did not let go of {name} within {timeout} s")
            yield
        finally:
            self._pause_wanted = None
            self._pause_over.set()

    def serve_pause(self) -> None:
        """(The workload thread, between steps.) Let go of a home ``paused`` asks for."""
        name = self._pause_wanted
        if name is None or name not in self.nodes:
            return
        self.nodes.pop(name).close()
        self._pause_held.set()
        self._pause_over.wait()
        self.nodes[name] = Node.open(self.homes[name], rng=random.Random(self.rng.getrandbits(64)))

    # -- setup -----------------------------------------------------------------

    def seed_catalogs(self, first: str) -> None:
        """Create what every node refers to (warehouse, items, shared
        customers) on node ``first``. Raises BranchlineError."""
        node = self.nodes[first]
        if self.custom is not None:
            for written in self.custom.seed(node):
                self._acked(node, written.collection, written.id)
            return
        self._acked(node, "warehouses", node.put("warehouses", {"code": "K1", "name": "Kho 1"}))
        for i in range(ITEMS):
            rid = node.put("items", {"code": f"SP{i}", "name": f"Item {i}", "price": "5000"})
            self._acked(node, "items", rid)
        for i in range(SHARED):
            rid = node.put("customers", {"code": f"SH{i}", "name": f"Shared {i}"})
            self._acked(node, "customers", rid)

    # -- one step --------------------------------------------------------------

    def step(self) -> str:
        """Run one random operation; returns its kind."""
        if self.custom is not None:
            return self._custom_step()
        kind = self.rng.choices(self._kinds, self._weights)[0]
        name = self.rng.choice(sorted(self.nodes))
        node = self.nodes[name]
        self.ops[kind] += 1
        if kind in EDITS and not node.numbering_known():
            # A rebuilt home before its first sync lacks its own changes the
            # relay holds: an edit of an older record now would be written
            # over them (docs/operations.md); new records and vouchers go on.
            self.refused[f"{kind}: rebuilt home not synced yet"] += 1
            return kind
        action: Callable[[Node], None] = getattr(self, f"_{kind}")
        try:
            action(node)
        except BranchlineError as exc:
            self.refused[f"{kind}: {type(exc).__name__}"] += 1
        return kind

    def _custom_step(self) -> str:
        """One write generated from the user's schema (or a resolution)."""
        assert self.custom is not None
        node = self.nodes[self.rng.choice(sorted(self.nodes))]
        resolving = self.rng.random() < 0.06
        try:
            if resolving:
                kind = "resolve"
                if node.numbering_known():
                    self._resolve(node)
            else:
                kind, written = self.custom.step(node, new_only=not node.numbering_known())
                if written is not None:
                    if written.issued is not None:
                        self.issued[written.id] = written.issued
                    self._acked(node, written.collection, written.id)
        except BranchlineError as exc:
            kind = "resolve" if resolving else "schema"
            self.refused[f"{kind}: {type(exc).__name__}"] += 1
        self.ops[kind] += 1
        return kind

    def _create_own(self, node: Node) -> None:
        mine = self.own[node.node_id]
        if len(mine) >= MAX_OWN:
            self._edit_own(node)
            return
        self.created += 1
        code = f"{node.node_id}-{self.created}"
        rid = node.put("customers", {"code": code, "name": self._text("name")})
        mine.append(code)
        self._acked(node, "customers", rid)

    def _edit_own(self, node: Node) -> None:
        mine = self.own[node.node_id]
        if not mine:
            self._create_own(node)
            return
        code = self.rng.choice(mine)
        rid = node.put("customers", {"code": code, "address": self._text("addr")})
        self._acked(node, "customers", rid)

    def _delete_own(self, node: Node) -> None:
        mine = self.own[node.node_id]
        if not mine:
            return
        code = mine.pop(self.rng.randrange(len(mine)))
        self._acked(node, "customers", node.delete("customers", code))

    def _edit_shared(self, node: Node) -> None:
        code = f"SH{self.rng.randrange(SHARED)}"
        field = self.rng.choice(["name", "address", "tax_code"])
        rid = node.put("customers", {"code": code, field: self._text(field)})
        self._acked(node, "customers", rid)

    def _delete_shared(self, node: Node) -> None:
        code = f"SH{self.rng.randrange(SHARED)}"
        self._acked(node, "customers", node.delete("customers", code))

    def _customer(self, node: Node) -> str:
        mine = self.own[node.node_id]
        if mine and self.rng.random() < 0.5:
            return self.rng.choice(mine)
        return f"SH{self.rng.randrange(SHARED)}"

    def _date(self) -> str:
        day = dt.date(2026, 11, 20) + dt.timedelta(days=self.rng.randrange(20))
        return day.isoformat()

    def _sales_invoice(self, node: Node) -> None:
        lines = [
            {
                "item": f"SP{self.rng.randrange(ITEMS)}",
                "qty": str(self.rng.randint(1, 9)),
                "price": f"{self.rng.randint(1, 500)}000",
                "vat_rate": "0.1",
            }
            for _ in range(self.rng.randint(1, 3))
        ]
        posted = node.post_voucher(
            "sales_invoice",
            {
                "date": self._date(),
                "customer": self._customer(node),
                "warehouse": "K1",
                "paid": self.rng.random() < 0.5,
                "lines": lines,
            },
        )
        self.issued[posted.id] = (posted.number, posted.provisional)
        self._acked(node, "sales_invoice", posted.id)

    def _cash_receipt(self, node: Node, number: str | None = None) -> None:
        fields: dict[str, Any] = {
            "date": self._date(),
            "customer": self._customer(node),
            "amount": f"{self.rng.randint(1, 10_000)}000",
        }
        if number is not None:
            fields["number"] = number
        posted = node.post_voucher("cash_receipt", fields)
        if number is None:
            self.issued[posted.id] = (posted.number, posted.provisional)
        self._acked(node, "cash_receipt", posted.id)

    def _typed_receipt(self, node: Node) -> None:
        self._cash_receipt(node, f"PT-SOAK-{self.rng.randrange(TYPED_POOL)}")

    def _resolve(self, node: Node) -> None:
        for conflict in node.conflicts():
            kind = conflict["kind"]
            if kind == "concurrent_edit":
                keep = "in_force"
            elif kind == "edit_delete":
                keep = self.rng.choice(["delete", "edit"])
            else:
                continue
            node.resolve(str(conflict["id"]), keep=keep)
            for rid in conflict["records"]:
                self._acked(node, str(conflict["collection"]), str(rid))
            return

    def _cli_put(self, node: Node) -> None:
        """An edit through ``branchline put`` (a separate process)."""
        mine = self.own[node.node_id]
        if not mine:
            self._create_own(node)
            return
        code = self.rng.choice(mine)
        fields = orjson.dumps({"code": code, "address": self._text("cli")}).decode()
        out = subprocess.run(
            [*self.cli, "put", "--home", str(node.home), "customers", fields],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if out.returncode != 0:
            self.refused[f"cli_put: exit {out.returncode}"] += 1
            print(f"soak: branchline put failed: {out.stderr.strip()}", file=sys.stderr)
            return
        node.refresh()
        self._acked(node, "customers", str(orjson.loads(out.stdout)["id"]))

    # -- helpers ---------------------------------------------------------------

    def _text(self, what: str) -> str:
        return f"{what}-{self.rng.getrandbits(32):08x}"

    def _acked(self, node: Node, collection: str, rid: str) -> None:
        """Remember the writer's entry of ``rid`` as acknowledged."""
        row = node.store.conn.execute(
            "SELECT doc FROM records WHERE collection = ? AND id = ?", (collection, rid)
        ).fetchone()
        if row is None:
            raise AssertionError(f"{node.node_id}: {collection}/{rid} written but not in records")
        doc = str(row[0])
        # The Node API has no reader of one raw entry; the soak is part of
        # the engine and reads it through the node's own document.
        entry = node._states(doc, rid).get(node.node_id)
        if entry is None:
            raise AssertionError(f"{node.node_id}: {collection}/{rid} has no entry of its writer")
        self.acked.append(
            AckedWrite(node.node_id, collection, rid, doc, entry_hlc(entry), dict(entry))
        )
