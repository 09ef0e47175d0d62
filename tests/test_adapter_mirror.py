"""The mirror adapter: acceptance suite, a user schema's collection as a
plain table (scalars as columns, lines as JSON), options and evolution."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from adapters.testing import make_node, run_acceptance
from engine.errors import AdapterConfigError
from engine.schema import parse_schema

SHOP = """
schema = "shop"
version = 1

[collections.products]
kind = "catalog"
fields.code = { type = "text", required = true }
fields.name = { type = "text", required = true }
fields.price = "decimal"
fields.stock = "int"
fields.active = "bool"
fields.since = "date"

[collections.orders]
kind = "voucher"
partition = "month"
series = { prefix = "DH", strategy = "node" }
fields.date = { type = "date", required = true }
fields.product = { type = "ref", to = "products" }

[collections.orders.fields.lines]
type = "lines"
fields = { sku = "text", qty = { type = "decimal", required = true } }
"""


def test_mirror_acceptance_accounting(tmp_path: Path) -> None:
    run_acceptance("mirror", tmp_path, schema="accounting", seed=3)


def test_mirror_acceptance_user_schema(tmp_path: Path) -> None:
    run_acceptance(
        "mirror",
        tmp_path,
        schema=parse_schema(SHOP, origin="shop"),
        seed=4,
        options={"collections": ["products", "orders"], "prefix": "app_"},
    )


def test_mirror_rows_are_plain(tmp_path: Path) -> None:
    schema = parse_schema(SHOP, origin="shop")
    node = make_node(tmp_path / "n", "N", schema, adapters={"mirror": {}})
    with node:
        pid = node.put(
            "products",
            {
                "code": "P1",
                "name": "Trà sen",
                "price": "12000.50",
                "stock": 7,
                "active": True,
                "since": "2026-01-02",
            },
        )
        posted = node.post_voucher(
            "orders", {"date": "2026-01-05", "product": "P1", "lines": [{"sku": "a", "qty": "1.5"}]}
        )
        rows = node.query("SELECT * FROM mirror_products").objects()
        assert rows == [
            {
                "id": pid,
                "code": "P1",
                "name": "Trà sen",
                "price": "12000.50",
                "stock": 7,
                "active": 1,
                "since": "2026-01-02",
            }
        ]
        order = node.query("SELECT * FROM mirror_orders").objects()[0]
        assert order["product"] == pid and order["number"] == posted.number
        assert json.loads(order["lines"]) == [{"qty": "1.5", "sku": "a"}]
        assert Decimal(rows[0]["price"]) == Decimal("12000.50")
        node.delete("products", "P1")
        assert node.query("SELECT COUNT(*) FROM mirror_products").rows == [(0,)]


def test_mirror_adds_missing_columns(tmp_path: Path) -> None:
    """A table made for fewer fields gets the new columns in setup (sqlite-utils)."""
    schema = parse_schema(SHOP, origin="shop")
    with make_node(tmp_path / "n", "N", schema) as node:
        node.store.conn.execute("CREATE TABLE mirror_products (id TEXT PRIMARY KEY, code TEXT)")
        node.put("products", {"code": "P1", "name": "Trà"})
        node.enable_adapter("mirror", {"collections": ["products"]})
        cols = [
            c for c, *_ in node.query("SELECT name FROM pragma_table_info('mirror_products')").rows
        ]
        assert set(cols) >= {"id", "code", "name", "price", "stock", "active", "since"}
        assert node.query("SELECT code, name FROM mirror_products").rows == [("P1", "Trà")]


@pytest.mark.parametrize(
    "options",
    [{"collections": ["nope"]}, {"prefix": "bad prefix"}, {"colections": []}, {"prefix": 3}],
)
def test_mirror_bad_options(tmp_path: Path, options: dict[str, object]) -> None:
    with make_node(tmp_path / "n", "N") as node, pytest.raises(AdapterConfigError):
        node.enable_adapter("mirror", options)
