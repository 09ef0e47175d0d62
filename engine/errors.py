"""The one exception hierarchy of Branchline.

Every error a user can meet says what happened and what to do. ``exit_code`` is
what the CLI exits with: 2 for user mistakes (bad input, unknown names), 1 for
problems of the environment or the data on disk.
"""

from __future__ import annotations


class BranchlineError(Exception):
    """Base of every error Branchline raises on purpose."""

    exit_code = 1


class UserError(BranchlineError):
    """The caller asked for something invalid; nothing was written."""

    exit_code = 2


class SchemaError(UserError):
    """A schema file is invalid; the message names the file, collection and field."""


class ValidationError(UserError):
    """A value or a set of fields does not fit the schema."""


class UnknownCollection(UserError):
    """The collection is not in the node's schema."""


class DuplicateKey(ValidationError):
    """A new record would take a unique key (a voucher number typed by hand)
    that a live record already has; nothing was written."""


class UnknownReference(ValidationError):
    """A reference names a record (by code or id) that this node does not have."""


class RecordNotFound(UserError):
    """No live record with that id or key."""


class RecordDeleted(UserError):
    """The record is deleted; restore it before editing."""


class AmbiguousId(UserError):
    """An id prefix matches more than one id; the message lists candidates."""


class ConflictNotFound(UserError):
    """No open conflict has that id (it may be resolved already)."""


class StoreError(BranchlineError):
    """The node home or its SQLite file cannot be used as asked."""


class StoreUnavailable(StoreError):
    """The relay store's server (PostgreSQL) cannot be reached now: the call
    did nothing; calls fail at once until the next retry (engine.relay.outage)."""


class HomeNotFound(StoreError):
    """There is no node store in the given home directory."""

    exit_code = 2


class HomeExists(StoreError):
    """A node store already exists where a new one was to be created."""

    exit_code = 2


class FormatVersionError(StoreError):
    """The store was written by another, incompatible format version."""


class StoreDamaged(StoreError):
    """The node store file is empty, truncated, overwritten or fails SQLite's
    check; nothing was written to it. The message says what to do
    (``branchline node recover``)."""


class HomeExposed(UserError):
    """A node home holding the relay token is readable (or its files
    replaceable) by other users; sync refuses it unless told otherwise."""


class RecoverRefused(UserError):
    """``node recover`` was asked for a home it must not touch (no store, a
    healthy store, an export of another dataset or node); nothing changed."""


class DatasetMismatch(BranchlineError):
    """Data of one dataset was offered to a node of another dataset."""

    exit_code = 2


class ExchangeFileError(UserError):
    """An export file is damaged, truncated or not a Branchline export."""


class UpdateError(BranchlineError):
    """A CRDT update could not be decoded or applied; nothing was stored."""


class SeriesError(BranchlineError):
    """A voucher number could not be allocated."""


class SeriesExhausted(SeriesError):
    """A leased block range is used up and no provisional numbering is allowed."""


# -- relay (issue 3) ---------------------------------------------------------


class RelayStoreNotFound(StoreError):
    """There is no relay store at the given path."""

    exit_code = 2


class RelayStoreExists(StoreError):
    """A file already exists where a new relay store was to be created."""

    exit_code = 2


class UnknownDataset(UserError):
    """The relay has no dataset of that name (datasets are made by enroll)."""


class UnknownNode(UserError):
    """The dataset has no enrolled node of that name."""


class AuthError(BranchlineError):
    """A node could not be authenticated (unknown node, wrong token). The
    message never says which part was wrong, and never contains a token."""

    exit_code = 2


class NodeRevoked(AuthError):
    """The node's token was right but the node has been revoked."""


class ReadOnlyNode(AuthError):
    """A read-only node tried to write; nothing was stored."""


class UpdateTooLarge(UpdateError):
    """An update is larger than the relay accepts; nothing was stored."""

    exit_code = 2


class PeriodLocked(UserError):
    """An update of a document whose period is locked on the relay was
    refused; nothing of it was stored. The message names document and period."""


class NotAuthor(UserError):
    """The relay refused an update from a node that is not a carrier because
    it would change another node's entries (or remove an entry, or wait for
    changes the relay has not seen, so that its author cannot be checked);
    nothing of it was stored. The message names the document and the entry."""


class RelayLimitError(BranchlineError):
    """A relay limit (documents per dataset, batch size, lease size) was hit."""

    exit_code = 2


class ProtocolError(BranchlineError):
    """A sync-protocol failure (``engine.protocol``), with the wire ``code`` of
    the error table in docs/protocol.md (e.g. ``bad_frame``, ``auth_failed``).

    Like h11, the subclass says whose fault it is: ``LocalProtocolError`` (this
    side asked its session for something invalid), ``RemoteProtocolError`` (the
    peer sent something invalid) and ``PeerRejected`` (the peer ended the session
    with an error frame).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.message = message


class LocalProtocolError(ProtocolError):
    """This side misused its session (wrong state, over a limit, bad argument).
    Nothing was sent and the session state is unchanged; fix the caller."""

    exit_code = 2


class RemoteProtocolError(ProtocolError):
    """The peer sent a frame that is malformed, over a limit or not allowed now.
    The session has queued an error frame for the peer and is closing: send
    ``data_to_send()``, then close the connection."""


class PeerRejected(ProtocolError):
    """The peer ended the session with an error frame (``code``, ``message``):
    e.g. the relay refused the token or serves another dataset."""


class SyncError(BranchlineError):
    """Sync could not complete (relay unreachable, link lost, timeout...)."""

    exit_code = 1


class RelayUnreachable(SyncError):
    """The relay could not be reached or the link broke."""


class SyncTimeout(SyncError):
    """A one-shot sync did not complete in the time given."""


class RelayRefused(SyncError):
    """The relay ended the session with an error frame that needs a person
    (unsupported version, read-only...)."""

    exit_code = 2


class RelayCertificateError(RelayRefused):
    """The relay's TLS certificate failed this node's check (unknown CA,
    expired, wrong name): a person must fix it, retrying will not."""


class UpdatesRefused(RelayUnreachable):
    """The relay refused some of this node's updates and ended the session:
    their documents are set aside as sync failures (``branchline failures``)
    and a new connection carries on with everything else."""


class SyncIncomplete(SyncError):
    """A one-shot sync moved everything it could, but some changes failed to
    go up or come down and wait for a person (``branchline failures``)."""


class FailureNotFound(UserError):
    """No recorded sync failure has that id (it may be resolved already)."""


# -- adapters (issue 5) -------------------------------------------------------


class AdapterError(BranchlineError):
    """An adapter could not be loaded, set up or run."""


class AdapterNotFound(AdapterError):
    """No adapter of that name is installed (entry-point group ``branchline.adapters``)."""

    exit_code = 2


class AdapterConfigError(AdapterError):
    """An adapter's options or config file are invalid, or it does not fit the node's schema."""

    exit_code = 2


class QueryError(UserError):
    """A read-only SQL query failed (syntax, unknown table) or tried to write."""


class ReportingError(AdapterError):
    """The head-office books in PostgreSQL (adapters.pg_books) cannot be fed:
    fed by another reporting home, or never built."""

    exit_code = 2


class ReportingUnreachable(ReportingError):
    """PostgreSQL cannot be reached, or the connection broke; nothing half
    applied (the transaction rolled back). The reporting process retries."""

    exit_code = 1


# -- branch server (issue 12) ---------------------------------------------------


class UserExists(UserError):
    """A workstation user of that name already exists on this node."""


class UnknownUser(UserError):
    """No workstation user of that name on this node."""


class ReadOnlyUser(AuthError):
    """A read-only workstation user tried to write; nothing was written."""


class SyncUnavailable(BranchlineError):
    """The branch server runs no sync loop (no relay configured, or it was
    started without one), so it cannot sync now."""


# -- write-back capture (issue 15) --------------------------------------------


class CaptureError(UserError):
    """A table cannot be captured as asked (no such table, a column that does
    not fit the collection); nothing changed."""


class CaptureNotFound(CaptureError):
    """The table is not captured on this node, or no quarantined change has that id."""
