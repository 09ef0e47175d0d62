"""Export and state files: round trips, every documented failure, and fuzzing
(any input gives a decoded file or ExchangeFileError, never another exception)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import exchange
from engine.errors import BranchlineError, DatasetMismatch, ExchangeFileError
from engine.exchange import (
    EXPORT_MAGIC,
    STATE_MAGIC,
    decode_export,
    decode_state,
    encode_export,
    encode_state,
    export_to_file,
    import_from_file,
    read_export,
    read_state,
    save_state,
    write_export,
    write_state,
)
from engine.node import Node

UPDATES = {
    "customers": b"\x01\x02\x03",
    "sales_invoice/2024-05": bytes(range(256)) * 3,
    "items": b"",
}
T0 = 1_716_000_000_000


def _export_bytes() -> bytes:
    return encode_export(dataset="acme", node="hn", updates=UPDATES, created_ms=T0)


def _state_bytes() -> bytes:
    # State vectors in lib0 encoding: count, then (client, clock) pairs.
    return encode_state(
        dataset="acme",
        node="hcm",
        state={"customers": b"\x01\x05\x07", "items": b"\x00"},
        created_ms=T0,
    )


def _with_header(data: bytes, magic: bytes, drop: str = "", **changes: object) -> bytes:
    """``data`` with header fields replaced (or one dropped), body left as it was."""
    start = len(magic)
    end = data.index(b"\n", start)
    header = orjson.loads(data[start:end])
    header.update(changes)
    header.pop(drop, None)
    return magic + orjson.dumps(header) + b"\n" + data[end + 1 :]


# -- round trips -------------------------------------------------------------


def test_export_round_trip() -> None:
    data = _export_bytes()
    assert data.startswith(EXPORT_MAGIC)
    header, updates = decode_export(data)
    assert updates == UPDATES
    assert (header.format, header.dataset, header.node, header.created_ms) == (1, "acme", "hn", T0)
    assert [p.name for p in header.documents] == sorted(UPDATES)
    assert header.body_length == sum(len(u) for u in UPDATES.values())
    body = data[data.index(b"\n", len(EXPORT_MAGIC)) + 1 :]
    assert header.body_sha256 == hashlib.sha256(body).hexdigest()
    for part in header.documents:
        assert body[part.offset : part.offset + part.length] == UPDATES[part.name]


def test_encoding_is_deterministic_and_the_header_is_one_line() -> None:
    updates = {"b": b"2", "a": b"1", "tên\u2028lạ": b"3"}
    one = encode_export(dataset="d", node="n", updates=updates, created_ms=5)
    two = encode_export(
        dataset="d", node="n", updates=dict(reversed(updates.items())), created_ms=5
    )
    assert one == two
    assert one.count(b"\n", 0, one.index(b"}\n") + 2) == 2  # magic line, header line
    assert decode_export(one)[1] == updates


def test_empty_export_round_trips() -> None:
    data = encode_export(dataset="acme", node="hn", updates={}, created_ms=0)
    header, updates = decode_export(data)
    assert updates == {} and header.documents == () and header.body_length == 0


def test_state_round_trip() -> None:
    header, state = decode_state(_state_bytes())
    assert state == {"customers": b"\x01\x05\x07", "items": b"\x00"}
    assert (header.dataset, header.node) == ("acme", "hcm")


def test_encode_state_rejects_a_bad_state_vector() -> None:
    with pytest.raises(ExchangeFileError, match="not a valid state vector"):
        encode_state(dataset="acme", node="n", state={"customers": b"\x05"}, created_ms=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": ""}, "invalid dataset"),
        ({"node": "a\nb"}, "invalid node"),
        ({"updates": {"": b"x"}}, "invalid document name"),
        ({"updates": {"x" * 200: b"x"}}, "invalid document name"),
        ({"updates": {"customers": "text"}}, "not bytes"),
        ({"created_ms": -1}, "created_ms"),
        ({"dataset": "a\ud800"}, "header cannot be written"),
    ],
)
def test_encode_export_rejects_bad_input(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"dataset": "acme", "node": "hn", "updates": {}, "created_ms": 1}
    args.update(kwargs)
    with pytest.raises(ExchangeFileError, match=match):
        encode_export(**args)  # type: ignore[arg-type]


def test_files_round_trip_atomically(tmp_path: Path) -> None:
    path = tmp_path / "out.blx"
    path.write_bytes(b"old content")
    size = write_export(path, dataset="acme", node="hn", updates=UPDATES, created_ms=T0)
    assert size == path.stat().st_size
    assert read_export(path)[1] == UPDATES
    assert os.listdir(tmp_path) == ["out.blx"]  # no temp file left behind
    state_path = tmp_path / "hn.state"
    write_state(state_path, dataset="acme", node="hn", state={"items": b"\x00"}, created_ms=T0)
    assert read_state(state_path)[1] == {"items": b"\x00"}


def test_write_into_a_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(BranchlineError, match="cannot write"):
        write_export(tmp_path / "no" / "x.blx", dataset="a", node="n", updates={}, created_ms=0)
    assert not (tmp_path / "no").exists()


def test_node_to_node_through_files(tmp_path: Path) -> None:
    a = Node.create(tmp_path / "a", dataset="acme", node="hn")
    b = Node.create(tmp_path / "b", dataset="acme", node="hcm")
    a.put("customers", {"code": "KH001", "name": "Công ty An"})
    b.put("customers", {"code": "KH002", "name": "Bình"})
    state = save_state(b, tmp_path / "b.state", created_ms=T0)
    done = export_to_file(a, tmp_path / "a.blx", created_ms=T0, since_state=state.path)
    assert (done.documents, done.since_node) == (1, "hcm")
    first = import_from_file(b, done.path)
    assert (first.header.node, first.report.records) == ("hn", 1)
    assert import_from_file(b, done.path).report.documents == 0  # idempotent
    back = export_to_file(b, tmp_path / "b.blx", created_ms=T0)
    import_from_file(a, back.path)
    assert a.list("customers") == b.list("customers")
    assert {r["code"] for r in a.list("customers")} == {"KH001", "KH002"}

    other = Node.create(tmp_path / "c", dataset="globex", node="hq")
    with pytest.raises(DatasetMismatch, match=r"'acme'.*'globex'"):
        import_from_file(other, back.path)
    with pytest.raises(DatasetMismatch, match=r"'acme'.*'globex'"):
        export_to_file(other, tmp_path / "c.blx", created_ms=T0, since_state=state.path)
    assert other.documents() == [] and not (tmp_path / "c.blx").exists()
    for node in (a, b, other):
        node.close()


# -- every documented failure -------------------------------------------------


def test_wrong_magic() -> None:
    with pytest.raises(ExchangeFileError, match="not a Branchline export file"):
        decode_export(b"PK\x03\x04 a zip file")
    with pytest.raises(ExchangeFileError, match="not a Branchline state file"):
        decode_state(b"{}")
    with pytest.raises(ExchangeFileError, match="empty"):
        decode_export(b"")


def test_kinds_are_told_apart() -> None:
    with pytest.raises(ExchangeFileError, match=r"state file .*not an export"):
        decode_export(_state_bytes())
    with pytest.raises(ExchangeFileError, match="export file, not a state file"):
        decode_state(_export_bytes())


def test_every_truncation_is_detected() -> None:
    data = _export_bytes()
    for cut in range(len(data)):
        with pytest.raises(ExchangeFileError) as info:
            decode_export(data[:cut])
        assert "truncated" in str(info.value) or "empty" in str(info.value), cut


def test_bad_header() -> None:
    with pytest.raises(ExchangeFileError, match="header is not valid JSON"):
        decode_export(EXPORT_MAGIC + b"{nope\n")
    with pytest.raises(ExchangeFileError, match="not a JSON object"):
        decode_export(EXPORT_MAGIC + b"[1, 2]\n")
    with pytest.raises(ExchangeFileError, match="lacks body_sha256"):
        decode_export(_with_header(_export_bytes(), EXPORT_MAGIC, drop="body_sha256"))
    with pytest.raises(ExchangeFileError, match="starts at"):
        docs = [{"name": "a", "offset": 1, "length": 0}]
        decode_export(_with_header(_export_bytes(), EXPORT_MAGIC, documents=docs))
    with pytest.raises(ExchangeFileError, match="listed twice"):
        docs = [{"name": "a", "offset": 0, "length": 0}, {"name": "a", "offset": 0, "length": 0}]
        decode_export(_with_header(_export_bytes(), EXPORT_MAGIC, documents=docs))
    with pytest.raises(ExchangeFileError, match="documents cover"):
        docs = [{"name": "a", "offset": 0, "length": 1}]
        decode_export(_with_header(_export_bytes(), EXPORT_MAGIC, documents=docs))
    with pytest.raises(ExchangeFileError, match="created_ms is out of range"):
        decode_export(_with_header(_export_bytes(), EXPORT_MAGIC, created_ms=True))


def test_other_format_version() -> None:
    with pytest.raises(ExchangeFileError, match="has format 2"):
        decode_export(_with_header(_export_bytes(), EXPORT_MAGIC, format=2))


def test_bad_checksum_and_trailing_bytes() -> None:
    data = bytearray(_export_bytes())
    data[-1] ^= 0x01
    with pytest.raises(ExchangeFileError, match="checksum"):
        decode_export(bytes(data))
    with pytest.raises(ExchangeFileError, match="unexpected bytes after the body"):
        decode_export(_export_bytes() + b"\x00")


def test_bad_state_vector_inside_a_checksummed_state_file() -> None:
    body = b"\x05"
    header = {
        "format": 1,
        "dataset": "acme",
        "node": "n",
        "created_ms": 0,
        "documents": [{"name": "items", "offset": 0, "length": 1}],
        "body_length": 1,
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    with pytest.raises(ExchangeFileError, match="not a valid state vector"):
        decode_state(STATE_MAGIC + orjson.dumps(header) + b"\n" + body)


def test_limits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(exchange, "MAX_HEADER_BYTES", 64)
    with pytest.raises(ExchangeFileError, match="header larger than 64 bytes"):
        decode_export(EXPORT_MAGIC + b"{" + b" " * 100)
    with pytest.raises(ExchangeFileError, match="header larger"):
        encode_export(dataset="acme", node="hn", updates=UPDATES, created_ms=0)
    monkeypatch.setattr(exchange, "MAX_HEADER_BYTES", 1 << 20)
    monkeypatch.setattr(exchange, "MAX_EXPORT_BYTES", 300)
    with pytest.raises(ExchangeFileError, match="300-byte limit"):
        encode_export(dataset="acme", node="hn", updates={"a": b"x" * 400}, created_ms=0)
    with pytest.raises(ExchangeFileError, match="larger than the 300-byte limit"):
        decode_export(EXPORT_MAGIC + b"x" * 400)
    big = tmp_path / "big.blx"
    big.write_bytes(EXPORT_MAGIC + b"x" * 400)
    with pytest.raises(ExchangeFileError, match=r"big\.blx: export file is larger"):
        read_export(big)
    monkeypatch.setattr(exchange, "MAX_DOCUMENTS", 2)
    with pytest.raises(ExchangeFileError, match="more than 2 documents"):
        encode_export(dataset="a", node="n", updates={"a": b"", "b": b"", "c": b""}, created_ms=0)


def test_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(ExchangeFileError, match="no such file"):
        read_export(tmp_path / "missing.blx")
    with pytest.raises(ExchangeFileError, match="is a directory"):
        read_state(tmp_path)
    damaged = tmp_path / "d.blx"
    damaged.write_bytes(_export_bytes()[:-3])
    with pytest.raises(ExchangeFileError, match=r"d\.blx: export file is truncated"):
        read_export(damaged)


# -- fuzzing -----------------------------------------------------------------


def _decodes_or_refuses(data: bytes) -> None:
    for decode in (decode_export, decode_state):
        try:
            header, parts = decode(data)
        except ExchangeFileError as exc:
            assert str(exc)
        else:
            assert set(parts) == {p.name for p in header.documents}


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _decodes_or_refuses(data)
    _decodes_or_refuses(EXPORT_MAGIC + data)
    _decodes_or_refuses(STATE_MAGIC + data)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from([_export_bytes(), _state_bytes()])))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        else:
            del data[pos:]
    return bytes(data)


@settings(max_examples=600)
@given(_mutated())
def test_fuzz_mutated_files(data: bytes) -> None:
    _decodes_or_refuses(data)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def _forged_header(draw: st.DrawFn) -> bytes:
    """Files with a correct checksum and a header whose fields are drawn at
    random (or left valid), so the deep checks of the header are reached."""
    body = draw(st.binary(max_size=40))
    valid: dict[str, object] = {
        "format": 1,
        "dataset": "acme",
        "node": "hn",
        "created_ms": 0,
        "documents": [{"name": "items", "offset": 0, "length": len(body)}],
        "body_length": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    header = {k: (draw(_json) if draw(st.booleans()) else v) for k, v in valid.items()}
    if draw(st.booleans()):
        header[draw(st.sampled_from(sorted(valid)))] = draw(_json)
    magic = draw(st.sampled_from([EXPORT_MAGIC, STATE_MAGIC]))
    # json, not orjson: it also writes what orjson refuses (big ints, NaN, lone
    # surrogates), which a forged file may hold.
    return magic + json.dumps(header).encode() + b"\n" + body


@settings(max_examples=400)
@given(_forged_header())
def test_fuzz_forged_headers(data: bytes) -> None:
    _decodes_or_refuses(data)


@settings(
    max_examples=50,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(_mutated())
def test_fuzz_files_on_disk(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.bin"
    path.write_bytes(data)
    for read in (read_export, read_state):
        try:
            read(path)
        except ExchangeFileError as exc:
            assert str(exc).startswith(str(path))


_VALID_SERIES: dict[str, object] = {
    "counters": {"sales_invoice": 4, "sales_invoice#provisional": 2},
    "blocks": [{"series": "cash_receipt", "start": 1, "stop": 100, "next": 7}],
    "provisional": [
        {
            "record": "01J0Z3",
            "collection": "cash_receipt",
            "series": "cash_receipt",
            "provisional": "PT-hn-P000001",
            "final": None,
            "at": 5,
        }
    ],
    "journal": [
        {
            "series": "sales_invoice",
            "number": "HDhn-000002",
            "event": "void",
            "collection": "sales_invoice",
            "record": "01J0Z4",
            "detail": None,
            "at": 6,
        }
    ],
}


def test_series_state_round_trips_in_the_header() -> None:
    data = encode_export(
        dataset="acme", node="hn", updates={}, created_ms=1, series=dict(_VALID_SERIES)
    )
    header, _ = decode_export(data)
    assert header.series == _VALID_SERIES
    assert (
        decode_export(encode_export(dataset="acme", node="hn", updates={}, created_ms=1))[0].series
        is None
    )
    with pytest.raises(ExchangeFileError, match="series state"):
        encode_export(dataset="acme", node="hn", updates={}, created_ms=1, series={"x": 1})


@st.composite
def _forged_series(draw: st.DrawFn) -> bytes:
    """Export files whose series state has fields drawn at random."""
    state = json.loads(json.dumps(_VALID_SERIES))
    for _ in range(draw(st.integers(1, 3))):
        part = draw(st.sampled_from(sorted(_VALID_SERIES)))
        value = state.get(part)
        if draw(st.booleans()) or not isinstance(value, list | dict):
            state[part] = draw(_json)
        elif isinstance(value, dict):
            value[draw(st.sampled_from([*value, "x"]))] = draw(_json)
        elif value and isinstance(value[0], dict) and value[0]:
            row = value[0]
            row[draw(st.sampled_from(sorted(row)))] = draw(_json | st.integers(-(2**70), 2**70))
    header = {
        "format": 1,
        "dataset": "acme",
        "node": "hn",
        "created_ms": 0,
        "documents": [],
        "body_length": 0,
        "body_sha256": hashlib.sha256(b"").hexdigest(),
        "series": state,
    }
    return EXPORT_MAGIC + json.dumps(header).encode() + b"\n"


@settings(max_examples=300)
@given(_forged_series())
def test_fuzz_forged_series_states(data: bytes) -> None:
    _decodes_or_refuses(data)
