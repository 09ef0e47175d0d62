"""engine.store.urgent: which pending records are urgent (``urgent_when``,
``paid = false`` on sales invoices in the accounting schema) and which
documents a sync pass takes first because of them."""

from __future__ import annotations

from pathlib import Path

from engine.node import Node


def _invoice(node: Node, date: str, customer: str, **more: object) -> str:
    fields = {
        "date": date,
        "customer": customer,
        "warehouse": "K1",
        "lines": [{"item": "I1", "qty": "1", "price": "10", "vat_rate": "10"}],
        **more,
    }
    return node.post_voucher("sales_invoice", fields).id


def test_urgent_pending_records_and_the_documents_they_bring(tmp_path: Path) -> None:
    with Node.create(tmp_path / "A", dataset="acme", node="A") as a:
        a.put("warehouses", {"code": "K1", "name": "Main store"})
        a.put("items", {"code": "I1", "name": "Tea", "unit": "kg", "price": "10"})
        a.put("customers", {"code": "C1", "name": "An"})
        for i in range(50):  # a backlog the urgent records do not refer to
            a.put("suppliers", {"code": f"S{i}", "name": f"Supplier {i}"})
        assert a.urgent_pending() == {"sales_invoice": 0} and a.urgent_docs() == set()
        _invoice(a, "2026-11-30", "C1")
        _invoice(a, "2026-12-01", "C1")
        _invoice(a, "2026-12-02", "C1", paid=True)  # paid: ordinary
        gone = _invoice(a, "2026-10-05", "C1")
        a.delete("sales_invoice", gone)  # deleted: not urgent
        assert a.urgent_pending() == {"sales_invoice": 2}
        assert a.urgent_docs() == {
            "sales_invoice/2026-11",
            "sales_invoice/2026-12",
            "customers",
            "items",
            "warehouses",
        }
        # Once the relay has everything, nothing is pending, nothing urgent.
        a.ack([seq for seq, _, _ in a.outbox(10_000)])
        assert a.urgent_pending() == {"sales_invoice": 0} and a.urgent_docs() == set()
        # A new unpaid invoice for a customer already acknowledged brings
        # only its own document.
        _invoice(a, "2026-12-03", "C1")
        assert a.urgent_docs() == {"sales_invoice/2026-12"}
