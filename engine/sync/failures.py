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

The rows are kept by ``engine.store.failures`` (the failure's code is a
column there); this module is the policy over them (sans-I/O, no clock:
times are passed in). Each write is one transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import FailureNotFound
from ..node import Node
from ..protocol import codes
from ..store import WriteTxn, meta
from ..store import failures as rows
from ..store.failures import FailureRow

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
class Failure(FailureRow):
    """One sync failure that needs a person.

    ``direction``: ``upload`` (failed to go up) or ``download`` (failed to
    come down). ``records``: the record ids concerned when known (at most
    ``MAX_RECORDS``). ``code``: the relay's error code, ``schema``,
    ``invalid`` or ``local``. ``retrying``: the user asked for a retry that
    has not happened yet. ``held``: local changes of the document that stay
    in the outbox while it is held (uploads only)."""

    collection: str
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


def record_failure(
    node: Node,
    direction: str,
    doc: str,
    code: str,
    message: str,
    at_ms: int,
    records: Iterable[str] | None = None,
) -> int:
    """Record a failure with ``code`` (the relay's code, ``schema``,
    ``invalid`` or ``local``), or count one more attempt of the same
    (direction, document, reason); returns its id. The reason shown is
    ``code: message``. A retry the user asked for is consumed: the failure
    is held again. Earlier failures of the same document and direction that
    were being retried are superseded by this one (their cause changed)."""
    names = sorted(set(records or ()))[:MAX_RECORDS]
    reason = f"{code}: {message}"[:MAX_REASON_CHARS]
    with node.store.transaction() as txn:
        retrying = _retry_ids(node)
        fid = rows.record(txn, direction, doc, code, reason, at_ms, names)
        others = rows.ids_of(txn.conn, direction, [doc])
        stale = [i for i in others if i != fid and i in retrying]
        rows.delete(txn, stale)
        _set_retry_ids(node, txn, retrying - {fid} - set(stale))
        return fid


def resolve(node: Node, direction: str, docs: Iterable[str], *, only_retrying: bool) -> int:
    """Delete the failures of ``docs`` in ``direction`` (their cause is gone:
    the relay took the document, or a pass imported it). With
    ``only_retrying``, only those the user asked to retry. Returns the rows
    deleted."""
    wanted = sorted(set(docs))
    if not wanted:
        return 0
    with node.store.transaction() as txn:
        retrying = _retry_ids(node)
        ids = rows.ids_of(txn.conn, direction, wanted)
        if only_retrying:
            ids = [i for i in ids if i in retrying]
        rows.delete(txn, ids)
        if retrying & set(ids):
            _set_retry_ids(node, txn, retrying - set(ids))
        return len(ids)


def list_failures(node: Node) -> list[Failure]:
    """Every recorded failure, uploads first, then by document and id."""
    retrying = _retry_ids(node)
    held = node.outbox_rows_per_doc()
    return [
        Failure(
            **vars(r),
            collection=r.doc.partition("/")[0],
            retrying=r.id in retrying,
            held=held.get(r.doc, 0) if r.direction == UPLOAD else 0,
        )
        for r in rows.rows(node.store.conn)
    ]


def failure_counts(node: Node) -> dict[str, int]:
    """``{"upload": n, "download": n}``: recorded failures per direction."""
    return {UPLOAD: 0, DOWNLOAD: 0, **rows.counts(node.store.conn)}


def retry(node: Node, ids: Iterable[int] | None = None) -> list[Failure]:
    """Ask for failures ``ids`` (all when None) to be tried again: a running
    sync picks them up within a poll, otherwise the next sync does. Returns
    the failures marked. Raises FailureNotFound (nothing is marked) for an
    unknown id."""
    with node.store.transaction() as txn:
        known = rows.all_ids(txn.conn)
        wanted = known if ids is None else set(ids)
        missing = sorted(wanted - known)
        if missing:
            listed = ", ".join(map(str, missing))
            raise FailureNotFound(
                f"no sync failure with id {listed}; 'branchline failures' lists them"
            )
        _set_retry_ids(node, txn, _retry_ids(node) | wanted)
    return [f for f in list_failures(node) if f.id in wanted]


def retry_codes(node: Node, direction: str, wanted: Iterable[str]) -> list[int]:
    """Mark for a retry (as ``retry`` does) every failure in ``direction``
    whose code is in ``wanted``; returns their ids, sorted. Writes nothing
    when there is none."""
    want = frozenset(wanted)

    def matching() -> set[int]:
        return {fid for fid, _, code in rows.keys(node.store.conn, direction) if code in want}

    if not matching():
        return []  # the usual case: no write transaction at all
    with node.store.transaction() as txn:
        ids = matching()
        retrying = _retry_ids(node)
        if ids - retrying:
            _set_retry_ids(node, txn, retrying | ids)
    return sorted(ids)


def held_uploads(node: Node) -> frozenset[str]:
    """Documents whose local changes are held (an upload failure that the
    user has not asked to retry)."""
    retrying = _retry_ids(node)
    return frozenset(
        doc for fid, doc, _ in rows.keys(node.store.conn, UPLOAD) if fid not in retrying
    )


def held_downloads(node: Node) -> frozenset[str]:
    """Documents left out of sync passes: this node's schema cannot hold
    them (failure code ``schema``) and no retry was asked for."""
    retrying = _retry_ids(node)
    return frozenset(
        doc
        for fid, doc, code in rows.keys(node.store.conn, DOWNLOAD)
        if fid not in retrying and code == SCHEMA
    )


def failed_docs(node: Node, direction: str) -> frozenset[str]:
    """Documents with a recorded failure in ``direction``."""
    return frozenset(doc for _, doc, _ in rows.keys(node.store.conn, direction))


def retrying_docs(node: Node, direction: str) -> frozenset[str]:
    """Documents with a failure in ``direction`` that the user asked to retry."""
    retrying = _retry_ids(node)
    return frozenset(
        doc for fid, doc, _ in rows.keys(node.store.conn, direction) if fid in retrying
    )


# -- internals ---------------------------------------------------------------------


def _retry_ids(node: Node) -> set[int]:
    raw = meta.get(node.store.conn, META_RETRY)
    if raw is None:
        return set()
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return set()  # a damaged marker only loses retry requests, never failures
    return {int(i) for i in value if isinstance(i, int)} if isinstance(value, list) else set()


def _set_retry_ids(node: Node, txn: WriteTxn, ids: set[int]) -> None:
    """Store the retry marks (deleting the key when empty)."""
    if ids:
        meta.put(txn, META_RETRY, orjson.dumps(sorted(ids)).decode())
    else:
        meta.delete(txn, META_RETRY)
