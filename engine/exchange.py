"""Exchange files: CRDT updates (export files) and replica states (state files).

Both kinds share one self-describing container::

    BRANCHLINE-EXPORT\\n      magic line (BRANCHLINE-STATE\\n for a state file)
    {"format":1,...}\\n       header: one line of JSON (orjson)
    <body>                    the parts, back to back, as the header lists them

The header holds the format version, dataset, node, creation time (ms since
the epoch), the list of documents with the byte ``offset``/``length`` of each
part inside the body, and the body's length and sha256. An export part is the
raw CRDT update of one document (``Node.export_updates``); a state part is the
document's Yjs state vector (``Node.state``), used by ``--since-state`` to
export only what another replica lacks.

A full or ``--unsynced`` export also carries, in the header key ``series``,
the exporting node's series state (``engine.series.dump_state``: counters,
leased blocks, provisional numbers, gap journal); importing it into a home
of the same node id merges it (``restore_state``), so a rebuilt home never
issues a number its earlier life issued. Other nodes ignore it.

The ``encode_*``/``decode_*`` functions are pure (bytes in, bytes out), so the
format can be tested and fuzzed without files. Decoders never raise anything
but ``ExchangeFileError``, whatever the input. File functions are thin: writes
are atomic (temp file, fsync, rename, fsync of the directory), so a crash
leaves either the old file or the complete new one, never a torn file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from .crdt.statevec import decode_state_vector
from .errors import BranchlineError, DatasetMismatch, ExchangeFileError, UpdateError, UserError
from .series import JOURNAL_EVENTS

if TYPE_CHECKING:
    from .node import ImportReport

EXPORT_MAGIC = b"BRANCHLINE-EXPORT\n"
STATE_MAGIC = b"BRANCHLINE-STATE\n"
FORMAT_VERSION = 1

# Explicit limits, so a damaged or hostile file cannot make a reader allocate
# without bound. 100,000 records weigh about 31 MB as one update, so 1 GiB
# leaves room for very large datasets; beyond that, export with --since-state.
MAX_HEADER_BYTES = 16 << 20
MAX_EXPORT_BYTES = 1 << 30
MAX_STATE_BYTES = 64 << 20
MAX_DOCUMENTS = 100_000
MAX_NAME_CHARS = 128
MAX_TIME_MS = 2**63 - 1
MAX_SERIES_ROWS = 100_000  # per list of a series state
MAX_DETAIL_CHARS = 1000

_Decoder = Callable[[bytes], tuple["Header", dict[str, bytes]]]
_NAME_RE = re.compile(r"^[^\x00-\x1f\x7f]+\Z")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
_HEADER_KEYS = frozenset(
    {"format", "dataset", "node", "created_ms", "documents", "body_length", "body_sha256"}
)


@dataclass(frozen=True)
class Part:
    """Where one document's bytes sit inside the body."""

    name: str
    offset: int
    length: int


@dataclass(frozen=True)
class Header:
    """The decoded header of an export or state file."""

    format: int
    dataset: str
    node: str
    created_ms: int
    documents: tuple[Part, ...]
    body_length: int
    body_sha256: str
    # An export of unacknowledged local work only (``export --unsynced``):
    # importing it puts the changes back into the outbox.
    unsynced: bool = False
    # The exporting node's series state (full and unsynced exports).
    series: dict[str, Any] | None = None


# -- pure encoding ---------------------------------------------------------


def encode_export(
    *,
    dataset: str,
    node: str,
    updates: dict[str, bytes],
    created_ms: int,
    unsynced: bool = False,
    series: dict[str, Any] | None = None,
) -> bytes:
    """The bytes of an export file holding ``updates`` (document -> CRDT update)
    and the node's ``series`` state, if given.

    Raises ExchangeFileError when the result would exceed what readers accept
    or ``series`` is not a valid series state.
    """
    extra: dict[str, Any] = {"unsynced": True} if unsynced else {}
    if series is not None:
        extra["series"] = _parse_series(series, "export file")
    return _encode(EXPORT_MAGIC, MAX_EXPORT_BYTES, dataset, node, updates, created_ms, extra)


def encode_state(*, dataset: str, node: str, state: dict[str, bytes], created_ms: int) -> bytes:
    """The bytes of a state file holding ``state`` (document -> Yjs state vector).

    Raises ExchangeFileError for an invalid state vector or an oversized result.
    """
    for name, sv in state.items():
        _check_state_vector(name, sv)
    return _encode(STATE_MAGIC, MAX_STATE_BYTES, dataset, node, state, created_ms)


def decode_export(data: bytes) -> tuple[Header, dict[str, bytes]]:
    """Header and per-document updates of an export file's bytes.

    Raises ExchangeFileError (and nothing else) for any damaged, truncated,
    oversized or foreign input.
    """
    return _decode(data, EXPORT_MAGIC, MAX_EXPORT_BYTES)


def decode_state(data: bytes) -> tuple[Header, dict[str, bytes]]:
    """Header and per-document state vectors of a state file's bytes.

    Raises ExchangeFileError (and nothing else) for any damaged, truncated,
    oversized or foreign input, including a malformed state vector.
    """
    header, state = _decode(data, STATE_MAGIC, MAX_STATE_BYTES)
    for name, sv in state.items():
        _check_state_vector(name, sv)
    return header, state


# -- thin file layer -------------------------------------------------------


def write_export(
    path: str | Path,
    *,
    dataset: str,
    node: str,
    updates: dict[str, bytes],
    created_ms: int,
    unsynced: bool = False,
    series: dict[str, Any] | None = None,
) -> int:
    """Write an export file atomically; returns its size in bytes.

    Raises ExchangeFileError (oversized) or BranchlineError (cannot write).
    """
    data = encode_export(
        dataset=dataset,
        node=node,
        updates=updates,
        created_ms=created_ms,
        unsynced=unsynced,
        series=series,
    )
    _write_atomic(Path(path), data)
    return len(data)


def read_export(path: str | Path) -> tuple[Header, dict[str, bytes]]:
    """Read and verify an export file. Raises ExchangeFileError naming the file."""
    return _read(Path(path), MAX_EXPORT_BYTES, decode_export)


def write_state(
    path: str | Path, *, dataset: str, node: str, state: dict[str, bytes], created_ms: int
) -> int:
    """Write a state file atomically; returns its size in bytes.

    Raises ExchangeFileError (bad state vector, oversized) or BranchlineError
    (cannot write).
    """
    data = encode_state(dataset=dataset, node=node, state=state, created_ms=created_ms)
    _write_atomic(Path(path), data)
    return len(data)


def read_state(path: str | Path) -> tuple[Header, dict[str, bytes]]:
    """Read and verify a state file. Raises ExchangeFileError naming the file."""
    return _read(Path(path), MAX_STATE_BYTES, decode_state)


# -- node-level helpers (used by the CLI and the demo) ----------------------


class Replica(Protocol):
    """What the helpers need of a ``Node``."""

    @property
    def dataset(self) -> str: ...

    @property
    def node_id(self) -> str: ...

    def state(self) -> dict[str, bytes]: ...

    def export_updates(self, since: dict[str, bytes] | None = None) -> dict[str, bytes]: ...

    def unsynced_updates(self) -> dict[str, bytes]: ...

    def series_state(self) -> dict[str, Any]: ...

    def import_updates(
        self,
        updates: dict[str, bytes],
        *,
        unsynced: bool = False,
        series: dict[str, Any] | None = None,
    ) -> ImportReport: ...


@dataclass(frozen=True)
class Exported:
    """What ``export_to_file`` wrote; ``since_node`` names the node whose state
    limited the export (None for a full export)."""

    path: Path
    documents: int
    bytes: int
    since_node: str | None


@dataclass(frozen=True)
class Imported:
    """The header of the imported file and what integrating it changed."""

    header: Header
    report: ImportReport


def save_state(node: Replica, path: str | Path, *, created_ms: int) -> Exported:
    """Write ``node``'s state file. Raises as ``write_state``."""
    state = node.state()
    size = write_state(
        path, dataset=node.dataset, node=node.node_id, state=state, created_ms=created_ms
    )
    return Exported(Path(path), len(state), size, None)


def export_to_file(
    node: Replica,
    path: str | Path,
    *,
    created_ms: int,
    since_state: str | Path | None = None,
    unsynced: bool = False,
) -> Exported:
    """Write what ``node`` holds (or, with ``since_state``, what the node that
    wrote that state file lacks; or, with ``unsynced``, only the local work
    the relay has not acknowledged) to an export file.

    Raises UserError for both options at once, DatasetMismatch for a state
    file of another dataset (nothing is written), ExchangeFileError,
    UpdateError, BranchlineError (cannot write).
    """
    if unsynced:
        if since_state is not None:
            raise UserError("choose --unsynced or --since-state, not both")
        updates = node.unsynced_updates()
        size = write_export(
            path,
            dataset=node.dataset,
            node=node.node_id,
            updates=updates,
            created_ms=created_ms,
            unsynced=True,
            series=node.series_state(),
        )
        return Exported(Path(path), len(updates), size, None)
    since = None
    since_node = None
    if since_state is not None:
        header, since = read_state(since_state)
        if header.dataset != node.dataset:
            raise DatasetMismatch(
                f"{since_state} is the state of node '{header.node}' of dataset "
                f"'{header.dataset}', but node '{node.node_id}' belongs to dataset "
                f"'{node.dataset}'; nothing was exported"
            )
        since_node = header.node
    updates = node.export_updates(since)
    size = write_export(
        path,
        dataset=node.dataset,
        node=node.node_id,
        updates=updates,
        created_ms=created_ms,
        # What another node lacks needs no numbering; a full export is a backup.
        series=node.series_state() if since is None else None,
    )
    return Exported(Path(path), len(updates), size, since_node)


def import_from_file(node: Replica, path: str | Path) -> Imported:
    """Verify an export file and integrate it into ``node`` (idempotent),
    with the series state it carries when ``node`` has the exporting node's id.

    Raises ExchangeFileError for a damaged file and DatasetMismatch for a file
    of another dataset (naming both); nothing is written then. Raises
    UpdateError when the node cannot apply the updates (nothing stored).
    """
    header, updates = read_export(path)
    if header.dataset != node.dataset:
        raise DatasetMismatch(
            f"{path} holds dataset '{header.dataset}' (exported by node '{header.node}'), "
            f"but node '{node.node_id}' belongs to dataset '{node.dataset}'; nothing was imported"
        )
    series = header.series if header.node == node.node_id else None
    return Imported(header, node.import_updates(updates, unsynced=header.unsynced, series=series))


# -- internals -------------------------------------------------------------


def _kind(magic: bytes) -> str:
    return "export file" if magic == EXPORT_MAGIC else "state file"


def _encode(
    magic: bytes,
    limit: int,
    dataset: str,
    node: str,
    parts: dict[str, bytes],
    created_ms: int,
    extra: dict[str, Any] | None = None,
) -> bytes:
    kind = _kind(magic)
    _check_name(dataset, "dataset", kind)
    _check_name(node, "node", kind)
    if type(created_ms) is not int or not 0 <= created_ms <= MAX_TIME_MS:
        raise ExchangeFileError(f"{kind}: created_ms must be a non-negative 64-bit integer")
    if len(parts) > MAX_DOCUMENTS:
        raise ExchangeFileError(f"{kind}: more than {MAX_DOCUMENTS} documents")
    documents = []
    offset = 0
    # Sorted, so the same content always gives the same bytes.
    for name in sorted(parts):
        _check_name(name, "document name", kind)
        blob = parts[name]
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise ExchangeFileError(f"{kind}: document {name!r} is not bytes")
        documents.append({"name": name, "offset": offset, "length": len(blob)})
        offset += len(blob)
    body = b"".join(bytes(parts[name]) for name in sorted(parts))
    try:
        header = orjson.dumps(
            {
                "format": FORMAT_VERSION,
                "dataset": dataset,
                "node": node,
                "created_ms": created_ms,
                "documents": documents,
                "body_length": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                **(extra or {}),
            }
        )
    except orjson.JSONEncodeError as exc:  # e.g. a lone surrogate in a text
        raise ExchangeFileError(f"{kind}: header cannot be written ({exc})") from None
    if len(header) > MAX_HEADER_BYTES:
        raise ExchangeFileError(f"{kind}: header larger than {MAX_HEADER_BYTES} bytes")
    total = len(magic) + len(header) + 1 + len(body)
    if total > limit:
        raise ExchangeFileError(
            f"{kind} would be {total} bytes, more than the {limit}-byte limit; "
            "export in smaller steps with --since-state"
        )
    # orjson escapes control characters inside strings, so the header is one line.
    return magic + header + b"\n" + body


def _decode(data: bytes, magic: bytes, limit: int) -> tuple[Header, dict[str, bytes]]:
    kind = _kind(magic)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ExchangeFileError(f"{kind}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > limit:
        raise ExchangeFileError(f"{kind} is larger than the {limit}-byte limit")
    if not data:
        raise ExchangeFileError(f"{kind} is empty")
    if not data.startswith(magic):
        if data.startswith(STATE_MAGIC):
            raise ExchangeFileError(
                "this is a Branchline state file (for --since-state), not an export file"
            )
        if data.startswith(EXPORT_MAGIC):
            raise ExchangeFileError("this is a Branchline export file, not a state file")
        if magic.startswith(data):
            raise ExchangeFileError(f"{kind} is truncated (ends inside the magic line)")
        raise ExchangeFileError(f"not a Branchline {kind} (wrong magic line)")
    start = len(magic)
    end = data.find(b"\n", start, start + MAX_HEADER_BYTES + 1)
    if end < 0:
        if len(data) - start > MAX_HEADER_BYTES:
            raise ExchangeFileError(f"{kind}: header larger than {MAX_HEADER_BYTES} bytes")
        raise ExchangeFileError(f"{kind} is truncated (ends inside the header)")
    header = _parse_header(data[start:end], kind)
    body = data[end + 1 :]
    if len(body) < header.body_length:
        raise ExchangeFileError(
            f"{kind} is truncated: body has {len(body)} of {header.body_length} bytes"
        )
    if len(body) > header.body_length:
        raise ExchangeFileError(
            f"{kind} is damaged: {len(body) - header.body_length} unexpected bytes after the body"
        )
    if hashlib.sha256(body).hexdigest() != header.body_sha256:
        raise ExchangeFileError(f"{kind} is damaged: body checksum (sha256) does not match")
    parts = {p.name: body[p.offset : p.offset + p.length] for p in header.documents}
    return header, parts


def _parse_header(raw: bytes, kind: str) -> Header:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ExchangeFileError(f"{kind} is damaged: header is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ExchangeFileError(f"{kind} is damaged: header is not a JSON object")
    missing = sorted(_HEADER_KEYS - obj.keys())
    if missing:
        raise ExchangeFileError(f"{kind} is damaged: header lacks {', '.join(missing)}")
    fmt = obj["format"]
    if type(fmt) is not int:
        raise ExchangeFileError(f"{kind} is damaged: header 'format' is not an integer")
    if fmt != FORMAT_VERSION:
        raise ExchangeFileError(
            f"{kind} has format {fmt}; this Branchline reads format {FORMAT_VERSION} "
            "(use the Branchline version that wrote it)"
        )
    dataset = _header_name(obj["dataset"], "dataset", kind)
    node = _header_name(obj["node"], "node", kind)
    created = _header_int(obj["created_ms"], "created_ms", kind, MAX_TIME_MS)
    body_length = _header_int(obj["body_length"], "body_length", kind, MAX_EXPORT_BYTES)
    sha = obj["body_sha256"]
    if not isinstance(sha, str) or not _SHA256_RE.match(sha):
        raise ExchangeFileError(f"{kind} is damaged: header 'body_sha256' is not a sha256")
    docs = obj["documents"]
    if not isinstance(docs, list):
        raise ExchangeFileError(f"{kind} is damaged: header 'documents' is not a list")
    if len(docs) > MAX_DOCUMENTS:
        raise ExchangeFileError(f"{kind}: more than {MAX_DOCUMENTS} documents")
    parts = []
    names: set[str] = set()
    offset = 0
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict) or set(doc) != {"name", "offset", "length"}:
            raise ExchangeFileError(f"{kind} is damaged: document entry {i} is malformed")
        name = _header_name(doc["name"], f"document {i} name", kind)
        if name in names:
            raise ExchangeFileError(f"{kind} is damaged: document {name!r} is listed twice")
        names.add(name)
        start = _header_int(doc["offset"], f"document {i} offset", kind, MAX_EXPORT_BYTES)
        length = _header_int(doc["length"], f"document {i} length", kind, MAX_EXPORT_BYTES)
        # Parts tile the body exactly: no gaps, no overlaps, nothing hidden.
        if start != offset:
            raise ExchangeFileError(
                f"{kind} is damaged: document {name!r} starts at {start}, expected {offset}"
            )
        offset += length
        parts.append(Part(name, start, length))
    if offset != body_length:
        raise ExchangeFileError(
            f"{kind} is damaged: documents cover {offset} bytes, body_length says {body_length}"
        )
    unsynced = obj.get("unsynced", False)
    if type(unsynced) is not bool:
        raise ExchangeFileError(f"{kind} is damaged: header 'unsynced' is not true or false")
    series = _parse_series(obj["series"], kind) if "series" in obj else None
    return Header(fmt, dataset, node, created, tuple(parts), body_length, sha, unsynced, series)


_SERIES_LISTS = {
    "blocks": {"series": "name", "start": "seq", "stop": "seq", "next": "seq"},
    "provisional": {
        "record": "name",
        "collection": "name",
        "series": "name",
        "provisional": "name",
        "final": "name?",
        "at": "time",
    },
    "journal": {
        "series": "name",
        "number": "name",
        "event": "event",
        "collection": "name?",
        "record": "name?",
        "detail": "text?",
        "at": "time",
    },
}


def _parse_series(value: Any, kind: str) -> dict[str, Any]:
    """A checked copy of a series state (``engine.series.dump_state``).
    Raises ExchangeFileError for anything else."""
    where = f"{kind} is damaged: series state"
    if not isinstance(value, dict) or set(value) != {"counters", *_SERIES_LISTS}:
        raise ExchangeFileError(f"{where} is malformed")
    counters = value["counters"]
    if not isinstance(counters, dict) or len(counters) > MAX_SERIES_ROWS:
        raise ExchangeFileError(f"{where}: counters are malformed")
    for key, nxt in counters.items():
        if not _valid_name(key) or type(nxt) is not int or not 1 <= nxt <= MAX_TIME_MS:
            raise ExchangeFileError(f"{where}: counter {key!r} is out of range")
    out: dict[str, Any] = {"counters": dict(counters)}
    for name, shape in _SERIES_LISTS.items():
        rows = value[name]
        if not isinstance(rows, list) or len(rows) > MAX_SERIES_ROWS:
            raise ExchangeFileError(f"{where}: {name} is not a list of at most {MAX_SERIES_ROWS}")
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or set(row) != set(shape):
                raise ExchangeFileError(f"{where}: {name} entry {i} is malformed")
            for field, rule in shape.items():
                if not _series_value(row[field], rule):
                    raise ExchangeFileError(f"{where}: {name} entry {i} has a bad {field}")
        out[name] = [dict(row) for row in rows]
    for b in out["blocks"]:
        if not b["start"] <= b["stop"] or not b["start"] <= b["next"] <= b["stop"] + 1:
            raise ExchangeFileError(f"{where}: block {b['start']}..{b['stop']} is inconsistent")
    return out


def _series_value(value: Any, rule: str) -> bool:
    if rule.endswith("?"):
        if value is None:
            return True
        rule = rule[:-1]
    if rule == "name":
        return isinstance(value, str) and _valid_name(value)
    if rule == "text":
        return isinstance(value, str) and len(value) <= MAX_DETAIL_CHARS
    if rule == "event":
        return value in JOURNAL_EVENTS
    if rule == "seq":
        return type(value) is int and 1 <= value < MAX_TIME_MS
    return type(value) is int and 0 <= value <= MAX_TIME_MS  # time


def _header_name(value: Any, what: str, kind: str) -> str:
    if not isinstance(value, str) or not _valid_name(value):
        raise ExchangeFileError(f"{kind} is damaged: header {what} is not a valid name")
    return value


def _header_int(value: Any, what: str, kind: str, maximum: int) -> int:
    if type(value) is not int or not 0 <= value <= maximum:
        raise ExchangeFileError(f"{kind} is damaged: header {what} is out of range")
    return value


def _valid_name(value: str) -> bool:
    return 0 < len(value) <= MAX_NAME_CHARS and bool(_NAME_RE.match(value))


def _check_name(value: Any, what: str, kind: str) -> None:
    if not isinstance(value, str) or not _valid_name(value):
        raise ExchangeFileError(
            f"{kind}: invalid {what} {value!r} (1 to {MAX_NAME_CHARS} printable characters)"
        )


def _check_state_vector(name: str, sv: Any) -> None:
    if not isinstance(sv, bytes | bytearray | memoryview):
        raise ExchangeFileError(f"state file: state of document {name!r} is not bytes")
    try:
        decode_state_vector(bytes(sv))
    except UpdateError as exc:
        raise ExchangeFileError(
            f"state file: state of document {name!r} is not a valid state vector ({exc})"
        ) from None


def _read(path: Path, limit: int, decode: _Decoder) -> tuple[Header, dict[str, bytes]]:
    try:
        with path.open("rb") as f:
            # One byte past the limit tells "oversized" apart from "exactly at it"
            # without trusting a stat() that a growing file could outdate.
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise ExchangeFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ExchangeFileError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise ExchangeFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header, parts = decode(data)
    except ExchangeFileError as exc:
        raise ExchangeFileError(f"{path}: {exc}") from None
    return header, parts


def _write_atomic(path: Path, data: bytes) -> None:
    directory = path.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise BranchlineError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise BranchlineError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    # The rename is durable only once the directory entry is on disk.
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        # Some file systems cannot fsync a directory; the data itself is synced.
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
