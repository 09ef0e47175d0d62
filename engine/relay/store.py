"""The relay's durable store: the interface the relay server uses.

One ``RelayStore`` holds, for every dataset, the enrolled nodes (tokens only
as salted hashes), a CRDT update log per document with snapshots, and the
company-wide ``blocks`` series counters. ``SqliteRelayStore``
(``sqlite_store.py``) is the embedded default; ``PgRelayStore``
(``pg_store.py``) lets several relay processes share one PostgreSQL store.
``engine.relay.testing`` holds the tests every store must pass.

Contract shared by every method:

- A method that writes is durable when it returns: after a crash (even
  SIGKILL or power loss) the write is there, or the method had not returned.
  A method that raises wrote nothing (``append_updates`` reports per update
  instead, see there).
- Errors are ``BranchlineError`` subclasses from ``engine.errors``; user
  mistakes (bad names, unknown dataset or node) are ``UserError``.
- Tokens never appear in a message, a log line or the store file.

Positions: every update a dataset stores gets the next **position** of that
dataset (1, 2, ...), in commit order across every process sharing the store,
with no gap a reader can see. ``head``, ``logged_after`` and ``wait_changes``
let a relay follow what other relays on the same store committed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..errors import (
    BranchlineError,
    NotAuthor,
    PeriodLocked,
    UpdateError,
    UpdateTooLarge,
)
from ..protocol import codes

EMPTY_UPDATE = b"\x00\x00"  # a Yjs update holding nothing
EMPTY_STATE_VECTOR = b"\x00"  # the state vector of an empty document


@dataclass(frozen=True)
class Enrollment:
    """A freshly issued token (shown once) and whether it replaced the
    node's earlier token, which no longer authenticates."""

    dataset: str
    node: str
    token: str
    read_only: bool
    replaced: bool
    dataset_created: bool
    carrier: bool = False

    def __repr__(self) -> str:  # keeps the token out of logs and tracebacks
        return (
            f"Enrollment(dataset={self.dataset!r}, node={self.node!r}, token=<hidden>, "
            f"read_only={self.read_only}, carrier={self.carrier}, replaced={self.replaced})"
        )


@dataclass(frozen=True)
class NodeGrant:
    """What an authenticated node may do in its dataset. ``token_id`` tells
    the token it was granted for from a later one (not the token, nor enough
    to find it); ``lapsed`` compares it."""

    dataset: str
    node: str
    read_only: bool
    token_id: bytes = field(default=b"", repr=False)
    carrier: bool = False  # may publish other nodes' entries (docs/reliability.md)


@dataclass(frozen=True)
class UpdateIn:
    """One update offered to ``append_updates``: document, Yjs update bytes,
    and the node that sent it."""

    doc: str
    data: bytes
    node: str


@dataclass(frozen=True)
class Appended:
    """The outcome of one update of an ``append_updates`` batch.

    ``stored``: new content, logged under ``seq``. ``duplicate``: everything
    in it was already held, nothing logged (acknowledge it anyway).
    ``rejected``: nothing stored; ``error`` says why (bad document name or
    bytes, too large, node unknown, revoked or read-only, a locked period,
    ``NotAuthor``).
    """

    doc: str
    status: Literal["stored", "duplicate", "rejected"]
    seq: int | None = None
    error: BranchlineError | None = None
    position: int | None = None  # the dataset's position of a stored update

    @property
    def ok(self) -> bool:
        """True when the update may be acknowledged to its sender."""
        return self.status != "rejected"


@dataclass(frozen=True)
class Logged:
    """One stored update as ``logged_after`` gives it back."""

    position: int  # the dataset's position after this update; increasing in commit order
    doc: str
    data: bytes
    node: str


@dataclass(frozen=True)
class NodeInfo:
    name: str
    read_only: bool
    revoked: bool
    enrolled_at: int  # ms since the epoch
    revoked_at: int | None
    carrier: bool = False


@dataclass(frozen=True)
class DocumentInfo:
    name: str
    updates: int  # updates stored since the document was created
    bytes: int  # bytes of those updates
    log_rows: int  # rows not yet folded into the snapshot


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    created_at: int
    nodes: list[NodeInfo] = field(default_factory=list)
    documents: list[DocumentInfo] = field(default_factory=list)
    series: dict[str, int] = field(default_factory=dict)  # series key -> next number
    locks: list[str] = field(default_factory=list)  # locked periods, sorted


class RelayStore(ABC):
    """The relay's durable state. See the module docstring for the contract
    shared by all methods."""

    # -- nodes -------------------------------------------------------------

    @abstractmethod
    def enroll(
        self, dataset: str, node: str, *, read_only: bool = False, carrier: bool = False
    ) -> Enrollment:
        """Issue a new token for ``node`` of ``dataset`` (the dataset is created
        on its first enroll). Re-enrolling a node (also a revoked one) replaces
        its token: the old one stops working once this returns, and the node's
        flags become ``read_only`` and ``carrier`` (a carrier may publish other
        nodes' entries, see ``append_updates``). Only a salted hash of the token is
        stored; the caller must show the token once and forget it.

        Raises UserError for a dataset or node name that is not valid.
        """

    @abstractmethod
    def revoke(self, dataset: str, node: str) -> bool:
        """Revoke a node: its token no longer authenticates and its writes are
        rejected from the moment this returns. Returns False when it was
        already revoked. Raises UnknownDataset, UnknownNode."""

    @abstractmethod
    def revocations(self) -> int:
        """A counter that changes whenever a node is revoked or its token
        replaced (enrolled again), by any process: a server polls it cheaply
        and calls ``lapsed`` for its connections only when it changed."""

    @abstractmethod
    def lapsed(self, grants: Sequence[NodeGrant]) -> dict[NodeGrant, str]:
        """The grants among ``grants`` that no longer hold, each with why (one
        line, no token): node revoked, no longer enrolled, or enrolled again
        with a new token. Writes nothing."""

    @abstractmethod
    def authenticate(self, dataset: str, node: str, token: str) -> NodeGrant:
        """Check a node's token in constant time. Raises AuthError (unknown
        dataset or node, or wrong token; the message does not say which) or
        NodeRevoked (right token, revoked node). Writes nothing."""

    @abstractmethod
    def note_seen(self, dataset: str, node: str, at_ms: int) -> None:
        """Record that ``node`` of ``dataset`` opened a session at ``at_ms``
        (wall ms); an older time never replaces a newer one. Durable."""

    @abstractmethod
    def last_seen(self) -> dict[tuple[str, str], int]:
        """(dataset, node) -> wall ms of the node's latest session; nodes
        never seen are missing."""

    # -- updates -----------------------------------------------------------

    @abstractmethod
    def append_updates(self, dataset: str, updates: Sequence[UpdateIn]) -> list[Appended]:
        """Store a batch of updates in ONE transaction (group commit); durable
        when this returns. Results are in the order of ``updates``.

        Updates whose content the store already holds are not stored again
        (``duplicate``). An update that is invalid, too large, or sent by a
        node that is not enrolled, revoked or read-only is ``rejected`` and
        stored in no part; the others of the batch are unaffected.

        Authorship: an update from a node that is not a carrier is rejected
        with ``NotAuthor`` when, integrated into the document, it would change
        an entry (map key ``record|node``) of another node, remove any entry,
        or leave a part (items or deletions) waiting for changes the store
        has not seen (whose effect could not be checked). A carrier's updates
        are not checked.

        Raises UnknownDataset (nothing stored), RelayLimitError for a batch
        larger than the limit, StoreError when the commit fails (nothing of
        the batch stored: acknowledge nothing).
        """

    @abstractmethod
    def head(self, dataset: str) -> int:
        """The dataset's position after its latest committed append (0 before
        any), as committed by any process. Raises UnknownDataset."""

    @abstractmethod
    def logged_after(self, dataset: str, position: int, limit: int) -> list[Logged] | None:
        """The stored updates with a position above ``position``, oldest first,
        at most ``limit`` (capped by the store's own limit); None when some of
        them were folded into a snapshot by compaction and their rows are
        gone: the caller then resyncs by state vector. A compaction keeps a
        folded row while it is within the store's ``keep_positions`` of the
        head, so a reader that follows the head closely gets rows. Raises
        UnknownDataset, UserError for a negative position or a limit below 1."""

    @abstractmethod
    def wait_changes(self, timeout_s: float) -> set[str]:
        """Block up to ``timeout_s`` seconds; return the datasets whose head
        may have moved by a commit of any process (this one included) since
        the previous call (since the store was opened, for the first call);
        empty on timeout. May name a dataset whose head did not move (never
        the reverse). Call it from one thread at a time."""

    @abstractmethod
    def state_vector(self, dataset: str, doc: str) -> bytes:
        """The Yjs state vector of what the relay holds of ``doc`` (the empty
        state vector for a document it does not have). Raises UnknownDataset,
        UpdateError for an invalid document name."""

    @abstractmethod
    def diff(self, dataset: str, doc: str, state_vector: bytes | None = None) -> bytes:
        """The Yjs update a replica in ``state_vector`` lacks (everything when
        None; ``EMPTY_UPDATE`` for a document the relay does not have).
        Raises UnknownDataset, UpdateError for an invalid state vector or
        document name."""

    @abstractmethod
    def documents(self, dataset: str) -> list[str]:
        """Names of the dataset's documents, sorted. Raises UnknownDataset."""

    @abstractmethod
    def compact(self, dataset: str, doc: str | None = None) -> int:
        """Fold the update log of one document (or all of the dataset) into its
        snapshot by replay. Atomic per document: an interrupted compaction
        leaves the previous snapshot and log. Returns the log rows folded (a
        reload no longer replays them; their rows may stay a while for
        ``logged_after``). Raises UnknownDataset."""

    # -- period locks ------------------------------------------------------

    @abstractmethod
    def lock_period(self, dataset: str, period: str) -> bool:
        """Lock ``period`` (``YYYY`` or ``YYYY-MM``) of ``dataset``: from the
        moment this returns, ``append_updates`` rejects (``PeriodLocked``)
        every update of a document of that period: ``coll/YYYY`` and
        ``coll/YYYY-MM`` for a year lock, only ``coll/YYYY-MM`` for a month
        lock (a yearly document is not covered by a month lock). Reading
        (diff, state vector) goes on. Returns False when it was locked
        already. Raises UnknownDataset, UserError for a bad period."""

    @abstractmethod
    def unlock_period(self, dataset: str, period: str) -> bool:
        """Lift a lock; False when ``period`` was not locked. Raises
        UnknownDataset, UserError for a bad period."""

    # -- series ------------------------------------------------------------

    @abstractmethod
    def lease(
        self, dataset: str, series_key: str, count: int, *, node: str | None = None
    ) -> tuple[int, int]:
        """Lease ``count`` numbers of the company-wide series ``series_key``:
        an inclusive range ``(first, last)`` no caller ever got or will get,
        across restarts and concurrent callers (threads or processes). Durable
        before it returns. Raises UnknownDataset, UserError for a bad key or
        count, RelayLimitError above the lease limit."""

    # -- inspection --------------------------------------------------------

    @abstractmethod
    def status(self) -> list[DatasetInfo]:
        """Every dataset with its nodes, documents and series (never tokens)."""

    @abstractmethod
    def close(self) -> None:
        """Release the store; later calls are not allowed."""


def refusal_code(error: BranchlineError | None) -> str | None:
    """The code of the ``refused`` frame that answers an update the store
    rejected with ``error`` while the session goes on, or None when the
    rejection must end the session (the node may no longer write)."""
    if isinstance(error, PeriodLocked):
        return codes.LOCKED_PERIOD
    if isinstance(error, NotAuthor):
        return codes.NOT_AUTHOR
    if isinstance(error, UpdateTooLarge):
        return codes.FRAME_TOO_LARGE
    if isinstance(error, UpdateError):
        return codes.BAD_UPDATE
    return None
