"""Fuzzing the decoders that tests/test_protocol_frames.py and
tests/test_exchange.py do not cover: schema TOML text, the JSON of
``branchline put`` / ``voucher``, and Yjs updates given to
``Node.import_updates``. Each input is accepted, or refused with the
documented error and nothing written; never another exception, a traceback
or a partial write.

The hostile-relay test (100,000 frames from several connections while two
nodes sync) is in tests/test_fuzz_relay.py.
"""

from __future__ import annotations

import itertools
import json
import random
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.cli import cli
from engine.errors import SchemaError, UpdateError
from engine.node import Node
from engine.schema.loader import builtin_schema, parse_schema
from engine.store.node_store import STORE_FILE

ACCOUNTING = builtin_schema("accounting").source
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- schema files ------------------------------------------------------------------

WEIRD_VALUES = [
    '""',
    '"x"',
    "-1",
    "0",
    "1.5",
    "true",
    "[]",
    "{}",
    '["a"]',
    '{ type = "nope" }',
    '"ref:nowhere"',
    '"ref:sales_invoice"',
    '"lines"',
    '{ type = "lines" }',
    "9" * 30,
    '{ prefix = "", strategy = "node" }',
    '{ strategy = "blocks" }',
    '"\\u0000"',
    "nan",
    '{ type = "text", required = "yes" }',
    '"voucher"',
    '"catalog"',
    "1979-05-27",
]


@st.composite
def mutated_schema(draw: st.DrawFn) -> str:
    """The accounting schema with lines deleted, duplicated, swapped, values
    replaced by ill-typed ones, or bytes cut."""
    lines = ACCOUNTING.splitlines()
    for _ in range(draw(st.integers(1, 6))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "value", "key", "cut"]))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "value" and "=" in lines[i]:
            key = lines[i].split("=", 1)[0]
            lines[i] = f"{key}= {draw(st.sampled_from(WEIRD_VALUES))}"
        elif op == "key" and "=" in lines[i]:
            value = lines[i].split("=", 1)[1]
            lines[i] = f"{draw(st.from_regex(r'[a-z_.]{1,12}', fullmatch=True))} ={value}"
        elif op == "cut":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
    return "\n".join(lines)


def _parses_or_schema_error(text: str) -> None:
    try:
        schema = parse_schema(text, origin="fuzz.toml")
    except SchemaError as exc:
        message = str(exc)
        assert message.startswith("fuzz.toml"), message  # names the file
        assert "\n" not in message.strip() or "TOML" in message
        return
    assert schema.collections  # a schema that parsed is usable
    for coll in schema.collections.values():
        assert coll.fields


@FUZZ
@given(mutated_schema())
def test_fuzz_mutated_schema_files(text: str) -> None:
    _parses_or_schema_error(text)


@FUZZ
@given(st.text(max_size=400))
def test_fuzz_any_schema_text(text: str) -> None:
    _parses_or_schema_error(text)


def test_schema_file_that_is_not_text_is_a_schema_error(tmp_path: Path) -> None:
    from engine.schema.loader import load_schema

    path = tmp_path / "bad.toml"
    for data in (b"\xff\xfe\x00", bytes(range(256)), b"[collections.x]\nkind = \x80\n"):
        path.write_bytes(data)
        with pytest.raises(SchemaError, match=r"bad\.toml"):
            load_schema(path)


# -- CLI JSON input ------------------------------------------------------------------

FIELDS = [
    "code",
    "name",
    "address",
    "tax_code",
    "price",
    "date",
    "customer",
    "warehouse",
    "paid",
    "lines",
    "amount",
    "number",
    "id",
    "item",
    "qty",
    "vat_rate",
    "_deleted",
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["KH001", "K1", "SP01", "2024-05-06", "1e400", "-0", "0.1", "\ud800"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
field_objects = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=6
)


@st.composite
def cli_json(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["object", "value", "text", "cut", "special"]))
    if kind == "object":
        return json.dumps(draw(field_objects))
    if kind == "value":
        return json.dumps(draw(json_values))
    if kind == "cut":
        text = json.dumps(draw(field_objects))
        return text[: draw(st.integers(0, len(text)))]
    if kind == "special":
        return draw(
            st.sampled_from(
                [
                    '{"code": NaN}',
                    '{"code": Infinity}',
                    '{"code": "a", "code": "b"}',
                    "[" * 5000 + "]" * 5000,
                    '{"a":' * 3000 + "1" + "}" * 3000,
                    '{"code": "\\ud800", "name": "x"}',
                    '{"price": 1e999999}',
                    '{"code": "K", "name": "n", "price": "12abc"}',
                    "\x00",
                    "{}",
                    "",
                    '{"code": "K", "name": "' + "x" * 100_000 + '"}',
                ]
            )
        )
    return draw(st.text(max_size=60))


def _store_fingerprint(home: Path) -> tuple[Any, ...]:
    conn = sqlite3.connect(home / STORE_FILE)
    try:
        return (
            conn.execute("SELECT COUNT(*), MAX(seq) FROM updates").fetchone(),
            conn.execute("SELECT COUNT(*), MAX(updated_hlc) FROM records").fetchone(),
            conn.execute("SELECT COUNT(*) FROM series_journal").fetchone(),
        )
    finally:
        conn.close()


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("fuzz") / "hn"
    with Node.create(home, dataset="acme", node="hn") as n:
        n.put("customers", {"code": "KH001", "name": "An Phát"})
        n.put("warehouses", {"code": "K1", "name": "Kho 1"})
        n.put("items", {"code": "SP01", "name": "Bút", "price": "5000"})
    return home


@FUZZ
@given(
    command=st.sampled_from(
        [
            ("put", "customers"),
            ("put", "items"),
            ("voucher", "sales_invoice"),
            ("voucher", "cash_receipt"),
            ("put", "nosuch"),
        ]
    ),
    text=cli_json(),
)
def test_fuzz_cli_json_input(cli_home: Path, command: tuple[str, str], text: str) -> None:
    before = _store_fingerprint(cli_home)
    verb, target = command
    result = CliRunner().invoke(cli, [verb, "--home", str(cli_home), target, text])
    # Never an unexpected exception (click's runner catches them).
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.stderr
    if result.exit_code == 0:
        assert result.stderr == ""
        assert "id" in orjson.loads(result.stdout)
        return
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert _store_fingerprint(cli_home) == before  # nothing written


def test_cli_json_mistakes_in_a_real_process(cli_home: Path) -> None:
    """The installed command: one line, exit 2, no traceback, also for input
    that blows the parser's recursion limit or is not UTF-8 on stdin."""
    exe = str(Path(sys.executable).parent / "branchline")
    before = _store_fingerprint(cli_home)
    cases: list[tuple[list[str], bytes | None]] = [
        (["put", "--home", str(cli_home), "customers", "[" * 100_000], None),
        (["put", "--home", str(cli_home), "customers", "-"], b'{"a":' * 500_000),
        (["put", "--home", str(cli_home), "customers", '{"code": NaN}'], None),
        (["put", "--home", str(cli_home), "customers", "-"], b"\xff\xfe{"),
        (["voucher", "--home", str(cli_home), "sales_invoice", '{"lines": 5}'], None),
    ]
    for args, stdin in cases:
        out = subprocess.run([exe, *args], input=stdin, capture_output=True, timeout=60)
        err = out.stderr.decode()
        assert out.returncode == 2, (args[:4], err)
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert "Traceback" not in err
    assert _store_fingerprint(cli_home) == before


# -- Yjs updates into a node ---------------------------------------------------------


def _valid_updates() -> list[bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "src"
        with Node.create(home, dataset="acme", node="src", rng=random.Random(7)) as n:
            n.put("customers", {"code": "C1", "name": "one"})
            n.put("customers", {"code": "C1", "address": "two"})
            n.delete("customers", "C1")
            n.put("customers", {"code": "C2", "name": "x" * 300})
            return [data for _, _, data in n.outbox()]


VALID = _valid_updates()


@st.composite
def hostile_update(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "flip", "cut", "splice", "grow"]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    data = bytearray(draw(st.sampled_from(VALID)))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    elif kind == "cut":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif kind == "splice":
        other = draw(st.sampled_from(VALID))
        data = data[: draw(st.integers(0, len(data)))] + other[draw(st.integers(0, len(other))) :]
    else:  # a huge length or count varint where a small one was
        i = draw(st.integers(0, len(data) - 1))
        data[i:i] = b"\xff\xff\xff\xff\x0f"
    return bytes(data)


_WAREHOUSES = itertools.count()


@pytest.fixture(scope="module")
def import_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("fuzz-import") / "hn"
    Node.create(home, dataset="acme", node="hn").close()
    return home


@FUZZ
@given(data=hostile_update(), doc=st.sampled_from(["customers", "items", "sales_invoice/2026-11"]))
def test_fuzz_import_of_hostile_updates(import_home: Path, data: bytes, doc: str) -> None:
    """A damaged update is imported (Yjs may find something valid in it) or
    refused with UpdateError and nothing stored; the node stays usable."""
    before = _store_fingerprint(import_home)
    with Node.open(import_home) as node:
        try:
            node.import_updates({doc: data})
        except UpdateError:
            assert _store_fingerprint(import_home) == before
        # Still usable: a local write and a full export work.
        node.put("warehouses", {"code": f"W{next(_WAREHOUSES)}", "name": "w"})
        node.export_updates()
        node.list("customers")
