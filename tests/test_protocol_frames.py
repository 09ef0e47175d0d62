"""Frame and message codec: round trips of every message type, every
documented decode failure, the limits, and fuzzing (any bytes decode to a
message or raise RemoteProtocolError, never anything else)."""

from __future__ import annotations

import ast
import struct
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import node as node_mod
from engine.errors import BranchlineError, LocalProtocolError, ProtocolError, RemoteProtocolError
from engine.protocol import codes, decode_frame, decode_message, encode_frame, encode_message
from engine.protocol import messages as m
from engine.protocol.limits import (
    MAX_HEADER_BYTES,
    MAX_REF,
    MIN_FRAME_BYTES,
    Limits,
)

MAX = 1 << 20

SAMPLES: list[m.Message] = [
    m.Hello((1, 2), "acme", "hn-01", "tok.EN-xyz", Limits(max_frame=MIN_FRAME_BYTES)),
    m.Welcome(2, "acme", "hn-01", True, Limits(), 1500),
    m.Docs(("customers", "sales_invoice/2026-01"), final=False),
    m.Docs((), final=True),
    m.Error(codes.AUTH_FAILED, "token revoked; enroll the node again"),
    m.Sync1("customers", b"\x01\x05\x07"),
    m.Sync2("sales_invoice/2026-01", bytes(range(256))),
    m.Sync2("items", b""),
    m.SyncEnd(7),
    m.Synced(7),
    m.Update("customers", b"\x00\x00", ref=MAX_REF),
    m.Update("customers", b"\x01\x02"),
    m.Ack((1, 2, 3)),
    m.Refused("journal/2026-11", (4, 5), codes.LOCKED_PERIOD, "period '2026-11' is locked"),
    m.Lease("sales_invoice@2026", 100, 4),
    m.LeaseGrant(4, "sales_invoice@2026", 101, 200),
    m.LeaseDeny(4, "sales_invoice@2026", "no such series"),
    m.Ping(),
    m.Pong(),
    m.Chunk(3, 0, 2, b"abc", size=5, head=m.Update("items", b"", ref=9)),
    m.Chunk(3, 1, 2, b"de"),
    m.Updates((m.Update("customers", b"\x01\x02", ref=1), m.Update("items", b"", ref=MAX_REF))),
    m.Updates((m.Update("customers", b"abc"), m.Update("sales_invoice/2026-01", b"\x00\x00"))),
]


def frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    raw = orjson.dumps(header)
    return struct.pack(">I", len(raw)) + raw + payload


def code_of(data: bytes, max_frame: int = MAX) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(data, max_frame=max_frame)
    return info.value.code


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: type(x).__name__)
def test_every_message_round_trips(msg: m.Message) -> None:
    data = encode_message(msg, max_frame=MAX)
    assert decode_message(data, max_frame=MAX) == msg


def test_frame_layout_is_length_header_payload() -> None:
    data = encode_message(m.Update("items", b"PAYLOAD", ref=1), max_frame=MAX)
    (length,) = struct.unpack(">I", data[:4])
    assert orjson.loads(data[4 : 4 + length]) == {"t": "update", "doc": "items", "ref": 1}
    assert data[4 + length :] == b"PAYLOAD"
    assert decode_frame(data, max_frame=MAX) == (
        {"t": "update", "doc": "items", "ref": 1},
        b"PAYLOAD",
    )


def test_error_message_is_truncated_on_encoding() -> None:
    data = encode_message(m.Error(codes.INTERNAL, "x" * 5000), max_frame=MAX)
    msg = decode_message(data, max_frame=MAX)
    assert isinstance(msg, m.Error) and len(msg.message) == 1000


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", codes.BAD_FRAME),
        (b"\x00\x00", codes.BAD_FRAME),
        (b"\x00\x00\x00\x00", codes.BAD_FRAME),  # zero-length header
        (b"\x00\x00\x00\x09{}", codes.BAD_FRAME),  # header longer than the frame
        (struct.pack(">I", MAX_HEADER_BYTES + 1) + b"{", codes.FRAME_TOO_LARGE),
        (b"\x00\x00\x00\x02\xff\xfe", codes.BAD_FRAME),  # not UTF-8 JSON
        (frame([1, 2]), codes.BAD_FRAME),  # type: ignore[arg-type]
        (frame({"x": 1}), codes.BAD_FRAME),  # no "t"
        (frame({"t": 5}), codes.BAD_FRAME),
        (frame({"t": "teleport"}), codes.BAD_FRAME),
        (frame({"t": "ping"}, b"x"), codes.BAD_FRAME),  # payload on a header-only type
        (frame({"t": "sync1"}), codes.BAD_FRAME),  # missing doc
        (frame({"t": "sync1", "doc": "Customers"}), codes.BAD_FRAME),  # invalid name
        (frame({"t": "sync1", "doc": "customers\n"}), codes.BAD_FRAME),
        (frame({"t": "update", "doc": "items", "ref": -1}), codes.BAD_FRAME),
        (frame({"t": "update", "doc": "items", "ref": True}), codes.BAD_FRAME),
        (frame({"t": "update", "doc": "items", "ref": 1.0}), codes.BAD_FRAME),
        (frame({"t": "update", "doc": "items", "ref": MAX_REF + 1}), codes.BAD_FRAME),
        (frame({"t": "ack", "refs": []}), codes.BAD_FRAME),
        (frame({"t": "ack", "refs": ["1"]}), codes.BAD_FRAME),
        (frame({"t": "refused", "refs": [1], "code": "x", "message": ""}), codes.BAD_FRAME),
        (
            frame({"t": "refused", "doc": "items", "refs": [], "code": "x", "message": ""}),
            codes.BAD_FRAME,
        ),
        (frame({"t": "sync_end", "pass": None}), codes.BAD_FRAME),
        (frame({"t": "docs", "names": ["a"] * 257, "final": True}), codes.BAD_FRAME),
        (frame({"t": "docs", "names": ["items"], "final": 1}), codes.BAD_FRAME),
        (frame({"t": "error", "code": "Bad Code", "message": ""}), codes.BAD_FRAME),
        (frame({"t": "error", "code": "internal", "message": "x" * 1001}), codes.BAD_FRAME),
        (frame({"t": "lease", "series": "s", "count": 0, "ref": 1}), codes.BAD_FRAME),
        (
            frame({"t": "lease_grant", "ref": 1, "series": "s", "first": 9, "last": 3}),
            codes.BAD_FRAME,
        ),
        (
            frame(
                {
                    "t": "hello",
                    "versions": [0],
                    "dataset": "a",
                    "node": "b",
                    "token": "t",
                    "limits": Limits().to_json(),
                }
            ),
            codes.BAD_FRAME,
        ),
        (
            frame(
                {
                    "t": "hello",
                    "versions": [1],
                    "dataset": "a",
                    "node": "b",
                    "token": "t t",
                    "limits": Limits().to_json(),
                }
            ),
            codes.BAD_FRAME,
        ),
        (
            frame(
                {
                    "t": "hello",
                    "versions": [1],
                    "dataset": "a",
                    "node": "b",
                    "token": "t",
                    "limits": {**Limits().to_json(), "max_frame": 10},
                }
            ),
            codes.BAD_FRAME,
        ),
        (
            frame(
                {
                    "t": "hello",
                    "versions": [1],
                    "dataset": "a",
                    "node": "b",
                    "token": "t",
                    "limits": {},
                }
            ),
            codes.BAD_FRAME,
        ),
        (frame({"t": "chunk", "id": 1, "i": 2, "n": 2}), codes.BAD_FRAME),  # i >= n
        (frame({"t": "chunk", "id": 1, "i": 0, "n": 2}), codes.BAD_FRAME),  # first lacks m
        (
            frame({"t": "chunk", "id": 1, "i": 0, "n": 2, "size": 4, "m": {"t": "ping"}}),
            codes.BAD_FRAME,
        ),  # a chunk cannot carry a ping
        (
            frame(
                {
                    "t": "chunk",
                    "id": 1,
                    "i": 0,
                    "n": 2,
                    "size": 4,
                    "m": {"t": "chunk", "id": 2, "i": 1, "n": 2},
                }
            ),
            codes.BAD_FRAME,
        ),
    ],
)
def test_malformed_frames_raise_documented_codes(data: bytes, code: str) -> None:
    assert code_of(data) == code


def test_frame_size_limit_is_checked_before_parsing() -> None:
    big = encode_message(m.Update("items", b"x" * 70_000, ref=1), max_frame=MAX)
    assert code_of(big, max_frame=MIN_FRAME_BYTES) == codes.FRAME_TOO_LARGE
    assert decode_message(big, max_frame=MAX) == m.Update("items", b"x" * 70_000, ref=1)


def test_encoding_over_the_limits_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_message(m.Update("items", b"x" * MIN_FRAME_BYTES, ref=1), max_frame=MIN_FRAME_BYTES)
    assert info.value.code == codes.FRAME_TOO_LARGE
    with pytest.raises(LocalProtocolError) as info:
        encode_frame({"t": "x", "pad": "y" * MAX_HEADER_BYTES}, max_frame=MAX)
    assert info.value.code == codes.FRAME_TOO_LARGE


def test_unknown_header_fields_are_ignored() -> None:
    assert decode_message(frame({"t": "synced", "pass": 3, "future": [1]}), max_frame=MAX) == (
        m.Synced(3)
    )


def test_limits_validate_their_ranges_and_merge_to_the_minimum() -> None:
    with pytest.raises(ValueError, match="max_frame"):
        Limits(max_frame=100)
    a = Limits(max_frame=MIN_FRAME_BYTES, max_inflight=10)
    b = Limits(max_syncs=2)
    assert a.merge(b) == Limits(max_frame=MIN_FRAME_BYTES, max_inflight=10, max_syncs=2)


def test_errors_belong_to_the_one_hierarchy() -> None:
    err = RemoteProtocolError(codes.BAD_FRAME, "short")
    assert isinstance(err, ProtocolError) and isinstance(err, BranchlineError)
    assert err.code == "bad_frame" and "short" in str(err) and "bad_frame" in str(err)
    assert set(codes.RETRYABLE) <= set(codes.CODES)


def test_name_patterns_are_the_nodes() -> None:
    assert m.DATASET_RE is node_mod.DATASET_RE
    assert m.NODE_RE is node_mod.NODE_RE
    assert m.DOC_RE is node_mod.DOC_RE


# -- fuzzing -------------------------------------------------------------------


def _decodes_or_protocol_error(data: bytes) -> None:
    try:
        msg = decode_message(data, max_frame=MIN_FRAME_BYTES)
    except RemoteProtocolError as exc:
        assert exc.code in codes.CODES
        return
    # Whatever decodes encodes back to an equivalent message.
    assert decode_message(encode_message(msg, max_frame=MAX), max_frame=MAX) == msg


@settings(max_examples=700, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_any_bytes(data: bytes) -> None:
    _decodes_or_protocol_error(data)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_types = st.sampled_from([*m._PARSERS, "nope"])


@settings(max_examples=700, deadline=None)
@given(
    _types,
    st.dictionaries(
        st.sampled_from(
            [
                "doc",
                "ref",
                "refs",
                "pass",
                "names",
                "final",
                "code",
                "message",
                "versions",
                "dataset",
                "node",
                "token",
                "limits",
                "version",
                "read_only",
                "heartbeat_ms",
                "series",
                "count",
                "first",
                "last",
                "id",
                "i",
                "n",
                "size",
                "m",
                "items",
            ]
        ),
        _json,
        max_size=8,
    ),
    st.binary(max_size=20),
)
def test_fuzz_plausible_headers(t: str, fields: dict[str, Any], payload: bytes) -> None:
    try:
        data = frame({"t": t, **fields}, payload)
    except orjson.JSONEncodeError:
        return  # integers beyond 64 bits cannot even be sent by orjson
    _decodes_or_protocol_error(data)


_items = st.lists(
    st.dictionaries(
        st.sampled_from(["doc", "size", "ref"]),
        st.sampled_from(["items", "customers", "Bad", "", None, True, 1.0])
        | st.integers(-2, 40)
        | _json,
        max_size=3,
    )
    | _json,
    max_size=5,
)


@settings(max_examples=700, deadline=None)
@given(_items | _json, st.binary(max_size=40))
def test_fuzz_updates_batches(items: Any, payload: bytes) -> None:
    try:
        data = frame({"t": "updates", "items": items}, payload)
    except orjson.JSONEncodeError:
        return
    _decodes_or_protocol_error(data)


def test_updates_batch_decoding_rules() -> None:
    good = {
        "t": "updates",
        "items": [{"doc": "items", "size": 2, "ref": 1}, {"doc": "x", "size": 1}],
    }
    msg = decode_message(frame(good, b"abc"), max_frame=MAX)
    assert msg == m.Updates((m.Update("items", b"ab", 1), m.Update("x", b"c")))
    for items, payload in [
        ([], b""),  # no item
        ([{"doc": "items", "size": 2}], b"abc"),  # sizes short of the payload
        ([{"doc": "items", "size": 4}], b"abc"),  # sizes beyond it
        ([{"doc": "Items", "size": 3}], b"abc"),  # bad name
        ([{"doc": "items", "size": 3, "ref": -1}], b"abc"),  # bad ref
        ([{"doc": "items", "size": True}], b"a"),
        ([{"doc": "items"}], b""),
        (["items"], b""),
        ([{"doc": "i", "size": 0}] * 1025, b""),  # over MAX_BATCH_ITEMS
    ]:
        assert code_of(frame({"t": "updates", "items": items}, payload)) == codes.BAD_FRAME
    # Never chunked: a chunk cannot carry an updates header.
    head = {"t": "chunk", "id": 1, "i": 0, "n": 1, "size": 1, "m": good}
    assert code_of(frame(head, b"a")) == codes.BAD_FRAME


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SAMPLES), st.data())
def test_fuzz_mutated_valid_frames(msg: m.Message, data: st.DataObject) -> None:
    raw = bytearray(encode_message(msg, max_frame=MAX))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    _decodes_or_protocol_error(bytes(raw[:cut]))


# -- layering (DESIGN §10) -------------------------------------------------------

FORBIDDEN = {
    "asyncio",
    "sqlite3",
    "socket",
    "websockets",
    "ssl",
    "selectors",
    "threading",
    "time",
    "select",
    "pycrdt",
}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            out.add(base)
    return out


def test_protocol_imports_no_io() -> None:
    root = Path(__file__).resolve().parent.parent / "engine"
    files = sorted((root / "protocol").glob("*.py"))
    assert len(files) >= 8
    for path in files:
        for name in _imports(path):
            assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
            if name.startswith(".."):
                # Only the shared exception hierarchy and name patterns may be
                # imported from the rest of the engine (engine.node and
                # engine.crdt do I/O / pycrdt).
                assert name in ("..errors", "..names"), f"{path.name} imports {name}"
    for shared in ("errors.py", "names.py"):
        shared_imports = _imports(root / shared)
        assert shared_imports <= {"__future__", "re"}, (shared, shared_imports)


def test_document_name_cache_is_bounded_and_holds_only_valid_names() -> None:
    from engine.protocol.messages import _VALID_DOCS, _VALID_DOCS_MAX, is_doc_name

    for i in range(2 * _VALID_DOCS_MAX + 7):
        assert is_doc_name(f"doc{i}/2026-11")
        assert len(_VALID_DOCS) <= _VALID_DOCS_MAX
    bad: list[object] = ["Doc", "doc/2026-1", "doc\n", 5, None, ["doc"]]
    assert not any(is_doc_name(b) for b in bad)
    assert not _VALID_DOCS & {b for b in bad if isinstance(b, str)}  # never cached
