"""Yearly reset of the built-in schema's voucher series (docs/schema.md
"Yearly reset in existing homes"): numbers restart at 1 in each calendar
year of the voucher date, on every node, offline or not, and a home made
with the continuous version 1 of the schema keeps numbering continuously.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

from test_series import invoice, receipt, setup_catalogs

from engine import Node
from engine.clock import ManualClock
from engine.schema import builtin_schema, parse_schema

DEC31, JAN1 = "2026-12-31", "2027-01-01"


def make(home: Path, node: str, schema: object = "accounting", seed: int = 1) -> Node:
    return Node.create(
        home,
        dataset="books",
        node=node,
        schema=schema,  # type: ignore[arg-type]
        clock=ManualClock(),
        rng=random.Random(seed),
    )


def sync(*nodes: Node) -> None:
    """Every node gets every other node's updates (as a relay would pass them)."""
    for src in nodes:
        for dst in nodes:
            if src is not dst:
                dst.import_updates(src.export_updates(dst.state()))


def version_1_schema() -> str:
    """The built-in schema as homes made before the yearly reset hold it."""
    text = builtin_schema().source.replace("version = 2", "version = 1")
    return re.sub(r', reset = "yearly", template = "[^"]*"', "", text)


def test_two_offline_nodes_restart_numbers_in_the_new_year(tmp_path: Path) -> None:
    a, b = make(tmp_path / "a", "A"), make(tmp_path / "b", "B", seed=2)
    try:
        setup_catalogs(a)
        sync(a, b)
        # Both offline across the boundary: each books on Dec 31 and Jan 1.
        booked = {
            n.node_id: [
                n.post_voucher("sales_invoice", invoice(day)).number
                for day in (DEC31, DEC31, JAN1, DEC31, JAN1)
            ]
            for n in (a, b)
        }
        late = a.post_voucher("cash_receipt", receipt(JAN1))
        assert booked["A"] == [
            "HDA-2026-000001", "HDA-2026-000002", "HDA-2027-000001",
            "HDA-2026-000003", "HDA-2027-000002",
        ]  # fmt: skip
        assert booked["B"] == [n.replace("HDA", "HDB") for n in booked["A"]]
        assert late.number == "PTA-2027-000001"  # each book has its own yearly series
        voided = a.list("sales_invoice")[2]
        assert voided["number"] == "HDA-2027-000001"
        a.delete("sales_invoice", voided["id"])
        sync(a, b)
        for n in (a, b):
            numbers = [r["number"] for r in n.list("sales_invoice")]
            assert len(numbers) == 9 and len(set(numbers)) == 9  # no number reused
            assert "HDA-2027-000001" not in numbers
            # A new voucher after the sync takes the next number of its year.
            assert n.post_voucher("sales_invoice", invoice(JAN1)).number.endswith("2027-000003")
        sync(a, b)
        assert a.gaps() == b.gaps()
        assert [(g["series"], g["number"], g["reason"], g["node"]) for g in a.gaps()] == [
            ("sales_invoice@2027", "HDA-2027-000001", "void", "A")
        ]
        assert a.gaps("sales_invoice@2026") == []
        per_year = Counter(r["number"][:8] for r in a.list("sales_invoice"))
        assert per_year == {"HDA-2026": 3, "HDA-2027": 2, "HDB-2026": 3, "HDB-2027": 3}
    finally:
        a.close()
        b.close()


def test_a_version_1_home_keeps_its_continuous_numbers(tmp_path: Path) -> None:
    old = parse_schema(version_1_schema())
    assert old.collections["sales_invoice"].series.reset == "never"  # type: ignore[union-attr]
    home = tmp_path / "old"
    with make(home, "A", old) as a:
        setup_catalogs(a)
        first = a.post_voucher("sales_invoice", invoice(DEC31)).number
    # Reopened with today's code, the home keeps the schema it was made with.
    with Node.open(home, clock=ManualClock(), rng=random.Random(5)) as a:
        assert a.schema.version == 1
        second = a.post_voucher("sales_invoice", invoice(JAN1)).number
        assert [first, second] == ["HDA-000001", "HDA-000002"]
        # A new node of the same dataset numbers yearly; the shapes never clash.
        with make(tmp_path / "new", "B") as b:
            sync(a, b)
            third = b.post_voucher("sales_invoice", invoice(JAN1)).number
            assert third == "HDB-2027-000001"
            sync(a, b)
            assert sorted(r["number"] for r in a.list("sales_invoice")) == [
                "HDA-000001", "HDA-000002", "HDB-2027-000001",
            ]  # fmt: skip
