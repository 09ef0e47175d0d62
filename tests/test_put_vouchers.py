"""``put`` on a voucher book only edits an existing voucher that keeps its
number; new vouchers go through ``voucher`` / ``post_voucher`` (issue 18)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli import cli
from engine.clock import ManualClock
from engine.errors import ValidationError
from engine.node import Node

SALE = {
    "date": "2026-02-10",
    "customer": "KH1",
    "warehouse": "K1",
    "paid": False,
    "lines": [{"item": "VT1", "qty": "1", "price": "100", "vat_rate": "0.1"}],
}


@pytest.fixture
def node(tmp_path: Path) -> Node:
    n = Node.create(
        tmp_path / "h", dataset="acme", node="HN", clock=ManualClock(), rng=random.Random(1)
    )
    n.put("customers", {"code": "KH1", "name": "An"})
    n.put("warehouses", {"code": "K1", "name": "Kho 1"})
    n.put("items", {"code": "VT1", "name": "Bút", "price": "100"})
    return n


def test_put_refuses_a_new_voucher_and_writes_nothing(node: Node) -> None:
    before = node.outbox()
    with pytest.raises(ValidationError, match="branchline voucher sales_invoice JSON"):
        node.put("sales_invoice", SALE)
    with pytest.raises(ValidationError, match="no voucher is numbered 'HD-77'"):
        node.put("sales_invoice", {**SALE, "number": "HD-77"})
    assert node.list("sales_invoice") == [] and node.outbox() == before


def test_put_edits_a_voucher_that_keeps_its_number(node: Node) -> None:
    posted = node.post_voucher("sales_invoice", SALE)
    node.put("sales_invoice", {"id": posted.id, "paid": True})
    node.put("sales_invoice", {"number": posted.number, "paid": False})  # by number
    node.put("sales_invoice", {"id": posted.id, "number": posted.number, "paid": True})
    with pytest.raises(ValidationError, match="keeps it"):
        node.put("sales_invoice", {"id": posted.id, "number": "HD-OTHER"})
    record = node.get("sales_invoice", posted.id)
    assert record is not None and record["number"] == posted.number and record["paid"] is True


def test_cli_put_on_a_voucher_book_is_one_line_exit_2(node: Node) -> None:
    home = node.home
    node.close()
    result = CliRunner().invoke(
        cli, ["put", "--home", str(home), "sales_invoice", json.dumps(SALE)]
    )
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: sales_invoice is a voucher book") and "voucher" in line
