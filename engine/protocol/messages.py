"""Typed protocol messages and their mapping to frames (docs/protocol.md §3).

Each message is a frozen dataclass; ``encode_message`` turns one into the bytes
of one frame and ``decode_message`` turns one received frame into a message,
checking every field's type and range. Decoding never raises anything but
``RemoteProtocolError``: ``bad_frame`` for anything malformed,
``frame_too_large`` for size limits. Unknown header fields are ignored (room
for additive changes within a version); an unknown type is ``bad_frame``.

Payloads (Yjs updates and state vectors) are opaque here: the drivers hand
them to the CRDT layer, which validates them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TypeAlias, TypeGuard

from ..errors import RemoteProtocolError
from ..names import DATASET_RE, DOC_RE, NODE_RE
from . import codes
from .frames import decode_frame, encode_frame
from .limits import (
    LIMIT_RANGES,
    MAX_BATCH_ITEMS,
    MAX_DOCS_PER_FRAME,
    MAX_HEARTBEAT_MS,
    MAX_LEASE_COUNT,
    MAX_MESSAGE_CHARS,
    MAX_REF,
    MAX_SERIES_CHARS,
    MAX_TOKEN_CHARS,
    MAX_VERSION,
    MAX_VERSIONS,
    MIN_HEARTBEAT_MS,
    Limits,
)

# Dataset, node and document names come from engine.names, shared with the
# node and the relay. Matched with fullmatch.
CODE_RE = re.compile(r"^[a-z][a-z_]{0,39}\Z")
SERIES_RE = re.compile(rf"^[^\x00-\x1f\x7f]{{1,{MAX_SERIES_CHARS}}}\Z")
TOKEN_RE = re.compile(rf"^[\x21-\x7e]{{1,{MAX_TOKEN_CHARS}}}\Z")


@dataclass(frozen=True)
class Hello:
    """Client -> relay, first frame: versions spoken, who it is, its limits."""

    versions: tuple[int, ...]
    dataset: str
    node: str
    token: str
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class Welcome:
    """Relay -> client: the handshake succeeded; ``limits`` now bind both sides.
    ``carrier``: the relay takes other nodes' entries from this node (absent
    on the wire means false)."""

    version: int
    dataset: str
    node: str
    read_only: bool
    limits: Limits
    heartbeat_ms: int
    carrier: bool = False


@dataclass(frozen=True)
class Docs:
    """Relay -> client after welcome: names of the dataset's documents;
    several frames when long, the last one with ``final`` true."""

    names: tuple[str, ...]
    final: bool


@dataclass(frozen=True)
class Error:
    """Either way: the session ends; the sender closes after this frame."""

    code: str
    message: str


@dataclass(frozen=True)
class Sync1:
    """Either way: the sender's Yjs state vector of ``doc`` (payload)."""

    doc: str
    payload: bytes = b""


@dataclass(frozen=True)
class Sync2:
    """Relay -> client: the Yjs update the client lacks for ``doc`` (payload;
    may be empty or the empty update ``00 00`` when it lacks nothing)."""

    doc: str
    payload: bytes = b""


@dataclass(frozen=True)
class SyncEnd:
    """Client -> relay: every sync1 of pass ``pass_id`` is answered and the
    client's own uploads for it are sent."""

    pass_id: int


@dataclass(frozen=True)
class Synced:
    """Relay -> client: pass ``pass_id`` is complete on the relay's side."""

    pass_id: int


@dataclass(frozen=True)
class Update:
    """A Yjs update of ``doc``. Client -> relay carries ``ref`` (acked later);
    relay -> client (fan-out) carries none."""

    doc: str
    payload: bytes = b""
    ref: int | None = None


@dataclass(frozen=True)
class Updates:
    """Several updates in one frame, in order; each item is exactly what a
    single ``update`` frame would carry (client -> relay: every item has a
    ``ref``; relay -> client: none has). On the wire the header lists each
    item's ``doc``, ``size`` and ``ref``; the payload is the items' payloads
    concatenated. Never chunked; 1 to ``MAX_BATCH_ITEMS`` items."""

    items: tuple[Update, ...]


@dataclass(frozen=True)
class Ack:
    """Relay -> client: the updates with these refs are durably stored."""

    refs: tuple[int, ...]


@dataclass(frozen=True)
class Refused:
    """Relay -> client: the updates with these refs, all of ``doc``, were not
    stored and will not be acknowledged (``code`` is one of
    ``codes.REFUSAL_CODES``; ``message`` names the document and why). The
    session goes on."""

    doc: str
    refs: tuple[int, ...]
    code: str
    message: str


@dataclass(frozen=True)
class Lease:
    """Client -> relay: lease ``count`` numbers of ``blocks`` series ``series``."""

    series: str
    count: int
    ref: int


@dataclass(frozen=True)
class LeaseGrant:
    """Relay -> client: numbers ``first``..``last`` (inclusive) are the client's."""

    ref: int
    series: str
    first: int
    last: int


@dataclass(frozen=True)
class LeaseDeny:
    """Relay -> client (``lease_denied``): lease ``ref`` was refused (the session goes on)."""

    ref: int
    series: str
    message: str


@dataclass(frozen=True)
class Ping:
    """Either way: the peer answers with pong."""


@dataclass(frozen=True)
class Pong:
    """Either way: answer to ping."""


#: Messages whose payload may be split into chunks.
ChunkableMessage: TypeAlias = Sync1 | Sync2 | Update


@dataclass(frozen=True)
class Chunk:
    """Part ``index`` of ``count`` of transfer ``transfer``. The first part
    (index 0) carries ``size`` (total payload bytes) and ``head``: the message
    whose payload the parts make up, with an empty payload."""

    transfer: int
    index: int
    count: int
    payload: bytes = b""
    size: int | None = None
    head: ChunkableMessage | None = None


Message: TypeAlias = (
    Hello
    | Welcome
    | Docs
    | Error
    | Sync1
    | Sync2
    | SyncEnd
    | Synced
    | Update
    | Updates
    | Ack
    | Refused
    | Lease
    | LeaseGrant
    | LeaseDeny
    | Ping
    | Pong
    | Chunk
)

_TYPE_OF: dict[type[Any], str] = {
    Hello: "hello",
    Welcome: "welcome",
    Docs: "docs",
    Error: "error",
    Sync1: "sync1",
    Sync2: "sync2",
    SyncEnd: "sync_end",
    Synced: "synced",
    Update: "update",
    Updates: "updates",
    Ack: "ack",
    Refused: "refused",
    Lease: "lease",
    LeaseGrant: "lease_grant",
    LeaseDeny: "lease_denied",
    Ping: "ping",
    Pong: "pong",
    Chunk: "chunk",
}
_PAYLOAD_TYPES = frozenset({"sync1", "sync2", "update", "updates", "chunk"})


def type_name(msg: Message) -> str:
    """The wire type ``"t"`` of a message."""
    return _TYPE_OF[type(msg)]


# -- encoding ----------------------------------------------------------------


def header_of(msg: Message) -> dict[str, Any]:
    """The JSON header of a message (without its payload)."""
    h: dict[str, Any] = {"t": _TYPE_OF[type(msg)]}
    if isinstance(msg, Hello):
        h.update(
            versions=list(msg.versions),
            dataset=msg.dataset,
            node=msg.node,
            token=msg.token,
            limits=msg.limits.to_json(),
        )
    elif isinstance(msg, Welcome):
        h.update(
            version=msg.version,
            dataset=msg.dataset,
            node=msg.node,
            read_only=msg.read_only,
            limits=msg.limits.to_json(),
            heartbeat_ms=msg.heartbeat_ms,
        )
        if msg.carrier:
            h["carrier"] = True
    elif isinstance(msg, Docs):
        h.update(names=list(msg.names), final=msg.final)
    elif isinstance(msg, Error):
        h.update(code=msg.code, message=msg.message[:MAX_MESSAGE_CHARS])
    elif isinstance(msg, Sync1 | Sync2):
        h["doc"] = msg.doc
    elif isinstance(msg, SyncEnd | Synced):
        h["pass"] = msg.pass_id
    elif isinstance(msg, Update):
        h["doc"] = msg.doc
        if msg.ref is not None:
            h["ref"] = msg.ref
    elif isinstance(msg, Updates):
        h["items"] = [batch_item(u.doc, len(u.payload), u.ref) for u in msg.items]
    elif isinstance(msg, Ack):
        h["refs"] = list(msg.refs)
    elif isinstance(msg, Refused):
        h.update(
            doc=msg.doc, refs=list(msg.refs), code=msg.code, message=msg.message[:MAX_MESSAGE_CHARS]
        )
    elif isinstance(msg, Lease):
        h.update(series=msg.series, count=msg.count, ref=msg.ref)
    elif isinstance(msg, LeaseGrant):
        h.update(ref=msg.ref, series=msg.series, first=msg.first, last=msg.last)
    elif isinstance(msg, LeaseDeny):
        h.update(ref=msg.ref, series=msg.series, message=msg.message[:MAX_MESSAGE_CHARS])
    elif isinstance(msg, Chunk):
        h.update(id=msg.transfer, i=msg.index, n=msg.count)
        if msg.head is not None:
            h["m"] = header_of(msg.head)
            h["size"] = msg.size
    return h


def payload_of(msg: Message) -> bytes:
    """The binary payload of a message (empty for header-only types)."""
    if isinstance(msg, Sync1 | Sync2 | Update | Chunk):
        return msg.payload
    if isinstance(msg, Updates):
        return b"".join(u.payload for u in msg.items)
    return b""


def batch_item(doc: str, size: int, ref: int | None) -> dict[str, Any]:
    """The header entry of one item of an ``updates`` frame."""
    item: dict[str, Any] = {"doc": doc, "size": size}
    if ref is not None:
        item["ref"] = ref
    return item


def encode_message(msg: Message, *, max_frame: int) -> bytes:
    """The bytes of one frame holding ``msg``. Raises LocalProtocolError
    (``frame_too_large``) when it does not fit; sessions chunk before that."""
    return encode_frame(header_of(msg), payload_of(msg), max_frame=max_frame)


# -- decoding ----------------------------------------------------------------


def decode_message(data: bytes, *, max_frame: int) -> Message:
    """The message in one received frame. Raises RemoteProtocolError only."""
    header, payload = decode_frame(data, max_frame=max_frame)
    return _parse(header, payload, nested=False)


def _bad(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(codes.BAD_FRAME, message)


def _parse(h: dict[str, Any], payload: bytes, *, nested: bool) -> Message:
    t = h.get("t")
    if not isinstance(t, str):
        raise _bad('header has no string type field "t"')
    if payload and t not in _PAYLOAD_TYPES:
        raise _bad(f"a {t!r} frame carries no payload, got {len(payload)} bytes")
    parser = _PARSERS.get(t)
    if parser is None:
        raise _bad(f"unknown frame type {t[:40]!r}")
    if nested and t not in ("sync1", "sync2", "update"):
        raise _bad(f"a chunk cannot carry a {t!r} message")
    return parser(h, payload)


def _get(h: dict[str, Any], key: str) -> Any:
    if key not in h:
        raise _bad(f"{h['t']!r} frame lacks field {key!r}")
    return h[key]


def _int(h: dict[str, Any], key: str, low: int, high: int) -> int:
    value = _get(h, key)
    # bool is an int subclass in Python; JSON true is not a number.
    if type(value) is not int or not low <= value <= high:
        raise _bad(f"{h['t']!r} field {key!r} must be an integer in [{low}, {high}]")
    return value


def _bool(h: dict[str, Any], key: str) -> bool:
    value = _get(h, key)
    if type(value) is not bool:
        raise _bad(f"{h['t']!r} field {key!r} must be true or false")
    return value


def _str(h: dict[str, Any], key: str, pattern: re.Pattern[str]) -> str:
    value = _get(h, key)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _bad(f"{h['t']!r} field {key!r} is not a valid {key}")
    return value


def _text(h: dict[str, Any], key: str) -> str:
    value = _get(h, key)
    if not isinstance(value, str) or len(value) > MAX_MESSAGE_CHARS:
        raise _bad(f"{h['t']!r} field {key!r} must be a string of at most {MAX_MESSAGE_CHARS}")
    return value


def _limits(h: dict[str, Any]) -> Limits:
    value = _get(h, "limits")
    if not isinstance(value, dict):
        raise _bad(f"{h['t']!r} field 'limits' must be an object")
    out = {}
    for name, (low, high) in LIMIT_RANGES.items():
        item = value.get(name)
        if type(item) is not int or not low <= item <= high:
            raise _bad(f"limits.{name} must be an integer in [{low}, {high}]")
        out[name] = item
    return Limits(**out)


def _refs(h: dict[str, Any], key: str, most: int) -> tuple[int, ...]:
    value = _get(h, key)
    if not isinstance(value, list) or not 1 <= len(value) <= most:
        raise _bad(f"{h['t']!r} field {key!r} must be a list of 1 to {most} items")
    for item in value:
        if type(item) is not int or not 0 <= item <= MAX_REF:
            raise _bad(f"{h['t']!r} field {key!r} holds an invalid integer")
    return tuple(value)


def _hello(h: dict[str, Any], payload: bytes) -> Hello:
    versions = _refs(h, "versions", MAX_VERSIONS)
    if any(not 1 <= v <= MAX_VERSION for v in versions):
        raise _bad(f"hello versions must be integers in [1, {MAX_VERSION}]")
    return Hello(
        versions=versions,
        dataset=_str(h, "dataset", DATASET_RE),
        node=_str(h, "node", NODE_RE),
        token=_str(h, "token", TOKEN_RE),
        limits=_limits(h),
    )


def _welcome(h: dict[str, Any], payload: bytes) -> Welcome:
    return Welcome(
        version=_int(h, "version", 1, MAX_VERSION),
        dataset=_str(h, "dataset", DATASET_RE),
        node=_str(h, "node", NODE_RE),
        read_only=_bool(h, "read_only"),
        limits=_limits(h),
        heartbeat_ms=_int(h, "heartbeat_ms", MIN_HEARTBEAT_MS, MAX_HEARTBEAT_MS),
        carrier=_bool(h, "carrier") if "carrier" in h else False,
    )


def _docs(h: dict[str, Any], payload: bytes) -> Docs:
    names = _get(h, "names")
    if not isinstance(names, list) or len(names) > MAX_DOCS_PER_FRAME:
        raise _bad(f"docs field 'names' must be a list of at most {MAX_DOCS_PER_FRAME} names")
    for name in names:
        if not isinstance(name, str) or not DOC_RE.fullmatch(name):
            raise _bad("docs field 'names' holds an invalid document name")
    return Docs(names=tuple(names), final=_bool(h, "final"))


def _error(h: dict[str, Any], payload: bytes) -> Error:
    return Error(code=_str(h, "code", CODE_RE), message=_text(h, "message"))


def _sync1(h: dict[str, Any], payload: bytes) -> Sync1:
    return Sync1(doc=_str(h, "doc", DOC_RE), payload=payload)


def _sync2(h: dict[str, Any], payload: bytes) -> Sync2:
    return Sync2(doc=_str(h, "doc", DOC_RE), payload=payload)


def _sync_end(h: dict[str, Any], payload: bytes) -> SyncEnd:
    return SyncEnd(pass_id=_int(h, "pass", 0, MAX_REF))


def _synced(h: dict[str, Any], payload: bytes) -> Synced:
    return Synced(pass_id=_int(h, "pass", 0, MAX_REF))


def _update(h: dict[str, Any], payload: bytes) -> Update:
    ref = _int(h, "ref", 0, MAX_REF) if "ref" in h else None
    return Update(doc=_str(h, "doc", DOC_RE), payload=payload, ref=ref)


#: Document names already found valid: a batch names the same few documents
#: over and over, and a set lookup is cheaper than the regex. Bounded: cleared
#: when full, so hostile peers cannot grow it.
_VALID_DOCS: set[str] = set()
_VALID_DOCS_MAX = 4096


def is_doc_name(value: object) -> TypeGuard[str]:
    """``value`` is a document name (a str matching DOC_RE); cached, as
    batches name the same few documents over and over."""
    if type(value) is not str:
        return False
    if value in _VALID_DOCS:
        return True
    if not DOC_RE.fullmatch(value):
        return False
    if len(_VALID_DOCS) >= _VALID_DOCS_MAX:
        _VALID_DOCS.clear()
    _VALID_DOCS.add(value)
    return True


def _updates(h: dict[str, Any], payload: bytes) -> Updates:
    items = _get(h, "items")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH_ITEMS:
        raise _bad(f"updates field 'items' must be a list of 1 to {MAX_BATCH_ITEMS} items")
    out: list[Update] = []
    start = 0
    end = len(payload)
    # Each item is validated exactly like a single update's header (the same
    # checks as _int and _str, inlined: this runs once per update received).
    for item in items:
        if type(item) is not dict:
            raise _bad("updates field 'items' holds a non-object")
        size = item.get("size")
        if type(size) is not int or not 0 <= size <= end - start:
            raise _bad(f"'updates' item field 'size' must be an integer in [0, {end - start}]")
        ref = item.get("ref")
        if (ref is not None or "ref" in item) and (type(ref) is not int or not 0 <= ref <= MAX_REF):
            raise _bad(f"'updates' item field 'ref' must be an integer in [0, {MAX_REF}]")
        doc = item.get("doc")
        if not is_doc_name(doc):
            raise _bad("'updates' item field 'doc' is not a valid doc")
        out.append(Update(doc, payload[start : start + size], ref))
        start += size
    if start != len(payload):
        raise _bad(f"updates items announce {start} bytes but the payload has {len(payload)}")
    return Updates(items=tuple(out))


def _ack(h: dict[str, Any], payload: bytes) -> Ack:
    return Ack(refs=_refs(h, "refs", LIMIT_RANGES["max_inflight"][1]))


def _refused(h: dict[str, Any], payload: bytes) -> Refused:
    return Refused(
        doc=_str(h, "doc", DOC_RE),
        refs=_refs(h, "refs", LIMIT_RANGES["max_inflight"][1]),
        code=_str(h, "code", CODE_RE),
        message=_text(h, "message"),
    )


def _lease(h: dict[str, Any], payload: bytes) -> Lease:
    return Lease(
        series=_str(h, "series", SERIES_RE),
        count=_int(h, "count", 1, MAX_LEASE_COUNT),
        ref=_int(h, "ref", 0, MAX_REF),
    )


def _lease_grant(h: dict[str, Any], payload: bytes) -> LeaseGrant:
    first = _int(h, "first", 1, 2**63 - 1)
    last = _int(h, "last", 1, 2**63 - 1)
    if last < first:
        raise _bad("lease_grant 'last' is below 'first'")
    return LeaseGrant(
        ref=_int(h, "ref", 0, MAX_REF), series=_str(h, "series", SERIES_RE), first=first, last=last
    )


def _lease_denied(h: dict[str, Any], payload: bytes) -> LeaseDeny:
    return LeaseDeny(
        ref=_int(h, "ref", 0, MAX_REF),
        series=_str(h, "series", SERIES_RE),
        message=_text(h, "message"),
    )


def _ping(h: dict[str, Any], payload: bytes) -> Ping:
    return Ping()


def _pong(h: dict[str, Any], payload: bytes) -> Pong:
    return Pong()


def _chunk(h: dict[str, Any], payload: bytes) -> Chunk:
    transfer = _int(h, "id", 0, MAX_REF)
    count = _int(h, "n", 1, LIMIT_RANGES["max_chunks"][1])
    index = _int(h, "i", 0, count - 1)
    if index != 0:
        return Chunk(transfer=transfer, index=index, count=count, payload=payload)
    inner = _get(h, "m")
    if not isinstance(inner, dict):
        raise _bad("the first chunk's field 'm' must be the message header object")
    head = _parse(inner, b"", nested=True)
    assert isinstance(head, Sync1 | Sync2 | Update)  # _parse(nested=True) guarantees it
    size = _int(h, "size", 0, LIMIT_RANGES["max_transfer"][1])
    return Chunk(transfer=transfer, index=0, count=count, payload=payload, size=size, head=head)


_PARSERS: dict[str, Callable[[dict[str, Any], bytes], Message]] = {
    "hello": _hello,
    "welcome": _welcome,
    "docs": _docs,
    "error": _error,
    "sync1": _sync1,
    "sync2": _sync2,
    "sync_end": _sync_end,
    "synced": _synced,
    "update": _update,
    "updates": _updates,
    "ack": _ack,
    "refused": _refused,
    "lease": _lease,
    "lease_grant": _lease_grant,
    "lease_denied": _lease_denied,
    "ping": _ping,
    "pong": _pong,
    "chunk": _chunk,
}

assert set(_PARSERS) == set(_TYPE_OF.values())
assert {f.name for f in fields(Limits)} == set(LIMIT_RANGES)
