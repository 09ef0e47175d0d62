"""Error codes carried by ``error`` frames (the table of docs/protocol.md §7).

Every error frame ends the session: its sender closes the connection after
sending it. ``RETRYABLE`` codes mean "reconnect later (with backoff)"; the
others need a person (a new token, another relay, a newer program).
"""

from __future__ import annotations

BAD_FRAME = "bad_frame"
FRAME_TOO_LARGE = "frame_too_large"
UNSUPPORTED_VERSION = "unsupported_version"
AUTH_FAILED = "auth_failed"
WRONG_DATASET = "wrong_dataset"
READ_ONLY = "read_only"
RATE_LIMITED = "rate_limited"
LIMIT_EXCEEDED = "limit_exceeded"
UNKNOWN_DOCUMENT = "unknown_document"
PROTOCOL_VIOLATION = "protocol_violation"
BAD_UPDATE = "bad_update"
UNAVAILABLE = "unavailable"
INTERNAL = "internal"
LOCKED_PERIOD = "locked_period"
NOT_AUTHOR = "not_author"

#: code -> what it means (docs/protocol.md repeats this table).
CODES: dict[str, str] = {
    BAD_FRAME: "the frame cannot be decoded: short, bad header length, header not a JSON "
    "object, unknown type, a field missing or of the wrong type or range",
    FRAME_TOO_LARGE: "a frame, header, payload or reassembled transfer exceeds the limits",
    UNSUPPORTED_VERSION: "hello and relay share no protocol version",
    AUTH_FAILED: "the token is unknown, wrong or revoked for this node",
    WRONG_DATASET: "the node belongs to another dataset than the one named (or served)",
    READ_ONLY: "a read-only node sent an update or a lease request",
    RATE_LIMITED: "the peer sends faster than allowed",
    LIMIT_EXCEEDED: "more updates, sync requests, transfers or leases in flight than allowed",
    UNKNOWN_DOCUMENT: "the document name is not one the relay accepts for this dataset",
    PROTOCOL_VIOLATION: "a well-formed frame that is not allowed in the current state",
    BAD_UPDATE: "a payload is not a valid Yjs update or state vector",
    UNAVAILABLE: "the relay is shutting down, overloaded, or cannot reach its store now",
    INTERNAL: "the peer failed internally (e.g. its store); nothing from this frame was kept",
    LOCKED_PERIOD: "an update of a document whose period the relay has locked (in a refused "
    "frame: the session goes on)",
    NOT_AUTHOR: "an update that would change or remove another node's entries, or that waits "
    "for changes the relay has not seen, from a node that is not a carrier (in a refused "
    "frame: the session goes on)",
}

#: Codes a ``refused`` frame may carry: the relay refuses those updates (not
#: stored, never acknowledged) and the session goes on. ``bad_update`` and
#: ``frame_too_large`` there are about one update the relay's store would
#: not take (bytes it cannot integrate, more than it stores); in an ``error``
#: frame they are about the frame itself and end the session.
REFUSAL_CODES: frozenset[str] = frozenset({LOCKED_PERIOD, NOT_AUTHOR, BAD_UPDATE, FRAME_TOO_LARGE})

#: Codes after which a client should reconnect with backoff.
RETRYABLE: frozenset[str] = frozenset({RATE_LIMITED, UNAVAILABLE, INTERNAL})
