"""Property: for random histories on several replicas, delivered in random
order (relative to the target's state, to another replica's state so parts
arrive before what they depend on, captured early and delivered late, twice),
the adapters' incremental tables equal a rebuild from state on every replica,
and once every replica holds every update, all replicas' tables are equal."""

from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.testing import assert_rebuild_identical, make_node, snapshot
from engine import Node
from engine.errors import BranchlineError

REPLICAS = 3
ADAPTERS: dict[str, dict[str, Any]] = {
    "accounting": {},
    "mirror": {"collections": ["customers", "items", "sales_invoice", "journal"]},
}
CUSTOMERS = ("K1", "K2", "K3")
ITEMS = ("I1", "I2")
WAREHOUSES = ("W1", "W2")
DATES = ("2026-01-05", "2026-01-31", "2026-02-01")
QTYS = ("1", "2.5", "10", "0.125")
PRICES = ("1000", "2500.50", "99999999999.99", "0.01")

step = st.tuples(st.integers(0, REPLICAS - 1), st.integers(0, 11), st.integers(0, 2**32))


def seed_catalogs(node: Node) -> None:
    for code in ("111", "131", "156", "331", "511", "3331", "632"):
        node.put("accounts", {"code": code, "name": f"TK {code}"})
    for code in ITEMS:
        node.put("items", {"code": code, "name": f"Hàng {code}"})
    for code in WAREHOUSES:
        node.put("warehouses", {"code": code, "name": f"Kho {code}"})
    node.put("suppliers", {"code": "S1", "name": "NCC"})
    node.put("customers", {"code": "K1", "name": "An"})
    node.put("contracts", {"code": "C1", "customer": "K1", "value": "1000000"})


def lines(rng: random.Random, kind: str) -> list[dict[str, Any]]:
    out = []
    for _ in range(rng.randint(1, 3)):
        line: dict[str, Any] = {"item": rng.choice(ITEMS), "qty": rng.choice(QTYS)}
        if kind != "stock_transfer":
            line["price"] = rng.choice(PRICES)
        if kind == "sales_invoice" and rng.random() < 0.7:
            line["vat_rate"] = rng.choice(("0.1", "0.08", "0"))
        out.append(line)
    return out


def write(node: Node, op: int, rng: random.Random) -> None:
    """One random write of kind ``op`` (0-6); refused writes change nothing."""
    date = rng.choice(DATES)
    if op == 0:
        node.put("customers", {"code": rng.choice(CUSTOMERS), "name": rng.choice(("An", "Bình"))})
    elif op == 1:
        kind = rng.choice(("sales_invoice", "purchase_invoice", "stock_transfer"))
        fields: dict[str, Any] = {"date": date, "lines": lines(rng, kind)}
        if kind == "sales_invoice":
            fields |= {"customer": rng.choice(CUSTOMERS), "warehouse": rng.choice(WAREHOUSES)}
            if rng.random() < 0.5:
                fields["contract"] = "C1"
        elif kind == "purchase_invoice":
            fields |= {"supplier": "S1", "warehouse": rng.choice(WAREHOUSES)}
        else:
            fields |= {"from_warehouse": "W1", "to_warehouse": "W2"}
        node.post_voucher(kind, fields)
    elif op == 2:
        kind = rng.choice(("cash_receipt", "cash_payment"))
        party = (
            {"customer": rng.choice(CUSTOMERS)} if kind == "cash_receipt" else {"supplier": "S1"}
        )
        node.post_voucher(kind, {"date": date, "amount": rng.choice(PRICES), **party})
    elif op == 3:
        debit, credit = rng.choice(PRICES), rng.choice(PRICES)
        node.post_voucher(
            "journal",
            {
                "date": date,
                "lines": [{"account": "632", "debit": debit}, {"account": "156", "credit": credit}],
            },
        )
    elif op == 4:  # edit a posted voucher: its lines, or only its paid flag
        invoices = node.list("sales_invoice")
        if invoices:
            rec = rng.choice(invoices)
            change = (
                {"paid": True} if rng.random() < 0.5 else {"lines": lines(rng, "sales_invoice")}
            )
            node.put("sales_invoice", {"id": rec["id"], **change})
    elif op == 5:  # delete (void) a voucher or a customer
        coll = rng.choice(("sales_invoice", "purchase_invoice", "customers", "journal"))
        recs = node.list(coll)
        if recs:
            node.delete(coll, rng.choice(recs)["id"])
    elif op == 6:  # rename an item's code: views show the new code
        node.put("items", {"code": rng.choice(ITEMS), "name": rng.choice(("Trà", "Cà phê"))})


class World:
    def __init__(self, root: Path) -> None:
        self.nodes = []
        for r in range(REPLICAS):
            self.nodes.append(make_node(root / f"r{r}", f"N{r}", adapters=ADAPTERS, seed=r))
        seed_catalogs(self.nodes[0])
        everything = self.nodes[0].export_updates()
        for other in self.nodes[1:]:
            other.import_updates(everything)
        self.captured: list[tuple[int, dict[str, bytes]]] = []

    def step(self, r: int, kind: int, seed: int) -> None:
        rng = random.Random(seed)
        node = self.nodes[r]
        target = (r + 1 + seed % (REPLICAS - 1)) % REPLICAS
        if kind <= 6:
            # A refused write (say, to a customer deleted here) changes nothing.
            with contextlib.suppress(BranchlineError):
                write(node, kind, rng)
        elif kind == 7:  # relative to the target's state
            self.nodes[target].import_updates(node.export_updates(self.nodes[target].state()))
        elif kind == 8:  # relative to a third replica's state: parts may come first
            third = self.nodes[3 - r - target] if REPLICAS == 3 else node
            self.nodes[target].import_updates(node.export_updates(third.state()))
        elif kind == 9:  # captured now, delivered later
            self.captured.append((target, node.export_updates(self.nodes[target].state())))
        elif kind == 10 and self.captured:
            to, updates = self.captured.pop(seed % len(self.captured))
            self.nodes[to].import_updates(updates)
            self.nodes[to].import_updates(updates)  # twice: nothing changes
        elif kind == 11:
            assert_rebuild_identical(node)

    def converge(self) -> None:
        for to, updates in self.captured:
            self.nodes[to].import_updates(updates)
        for _ in range(2):
            for a in self.nodes:
                for b in self.nodes:
                    if a is not b:
                        b.import_updates(a.export_updates(b.state()))

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(step, min_size=4, max_size=40))
def test_incremental_equals_rebuild_on_every_replica(steps: list[tuple[int, int, int]]) -> None:
    root = Path(tempfile.mkdtemp(prefix="bl-adapters-"))
    world = World(root)
    try:
        for r, kind, seed in steps:
            world.step(r, kind, seed)
        for node in world.nodes:  # before convergence too: each replica on its own
            assert_rebuild_identical(node)
        world.converge()
        first = snapshot(world.nodes[0])
        conflicts = world.nodes[0].invariant_conflicts()
        for node in world.nodes:
            assert_rebuild_identical(node)
            assert snapshot(node) == first
            assert node.invariant_conflicts() == conflicts
    finally:
        world.close()
        shutil.rmtree(root, ignore_errors=True)
