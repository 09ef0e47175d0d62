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
- A received update that cannot be imported is recorded in ``sync_failures``
  (direction ``download``) and the session goes on.
"""

from __future__ import annotations

import datetime as dt
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .. import series as series_mod
from ..crdt.statevec import decode_state_vector
from ..errors import (
    AuthError,
    DatasetMismatch,
    RelayRefused,
    RelayUnreachable,
    RemoteProtocolError,
    UpdateError,
)
from ..node import EMPTY_UPDATE, Node
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
    codes,
)

#: Refs of state-diff answers and lease requests start here; outbox seqs (the
#: refs of live updates) are SQLite rowids and stay far below.
SYNTHETIC_REF_BASE = 1 << 52
#: Largest update one sync answer sends; a larger diff goes in several parts
#: made of the outbox rows (the relay refuses single updates above its limit,
#: 128 MiB by default; a 100,000-record catalog is about 42 MB).
MAX_ANSWER_BYTES = 64 << 20
#: Live outbox rows read per ``poll`` (also bounded by the session's in-flight room).
MAX_LIVE_BATCH = 256
#: Reasons longer than this are cut before they are stored.
MAX_REASON_CHARS = 500

ProgressCallback = Callable[[str, int, int], None]

# Codes after which reconnecting cannot help: a person must act.
_FATAL_CODES = frozenset(
    {codes.AUTH_FAILED, codes.WRONG_DATASET, codes.UNSUPPORTED_VERSION, codes.READ_ONLY}
)


@dataclass
class Progress:
    """Progress of one collection in the current pass: documents exchanged
    (diff imported and our answer acknowledged) out of the pass's documents."""

    done: int = 0
    total: int = 0


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


def upload_order(node: Node, docs: Iterable[str], today: dt.date) -> list[str]:
    """``docs`` in upload order: catalogs before voucher books, then schema
    priority, then (partitioned books) the current period first and the others
    newest first. Documents of collections the schema lacks come last (their
    import fails and is recorded)."""
    rank = {c.name: i for i, c in enumerate(node.schema.ordered())}
    current = {f"{today.year:04d}-{today.month:02d}", f"{today.year:04d}"}

    def key(doc: str) -> tuple[int, int, str]:
        name, _, period = doc.partition("/")
        return (rank.get(name, len(rank)), 0 if period in current else 1, period)

    ordered = sorted(set(docs), key=lambda d: d.partition("/")[2], reverse=True)
    ordered.sort(key=lambda d: key(d)[:2])  # stable: newest first within a rank
    return ordered


def record_failure(
    node: Node, direction: str, doc: str, reason: str, at_ms: int, record: str | None = None
) -> None:
    """Record (or count again) a sync failure in the node's ``sync_failures``."""
    with node.store.transaction() as conn:
        conn.execute(
            "INSERT INTO sync_failures (direction, doc, record, reason, first_at, last_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (direction, doc, reason) DO UPDATE SET "
            "attempts = attempts + 1, last_at = excluded.last_at, "
            "record = COALESCE(excluded.record, record)",
            (direction, doc, record, reason[:MAX_REASON_CHARS], at_ms, at_ms),
        )


def failure_counts(node: Node) -> dict[str, int]:
    """{"upload": n, "download": n}: recorded failures per direction."""
    out = {"upload": 0, "download": 0}
    for direction, count in node.store.conn.execute(
        "SELECT direction, COUNT(*) FROM sync_failures GROUP BY direction"
    ):
        out[str(direction)] = int(count)
    return out


class SyncDriver:
    """Connects one ``Node`` to one ``ClientSession`` (one connection).

    ``wall_ms`` tells wall-clock time (for ``last_sync`` and failure dates);
    ``on_progress(collection, done, total)`` is called when a collection's
    progress changes. Not thread-safe. A new connection needs a new driver
    (and a new session): everything unacknowledged is sent again then.
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
        self._sent: set[int] = set()  # outbox seqs sent or carried this connection
        self._cursor = 0  # live rows up to this seq were sent or skipped
        self._next_ref = SYNTHETIC_REF_BASE
        self._leases: dict[int, _Lease] = {}
        self._leasing: set[str] = set()  # series keys with a lease request pending
        #: Set when the relay opened the session read-only while this node has
        #: local changes: they can never be uploaded (recorded as upload failures).
        self.upload_refused: str | None = None

    # -- state ---------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """The pass completed, every update sent is acknowledged and the node's
        outbox is empty (nothing left to push)."""
        return self.session.synced and not self._answers and not self._has_pending()

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
        frame that needs a person), RelayUnreachable (a retryable error frame
        or a protocol error: reconnect), StoreError when the node's store fails.
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
        """Feed monotonic time (heartbeats). Raises RelayUnreachable when the
        link has been silent for too long."""
        self.handle(self.session.tick(now_ms))

    def poll(self) -> int:
        """Pick up other processes' commits (``Node.refresh``) and send new
        outbox rows as live updates, in seq order, within the session's
        in-flight room. Returns the rows sent."""
        self.node.refresh()
        return self._ship_live()

    def data_to_send(self) -> list[bytes]:
        """Frames to send now, in order (one websocket message each)."""
        return self.session.data_to_send()

    def handle(self, events: list[Event]) -> None:
        """Perform what ``events`` call for (see the module docstring)."""
        for ev in events:
            if isinstance(ev, Opened):
                self._opened(ev)
            elif isinstance(ev, DiffReceived):
                self._import(ev.doc, ev.data)
                entry = self._docs.get(ev.doc)
                if entry is not None:
                    entry.downloaded = True
                    self._maybe_done(ev.doc)
            elif isinstance(ev, UpdateReceived):
                self._import(ev.doc, ev.data)
            elif isinstance(ev, RemoteState):
                self._answers.append((ev.doc, ev.state_vector))
            elif isinstance(ev, Acked):
                self._acked(ev.refs)
            elif isinstance(ev, SyncComplete):
                self.stats.passes_completed += 1
                with self.node.store.transaction():
                    self.node.store.set_meta("last_sync", str(self._wall_ms()))
            elif isinstance(ev, LeaseGranted):
                lease = self._leases.pop(ev.ref)
                self._leasing.discard(ev.series)
                self.node.add_block(lease.collection, ev.first, ev.last, lease.year)
            elif isinstance(ev, LeaseDenied):
                self._leases.pop(ev.ref, None)
                # Not retried on this connection: the relay said no (e.g. no
                # such series); provisional numbers keep the node working.
                self.stats.extra["leases_denied"] = self.stats.extra.get("leases_denied", 0) + 1
            elif isinstance(ev, ErrorReceived):
                self._error(ev)
            elif isinstance(ev, HeartbeatTimeout):
                raise RelayUnreachable(
                    f"nothing heard from the relay for {ev.silent_ms} ms; the link is dead"
                )
        self._answer_states()
        if self.live:
            self._ship_live()

    # -- internals -----------------------------------------------------------

    def _error(self, ev: ErrorReceived) -> None:
        if ev.code == codes.AUTH_FAILED:
            raise AuthError(f"the relay refused this node's token: {ev.message}")
        if ev.code == codes.WRONG_DATASET:
            raise DatasetMismatch(
                f"the relay refused dataset {self.node.dataset!r} of node "
                f"{self.node.node_id!r}: {ev.message}"
            )
        if ev.code in (codes.BAD_UPDATE, codes.FRAME_TOO_LARGE, codes.UNKNOWN_DOCUMENT):
            # Blame the documents whose updates were in flight.
            docs = sorted(set(self.session.unacked.values())) or ["?"]
            for doc in docs:
                record_failure(
                    self.node, "upload", doc, f"{ev.code}: {ev.message}", self._wall_ms()
                )
        if ev.code in _FATAL_CODES:
            raise RelayRefused(f"the relay refused the session: {ev.message} [{ev.code}]")
        raise RelayUnreachable(f"the relay ended the session: {ev.message} [{ev.code}]")

    def _opened(self, ev: Opened) -> None:
        if ev.dataset != self.node.dataset:  # the session checks too; never trust one layer
            raise DatasetMismatch(
                f"the relay serves dataset {ev.dataset!r} but this node belongs to "
                f"{self.node.dataset!r}"
            )
        self.opened = ev
        states = self.node.state()
        today = dt.date.fromtimestamp(self._wall_ms() / 1000)
        order = upload_order(self.node, set(states) | set(ev.documents), today)
        self._docs = {d: _DocPass(d.partition("/")[0]) for d in order}
        self._to_answer = set(order)
        self.progress = {}
        for entry in self._docs.values():
            self.progress.setdefault(entry.collection, Progress()).total += 1
        for coll, prog in self.progress.items():
            self._report(coll, prog)
        self.session.start_sync([(d, states.get(d, EMPTY_STATE_VECTOR)) for d in order])
        if not ev.read_only:
            self._request_leases()
        else:
            self._refuse_pending_uploads()

    def _refuse_pending_uploads(self) -> None:
        """A read-only node with local changes: record one upload failure per
        document holding them (the rows stay in the outbox, nothing is sent)."""
        pending = self.node.store.conn.execute(
            "SELECT doc, COUNT(*) FROM updates WHERE pending = 1 GROUP BY doc ORDER BY doc"
        ).fetchall()
        if not pending:
            return
        reason = (
            f"node {self.node.node_id!r} is enrolled read-only on the relay: its local "
            "changes are not uploaded; enroll it again without --read-only to upload them"
        )
        for doc, _count in pending:
            record_failure(self.node, "upload", str(doc), reason, self._wall_ms())
        total = sum(int(c) for _, c in pending)
        self.upload_refused = f"{reason} ({total} pending in {len(pending)} documents)"

    def _import(self, doc: str, data: bytes) -> None:
        if self.stats.first_update_ms is None:
            self.stats.first_update_ms = self._wall_ms()
        if data in (b"", EMPTY_UPDATE):
            return
        try:
            self.node.import_updates({doc: data})
        except UpdateError as exc:
            self.stats.download_failures += 1
            record_failure(self.node, "download", doc, str(exc), self._wall_ms())
            return
        self.stats.imported += 1

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
        more in-flight room than there is now (nothing was sent)."""
        entry = self._docs.get(doc)
        if self.session.read_only:
            self.session.answer_state(doc, [])
        else:
            try:
                parts = self._parts(doc, sv)
            except UpdateError as exc:
                # Nothing of it can go up in updates the relay accepts: say so
                # where the user looks, and let the pass go on.
                record_failure(self.node, "upload", doc, str(exc), self._wall_ms())
                parts = []
            if len(parts) > self.session.inflight_room:
                return False
            answer = []
            for seqs, data in parts:
                ref = self._new_ref()
                answer.append((ref, data))
                self._inflight[ref] = seqs
                self._ref_doc[ref] = doc
                self._sent.update(seqs)
                if entry is not None:
                    entry.refs.add(ref)
            self.session.answer_state(doc, answer)
            self.stats.diffs_sent += len(answer)
        self._to_answer.discard(doc)
        if entry is not None:
            entry.answered = True
            self._maybe_done(doc)
        return True

    def _parts(self, doc: str, sv: bytes) -> list[tuple[list[int], bytes]]:
        # An empty diff with pending rows is still sent: the relay holds them
        # (an ack was lost in a cut) and the empty update earns the ack that
        # clears them. ``export_parts`` reads seqs before it diffs, so a row
        # committed in between is in a part but not claimed by it: it is sent
        # again later, which is harmless.
        try:
            return self.node.export_parts(doc, sv, MAX_ANSWER_BYTES)
        except UpdateError:
            if self._readable(sv):
                raise
            # The relay's state vector is unreadable: upload everything.
            record_failure(
                self.node, "upload", doc, "unreadable relay state vector", self._wall_ms()
            )
            return self.node.export_parts(doc, None, MAX_ANSWER_BYTES)

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
            rows = self.node.store.conn.execute(
                "SELECT seq, doc, data FROM updates WHERE pending = 1 AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (cursor, MAX_LIVE_BATCH),
            ).fetchall()
            if not rows:
                break
            for seq, doc, data in rows:
                if room <= 0:
                    break
                cursor = int(seq)
                if cursor in self._sent:
                    continue
                batch.append((str(doc), bytes(data), cursor))
                room -= 1
        # One call: several updates per frame (docs/protocol.md §6.3).
        self.session.send_updates(batch)
        self._cursor = cursor
        for _doc, _data, seq in batch:
            self._inflight[seq] = [seq]
            self._sent.add(seq)
        self.stats.live_sent += len(batch)
        return len(batch)

    def _acked(self, refs: Iterable[int]) -> None:
        seqs: list[int] = []
        for ref in refs:
            seqs.extend(self._inflight.pop(ref, []))
            doc = self._ref_doc.pop(ref, None)
            if doc is not None:
                self._maybe_done(doc)
        if seqs:
            self.node.ack(seqs)
            self.stats.acked_rows += len(seqs)

    def _maybe_done(self, doc: str) -> None:
        entry = self._docs.get(doc)
        if entry is None or entry.done or not (entry.downloaded and entry.answered):
            return
        if any(ref in self._inflight for ref in entry.refs):
            return
        entry.done = True
        prog = self.progress[entry.collection]
        prog.done += 1
        self._report(entry.collection, prog)

    def _report(self, collection: str, prog: Progress) -> None:
        if self._on_progress is not None:
            self._on_progress(collection, prog.done, prog.total)

    def _has_pending(self) -> bool:
        row = self.node.store.conn.execute(
            "SELECT 1 FROM updates WHERE pending = 1 LIMIT 1"
        ).fetchone()
        return row is not None

    def _new_ref(self) -> int:
        ref = self._next_ref
        self._next_ref += 1
        return ref

    def _request_leases(self) -> None:
        """Ask for blocks of every ``blocks`` series whose reserve is below target."""
        year = dt.date.fromtimestamp(self._wall_ms() / 1000).year
        for coll in self.node.schema.ordered():
            if coll.series is None or coll.series.strategy != "blocks":
                continue
            yearly = coll.series.reset == "yearly"
            key = series_mod.series_key(coll, dt.date(year, 1, 1) if yearly else None)
            if key in self._leasing:
                continue
            missing = coll.series.reserve - self.node.reserve_left(coll.name, year)
            if missing <= 0:
                continue
            count = max(coll.series.block_size, missing)
            ref = self._new_ref()
            self.session.request_lease(key, count, ref)
            self._leases[ref] = _Lease(coll.name, year if yearly else None)
            self._leasing.add(key)

    def refill(self) -> None:
        """Request leases again if a reserve fell below target (call now and
        then while live, e.g. after local bookings)."""
        if self.live and not self.session.read_only:
            self._request_leases()
