"""Rules every relay store applies the same way: names, periods and their
locks, series keys, the checks of an offered update, and who may write.
Pure functions, no I/O."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import (
    AuthError,
    BranchlineError,
    NodeRevoked,
    PeriodLocked,
    ReadOnlyNode,
    RelayLimitError,
    UnknownDataset,
    UpdateError,
    UpdateTooLarge,
    UserError,
)
from ..names import DATASET_RE, DOC_RE, NODE_RE
from ..tokens import token_matches
from .store import Appended, NodeGrant, UpdateIn

SERIES_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@/-]{0,127}\Z")


def check_dataset(dataset: str) -> None:
    if not isinstance(dataset, str) or not DATASET_RE.match(dataset):
        raise UserError(
            f"invalid dataset name {dataset!r}: use letters, digits, '_', '.', '-' (max 64)"
        )


def check_node(node: str) -> None:
    if not isinstance(node, str) or not NODE_RE.match(node):
        raise UserError(f"invalid node name {node!r}: use letters, digits, '_', '-' (max 32)")


#: A period: a year, or a year and a month.
PERIOD_RE = re.compile(r"^\d{4}(-(0[1-9]|1[0-2]))?\Z")


def check_period(period: str) -> None:
    if not isinstance(period, str) or not PERIOD_RE.match(period):
        raise UserError(f"invalid period {period!r}: give a year or a month, YYYY or YYYY-MM")


def locked_by(dataset: str, doc: str, locked: set[str]) -> PeriodLocked | None:
    """Why ``doc`` may not be written under the ``locked`` periods, or None.
    A year lock covers the year's document and its months' documents; a
    month lock only that month's (not the yearly document)."""
    period = doc.partition("/")[2]
    if not period:
        return None
    hit = period if period in locked else period[:4] if period[:4] in locked else None
    if hit is None:
        return None
    return PeriodLocked(
        f"document {doc!r} is in period {hit!r}, locked on the relay for dataset "
        f"{dataset!r}: the update was not stored; unlock the period "
        f"('branchline relay unlock STORE {dataset} {hit}') to send it"
    )


def check_doc(doc: str) -> None:
    if not isinstance(doc, str) or not DOC_RE.match(doc):
        raise UpdateError(f"invalid document name {doc!r}")


def token_id(hashed: bytes) -> bytes:
    """What a grant keeps to tell its token from a later one: a prefix of the
    salted hash (a random salt per token, so no two tokens share it in practice)."""
    return hashed[:8]


def precheck(u: UpdateIn, max_update_bytes: int) -> BranchlineError | None:
    """Why ``u`` is rejected before the store looks at it (not bytes, too
    large, a bad document name), or None."""
    if not isinstance(u.data, bytes | bytearray | memoryview):
        return UpdateError(f"document {u.doc!r}: update is not bytes")
    if len(u.data) > max_update_bytes:
        return UpdateTooLarge(
            f"document {u.doc!r}: update of {len(u.data)} bytes is larger than the "
            f"relay accepts ({max_update_bytes})"
        )
    if not isinstance(u.doc, str) or not DOC_RE.match(u.doc):
        return UpdateError(f"invalid document name {u.doc!r}")
    return None


def prechecked(
    updates: Sequence[UpdateIn], max_batch: int, max_update_bytes: int
) -> list[Appended | None]:
    """Per update of a batch, its rejection by ``precheck`` or None (to be
    decided by the store). Raises RelayLimitError for more than ``max_batch``."""
    if len(updates) > max_batch:
        raise RelayLimitError(
            f"{len(updates)} updates in one batch; the relay takes at most {max_batch}"
        )
    results: list[Appended | None] = []
    for u in updates:
        err = precheck(u, max_update_bytes)
        results.append(None if err is None else Appended(u.doc, "rejected", error=err))
    return results


def writer_refusal(
    dataset: str, node: str, row: tuple[object, object, object] | None
) -> tuple[BranchlineError | None, bool]:
    """(why ``node`` may not write, or None; whether it is a carrier) from its
    row ``(read_only, revoked_at, carrier)``, None when not enrolled."""
    if row is None:
        return AuthError(f"node {node!r} is not enrolled in dataset {dataset!r}"), False
    if row[1] is not None:
        return NodeRevoked(f"node {node!r} of dataset {dataset!r} has been revoked"), False
    if row[0]:
        return ReadOnlyNode(f"node {node!r} of dataset {dataset!r} is read-only"), False
    return None, bool(row[2])


def check_lease(series_key: str, count: int, max_lease: int) -> None:
    """Raise UserError for a bad series key or count, RelayLimitError for a
    count above ``max_lease``."""
    if not isinstance(series_key, str) or not SERIES_KEY_RE.match(series_key):
        raise UserError(f"invalid series key {series_key!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"a lease needs a count of at least 1, not {count!r}")
    if count > max_lease:
        raise RelayLimitError(
            f"a lease of {count} numbers is more than the relay hands out at once ({max_lease})"
        )


def check_follow(position: int, limit: int) -> None:
    """Raise UserError unless ``logged_after``'s position and limit are sound."""
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
        raise UserError(f"a position is a whole number from 0, not {position!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise UserError(f"a limit is a whole number from 1, not {limit!r}")


def unknown_dataset(dataset: str) -> UnknownDataset:
    return UnknownDataset(f"the relay has no dataset {dataset!r}; enroll a node to create it")


def room_refusal(dataset: str, count: int, max_documents: int) -> RelayLimitError | None:
    """Why a dataset holding ``count`` documents may not get one more, or None."""
    if count >= max_documents:
        return RelayLimitError(
            f"dataset {dataset!r} already has {count} documents, the relay's limit"
        )
    return None


def grant_for(
    dataset: str,
    node: str,
    token: str,
    row: tuple[bytes, bytes, object, object, object] | None,
) -> NodeGrant:
    """The grant of ``token`` given the node's row ``(salt, token_hash,
    read_only, revoked_at, carrier)`` (None when not enrolled). Raises
    AuthError (unknown or wrong; the message does not say which),
    NodeRevoked (right token, revoked node)."""
    # token_matches hashes even for an unknown node, so that timing does
    # not tell an unknown node from a wrong token.
    salt, stored = (row[0], row[1]) if row else (None, None)
    if row is None or not token_matches(salt, stored, token):
        raise AuthError(
            f"authentication failed for node {node!r} of dataset {dataset!r}: "
            "unknown node or dataset, or wrong token"
        )
    if row[3] is not None:
        # Safe to say: the caller proved it holds the node's token.
        raise NodeRevoked(
            f"node {node!r} of dataset {dataset!r} has been revoked; "
            "enroll it again to issue a new token"
        )
    return NodeGrant(dataset, node, bool(row[2]), token_id(row[1]), bool(row[4]))


def lapse_reason(grant: NodeGrant, row: tuple[bytes, object] | None) -> str | None:
    """Why ``grant`` no longer holds given the node's row ``(token_hash,
    revoked_at)`` (None when not enrolled), or None while it holds."""
    who = f"node {grant.node!r} of dataset {grant.dataset!r}"
    if row is None:
        return f"{who} is no longer enrolled"
    if row[1] is not None:
        return f"{who} has been revoked; enroll it again to issue a new token"
    if token_id(row[0]) != grant.token_id:
        return f"{who} was enrolled again: its previous token no longer works"
    return None
