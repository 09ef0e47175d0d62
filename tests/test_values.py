"""Typed values round-trip exactly (engine.values, and through a real Node).

Decimal money keeps its exact digits and scale, ints are checked to fit in 64
bits (pycrdt would mangle or panic on them), dates are ISO strings, text is
any Unicode a UTF-8 store can hold; lone surrogates are refused.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import Node
from engine.clock import ManualClock
from engine.errors import RecordNotFound, ValidationError
from engine.schema import Field
from engine.values import INT_MAX, INT_MIN, decode, encode, is_stored

TEXT = Field("t", "text")
INT = Field("i", "int")
DECIMAL = Field("d", "decimal")
DATE = Field("day", "date")
BOOL = Field("b", "bool")
LINES = Field(
    "lines",
    "lines",
    fields=(
        Field("label", "text", required=True),
        Field("qty", "decimal", required=True),
        Field("n", "int"),
        Field("day", "date"),
    ),
)

# Decimals the engine accepts: finite, at most 38 digits, exponent within ±76.
decimals = st.builds(
    lambda sign, digits, exp: Decimal((sign, tuple(int(c) for c in str(digits)), exp)),
    st.integers(0, 1),
    st.integers(0, 10**38 - 1),
    st.integers(-76, 76),
)
ints64 = st.integers(INT_MIN, INT_MAX)
# Any Unicode scalar value (no surrogates), including NUL, emoji, combining marks.
texts = st.text(st.characters(codec="utf-8"), max_size=200)
VIETNAMESE = "Công ty TNHH Thương mại Đông Á — Hoá đơn số 12, Quận Hải Châu, Đà Nẵng"
SPECIAL_TEXTS = [
    "",
    "\x00",
    "a\x00b",
    VIETNAMESE,
    "Tiếng Việt có dấu: ắ ằ ẳ ẵ ặ ơ ư đ",
    "emoji 👍🏽 🇻🇳 👨‍👩‍👧‍👦",
    "e\u0301 (combining) vs \u00e9",
    "right-to-left \u202e reversed",
    "\uffff \U0010ffff \ufeff",
    "line\nbreak\ttab\r\n",
    '{"json": "looking", "quote": "\\""}',
    "x" * 10_000,
]


def roundtrip(fld: Field, value: Any) -> Any:
    return decode(fld, encode(fld, value, f"test.{fld.name}"))


# -- decimals ---------------------------------------------------------------


@given(decimals)
def test_decimal_round_trips_exactly(value: Decimal) -> None:
    back = roundtrip(DECIMAL, value)
    assert isinstance(back, Decimal)
    assert back == value
    assert back.as_tuple() == value.as_tuple()  # same digits and scale: 1.50 stays 1.50


@pytest.mark.parametrize(
    "text",
    [
        "0",
        "-0",
        "1.50",
        "-1.50",
        "0.000001",
        "-123456789012345678901234567890.12345678",
        "1E+20",
        "-7.000",
        "12345678901234567890123456789012345678",
        "1E-76",
        "9.99E+76",
    ],
)
def test_decimal_text_round_trips_exactly(text: str) -> None:
    value = Decimal(text)
    assert encode(DECIMAL, text, "d") == str(value)
    assert roundtrip(DECIMAL, value).as_tuple() == value.as_tuple()


def test_decimal_accepts_ints_and_shortest_float_text() -> None:
    assert roundtrip(DECIMAL, 7) == Decimal(7)
    assert roundtrip(DECIMAL, 0.1) == Decimal("0.1")
    assert roundtrip(DECIMAL, 2**80) == Decimal(2**80)


@pytest.mark.parametrize(
    "bad",
    [
        "NaN",
        "Infinity",
        "-inf",
        "abc",
        "",
        "1,5",
        True,
        [1],
        {"x": 1},
        float("nan"),
        "1" * 39,
        "1E-77",
        "1E+77",
    ],
)
def test_decimal_rejects_clearly(bad: Any) -> None:
    with pytest.raises(ValidationError, match=r"^test\.d: "):
        encode(DECIMAL, bad, "test.d")


# -- ints -------------------------------------------------------------------


@given(ints64)
def test_int_within_64_bits_round_trips(value: int) -> None:
    back = roundtrip(INT, value)
    assert type(back) is int and back == value
    assert roundtrip(INT, str(value)) == value


@given(st.one_of(st.integers(INT_MAX + 1, 2**200), st.integers(-(2**200), INT_MIN - 1)))
def test_int_beyond_64_bits_is_rejected_clearly(value: int) -> None:
    with pytest.raises(ValidationError) as err:
        encode(INT, value, "items.stock")
    message = str(err.value)
    assert message.startswith("items.stock: ")
    assert "64 bits" in message
    assert "decimal" in message  # tells what to do instead
    with pytest.raises(ValidationError, match="64 bits"):
        encode(INT, str(value), "items.stock")


@pytest.mark.parametrize("bad", [True, False, 1.5, "1.5", "x", Decimal("1.5"), [1], None])
def test_int_rejects_non_integers(bad: Any) -> None:
    if bad is None:
        assert encode(INT, bad, "x") is None  # empty is not an int error
        return
    with pytest.raises(ValidationError, match=r"^x: expected an integer"):
        encode(INT, bad, "x")


def test_int_edges() -> None:
    assert roundtrip(INT, INT_MAX) == 2**63 - 1
    assert roundtrip(INT, INT_MIN) == -(2**63)
    assert roundtrip(INT, Decimal("42")) == 42


# -- dates, bools -----------------------------------------------------------


@given(st.dates())
def test_date_round_trips(value: dt.date) -> None:
    stored = encode(DATE, value, "d")
    assert stored == value.isoformat()
    assert roundtrip(DATE, value) == value
    assert roundtrip(DATE, value.isoformat()) == value


@pytest.mark.parametrize(
    "bad", ["2026-02-30", "2026-1-5", "05/01/2026", "", dt.datetime(2026, 1, 5, 10, 0), 20260105]
)
def test_date_rejects_clearly(bad: Any) -> None:
    with pytest.raises(ValidationError, match=r"^d: expected a date"):
        encode(DATE, bad, "d")


def test_bool_round_trips_and_rejects_non_bools() -> None:
    assert roundtrip(BOOL, True) is True
    assert roundtrip(BOOL, False) is False
    for bad in (0, 1, "true", None):
        if bad is None:
            continue
        with pytest.raises(ValidationError):
            encode(BOOL, bad, "b")


# -- text -------------------------------------------------------------------


@given(texts)
def test_any_unicode_text_round_trips(value: str) -> None:
    assert roundtrip(TEXT, value) == value


@pytest.mark.parametrize("value", SPECIAL_TEXTS)
def test_special_texts_round_trip(value: str) -> None:
    assert roundtrip(TEXT, value) == value


@given(
    st.text(max_size=20),
    st.integers(0xD800, 0xDFFF).map(chr),
    st.text(max_size=20),
)
def test_lone_surrogates_are_rejected(before: str, surrogate: str, after: str) -> None:
    with pytest.raises(ValidationError, match="surrogate"):
        encode(TEXT, before + surrogate + after, "customers.name")


# -- lines --------------------------------------------------------------------

lines = st.lists(
    st.fixed_dictionaries(
        {"label": texts, "qty": decimals},
        optional={"n": ints64, "day": st.dates()},
    ),
    max_size=5,
)


@given(lines)
def test_lines_round_trip_exactly(value: list[dict[str, Any]]) -> None:
    back = roundtrip(LINES, value)
    assert back == value
    for b, v in zip(back, value, strict=True):
        assert b["qty"].as_tuple() == v["qty"].as_tuple()


def test_lines_reject_bad_lines_naming_the_line_and_field() -> None:
    with pytest.raises(ValidationError, match=r"^v\.lines line 2, n: .*64 bits"):
        encode(LINES, [{"label": "a", "qty": 1}, {"label": "b", "qty": 1, "n": 2**64}], "v.lines")
    with pytest.raises(ValidationError, match=r"line 1: missing required field 'qty'"):
        encode(LINES, [{"label": "a"}], "v.lines")
    with pytest.raises(ValidationError, match=r"line 1: unknown field\(s\) bogus"):
        encode(LINES, [{"label": "a", "qty": 1, "bogus": 1}], "v.lines")


# -- through a real Node ------------------------------------------------------

SCHEMA = """
schema = "values-test"
version = 1

[collections.things]
kind = "catalog"
fields.code = { type = "text", required = true }
fields.label = "text"
fields.count = "int"
fields.amount = "decimal"
fields.day = "date"
fields.flag = "bool"

[collections.things.fields.rows]
type = "lines"
fields = { label = "text", qty = "decimal", n = "int", day = "date" }
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    home: Path = tmp_path_factory.mktemp("values")
    schema = home / "schema.toml"
    schema.write_text(SCHEMA, "utf-8")
    seed = 20260101
    print(f"seed={seed}")
    n = Node.create(
        home / "node",
        dataset="values",
        node="A",
        schema=schema,
        clock=ManualClock(),
        rng=random.Random(seed),
    )
    yield n
    n.close()


_codes = iter(range(10**9))


@settings(max_examples=60, deadline=None)
@given(
    label=texts,
    count=ints64,
    amount=decimals,
    day=st.dates(),
    flag=st.booleans(),
    rows=st.lists(
        st.fixed_dictionaries(
            {}, optional={"label": texts, "qty": decimals, "n": ints64, "day": st.dates()}
        ),
        max_size=3,
    ),
)
def test_values_round_trip_through_a_node(
    node: Node, label: str, count: int, amount: Decimal, day: dt.date, flag: bool, rows: list[Any]
) -> None:
    code = f"T{next(_codes)}"
    fields = {
        "code": code,
        "label": label,
        "count": count,
        "amount": amount,
        "day": day,
        "flag": flag,
        "rows": rows,
    }
    rid = node.put("things", fields)
    for got in (node.get("things", rid), node.get("things", code)):
        assert got is not None
        assert got == {"id": rid, **fields}
        assert type(got["count"]) is int
        assert got["amount"].as_tuple() == amount.as_tuple()
        for g, r in zip(got["rows"], rows, strict=True):
            if "qty" in r:
                assert g["qty"].as_tuple() == r["qty"].as_tuple()
    # A partial update changes only what it names and keeps types exact.
    negated = amount.copy_negate()
    node.put("things", {"code": code, "amount": negated})
    got = node.get("things", rid)
    assert got == {"id": rid, **fields, "amount": negated}
    assert got["amount"].as_tuple() == negated.as_tuple()


@pytest.mark.parametrize("text", SPECIAL_TEXTS)
def test_special_texts_through_a_node_and_a_replica(node: Node, text: str, tmp_path: Path) -> None:
    code = f"S{next(_codes)}"
    rid = node.put("things", {"code": code, "label": text, "rows": [{"label": text}]})
    assert node.get("things", rid)["label"] == text
    # ... also as a unique key, and after replication to another node.
    keyed = node.put("things", {"code": text + code})
    replica = Node.create(
        tmp_path / "replica",
        dataset="values",
        node="B",
        schema=node.schema,
        clock=ManualClock(),
        rng=random.Random(1),
    )
    try:
        replica.import_updates(node.export_updates())
        assert replica.get("things", rid) == node.get("things", rid)
        assert replica.get("things", text + code)["id"] == keyed
    finally:
        replica.close()


def test_node_rejects_big_ints_and_surrogates_and_writes_nothing(node: Node) -> None:
    code = f"X{next(_codes)}"
    before = node.store.conn.execute("SELECT COUNT(*) FROM updates").fetchone()[0]
    with pytest.raises(ValidationError, match=r"things\.count: integer .* does not fit in 64 bits"):
        node.put("things", {"code": code, "count": 2**63})
    with pytest.raises(ValidationError, match=r"things\.rows line 1, n: .*64 bits"):
        node.put("things", {"code": code, "rows": [{"n": -(2**63) - 1}]})
    with pytest.raises(ValidationError, match=r"things\.label: .*surrogate"):
        node.put("things", {"code": code, "label": "bad \udc80 text"})
    with pytest.raises(ValidationError, match=r"things\.code: .*surrogate"):
        node.put("things", {"code": "\ud800"})
    with pytest.raises(ValidationError, match=r"things\.amount: "):
        node.put("things", {"code": code, "amount": "NaN"})
    assert node.get("things", code) is None
    assert node.store.conn.execute("SELECT COUNT(*) FROM updates").fetchone()[0] == before


def test_lookups_by_a_malformed_key_find_nothing(node: Node) -> None:
    """A key no record can have (unpaired surrogates, e.g. from undecodable
    command-line bytes) is simply not found, never a crash."""
    assert node.get("things", "\udcff") is None
    assert node.find("things", code="\udcff") == []
    with pytest.raises(RecordNotFound):
        node.delete("things", "bad \ud800 key")


@given(
    st.one_of(
        decimals.map(lambda v: (DECIMAL, v)),
        ints64.map(lambda v: (INT, v)),
        st.dates().map(lambda v: (DATE, v)),
        texts.map(lambda v: (TEXT, v)),
        st.booleans().map(lambda v: (BOOL, v)),
        lines.map(lambda v: (LINES, v)),
    )
)
def test_every_encoded_value_passes_the_import_check(case: tuple[Field, Any]) -> None:
    """``is_stored`` (run on every value a replica sends) accepts all ``encode`` makes."""
    fld, value = case
    assert is_stored(fld, encode(fld, value, "x"))


@pytest.mark.parametrize(
    ("fld", "stored"),
    [
        (DECIMAL, "abc"),
        (DECIMAL, 1.5),
        (DECIMAL, "NaN"),
        (DECIMAL, "1" * 101),
        (INT, 2**64),
        (INT, True),
        (INT, "1"),
        (DATE, "2026-02-30"),
        (DATE, "20260101"),
        (BOOL, 1),
        (TEXT, 5),
        (LINES, [{"qty": "1"}]),
        (LINES, [{"label": "a", "qty": "1", "x": 1}]),
        (LINES, "nope"),
        (LINES, [["label"]]),
    ],
)
def test_malformed_replicated_values_fail_the_import_check(fld: Field, stored: Any) -> None:
    assert not is_stored(fld, stored)
