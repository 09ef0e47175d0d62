"""Merging duplicate catalog records keeps the books right: receivables and
stock on hand count every voucher once, under the surviving record, on every
node, and the incremental tables still equal a rebuild."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from engine import Node
from engine.clock import ManualClock


def make(tmp: Path, name: str, offset: int) -> Node:
    return Node.create(
        tmp / name,
        dataset="shop",
        node=name,
        clock=ManualClock(1_790_000_000_000 + offset),
        rng=random.Random(name),
        adapters=["accounting"],
    )


def mesh(nodes: list[Node]) -> None:
    for a, b in itertools.permutations(nodes, 2):
        updates = a.export_updates(b.state())
        if updates:
            b.import_updates(updates)


def books(node: Node) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    receivables = node.query("SELECT * FROM receivables").objects()
    stock = node.query("SELECT * FROM stock_on_hand").objects()
    return receivables, stock


def test_merged_customers_and_items_count_each_voucher_once(tmp_path: Path) -> None:
    hn, hcm = make(tmp_path, "HN", 0), make(tmp_path, "HCM", 1)
    nodes = [hn, hcm]
    try:
        hn.put("warehouses", {"code": "K1", "name": "Kho"})
        hn.put("suppliers", {"code": "NCC", "name": "Nhà cung cấp"})
        mesh(nodes)
        # The same customer and the same item created at both branches.
        for n in nodes:
            n.put("customers", {"code": "KH01", "name": f"An ({n.node_id})"})
            n.put("items", {"code": "TRA", "name": "Trà", "unit": "kg", "price": "10"})
        for n, qty in ((hn, "10"), (hcm, "7")):
            n.post_voucher(
                "purchase_invoice",
                {
                    "date": "2026-03-01",
                    "supplier": "NCC",
                    "warehouse": "K1",
                    "lines": [{"item": "TRA", "qty": qty, "price": "6"}],
                },
            )
            n.post_voucher(
                "sales_invoice",
                {
                    "date": "2026-03-02",
                    "customer": "KH01",
                    "warehouse": "K1",
                    "paid": False,
                    "lines": [{"item": "TRA", "qty": "2", "price": "1000000.50"}],
                },
            )
        mesh(nodes)
        before, _ = books(hn)
        assert [r["customer"] for r in before] == ["KH01", "KH01"]  # two customers, one code
        for conflict in hn.conflicts():
            assert conflict["kind"] == "duplicate_key"
            hn.resolve(conflict["id"], merge_into=conflict["records"][0])
        mesh(nodes)
        for n in nodes:
            receivables, stock = books(n)
            # 2 invoices x 2 x 1,000,000.50, no VAT: each counted once, under KH01.
            assert receivables == [
                {
                    "customer": "KH01",
                    "invoiced": "4000002.00",
                    "received": "0.00",
                    "balance": "4000002.00",
                }
            ]
            assert stock == [{"item": "TRA", "warehouse": "K1", "qty": "13.000"}]  # 10 + 7 - 4
            assert n.conflicts() == []
            assert all(report.same for report in n.rebuild_adapters())
        assert books(hn) == books(hcm)
    finally:
        for n in nodes:
            n.close()
