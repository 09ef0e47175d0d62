"""Sans-I/O glue between a ``Node`` and a ``ClientSession`` (docs/sync.md).

The driver does no network I/O and owns no clock: the transport feeds it the
frames it receives (``receive``), the time (``tick``), asks it to look for
other processes' writes (``poll``) and sends what ``data_to_send`` returns.
It reads and writes the node's SQLite store (import, ack, failures, meta).

Guarantees:

- Upload order: documents go into the sync pass catalogs first, then voucher
  books, then by schema priority, and for partitioned books the current
  period first, then the others newest first.
- Within one document, local updates leave in outbox seq order (Yjs updates
  of one client must not be reordered): a document's state diff is answered
  before any live row of it is sent, and live rows go out in seq order.
- No live row leaves while the pass still has relay states to answer, so a
  voucher never overtakes the catalog diff it may reference.
- An outbox row is cleared (``Node.ack``) only when the relay acknowledged an
  update that carried it: a live row under its own seq as ref, or a state
  diff under a synthetic ref that maps to the rows read *before* the diff was
  computed (a row committed in between is in the diff but not in the map: it
  is sent again later, which is harmless).
- Unless the relay's welcome says this node is a carrier, a state is
  answered with an own-only diff (``Node.export_parts(own_only=True)``): the
  items this node wrote and their deletions, plus its outbox rows, never
  another node's entries, which a relay checking authorship would refuse
  (``not_author``). A carrier answers with the whole diff.
- A received update that cannot be imported is recorded in ``sync_failures``
  (direction ``download``) and the session goes on.
- An update the relay refuses holds back only its document: the failure is
  recorded (``engine.sync.failures``) and that document's outbox rows are
  left alone until ``retry``; every other document keeps flowing. A
  ``refused`` frame (``UpdateRefused``, e.g. a locked period) leaves the
  session open; an error frame ends it with ``UpdatesRefused`` and the next
  connection goes on. Failures that clear by themselves (``not_author``:
  the relay lacked changes the refused update builds on, say after updates
  overtook one another) get one more pass of their document on the same
  connection, then are retried at the start of every connection
  (``failures.AUTO_RETRY``).
- After the first full sync of a connection, received records still waiting
  for a record they refer to are shown (``Node.settle_waiting``): each is
  then a ``dangling_reference`` conflict.
- After a completed pass without download failures of voucher books, the
  node's numbering is known (``Node.confirm_numbering``): a rebuilt home's
  provisional numbers become final.
- While live, ``blocks`` series reserves below their target are refilled
  (also after a local booking by another process), with capped exponential
  backoff after a refusal.

The driver does not care which thread runs it, as long as it is one at a
time: the transport runs every call on the thread that owns the ``Node``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .. import diffs
from .. import series as series_mod
from ..crdt.statevec import decode_state_vector
from ..errors import (
    AuthError,
    DatasetMismatch,
    RelayRefused,
    RelayUnreachable,
    RemoteProtocolError,
    UpdateError,
    UpdatesRefused,
)
from ..names import DOC_RE, META_TOKEN_REFUSED
from ..node import EMPTY_UPDATE, IMPORT_SLICE_BYTES, Node
from ..protocol import (
    EMPTY_STATE_VECTOR,
    Acked,
    ClientSession,
    DiffReceived,
    ErrorReceived,
    Event,
    HeartbeatTimeout,
    LeaseDenied,
    LeaseGranted,
    Opened,
    RemoteState,
    SessionState,
    SyncComplete,
    UpdateReceived,
    UpdateRefused,
    codes,
)
from ..store import outbox
from . import failures as fl

#: Refs of state-diff answers and lease requests start here; outbox seqs (the
#: refs of live updates) are SQLite rowids and stay far below.
SYNTHETIC_REF_BASE = 1 << 52
#: Largest update one sync answer sends; a larger diff goes in several parts
#: made of the outbox rows (the relay refuses single updates above its limit,
#: 128 MiB by default; a 100,000-record catalog is about 42 MB).
MAX_ANSWER_BYTES = 64 << 20
#: Received live updates of one document merged at once (pycrdt's merge is
#: quadratic in their number; a frame holds up to 1,024).
LIVE_MERGE = 128
#: Live outbox rows read per ``poll`` (also bounded by the session's in-flight room).
MAX_LIVE_BATCH = 256
#: While live, blocks reserves are checked this often (and after other
#: processes' commits, e.g. a booking that used a leased number).
LEASE_CHECK_MS = 1_000
#: After a refused lease, the series waits min(cap, base * 2**(n-1)) before
#: asking again (n: refusals in a row on this connection).
LEASE_RETRY_BASE_MS = 1_000
LEASE_RETRY_CAP_MS = 60_000

ProgressCallback = Callable[[str, int, int], None]
_QUOTED = re.compile(r"'([^']*)'")

# Codes after which reconnecting cannot help: a person must act.
_FATAL_CODES = frozenset(
    {codes.AUTH_FAILED, codes.WRONG_DATASET, codes.UNSUPPORTED_VERSION, codes.READ_ONLY}
)
# Codes by which the relay refuses an update it received (``refused_docs``
# finds the document the message names, see engine.relay.hub.rejection). A
# code this version does
# not know (say a future period lock) is taken as such a refusal too.
_REFUSAL_CODES = frozenset(
    {codes.BAD_UPDATE, codes.FRAME_TOO_LARGE, codes.UNKNOWN_DOCUMENT, codes.READ_ONLY}
)


@dataclass
class Progress:
    """Progress of one collection in the current pass, in **records**.

    ``total``: records with local changes to upload (counted from the outbox
    when the pass starts) plus records received so far; ``done``: records
    whose upload the relay acknowledged plus records received and imported.
    What a diff brings is known only once it is imported, so ``total`` grows
    while diffs arrive. ``docs_done``/``docs_total``: the pass's documents
    exchanged (diff imported and answer acknowledged)."""

    done: int = 0
    total: int = 0
    docs_done: int = 0
    docs_total: int = 0


@dataclass
class _DocPass:
    collection: str
    downloaded: bool = False
    answered: bool = False
    refs: set[int] = field(default_factory=set)  # answer parts in flight
    done: bool = False


@dataclass
class _Lease:
    collection: str
    year: int | None


@dataclass
class DriverStats:
    """Counters of one driver (one connection)."""

    imported: int = 0
    live_sent: int = 0
    diffs_sent: int = 0
    acked_rows: int = 0
    download_failures: int = 0
    passes_completed: int = 0
    first_update_ms: int | None = None  # wall ms of the first update received
    extra: dict[str, int] = field(default_factory=dict)


def refused_docs(ev: ErrorReceived) -> list[str]:
    """The documents an error frame refusing an update may be about, most
    certain first: its ``doc`` field when the frame has one (the protocol's
    error frame has none yet), then the names quoted in the message (the relay
    writes ``update of 'DOC' not stored: ...``)."""
    doc = getattr(ev, "doc", None)
    named = [doc] if isinstance(doc, str) and DOC_RE.match(doc) else []
    return named + [n for n in _QUOTED.findall(ev.message) if DOC_RE.match(n)]


def upload_order(
    node: Node, docs: Iterable[str], today: dt.date, first: Iterable[str] = ()
) -> list[str]:
    """``docs`` in upload order: the documents ``first`` names (those holding
    urgent pending records and what they refer to, ``engine.store.urgent``),
    then the rest; within each, catalogs before voucher books, then schema
    priority, then (partitioned books) the current period first and the
    others newest first. Documents of collections the schema lacks come last
    (their import fails and is recorded)."""
    rank = {c.name: i for i, c in enumerate(node.schema.ordered())}
    current = {f"{today.year:04d}-{today.month:02d}", f"{today.year:04d}"}
    early = set(first)

    def key(doc: str) -> tuple[int, int, int]:
        name, _, period = doc.partition("/")
        return (0 if doc in early else 1, rank.get(name, len(rank)), 0 if period in current else 1)

    ordered = sorted(set(docs), key=lambda d: d.partition("/")[2], reverse=True)
    ordered.sort(key=key)  # stable: newest first within a rank
    return ordered


class SyncDriver:
    """Connects one ``Node`` to one ``ClientSession`` (one connection).

    ``wall_ms`` tells wall-clock time (for ``last_sync`` and failure dates);
    ``on_progress(collection, done, total)`` is called, with record counts
    (see ``Progress``), when a collection's progress changes. Not
    thread-safe: one call at a time. A new connection needs a new driver (and
    a new session): everything unacknowledged is sent again then.
    """

    def __init__(
        self,
        node: Node,
        session: ClientSession,
        *,
        wall_ms: Callable[[], int],
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self.node = node
        self.session = session
        self._wall_ms = wall_ms
        self._on_progress = on_progress
        self.stats = DriverStats()
        self.progress: dict[str, Progress] = {}
        self.opened: Opened | None = None
        self._docs: dict[str, _DocPass] = {}
        self._to_answer: set[str] = set()
        self._answers: deque[tuple[str, bytes]] = deque()  # RemoteStates awaiting room
        self._inflight: dict[int, list[int]] = {}  # ref -> outbox seqs it carries
        self._ref_doc: dict[int, str] = {}  # diff ref -> document
        self._live_doc: dict[int, str] = {}  # live ref -> document
        self._ref_records: dict[int, int] = {}  # diff ref -> records it newly carries
        self._sent: set[int] = set()  # outbox seqs sent or carried this connection
        self._cursor = 0  # live rows up to this seq were sent or skipped
        self._next_ref = SYNTHETIC_REF_BASE
        self._leases: dict[int, _Lease] = {}
        self._leasing: set[str] = set()  # series keys with a lease request pending
        self._lease_denials: dict[str, int] = {}  # series key -> refusals in a row
        self._lease_retry_at: dict[str, int] = {}  # series key -> monotonic ms
        self._lease_checked_ms: int | None = None
        self._changes_seen = node.changes_seen
        self._now_ms: int | None = None  # monotonic, from the latest tick
        #: Documents whose local changes are held back by an upload failure.
        self.held: frozenset[str] = frozenset()
        self._held_down: frozenset[str] = frozenset()
        self._retry_up: frozenset[str] = frozenset()
        self._retry_down: frozenset[str] = frozenset()
        self._failed_down: frozenset[str] = frozenset()  # docs with download failures
        self._asked_again: set[str] = set()  # retried downloads requested this connection
        # Documents refused with ``not_author`` that get one more pass on this
        # connection (to pass), and those that had it (never twice).
        self._repass: set[str] = set()
        self._repassed: set[str] = set()
        #: Documents this connection set aside because the relay refused them.
        self.quarantined: list[str] = []
        #: ``{"upload": n, "download": n}`` failures waiting for a person when
        #: a one-shot sync ended (set by ``engine.transport.node_sync``).
        self.failures: dict[str, int] = {}
        #: Set when the relay opened the session read-only while this node has
        #: local changes: they can never be uploaded (recorded as upload failures).
        self.upload_refused: str | None = None
        #: Records still waiting for a reference were settled after this
        #: connection's first full sync (``Node.settle_waiting``).
        self.settled = False

    # -- state ---------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """The pass completed, every update sent is acknowledged and the
        node's outbox holds nothing but held documents (failures waiting for
        a person: ``engine.sync.failures``)."""
        return (
            self.session.synced
            and not self._answers
            and not self._pending_retry()
            and not self._has_pending()
        )

    @property
    def live(self) -> bool:
        """The session is OPEN and the first pass answered every relay state:
        new local writes are now shipped as live updates."""
        return (
            self.session.state is SessionState.OPEN
            and self.opened is not None
            and not self._to_answer
        )

    # -- driving -------------------------------------------------------------

    def receive(self, frame: bytes) -> None:
        """Handle one received websocket message.

        Raises DatasetMismatch (the relay serves another dataset; the message
        names both), AuthError (token refused), RelayRefused (another error
        frame that needs a person), UpdatesRefused (the relay refused updates:
        their documents are now held, reconnect), RelayUnreachable (a
        retryable error frame or a protocol error: reconnect), StoreError
        when the node's store fails.
        """
        try:
            events = self.session.receive_frame(frame)
        except RemoteProtocolError as exc:
            if exc.code == codes.WRONG_DATASET:
                raise DatasetMismatch(exc.message) from None
            if exc.code == codes.UNSUPPORTED_VERSION:
                raise RelayRefused(exc.message) from None
            raise RelayUnreachable(f"the relay broke the protocol: {exc}") from None
        self.handle(events)

    def tick(self, now_ms: int) -> None:
        """Feed monotonic time (heartbeats, lease retries). Raises
        RelayUnreachable when the link has been silent for too long."""
        self._now_ms = now_ms
        self.handle(self.session.tick(now_ms))

    def poll(self) -> int:
        """Pick up other processes' commits (``Node.refresh``), including
        ``retry`` requests; refill ``blocks`` reserves below target; send new
        outbox rows of documents that are not held as live updates, in seq
        order, within the session's in-flight room. Returns the rows sent."""
        # Another caller (the capture pump, a local write) may have taken
        # ``refresh``'s True: compare counts instead, or a ``retry`` is missed.
        self.node.refresh()
        changed = self.node.changes_seen != self._changes_seen
        self._changes_seen = self.node.changes_seen
        if changed and self.opened is not None:
            self._load_failures()
        if self.live and not self.session.read_only:
            self._maybe_refill(changed)
        self._ask_again()
        if not self.settled and self.synced:
            # A full sync without the record a waiting one refers to: it is
            # not coming, so show the waiting record as a dangling reference.
            self.settled = True
            self.node.settle_waiting()
        return self._ship_live()

    def data_to_send(self) -> list[bytes]:
        """Frames to send now, in order (one websocket message each)."""
        return self.session.data_to_send()

    def handle(self, events: list[Event]) -> None:
        """Perform what ``events`` call for (see the module docstring)."""
        live: list[UpdateReceived] = []
        for ev in events:
            if isinstance(ev, UpdateReceived):
                live.append(ev)
                continue
            if live:
                self._import_live(live)
                live = []
            if isinstance(ev, Opened):
                self._opened(ev)
            elif isinstance(ev, DiffReceived):
                received = self._import(ev.doc, ev.data, from_pass=True)
                entry = self._docs.get(ev.doc)
                if entry is not None:
                    entry.downloaded = True
                    if received:
                        prog = self.progress[entry.collection]
                        prog.total += received
                        prog.done += received
                        self._report(entry.collection, prog)
                    self._maybe_done(ev.doc)
            elif isinstance(ev, RemoteState):
                self._answers.append((ev.doc, ev.state_vector))
            elif isinstance(ev, Acked):
                self._acked(ev.refs)
            elif isinstance(ev, UpdateRefused):
                self._refused(ev)
            elif isinstance(ev, SyncComplete):
                self.stats.passes_completed += 1
                with self.node.store.transaction():
                    self.node.store.set_meta("last_sync", str(self._wall_ms()))
                if not any(self._numbered(doc) for doc in self._failed_down):
                    # Everything the relay holds of this node's vouchers is
                    # here and counted: provisional numbers become final.
                    self.node.confirm_numbering()
            elif isinstance(ev, LeaseGranted):
                lease = self._leases.pop(ev.ref)
                self._leasing.discard(ev.series)
                self._lease_denials.pop(ev.series, None)
                self.node.add_block(lease.collection, ev.first, ev.last, lease.year)
            elif isinstance(ev, LeaseDenied):
                self._lease_denied(ev)
            elif isinstance(ev, ErrorReceived):
                self._error(ev)
            elif isinstance(ev, HeartbeatTimeout):
                raise RelayUnreachable(
                    f"nothing heard from the relay for {ev.silent_ms} ms; the link is dead"
                )
        if live:
            self._import_live(live)
        self._answer_states()
        if self._repass:
            self._ask_again()  # as soon as the pass in progress ends
        if self.live:
            self._ship_live()

    def refill(self) -> None:
        """Request leases now for every ``blocks`` series below its reserve
        (``poll`` does this by itself while live; leases refused lately wait
        out their backoff)."""
        if self.live and not self.session.read_only:
            self._request_leases()

    # -- failures and quarantine -----------------------------------------------

    def _load_failures(self) -> None:
        """Read which documents are held or being retried (``retry`` may have
        run in another process). Documents released while connected have
        their outbox rows looked at again."""
        held = fl.held_uploads(self.node)
        if self.held - held:
            self._cursor = 0  # rows skipped while held are shipped now (``_sent`` skips the rest)
        self.held = held
        self._retry_up = fl.retrying_docs(self.node, fl.UPLOAD)
        self._held_down = fl.held_downloads(self.node)
        self._retry_down = fl.retrying_docs(self.node, fl.DOWNLOAD)
        self._failed_down = fl.failed_docs(self.node, fl.DOWNLOAD)

    def _error(self, ev: ErrorReceived) -> None:
        if ev.code == codes.AUTH_FAILED:
            # Kept for ``status`` and ``node run``: a person must act.
            with self.node.store.transaction():
                self.node.store.set_meta(META_TOKEN_REFUSED, f"{self._wall_ms()} {ev.message}")
            raise AuthError(
                f"the relay refused this node's token: {ev.message}; enroll the node again "
                "on the relay ('branchline relay enroll STORE DATASET NODE') and give the "
                f"new token with 'branchline node config --home {self.node.home} --token T'"
            )
        if ev.code == codes.WRONG_DATASET:
            raise DatasetMismatch(
                f"the relay refused dataset {self.node.dataset!r} of node "
                f"{self.node.node_id!r}: {ev.message}"
            )
        refused: list[str] = []
        if ev.code in _REFUSAL_CODES or ev.code not in codes.CODES:
            refused = self._quarantine(ev)
        if ev.code in _FATAL_CODES:
            raise RelayRefused(f"the relay refused the session: {ev.message} [{ev.code}]")
        if refused:
            raise UpdatesRefused(
                f"the relay refused updates of {', '.join(refused)}; set aside (see "
                f"'branchline failures'), the rest goes on: {ev.message} [{ev.code}]"
            )
        raise RelayUnreachable(f"the relay ended the session: {ev.message} [{ev.code}]")

    def _refused(self, ev: UpdateRefused) -> None:
        """The relay refused updates ``ev.refs`` of ``ev.doc`` and the session
        goes on (e.g. a locked period): record the failure, hold the
        document; its rows stay in the outbox, sent again only on ``retry``."""
        seqs: list[int] = []
        for ref in ev.refs:
            seqs.extend(self._inflight.pop(ref, []))
            self._ref_doc.pop(ref, None)
            self._live_doc.pop(ref, None)
            self._ref_records.pop(ref, None)
        self._sent.difference_update(seqs)  # a retry on this connection sends them again
        fl.record_failure(
            self.node,
            fl.UPLOAD,
            ev.doc,
            ev.code,
            ev.message,
            self._wall_ms(),
            self._records_of(seqs),
        )
        if ev.doc not in self.quarantined:
            self.quarantined.append(ev.doc)
        self.held = self.held | {ev.doc}
        self._retry_up = self._retry_up - {ev.doc}
        if ev.code in fl.AUTO_RETRY and ev.doc not in self._repassed:
            self._repass.add(ev.doc)
        self._maybe_done(ev.doc)

    def _quarantine(self, ev: ErrorReceived) -> list[str]:
        """Record an upload failure for the documents the refusal is about and
        hold them: the document the error names (``refused_doc``); failing
        that, only a single document in flight is certain. Returns the
        documents held (none when it cannot tell)."""
        inflight: dict[str, list[int]] = {}
        for ref, doc in self.session.unacked.items():
            inflight.setdefault(doc, []).append(ref)
        named = [d for d in refused_docs(ev) if d in inflight][:1]
        docs = named or (list(inflight) if len(inflight) == 1 else [])
        for doc in sorted(docs):
            seqs = [s for ref in inflight[doc] for s in self._inflight.get(ref, [])]
            fl.record_failure(
                self.node,
                fl.UPLOAD,
                doc,
                ev.code,
                ev.message,
                self._wall_ms(),
                self._records_of(seqs),
            )
            self.quarantined.append(doc)
        if docs:
            self.held = self.held | frozenset(docs)
            self._retry_up = self._retry_up - frozenset(docs)
        return sorted(docs)

    def _records_of(self, seqs: list[int]) -> list[str]:
        """Record ids written by outbox rows ``seqs`` (at most ``fl.MAX_RECORDS``)."""
        return outbox.records_of(self.node.store.conn, seqs, fl.MAX_RECORDS)

    def _pending_retry(self) -> bool:
        """A retried download not asked again yet, or a document refused
        with ``not_author`` awaiting its second pass (keeps a one-shot sync
        going)."""
        return bool(self._retry_down - self._asked_again or self._repass)

    def _ask_again(self) -> None:
        """While connected and between passes, start a pass over the retried
        downloads (a new connection includes them in its first pass) and
        over documents just refused with ``not_author``."""
        docs = sorted((self._retry_down - self._asked_again) | self._repass)
        if not docs or not self.live or self.session.syncing:
            return
        self._asked_again.update(docs)
        if self._repass:
            # Released for this pass: its answer, an own-only diff against the
            # relay's state of now, is what the relay takes when the refusal
            # came from updates overtaking one another (a diff of the relay's
            # state never waits). Refused again, it is held until the next
            # connection.
            ids = [
                f.id
                for f in fl.list_failures(self.node)
                if f.direction == fl.UPLOAD and f.doc in self._repass and f.code in fl.AUTO_RETRY
            ]
            fl.retry(self.node, ids)
            self._repassed |= self._repass
            self._repass = set()
            self._load_failures()
        states = self.node.state()
        for doc in docs:
            entry = self._docs.setdefault(doc, _DocPass(doc.partition("/")[0]))
            entry.downloaded = entry.answered = entry.done = False
            self.progress.setdefault(entry.collection, Progress()).docs_total += 1
            self._to_answer.add(doc)
        self.session.start_sync([(d, states.get(d, EMPTY_STATE_VECTOR)) for d in docs])

    def _refuse_pending_uploads(self) -> None:
        """A read-only node with local changes: record one upload failure per
        document holding them (the rows stay in the outbox, nothing is sent)."""
        pending = outbox.rows_per_doc(self.node.store.conn)
        if not pending:
            return
        message = (
            f"node {self.node.node_id!r} is enrolled read-only on the "
            "relay: its local changes are not uploaded; enroll it again without --read-only "
            "to upload them"
        )
        for doc in pending:
            seqs = outbox.seqs_of(self.node.store.conn, doc, fl.MAX_RECORDS)
            fl.record_failure(
                self.node,
                fl.UPLOAD,
                doc,
                codes.READ_ONLY,
                message,
                self._wall_ms(),
                self._records_of(seqs),
            )
        total = sum(pending.values())
        self.upload_refused = (
            f"{codes.READ_ONLY}: {message} ({total} pending in {len(pending)} documents)"
        )

    # -- internals -----------------------------------------------------------

    def _opened(self, ev: Opened) -> None:
        if ev.dataset != self.node.dataset:  # the session checks too; never trust one layer
            raise DatasetMismatch(
                f"the relay serves dataset {ev.dataset!r} but this node belongs to "
                f"{self.node.dataset!r}"
            )
        self.opened = ev
        if self.node.store.get_meta(META_TOKEN_REFUSED) is not None:
            with self.node.store.transaction():
                self.node.store.delete_meta(META_TOKEN_REFUSED)
        if not ev.read_only:
            # The relay takes this node's writes again: read-only refusals are moot.
            docs = [f.doc for f in fl.list_failures(self.node) if f.code == codes.READ_ONLY]
            fl.resolve(self.node, fl.UPLOAD, docs, only_retrying=False)
            # Another node may have published since what the relay refused
            # for want of it: try again, no person needed.
            fl.retry_codes(self.node, fl.UPLOAD, fl.AUTO_RETRY)
        self._load_failures()
        self._asked_again = set(self._retry_down)  # this first pass asks for them
        states = self.node.state()
        today = dt.date.fromtimestamp(self._wall_ms() / 1000)
        # Documents with urgent pending records go first, up and down: the
        # relay answers sync requests in the order they are sent.
        first = self.node.urgent_docs()
        order = [
            d
            for d in upload_order(self.node, set(states) | set(ev.documents), today, first)
            if d not in self._held_down
        ]
        self._docs = {d: _DocPass(d.partition("/")[0]) for d in order}
        self._to_answer = set(order)
        self.progress = {}
        for entry in self._docs.values():
            self.progress.setdefault(entry.collection, Progress()).docs_total += 1
        if not ev.read_only:
            for doc, count in outbox.records_per_doc(self.node.store.conn).items():
                found = self._docs.get(doc)
                if found is not None and doc not in self.held:
                    self.progress[found.collection].total += count
        for coll, prog in self.progress.items():
            self._report(coll, prog)
        self.session.start_sync([(d, states.get(d, EMPTY_STATE_VECTOR)) for d in order])
        if not ev.read_only:
            self._request_leases()
        else:
            self._refuse_pending_uploads()
            self._load_failures()

    def _import(self, doc: str, data: bytes, *, from_pass: bool) -> int:
        """Import a received update; returns the records it changed. A failure
        is recorded (the session goes on); a pass diff imported cleanly
        resolves the document's earlier download failures."""
        if self.stats.first_update_ms is None:
            self.stats.first_update_ms = self._wall_ms()
        if doc in self._held_down:
            return 0  # this node cannot hold it; it waits for ``retry``
        if data in (b"", EMPTY_UPDATE):
            records = 0
        else:
            try:
                report = self.node.import_sliced(doc, data)
            except UpdateError as exc:
                self.stats.download_failures += 1
                whole = bool(DOC_RE.match(doc)) and doc.partition("/")[0] in (
                    self.node.schema.collections
                )
                code = fl.INVALID if whole else fl.SCHEMA
                fl.record_failure(self.node, fl.DOWNLOAD, doc, code, str(exc), self._wall_ms())
                self._failed_down = self._failed_down | {doc}
                if code == fl.SCHEMA:
                    self._held_down = self._held_down | {doc}
                self._retry_down = self._retry_down - {doc}
                return 0
            self.stats.imported += 1
            records = report.records
        if from_pass and doc in self._failed_down:
            # The node now holds everything the relay has of ``doc``.
            fl.resolve(self.node, fl.DOWNLOAD, [doc], only_retrying=False)
            self._failed_down = self._failed_down - {doc}
            self._retry_down = self._retry_down - {doc}
        return records

    def _import_live(self, events: list[UpdateReceived]) -> None:
        """Import the live updates of one received frame in transactions of
        about ``IMPORT_SLICE_BYTES``, those of one document merged (in groups
        of ``LIVE_MERGE``): one durable commit per group, not per update,
        which is what kept a busy receiver behind, and never one so long that
        the home's other writers wait for it (a larger update is imported in
        slices). If a group fails, its updates are imported one by one, so
        the failing update alone is recorded as a download failure."""
        if self.stats.first_update_ms is None:
            self.stats.first_update_ms = self._wall_ms()
        group: list[UpdateReceived] = []
        size = 0
        for ev in events:
            if ev.doc in self._held_down or ev.data in (b"", EMPTY_UPDATE):
                continue
            if group and size + len(ev.data) > IMPORT_SLICE_BYTES:
                self._import_group(group)
                group, size = [], 0
            group.append(ev)
            size += len(ev.data)
        self._import_group(group)

    def _import_group(self, events: list[UpdateReceived]) -> None:
        if len(events) <= 1:
            for ev in events:
                self._import(ev.doc, ev.data, from_pass=False)
            return
        by_doc: dict[str, list[bytes]] = {}
        for ev in events:
            by_doc.setdefault(ev.doc, []).append(ev.data)
        try:
            self.node.import_updates(
                {doc: diffs.merged(blobs, LIVE_MERGE) for doc, blobs in by_doc.items()}
            )
        except UpdateError:
            for ev in events:
                self._import(ev.doc, ev.data, from_pass=False)
            return
        self.stats.imported += len(events)

    def _answer_states(self) -> None:
        while self._answers and self.session.state is SessionState.OPEN:
            if not self.session.read_only and self.session.inflight_room < 1:
                return  # answered when acks make room
            doc, sv = self._answers[0]
            if not self._answer(doc, sv):
                return  # more parts than room: answered when acks make room
            self._answers.popleft()

    def _answer(self, doc: str, sv: bytes) -> bool:
        """Answer the relay's state of ``doc``; False when the answer needs
        more in-flight room than there is now (nothing was sent). A held
        document is answered with nothing: its changes wait for ``retry``."""
        entry = self._docs.get(doc)
        if self.session.read_only or doc in self.held:
            self.session.answer_state(doc, [])
        else:
            try:
                parts = self._parts(doc, sv)
            except UpdateError as exc:
                # Nothing of it can go up in updates the relay accepts: say so
                # where the user looks, hold it, and let the pass go on.
                fl.record_failure(self.node, fl.UPLOAD, doc, fl.LOCAL, str(exc), self._wall_ms())
                self.held = self.held | {doc}
                parts = []
            else:
                if not parts and doc in self._retry_up:
                    # The relay lacks nothing of this node's changes of it
                    # (say another node carried them): the failure is moot.
                    fl.resolve(self.node, fl.UPLOAD, [doc], only_retrying=True)
                    self._retry_up = self._retry_up - {doc}
            if len(parts) > self.session.inflight_room:
                return False
            answer = []
            owner = self._owners(doc) if parts else {}
            counted: set[str] = set()
            for seqs, data in parts:
                ref = self._new_ref()
                answer.append((ref, data))
                self._inflight[ref] = seqs
                self._ref_doc[ref] = doc
                self._sent.update(seqs)
                mine = {r for s in seqs for r in owner.get(s, ())} - counted
                counted |= mine
                self._ref_records[ref] = len(mine)
                if entry is not None:
                    entry.refs.add(ref)
            self.session.answer_state(doc, answer)
            self.stats.diffs_sent += len(answer)
        self._to_answer.discard(doc)
        if entry is not None:
            entry.answered = True
            self._maybe_done(doc)
        return True

    def _owners(self, doc: str) -> dict[int, list[str]]:
        """Outbox seq -> records of ``doc``'s pending rows (progress counts records)."""
        return outbox.owners(self.node.store.conn, doc)

    def _parts(self, doc: str, sv: bytes) -> list[tuple[list[int], bytes]]:
        # An empty diff with pending rows is still sent: the relay holds them
        # (an ack was lost in a cut) and the empty update earns the ack that
        # clears them. ``export_parts`` reads seqs before it diffs, so a row
        # committed in between is in a part but not claimed by it: it is sent
        # again later, which is harmless.
        # Only a carrier may hand the relay other nodes' entries.
        own_only = not (self.opened is not None and self.opened.carrier)
        try:
            parts = self.node.export_parts(doc, sv, MAX_ANSWER_BYTES, own_only=own_only)
        except UpdateError:
            if self._readable(sv):
                raise
            # The relay's state vector is unreadable: upload everything (the
            # relay stores nothing twice). Its fault, not one a user can fix.
            self.stats.extra["unreadable_states"] = self.stats.extra.get("unreadable_states", 0) + 1
            parts = self.node.export_parts(doc, None, MAX_ANSWER_BYTES, own_only=own_only)
        limit = self.session.limits.max_transfer
        for _, data in parts:
            if len(data) > limit:
                raise UpdateError(
                    f"document {doc}: {len(data):,} bytes to send in one update, more than "
                    f"the relay takes ({limit:,}); nothing of it was sent"
                )
        return parts

    @staticmethod
    def _readable(sv: bytes) -> bool:
        try:
            decode_state_vector(sv)
        except UpdateError:
            return False
        return True

    def _ship_live(self) -> int:
        if not self.live or self.session.read_only:
            return 0
        room = min(self.session.inflight_room, MAX_LIVE_BATCH)
        if room <= 0:
            return 0
        batch: list[tuple[str, bytes, int]] = []  # (doc, data, ref = seq), in seq order
        cursor = self._cursor
        while room > 0:
            rows = outbox.rows(self.node.store.conn, after=cursor, limit=MAX_LIVE_BATCH)
            if not rows:
                break
            for seq, doc, data in rows:
                if room <= 0:
                    break
                cursor = seq
                if cursor in self._sent or doc in self.held:
                    continue
                batch.append((doc, data, cursor))
                room -= 1
        # One call: several updates per frame (docs/protocol.md §6.3).
        self.session.send_updates(batch)
        self._cursor = cursor
        for doc, _data, seq in batch:
            self._inflight[seq] = [seq]
            self._live_doc[seq] = doc
            self._sent.add(seq)
        self.stats.live_sent += len(batch)
        return len(batch)

    def _acked(self, refs: Iterable[int]) -> None:
        seqs: list[int] = []
        touched: dict[str, int] = {}  # document -> highest seq acknowledged
        for ref in refs:
            carried = self._inflight.pop(ref, [])
            seqs.extend(carried)
            doc = self._ref_doc.pop(ref, None) or self._live_doc.pop(ref, None)
            if doc is not None and (carried or ref >= SYNTHETIC_REF_BASE):
                # A state diff counts even when it carried no outbox row: the
                # relay took what it lacked of the document (a refused diff
                # need not have carried any).
                touched[doc] = max(touched.get(doc, 0), max(carried, default=0))
            records = self._ref_records.pop(ref, 0)
            entry = self._docs.get(doc) if doc is not None else None
            if entry is not None and records:
                prog = self.progress[entry.collection]
                prog.done += records
                prog.total = max(prog.total, prog.done)
                self._report(entry.collection, prog)
            if doc is not None and ref >= SYNTHETIC_REF_BASE:
                self._maybe_done(doc)
        if seqs:
            self.node.ack(seqs)
            self.stats.acked_rows += len(seqs)
        self._resolve_retried(touched)

    def _resolve_retried(self, touched: dict[str, int]) -> None:
        """A retried document whose changes up to what was just acknowledged
        all reached the relay: its upload failure is resolved."""
        done = []
        for doc, upto in touched.items():
            if doc not in self._retry_up:
                continue
            if not outbox.pending_upto(self.node.store.conn, doc, upto):
                done.append(doc)
        if done:
            fl.resolve(self.node, fl.UPLOAD, done, only_retrying=True)
            self._retry_up = self._retry_up - frozenset(done)

    def _maybe_done(self, doc: str) -> None:
        entry = self._docs.get(doc)
        if entry is None or entry.done or not (entry.downloaded and entry.answered):
            return
        if any(ref in self._inflight for ref in entry.refs):
            return
        entry.done = True
        prog = self.progress[entry.collection]
        prog.docs_done += 1
        self._report(entry.collection, prog)

    def _report(self, collection: str, prog: Progress) -> None:
        if self._on_progress is not None:
            self._on_progress(collection, prog.done, prog.total)

    def _numbered(self, doc: str) -> bool:
        """``doc`` belongs to a voucher book with a series."""
        coll = self.node.schema.collections.get(doc.partition("/")[0])
        return coll is not None and coll.series is not None

    def _has_pending(self) -> bool:
        """Outbox rows of documents that are not held."""
        return outbox.any_pending(self.node.store.conn, except_docs=self.held)

    def _new_ref(self) -> int:
        ref = self._next_ref
        self._next_ref += 1
        return ref

    # -- blocks leases -----------------------------------------------------------

    def _maybe_refill(self, changed: bool) -> None:
        """Check the reserves after other processes' commits (a booking may
        have used leased numbers), when a refused lease's backoff ends, and
        every ``LEASE_CHECK_MS`` otherwise."""
        now = self._now_ms
        if now is None:
            return
        last = self._lease_checked_ms
        due = last is None or now - last >= LEASE_CHECK_MS
        if not due and last is not None:
            due = any(last < at <= now for at in self._lease_retry_at.values())
        if changed or due:
            self._lease_checked_ms = now
            self._request_leases()

    def _lease_denied(self, ev: LeaseDenied) -> None:
        self._leases.pop(ev.ref, None)
        self._leasing.discard(ev.series)
        # The relay said no (no such series, out of numbers...); provisional
        # numbers keep the node working. Ask again after a capped backoff.
        n = self._lease_denials.get(ev.series, 0) + 1
        self._lease_denials[ev.series] = n
        wait = min(LEASE_RETRY_CAP_MS, LEASE_RETRY_BASE_MS * 2 ** min(n - 1, 30))
        self._lease_retry_at[ev.series] = (self._now_ms or 0) + wait
        self.stats.extra["leases_denied"] = self.stats.extra.get("leases_denied", 0) + 1

    def _request_leases(self) -> None:
        """Ask for blocks of every ``blocks`` series whose reserve is below
        target, unless a request is pending or a refusal's backoff runs."""
        this_year = dt.date.fromtimestamp(self._wall_ms() / 1000).year
        now = self._now_ms or 0
        for coll in self.node.schema.ordered():
            if coll.series is None or coll.series.strategy != "blocks":
                continue
            yearly = coll.series.reset == "yearly"
            # A yearly series also leases for the other years of vouchers
            # waiting for a final number (dated 31 Dec, booked on 2 Jan).
            years = {this_year, *self.node.provisional_years(coll.name)} if yearly else {this_year}
            for year in sorted(years):
                key = series_mod.series_key(coll, dt.date(year, 1, 1) if yearly else None)
                if key in self._leasing or now < self._lease_retry_at.get(key, 0):
                    continue
                target = coll.series.reserve if year == this_year else 1
                missing = target - self.node.reserve_left(coll.name, year)
                if missing <= 0:
                    continue
                count = max(coll.series.block_size, missing)
                ref = self._new_ref()
                self.session.request_lease(key, count, ref)
                self._leases[ref] = _Lease(coll.name, year if yearly else None)
                self._leasing.add(key)
