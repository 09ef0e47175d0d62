"""Sync failures as the user sees them (docs/sync.md "Failures"): what failed
to go up or to come down, why, since when and how often, and ``retry``.

Rows live in the node store's ``sync_failures`` table, one per (direction,
document, reason). Only failures that need a person are recorded: a refusal
by the relay (read-only, too large, invalid, unknown document, a period lock)
or a received update this node cannot take (a collection its schema lacks,
bytes that do not decode). Transient causes (link down, timeout, relay busy)
are retried automatically by the transport and never land here.

Quarantine: a document with an upload failure is **held**: none of its
outbox rows go up, so everything else keeps flowing. The unit is the
document because the Yjs updates of one client in one document form a chain:
a replica cannot apply a later update of that chain before the refused one,
so sending them would only park them at the relay and at the other nodes.
A document that failed to come down because this node cannot hold it at all
(its collection is not in the schema) is left out of sync passes until
retried; an update whose bytes did not decode does not hold its document,
and the failure is resolved when a later pass imports that document cleanly.

Upload failures whose cause clears without a person (``AUTO_RETRY``: the
relay refused another node's entries, ``not_author``, which it takes once
that node has published them) are marked for a retry by the driver at the
start of every connection (``retry_codes``).

``retry`` does not delete history: it marks failures in node meta
``sync_retry`` (a JSON list of failure ids) so the driver sends or asks for
their documents again. An upload failure is resolved (its row deleted) when
the relay acknowledges the document's updates; if it is refused again, the
row counts one more attempt and the document is held again.

Every function here runs plain SQLite on the node's store (sans-I/O, no
clock: times are passed in). Each write is one transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import FailureNotFound
from ..node import Node
from ..protocol import codes

UPLOAD = "upload"
DOWNLOAD = "download"
#: Node meta key holding the ids of failures the user asked to retry.
META_RETRY = "sync_retry"
#: Reasons longer than this are cut before they are stored.
MAX_REASON_CHARS = 500
#: Records named by one failure (a refused diff can carry thousands).
MAX_RECORDS = 100
#: Code of a received update this node's schema cannot hold (whole document).
SCHEMA = "schema"
#: Code of a received update whose bytes do not decode.
INVALID = "invalid"
#: Code of an update this node could not even build (local store problem).
LOCAL = "local"
#: Upload failure codes retried at the start of every connection: the relay
#: refused entries of another node, or changes it had not seen yet, which it
#: takes once their own node has published them.
AUTO_RETRY: frozenset[str] = frozenset({codes.NOT_AUTHOR})


@dataclass(frozen=True)
class Failure:
    """One sync failure that needs a person.

    ``direction``: ``upload`` (failed to go up) or ``download`` (failed to
    come down). ``records``: the record ids concerned when known (at most
    ``MAX_RECORDS``). ``code``: the relay's error code, ``schema``,
    ``invalid`` or ``local``. ``retrying``: the user asked for a retry that
    has not happened yet. ``held``: local changes of the document that stay
    in the outbox while it is held (uploads only)."""

    id: int
    direction: str
    doc: str
    collection: str
    records: list[str]
    code: str
    reason: str
    first_at: int
    last_at: int
    attempts: int
    retrying: bool
    held: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "direction": self.direction,
            "document": self.doc,
            "collection": self.collection,
            "records": self.records,
            "code": self.code,
            "reason": self.reason,
            "first_attempt": self.first_at,
            "last_attempt": self.last_at,
            "attempts": self.attempts,
            "retrying": self.retrying,
            "held": self.held,
        }


def code_of(reason: str) -> str:
    """The code a stored reason starts with (``code: message``); reasons of
    older stores without one count as ``local``."""
    head, sep, _ = reason.partition(": ")
    if sep and head and head.replace("_", "").isalnum() and head.islower():
        return head
    return LOCAL


def record_failure(
    node: Node,
    direction: str,
    doc: str,
    reason: str,
    at_ms: int,
    records: Iterable[str] | None = None,
) -> int:
    """Record a failure, or count one more attempt of the same (direction,
    document, reason); returns its id. A retry the user asked for is
    consumed: the failure is held again. Earlier failures of the same
    document and direction that were being retried are superseded by this
    one (their cause changed). ``reason`` should read ``code: message``."""
    names = sorted(set(records or ()))[:MAX_RECORDS]
    stored = orjson.dumps(names).decode() if names else None
    with node.store.transaction() as conn:
        retrying = _retry_ids(node)
        row = conn.execute(
            "INSERT INTO sync_failures (direction, doc, record, reason, first_at, last_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (direction, doc, reason) DO UPDATE SET "
            "attempts = attempts + 1, last_at = excluded.last_at, "
            "record = COALESCE(excluded.record, record) RETURNING id",
            (direction, doc, stored, reason[:MAX_REASON_CHARS], at_ms, at_ms),
        ).fetchone()
        fid = int(row[0])
        stale = [
            int(r[0])
            for r in conn.execute(
                "SELECT id FROM sync_failures WHERE direction = ? AND doc = ? AND id != ?",
                (direction, doc, fid),
            )
            if int(r[0]) in retrying
        ]
        conn.executemany("DELETE FROM sync_failures WHERE id = ?", [(i,) for i in stale])
        _set_retry_ids(node, retrying - {fid} - set(stale))
        return fid


def resolve(node: Node, direction: str, docs: Iterable[str], *, only_retrying: bool) -> int:
    """Delete the failures of ``docs`` in ``direction`` (their cause is gone:
    the relay took the document, or a pass imported it). With
    ``only_retrying``, only those the user asked to retry. Returns the rows
    deleted."""
    wanted = sorted(set(docs))
    if not wanted:
        return 0
    with node.store.transaction() as conn:
        retrying = _retry_ids(node)
        ids = [
            int(r[0])
            for r in conn.execute(
                f"SELECT id FROM sync_failures WHERE direction = ? AND doc IN ({_marks(wanted)})",
                (direction, *wanted),
            )
        ]
        if only_retrying:
            ids = [i for i in ids if i in retrying]
        conn.executemany("DELETE FROM sync_failures WHERE id = ?", [(i,) for i in ids])
        if retrying & set(ids):
            _set_retry_ids(node, retrying - set(ids))
        return len(ids)


def list_failures(node: Node) -> list[Failure]:
    """Every recorded failure, uploads first, then by document and id."""
    conn = node.store.conn
    retrying = _retry_ids(node)
    held = dict(
        conn.execute("SELECT doc, COUNT(*) FROM updates WHERE pending = 1 GROUP BY doc").fetchall()
    )
    out = []
    for fid, direction, doc, record, reason, first_at, last_at, attempts in conn.execute(
        "SELECT id, direction, doc, record, reason, first_at, last_at, attempts "
        "FROM sync_failures ORDER BY direction DESC, doc, id"
    ):
        out.append(
            Failure(
                id=int(fid),
                direction=str(direction),
                doc=str(doc),
                collection=str(doc).partition("/")[0],
                records=_records(record),
                code=code_of(str(reason)),
                reason=str(reason),
                first_at=int(first_at),
                last_at=int(last_at),
                attempts=int(attempts),
                retrying=int(fid) in retrying,
                held=int(held.get(doc, 0)) if direction == UPLOAD else 0,
            )
        )
    return out


def failure_counts(node: Node) -> dict[str, int]:
    """``{"upload": n, "download": n}``: recorded failures per direction."""
    out = {UPLOAD: 0, DOWNLOAD: 0}
    for direction, count in node.store.conn.execute(
        "SELECT direction, COUNT(*) FROM sync_failures GROUP BY direction"
    ):
        out[str(direction)] = int(count)
    return out


def retry(node: Node, ids: Iterable[int] | None = None) -> list[Failure]:
    """Ask for failures ``ids`` (all when None) to be tried again: a running
    sync picks them up within a poll, otherwise the next sync does. Returns
    the failures marked. Raises FailureNotFound (nothing is marked) for an
    unknown id."""
    with node.store.transaction() as conn:
        known = {int(r[0]) for r in conn.execute("SELECT id FROM sync_failures")}
        wanted = known if ids is None else set(ids)
        missing = sorted(wanted - known)
        if missing:
            listed = ", ".join(map(str, missing))
            raise FailureNotFound(
                f"no sync failure with id {listed}; 'branchline failures' lists them"
            )
        _set_retry_ids(node, _retry_ids(node) | wanted)
    return [f for f in list_failures(node) if f.id in wanted]


def retry_codes(node: Node, direction: str, wanted: Iterable[str]) -> list[int]:
    """Mark for a retry (as ``retry`` does) every failure in ``direction``
    whose code is in ``wanted``; returns their ids, sorted. Writes nothing
    when there is none."""
    want = frozenset(wanted)

    def matching() -> set[int]:
        return {
            int(fid)
            for fid, reason in node.store.conn.execute(
                "SELECT id, reason FROM sync_failures WHERE direction = ?", (direction,)
            )
            if code_of(str(reason)) in want
        }

    if not matching():
        return []  # the usual case: no write transaction at all
    with node.store.transaction():
        ids = matching()
        retrying = _retry_ids(node)
        if ids - retrying:
            _set_retry_ids(node, retrying | ids)
    return sorted(ids)


def held_uploads(node: Node) -> frozenset[str]:
    """Documents whose local changes are held (an upload failure that the
    user has not asked to retry)."""
    retrying = _retry_ids(node)
    return frozenset(
        str(doc)
        for fid, doc in node.store.conn.execute(
            "SELECT id, doc FROM sync_failures WHERE direction = ?", (UPLOAD,)
        )
        if int(fid) not in retrying
    )


def held_downloads(node: Node) -> frozenset[str]:
    """Documents left out of sync passes: this node's schema cannot hold
    them (failure code ``schema``) and no retry was asked for."""
    retrying = _retry_ids(node)
    return frozenset(
        str(doc)
        for fid, doc, reason in node.store.conn.execute(
            "SELECT id, doc, reason FROM sync_failures WHERE direction = ?", (DOWNLOAD,)
        )
        if int(fid) not in retrying and code_of(str(reason)) == SCHEMA
    )


def failed_docs(node: Node, direction: str) -> frozenset[str]:
    """Documents with a recorded failure in ``direction``."""
    return frozenset(
        str(doc)
        for (doc,) in node.store.conn.execute(
            "SELECT DISTINCT doc FROM sync_failures WHERE direction = ?", (direction,)
        )
    )


def retrying_docs(node: Node, direction: str) -> frozenset[str]:
    """Documents with a failure in ``direction`` that the user asked to retry."""
    retrying = _retry_ids(node)
    return frozenset(
        str(doc)
        for fid, doc in node.store.conn.execute(
            "SELECT id, doc FROM sync_failures WHERE direction = ?", (direction,)
        )
        if int(fid) in retrying
    )


# -- internals ---------------------------------------------------------------------


def _retry_ids(node: Node) -> set[int]:
    row = node.store.conn.execute("SELECT value FROM meta WHERE key = ?", (META_RETRY,)).fetchone()
    if row is None:
        return set()
    try:
        value = orjson.loads(row[0])
    except orjson.JSONDecodeError:
        return set()  # a damaged marker only loses retry requests, never failures
    return {int(i) for i in value if isinstance(i, int)} if isinstance(value, list) else set()


def _set_retry_ids(node: Node, ids: set[int]) -> None:
    """Inside a transaction: store the retry marks (deleting the key when empty)."""
    if ids:
        node.store.set_meta(META_RETRY, orjson.dumps(sorted(ids)).decode())
    else:
        node.store.conn.execute("DELETE FROM meta WHERE key = ?", (META_RETRY,))


def _records(stored: object) -> list[str]:
    if stored is None:
        return []
    text = str(stored)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return [text]  # a single id, as older rows may hold
    if isinstance(value, list):
        return [str(v) for v in value]
    return [text]


def _marks(items: list[str]) -> str:
    return ", ".join("?" * len(items))
