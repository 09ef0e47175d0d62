"""Schemas: the built-in accounting schema (DESIGN §9) and TOML files.

A bad schema file gets a SchemaError naming the file, the collection and the
field at fault, and a custom schema works end to end in a Node.
"""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal
from pathlib import Path

import pytest

from engine import Node
from engine.clock import ManualClock
from engine.errors import SchemaError, UnknownReference, ValidationError
from engine.schema import GAPS, builtin_schema, load_schema, parse_schema

CATALOGS = {
    "accounts": {"code", "name", "kind"},
    "customers": {"code", "name", "tax_code", "address"},
    "suppliers": {"code", "name", "tax_code"},
    "items": {"code", "name", "unit", "price"},
    "warehouses": {"code", "name"},
    "users": {"code", "name", "role"},
    "contracts": {"code", "customer", "value"},
    "tasks": {"code", "title", "status", "assignee"},
}
VOUCHERS = {
    # name: (series prefix, fields, line fields)
    "sales_invoice": (
        "HD",
        {"date", "customer", "warehouse", "contract", "paid", "lines"},
        {"item", "qty", "price", "vat_rate"},
    ),
    "purchase_invoice": (
        "MH",
        {"date", "supplier", "warehouse", "lines"},
        {"item", "qty", "price"},
    ),
    "cash_receipt": ("PT", {"date", "customer", "amount", "contract"}, None),
    "cash_payment": ("PC", {"date", "supplier", "amount"}, None),
    "stock_transfer": (
        "CK",
        {"date", "from_warehouse", "to_warehouse", "lines"},
        {"item", "qty"},
    ),
    "journal": ("NVK", {"date", "lines"}, {"account", "debit", "credit"}),
}
REFS = {
    ("contracts", "customer"): "customers",
    ("tasks", "assignee"): "users",
    ("sales_invoice", "customer"): "customers",
    ("sales_invoice", "warehouse"): "warehouses",
    ("sales_invoice", "contract"): "contracts",
    ("purchase_invoice", "supplier"): "suppliers",
    ("purchase_invoice", "warehouse"): "warehouses",
    ("cash_receipt", "customer"): "customers",
    ("cash_receipt", "contract"): "contracts",
    ("cash_payment", "supplier"): "suppliers",
    ("stock_transfer", "from_warehouse"): "warehouses",
    ("stock_transfer", "to_warehouse"): "warehouses",
}


# -- the built-in schema -------------------------------------------------------


def test_builtin_accounting_schema_has_the_design_collections() -> None:
    s = builtin_schema("accounting")
    assert s is not None and load_schema("accounting").collections.keys() == s.collections.keys()
    assert set(s.collections) == set(CATALOGS) | set(VOUCHERS) | {GAPS}
    assert s.collections[GAPS].system and s.version == 2
    for name, fields in CATALOGS.items():
        c = s.collections[name]
        assert c.kind == "catalog" and not c.is_voucher
        assert set(c.fields) == fields
        assert c.key == "code" and c.fields["code"].required
        assert c.series is None
    for name, (prefix, fields, line_fields) in VOUCHERS.items():
        c = s.collections[name]
        assert c.is_voucher
        assert set(c.fields) == fields | {"number"}
        assert c.key == "number"
        assert c.series is not None and c.series.prefix == prefix
        assert c.series.strategy == "node" and "{node}" in c.series.template
        # Numbering restarts every year (Vietnamese practice), the year in the number.
        assert c.series.reset == "yearly" and "{year}" in c.series.template
        assert c.partition == "month" and c.fields["date"].type == "date"
        assert c.fields["date"].required
        if line_fields:
            assert c.fields["lines"].type == "lines"
            assert {f.name for f in c.fields["lines"].fields} == line_fields
    for (coll, fld), target in REFS.items():
        f = s.collections[coll].fields[fld]
        assert (f.type, f.to) == ("ref", target), (coll, fld)
    lines = s.collections["sales_invoice"].fields["lines"]
    assert lines.line_field("item").to == "items"
    assert lines.line_field("qty").type == "decimal"
    journal_lines = s.collections["journal"].fields["lines"]
    assert journal_lines.line_field("account").to == "accounts"
    assert s.collections["items"].fields["price"].type == "decimal"
    assert s.collections["cash_receipt"].fields["amount"].type == "decimal"
    assert s.collections["sales_invoice"].fields["paid"].type == "bool"
    assert s.collections["sales_invoice"].urgent_when == {"paid": False}


def test_builtin_schema_orders_catalogs_before_vouchers() -> None:
    ordered = builtin_schema().ordered()
    kinds = [c.kind for c in ordered]
    assert kinds == sorted(kinds)  # "catalog" < "voucher"
    assert ordered[0].name == "accounts"  # priority 10
    assert next(c.name for c in ordered if c.is_voucher) == "sales_invoice"


def test_unknown_builtin_or_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="unknown built-in schema 'payroll'"):
        builtin_schema("payroll")
    missing = tmp_path / "nope.toml"
    with pytest.raises(SchemaError, match=f"{missing}: schema file not found"):
        load_schema(missing)


# -- bad schema files ------------------------------------------------------------

GOOD_CATALOG = """
[collections.customers]
kind = "catalog"
fields.code = { type = "text", required = true }
fields.name = "text"
"""

# (description, TOML, collection named, field named or None, words of the problem)
BAD = [
    (
        "unknown type",
        GOOD_CATALOG + 'fields.age = "integer"\n',
        "customers",
        "age",
        "unknown type 'integer'",
    ),
    (
        "ref to unknown collection",
        GOOD_CATALOG
        + """
[collections.orders]
kind = "catalog"
fields.code = "text"
fields.buyer = { type = "ref", to = "clients" }
""",
        "orders",
        "buyer",
        "unknown collection 'clients'",
    ),
    (
        "ref to a voucher book",
        GOOD_CATALOG
        + """
[collections.invoice]
kind = "voucher"
series = { prefix = "HD" }
fields.date = { type = "date", required = true }

[collections.notes]
kind = "catalog"
fields.code = "text"
fields.invoice = { type = "ref", to = "invoice" }
""",
        "notes",
        "invoice",
        "not a catalog",
    ),
    (
        "ref inside lines to unknown collection",
        GOOD_CATALOG
        + """
[collections.invoice]
kind = "voucher"
fields.date = { type = "date", required = true }
fields.lines = { type = "lines", fields = { item = { type = "ref", to = "goods" } } }
""",
        "invoice",
        "item",
        "unknown collection 'goods'",
    ),
    (
        "ref without a target",
        GOOD_CATALOG + 'fields.owner = { type = "ref" }\n',
        "customers",
        "owner",
        "needs 'to",
    ),
    (
        "unknown type inside lines",
        GOOD_CATALOG
        + """
[collections.invoice]
kind = "voucher"
fields.date = { type = "date", required = true }
fields.lines = { type = "lines", fields = { qty = "float" } }
""",
        "invoice",
        "lines.qty",
        "unknown type 'float'",
    ),
    (
        "lines nested in lines",
        GOOD_CATALOG
        + """
[collections.invoice]
kind = "voucher"
fields.date = { type = "date", required = true }
fields.lines = { type = "lines", fields = { sub = "lines" } }
""",
        "invoice",
        "lines.sub",
        "unknown type 'lines'",
    ),
    (
        "missing key field",
        """
[collections.customers]
kind = "catalog"
fields.name = "text"
""",
        "customers",
        "code",
        "unique key field is not defined",
    ),
    (
        "key field of the wrong type",
        """
[collections.customers]
kind = "catalog"
key = "number"
fields.number = "int"
""",
        "customers",
        "number",
        "must be of type text",
    ),
    (
        "bad series template placeholder",
        """
[collections.invoice]
kind = "voucher"
series = { prefix = "HD", template = "{prefix}{node}-{branch}-{seq:06}" }
fields.date = { type = "date", required = true }
""",
        "invoice",
        None,
        "series template",
    ),
    (
        "series template without seq",
        """
[collections.invoice]
kind = "voucher"
series = { prefix = "HD", template = "{prefix}{node}" }
fields.date = { type = "date", required = true }
""",
        "invoice",
        None,
        "{seq",
    ),
    (
        "node series template without node",
        """
[collections.invoice]
kind = "voucher"
series = { prefix = "HD", strategy = "node", template = "{prefix}{seq:06}" }
fields.date = { type = "date", required = true }
""",
        "invoice",
        None,
        "{node}",
    ),
    (
        "yearly reset without year",
        """
[collections.invoice]
kind = "voucher"
series = { prefix = "HD", reset = "yearly" }
fields.date = { type = "date", required = true }
""",
        "invoice",
        None,
        "{year}",
    ),
    (
        "yearly reset without a required date",
        """
[collections.invoice]
kind = "voucher"
series = { prefix = "HD", reset = "yearly", template = "{prefix}{year}{node}{seq:04}" }
fields.date = "date"
""",
        "invoice",
        "date",
        "required date field",
    ),
    (
        "unknown series strategy",
        """
[collections.invoice]
kind = "voucher"
series = { prefix = "HD", strategy = "central" }
fields.date = { type = "date", required = true }
""",
        "invoice",
        None,
        "strategy",
    ),
    (
        "series on a catalog",
        GOOD_CATALOG + 'series = { prefix = "KH" }\n',
        "customers",
        None,
        "only voucher books have a series",
    ),
    (
        "partition without a date field",
        """
[collections.invoice]
kind = "voucher"
partition = "month"
fields.day = { type = "date", required = true }
""",
        "invoice",
        "date",
        "partitioning needs a required date field",
    ),
    (
        "voucher declaring its own number",
        """
[collections.invoice]
kind = "voucher"
fields.number = "text"
""",
        "invoice",
        "number",
        "implicitly",
    ),
    (
        "bad field name",
        GOOD_CATALOG + 'fields.Name = "text"\n',
        "customers",
        "Name",
        "lower-case",
    ),
    (
        "unknown field option",
        GOOD_CATALOG + 'fields.note = { type = "text", default = "x" }\n',
        "customers",
        "note",
        "unknown key(s): default",
    ),
    (
        "unknown collection kind",
        """
[collections.customers]
kind = "ledger"
fields.code = "text"
""",
        "customers",
        None,
        "kind must be one of",
    ),
    (
        "collection without fields",
        """
[collections.customers]
kind = "catalog"
""",
        "customers",
        None,
        "needs a 'fields' table",
    ),
]


@pytest.mark.parametrize(
    ("what", "text", "collection", "field", "problem"), BAD, ids=[b[0] for b in BAD]
)
def test_bad_schema_file_names_file_collection_and_field(
    tmp_path: Path, what: str, text: str, collection: str, field: str | None, problem: str
) -> None:
    path = tmp_path / "my-schema.toml"
    path.write_text(f'schema = "shop"\nversion = 1\n{text}', "utf-8")
    with pytest.raises(SchemaError) as err:
        load_schema(path)
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    assert f"collection '{collection}'" in message, message
    if field is not None:
        assert f"field '{field}'" in message, message
    assert problem in message, message
    assert "\n" not in message  # one line, fit for stderr
    # A Node refuses it the same way and leaves no home behind.
    with pytest.raises(SchemaError):
        Node.create(tmp_path / "home", dataset="d", node="A", schema=path, clock=ManualClock())
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("collections = [", "not valid TOML"),
        ('schema = "x"\n', "no [collections.<name>] tables"),
        ('version = "one"\n' + GOOD_CATALOG, "'version' must be a positive integer"),
        ("colections = 1\n" + GOOD_CATALOG, "unknown top-level key(s): colections"),
    ],
)
def test_bad_schema_file_top_level_errors_name_the_file(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "top.toml"
    path.write_text(text, "utf-8")
    with pytest.raises(SchemaError) as err:
        load_schema(path)
    assert str(err.value).startswith(f"{path}: ")
    assert problem in str(err.value)


def test_schema_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(GOOD_CATALOG.replace("text", "t\xe9xt").encode("latin-1"))
    with pytest.raises(SchemaError, match=f"^{path}: "):
        load_schema(path)


# -- a custom schema, end to end -------------------------------------------------

SHOP = """
schema = "shop"
version = 3

[collections.products]
kind = "catalog"
key = "sku"
priority = 5
fields.sku = "text"
fields.title = { type = "text", required = true }
fields.stock = "int"
fields.price = "decimal"
fields.active = "bool"

[collections.orders]
kind = "voucher"
partition = "year"
series = { prefix = "OR", reset = "yearly", template = "{prefix}{year}/{node}/{seq:04}" }
fields.date = { type = "date", required = true }
fields.note = "text"
fields.lines = { type = "lines", required = true, fields = { product = { type = "ref", to = "products", required = true }, qty = { type = "int", required = true } } }
"""  # noqa: E501


def test_custom_schema_works_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "shop.toml"
    path.write_text(SHOP, "utf-8")
    schema = load_schema(path)
    assert schema.name == "shop" and schema.version == 3
    assert schema.collections["products"].key == "sku"
    assert schema.collections["products"].fields["sku"].required  # a catalog key is required
    clock = ManualClock()
    home = tmp_path / "home"
    node = Node.create(
        home, dataset="shop", node="T1", schema=path, clock=clock, rng=random.Random(7)
    )
    pid = node.put("products", {"sku": "P-1", "title": "Phở bò", "stock": 12, "price": "45000.00"})
    node.put("products", {"sku": "P-1", "stock": 11})  # partial update by unique key
    assert node.get("products", "P-1") == {
        "id": pid,
        "sku": "P-1",
        "title": "Phở bò",
        "stock": 11,
        "price": Decimal("45000.00"),
    }
    first = node.post_voucher(
        "orders", {"date": "2026-03-01", "lines": [{"product": "P-1", "qty": 2}]}
    )
    assert first.number == "OR2026/T1/0001"
    order = node.get("orders", first.id)
    assert order["lines"] == [{"product": pid, "qty": 2}]
    assert order["date"] == dt.date(2026, 3, 1)
    assert node.get("orders", first.id, codes=True)["lines"] == [{"product": "P-1", "qty": 2}]
    with pytest.raises(UnknownReference, match=r"orders\.lines line 1, product: .*'P-404'"):
        node.post_voucher(
            "orders", {"date": "2026-03-01", "lines": [{"product": "P-404", "qty": 1}]}
        )
    with pytest.raises(ValidationError, match="products: unknown field"):
        node.put("products", {"sku": "P-2", "title": "x", "colour": "red"})
    with pytest.raises(ValidationError, match="missing required field"):
        node.put("products", {"sku": "P-2"})
    assert "orders/2026" in node.documents()
    node.close()
    # The node keeps the schema it was made with, even when the file is gone.
    path.unlink()
    reopened = Node.open(home, clock=clock, rng=random.Random(8))
    assert reopened.schema.name == "shop" and reopened.schema.version == 3
    second = reopened.post_voucher(
        "orders", {"date": "2026-03-02", "lines": [{"product": "P-1", "qty": 1}]}
    )
    assert second.number == "OR2026/T1/0002"
    assert sorted(o["number"] for o in reopened.list("orders")) == [
        "OR2026/T1/0001",
        "OR2026/T1/0002",
    ]
    # ... and replicates to another node made with the same schema.
    other = Node.create(
        tmp_path / "other",
        dataset="shop",
        node="T2",
        schema=reopened.schema,
        clock=clock,
        rng=random.Random(9),
    )
    other.import_updates(reopened.export_updates())
    assert other.list("orders") == reopened.list("orders")
    assert other.get("products", "P-1") == reopened.get("products", "P-1")
    reopened.close()
    other.close()


def test_parse_schema_names_its_origin() -> None:
    with pytest.raises(SchemaError, match=r"^<inline>: collection 'c', field 'x': unknown type"):
        parse_schema(
            '[collections.c]\nfields.code = "text"\nfields.x = "money"\n', origin="<inline>"
        )
