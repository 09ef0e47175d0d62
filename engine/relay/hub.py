"""The relay core, sans-I/O: every decision the relay makes, in one object.

``RelayHub`` holds the sessions of all connections of one relay and decides
what the relay does: authentication answers, ordering of sync replies,
group commits, acknowledgements, refusals, errors that end a session,
fan-out to the other connections of a dataset, rate limits, slow consumers,
revocations and shutdown. Data goes in (frames received, the time, answers
of store calls) and data comes out (frames to send per connection, store
calls to run, close codes); no asyncio, no sockets, no SQLite here. In the
manner of h11 and the python-websockets protocol objects.

Store calls are data (``calls.py``); ``StoreRunner`` (``runner.py``) runs
them against a ``RelayStore`` at the edge. Drivers of this one core: the
asyncio server (``server.py``: sockets, timers, TLS, metrics endpoint, the
store thread), the simulator's relay (``harness.sim.world.SimRelay``) and the
test relays. A driver's loop::

    cid = hub.connect(now_ms, peer)              # a connection opened
    for call in hub.receive(cid, frame, now_ms): # hello / lease: answer now,
        hub.answer(call, runner.run(call))       # before the next frame
    while (d := hub.next_sync(cid)) is not None: # sync replies, paced by the
        hub.answer(d, runner.run(d))             # driver's send queue
    batch = hub.take_batch()                     # group commit, when it likes
    touched = hub.settle(batch, runner.commit(batch))
    hub.data_to_send(cid) -> frames              # after any of the above
    hub.disconnect(cid)                          # the connection is gone

Several relays on one store: each relay follows, for the datasets it has
connections of (``followed``), the positions other relays commit. A driver
asks ``follow(dataset)`` when the store says the dataset's head may have
moved and hands the rows back (``remote_committed``); the core fans out the
rows it did not commit itself (it knows its own from ``Appended.position``)
and keeps the dataset's position. Follow calls and batches must run on the
store in the order they were taken.

Guarantees: an update is acknowledged only once the commit of the batch
holding it was settled with its result; an update is committed only while
its connection is open (a connection gone before its batch was taken has
its updates dropped, unacknowledged: the client sends them again);
stored updates are fanned out to the other open connections of the same
dataset only, never to the sender, in commit order; a connection's dataset
and node are those its hello authenticated.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import (
    AuthError,
    BranchlineError,
    LocalProtocolError,
    ReadOnlyNode,
    RelayLimitError,
    RemoteProtocolError,
)
from ..protocol import (
    DEFAULT_HEARTBEAT_MS,
    EncodedUpdates,
    ErrorReceived,
    HeartbeatTimeout,
    HelloReceived,
    LeaseRequested,
    Limits,
    RelaySession,
    SessionState,
    SyncRequested,
    UpdateReceived,
    codes,
    encode_updates,
)
from .calls import (
    Append,
    Authenticate,
    Batch,
    BatchOutcome,
    Diff,
    DiffAnswer,
    Follow,
    FollowAnswer,
    HelloAnswer,
    Lease,
    LeaseAnswer,
)
from .metrics import RelayMetrics
from .store import Appended, NodeGrant, refusal_code

log = logging.getLogger("branchline.relay")

#: Websocket close codes (RFC 6455) the core asks its driver to close with.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013

#: Runs of consecutive updates from one connection are fanned out to the
#: batch's senders as frames shared by all of them only when they average at
#: least this many updates (shorter runs would make many small frames).
MIN_SHARED_RUN = 16


@dataclass(frozen=True)
class HubLimits:
    """Bounds of one relay (all per relay unless named per connection or dataset).

    ``protocol``: the relay's side of the negotiated protocol limits.
    ``heartbeat_ms``: heartbeat interval announced in welcome; a peer silent
    for 3 intervals (or a handshake taking that long) is dropped.
    ``tick_ms``: how often a driver ticks the sessions (default heartbeat / 4).
    ``max_connections``: open connections; more are refused with
    ``unavailable``. ``max_subscribers``: open connections of one dataset;
    more are refused with ``unavailable``. ``commit_queue``: updates received
    and not yet committed; a driver stops reading from connections while it
    is full (TCP backpressure; at most one frame's updates beyond it).
    ``max_batch``: updates per group commit. ``send_queue_bytes`` /
    ``send_queue_frames``: per connection, frames waiting to be sent beyond
    which a connection receiving fan-out is dropped (``slow``).
    ``sync_high_water_bytes``: per connection, a sync reply is computed only
    when less than this waits to be sent (a big catch-up streams instead of
    piling up). ``rate_frames_per_s`` / ``rate_burst``: per-connection token
    bucket on received frames; exceeding it ends the connection with
    ``rate_limited``. ``close_timeout_s``: wait for the peer's close frame.
    ``shutdown_timeout_s``: how long a shutdown waits for queued commits and
    sends before dropping what is left. ``revocation_poll_s``: how often the
    store's revocation counter is read; connections of a node revoked (or
    enrolled again) by an admin command are closed within about that long.
    ``follow_batch``: rows read per ``Follow`` (other relays' commits).
    ``follow_lag``: own commits of a dataset not yet passed by its follower
    beyond which the follower has lost its place: the dataset's connections
    are closed (``unavailable``) and resync by state vector on reconnect.
    """

    protocol: Limits = field(default_factory=Limits)
    heartbeat_ms: int = DEFAULT_HEARTBEAT_MS
    tick_ms: int | None = None
    max_connections: int = 10_000
    max_subscribers: int = 10_000
    commit_queue: int = 65_536
    max_batch: int = 4096
    send_queue_bytes: int = 64 << 20
    send_queue_frames: int = 100_000
    sync_high_water_bytes: int = 8 << 20
    rate_frames_per_s: float = 20_000.0
    rate_burst: float = 40_000.0
    close_timeout_s: float = 3.0
    shutdown_timeout_s: float = 10.0
    revocation_poll_s: float = 0.5
    follow_batch: int = 1024
    follow_lag: int = 262_144

    def __post_init__(self) -> None:
        positive = {
            "max_connections": self.max_connections,
            "max_subscribers": self.max_subscribers,
            "commit_queue": self.commit_queue,
            "max_batch": self.max_batch,
            "send_queue_bytes": self.send_queue_bytes,
            "send_queue_frames": self.send_queue_frames,
            "sync_high_water_bytes": self.sync_high_water_bytes,
            "rate_frames_per_s": self.rate_frames_per_s,
            "rate_burst": self.rate_burst,
            "close_timeout_s": self.close_timeout_s,
            "shutdown_timeout_s": self.shutdown_timeout_s,
            "revocation_poll_s": self.revocation_poll_s,
            "follow_batch": self.follow_batch,
            "follow_lag": self.follow_lag,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"limits.{name} must be positive, got {value!r}")
        if self.tick_ms is not None and self.tick_ms <= 0:
            raise ValueError(f"limits.tick_ms must be positive, got {self.tick_ms!r}")

    @property
    def tick_period_ms(self) -> int:
        """How often a driver should call ``RelayHub.tick``."""
        return self.tick_ms or max(25, self.heartbeat_ms // 4)


class _Conn:
    """One connection as the core knows it."""

    __slots__ = (
        "close_code",
        "close_reason",
        "dataset",
        "grant",
        "id",
        "node",
        "peer",
        "refilled_ms",
        "session",
        "syncs",
        "tokens",
    )

    def __init__(self, cid: int, session: RelaySession, peer: str, now_ms: int, burst: float):
        self.id = cid
        self.session = session
        self.peer = peer
        self.dataset: str | None = None  # set from the authenticated hello only
        self.node: str | None = None
        self.grant: NodeGrant | None = None
        self.syncs: deque[SyncRequested] = deque()  # bounded by limits.max_syncs
        self.tokens = burst
        self.refilled_ms = now_ms
        self.close_code = CLOSE_NORMAL
        self.close_reason = ""

    def label(self) -> str:
        who = f"node {self.node!r} of dataset {self.dataset!r}" if self.node else "unauthenticated"
        return f"connection {self.id} ({self.peer}, {who})"


class _Followed:
    """A dataset whose commits by other relays the core follows."""

    __slots__ = ("answered", "asked", "behind", "held", "own", "position")

    def __init__(self, position: int) -> None:
        self.position = position  # every row up to here was fanned out or is ours
        self.own: deque[int] = deque()  # positions of our commits above it, increasing
        self.asked: Follow | None = None  # the read out now (one at a time)
        self.answered = False  # its answer came and is held in ``held``...
        self.held: FollowAnswer = None  # ...until its barrier batch is settled
        self.behind = False  # the last read was a full page: read again

    def skip_own(self) -> None:
        """Pass our own commits right after the position: nothing to read there."""
        own = self.own
        while own and own[0] <= self.position + 1:
            self.position = max(self.position, own.popleft())


@dataclass(slots=True)
class _Pending:
    """An update waiting for its group commit."""

    conn: _Conn
    dataset: str
    node: str
    doc: str
    data: bytes
    ref: int


class RelayHub:
    """The relay core (see the module docstring). ``metrics`` gets the
    relay's counters (a fresh ``RelayMetrics`` when omitted)."""

    def __init__(self, limits: HubLimits | None = None, *, metrics: RelayMetrics | None = None):
        self.limits = limits or HubLimits()
        self.metrics = metrics or RelayMetrics()
        self._conns: dict[int, _Conn] = {}
        self._datasets: dict[str, dict[int, _Conn]] = {}  # open, accepted connections
        self._queue: deque[_Pending] = deque()
        self._inflight: dict[int, list[_Pending]] = {}  # batch id -> its updates
        self._ids = itertools.count(1)
        self._batch_ids = itertools.count(1)
        self._taken = 0  # id of the last batch taken
        self._followed: dict[str, _Followed] = {}
        self.stopping = False

    # -- introspection ----------------------------------------------------------

    @property
    def connections(self) -> int:
        """Connections known to the core (open, or closing and not yet disconnected)."""
        return len(self._conns)

    def datasets_connected(self) -> int:
        return sum(1 for conns in self._datasets.values() if conns)

    @property
    def queued(self) -> int:
        """Updates received and not yet taken into a batch."""
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """No update waits for a commit or for its batch to be settled."""
        return not self._queue and not self._inflight

    def session(self, cid: int) -> RelaySession:
        """The session of connection ``cid``; raises KeyError for an unknown one."""
        return self._conns[cid].session

    def label(self, cid: int) -> str:
        conn = self._conns.get(cid)
        return conn.label() if conn is not None else f"connection {cid} (gone)"

    def close_code(self, cid: int) -> tuple[int, str]:
        """The websocket close code and reason the driver should close ``cid`` with."""
        conn = self._conns.get(cid)
        return (conn.close_code, conn.close_reason) if conn is not None else (CLOSE_NORMAL, "")

    def closed(self, cid: int) -> bool:
        """True when ``cid`` has sent its last frame (or is unknown): close it."""
        conn = self._conns.get(cid)
        return conn is None or conn.session.state is SessionState.CLOSED

    def is_open(self, cid: int) -> bool:
        conn = self._conns.get(cid)
        return conn is not None and conn.session.state is SessionState.OPEN

    # -- connections ------------------------------------------------------------

    def connect(self, now_ms: int, peer: str = "?") -> int:
        """A new connection: its id. Over ``max_connections`` or while
        stopping it is refused at once (``unavailable``, close code 1013):
        send its frames, close it, ``disconnect`` it."""
        session = RelaySession(limits=self.limits.protocol, heartbeat_ms=self.limits.heartbeat_ms)
        session.tick(now_ms)  # starts the handshake clock
        conn = _Conn(next(self._ids), session, peer, now_ms, self.limits.rate_burst)
        full = len(self._conns) >= self.limits.max_connections
        self._conns[conn.id] = conn
        if self.stopping or full:
            why = "shutting down" if self.stopping else "at its connection limit"
            conn.close_code, conn.close_reason = CLOSE_TRY_AGAIN, "unavailable"
            self.metrics.connections_rejected[codes.UNAVAILABLE] += 1
            self._fail(conn, codes.UNAVAILABLE, f"the relay is {why}; reconnect later")
            return conn.id
        self.metrics.connections_total += 1
        log.info("%s opened", conn.label())
        return conn.id

    def disconnect(self, cid: int) -> None:
        """The connection is gone: forget it (its queued updates are dropped
        when the next batch is taken). Unknown ids are ignored."""
        conn = self._conns.pop(cid, None)
        if conn is None:
            return
        if conn.dataset is not None:
            peers = self._datasets.get(conn.dataset)
            if peers is not None:
                peers.pop(cid, None)
                if not peers:
                    del self._datasets[conn.dataset]
                    self._followed.pop(conn.dataset, None)
        if conn.session.state is not SessionState.CLOSED:
            conn.session.close()
        ended = conn.session.error
        log.info("%s closed%s", conn.label(), f" ({ended.code}: {ended.message})" if ended else "")

    def data_to_send(self, cid: int) -> list[bytes]:
        """Frames to send to ``cid``, in order (empties its queue)."""
        conn = self._conns.get(cid)
        return conn.session.data_to_send() if conn is not None else []

    def fail(self, cid: int, code: str, message: str) -> None:
        """End ``cid`` with an error frame (e.g. ``internal`` for a driver's
        own failure). Ignored when it is closing, closed or unknown."""
        conn = self._conns.get(cid)
        if conn is not None:
            self._fail(conn, code, message)

    def slow(self, cid: int, frames: int, nbytes: int) -> bool:
        """The driver holds ``frames`` (``nbytes``) not yet sent for ``cid``:
        True when that is over the send-queue limits, and then the session is
        closed (a slow consumer: drop the connection and its queue; it
        catches up by state-vector sync when it reconnects)."""
        if nbytes <= self.limits.send_queue_bytes and frames <= self.limits.send_queue_frames:
            return False
        conn = self._conns.get(cid)
        if conn is None:
            return False
        self.metrics.slow_consumers_dropped += 1
        log.warning(
            "%s: %d frames (%d bytes) waiting to be sent; dropping the slow consumer",
            conn.label(),
            frames,
            nbytes,
        )
        conn.session.close()
        return True

    def tick(self, now_ms: int) -> None:
        """Advance every session's clock: pings, dead links (closed)."""
        for conn in list(self._conns.values()):
            for event in conn.session.tick(now_ms):
                if isinstance(event, HeartbeatTimeout):
                    log.info(
                        "%s: nothing received for %d ms; dropping the dead link",
                        conn.label(),
                        event.silent_ms,
                    )

    # -- receiving --------------------------------------------------------------

    def receive(self, cid: int, message: bytes | str, now_ms: int) -> list[Authenticate | Lease]:
        """Handle one received websocket message. Returns the store calls it
        needs answered (``answer``) before the connection's next message:
        an ``Authenticate`` for a hello, a ``Lease``. Updates go to the commit
        queue, sync requests to the connection's sync queue (``next_sync``).
        Errors end the connection with an error frame; nothing is raised."""
        conn = self._conns.get(cid)
        if conn is None:
            return []
        session = conn.session
        self.metrics.frames_in += 1
        self.metrics.bytes_in += len(message)
        if not self._take_token(conn, now_ms):
            self._fail(
                conn,
                codes.RATE_LIMITED,
                f"more than {self.limits.rate_frames_per_s:g} frames/s; slow down and reconnect",
            )
            return []
        if isinstance(message, str):
            self._fail(conn, codes.BAD_FRAME, "text message: frames are binary websocket messages")
            return []
        try:
            events = session.receive_frame(message)
        except RemoteProtocolError as exc:
            self.metrics.protocol_errors[exc.code] += 1
            log.info("%s: protocol error %s: %s", conn.label(), exc.code, exc.message)
            return []
        calls: list[Authenticate | Lease] = []
        queue = self._queue
        for event in events:
            if isinstance(event, UpdateReceived):
                assert conn.dataset is not None and conn.node is not None
                assert event.ref is not None
                if not self.stopping:  # else not stored, not acked: sent again
                    queue.append(
                        _Pending(conn, conn.dataset, conn.node, event.doc, event.data, event.ref)
                    )
            elif isinstance(event, SyncRequested):
                conn.syncs.append(event)  # the session bounds these by max_syncs
            elif isinstance(event, HelloReceived):
                calls.append(Authenticate(cid, event.dataset, event.node, event.token))
            elif isinstance(event, LeaseRequested):
                assert conn.dataset is not None and conn.node is not None
                calls.append(
                    Lease(cid, event.ref, conn.dataset, event.series, event.count, conn.node)
                )
            elif isinstance(event, ErrorReceived):
                log.info("%s: peer sent error %s: %s", conn.label(), event.code, event.message)
        return calls

    def _take_token(self, conn: _Conn, now_ms: int) -> bool:
        elapsed = max(0, now_ms - conn.refilled_ms) / 1000
        conn.refilled_ms = now_ms
        conn.tokens = min(
            self.limits.rate_burst, conn.tokens + elapsed * self.limits.rate_frames_per_s
        )
        if conn.tokens < 1:
            return False
        conn.tokens -= 1
        return True

    # -- answers of store calls ---------------------------------------------------

    def answer(self, call: Authenticate | Lease | Diff, answer: object) -> None:
        """Feed back the answer of a store call (``HelloAnswer`` for an
        ``Authenticate``, ``LeaseAnswer`` for a ``Lease``, ``DiffAnswer`` for
        a ``Diff``). Raises TypeError for a mismatched pair."""
        if isinstance(call, Authenticate) and isinstance(answer, HelloAnswer):
            self.answer_hello(call, answer)
        elif isinstance(call, Lease) and isinstance(answer, LeaseAnswer):
            self.answer_lease(call, answer)
        elif isinstance(call, Diff) and isinstance(answer, DiffAnswer):
            self.answer_diff(call, answer)
        else:
            raise TypeError(f"{type(answer).__name__} does not answer {type(call).__name__}")

    def answer_hello(self, call: Authenticate, answer: HelloAnswer) -> None:
        """Admit the connection (welcome, docs) or refuse it (close code 1008)."""
        conn = self._conns.get(call.conn)
        if conn is None:
            return
        if answer.grant is None:
            self.metrics.connections_rejected[answer.code] += 1
            conn.close_code = CLOSE_POLICY
            log.info(
                "%s: refused node %r of dataset %r: %s",
                conn.label(),
                call.node,
                call.dataset,
                answer.code,
            )
            self._fail(conn, answer.code, answer.message)
            return
        grant = answer.grant
        if conn.session.state is not SessionState.CONNECTING:
            return  # timed out or failed while the store answered
        if len(self._datasets.get(grant.dataset, ())) >= self.limits.max_subscribers:
            conn.close_code = CLOSE_TRY_AGAIN
            self.metrics.connections_rejected[codes.UNAVAILABLE] += 1
            self._fail(
                conn,
                codes.UNAVAILABLE,
                f"dataset {grant.dataset!r} has {self.limits.max_subscribers} connections "
                "open, the relay's limit; reconnect later",
            )
            return
        try:
            conn.session.accept(
                read_only=grant.read_only, documents=answer.documents, carrier=grant.carrier
            )
        except LocalProtocolError as exc:
            self._fail(conn, codes.LIMIT_EXCEEDED, f"cannot list the dataset's documents: {exc}")
            return
        # Registered before any sync request of this connection is answered:
        # every later commit is either in its diff or fanned out to it.
        conn.dataset, conn.node, conn.grant = grant.dataset, grant.node, grant
        self._datasets.setdefault(grant.dataset, {})[conn.id] = conn
        if answer.head is not None and grant.dataset not in self._followed:
            # The head was read before the documents, so before any diff of
            # this connection: every later commit of another relay is read.
            self._followed[grant.dataset] = _Followed(answer.head)
        log.info(
            "%s accepted (%s, %d documents)",
            conn.label(),
            "read-only" if grant.read_only else "read-write",
            len(answer.documents),
        )

    def answer_lease(self, call: Lease, answer: LeaseAnswer) -> None:
        conn = self._conns.get(call.conn)
        if conn is None:
            return
        try:
            if answer.denied:
                self.metrics.leases_denied += 1
                conn.session.deny_lease(call.ref, answer.denied)
            else:
                self.metrics.leases_granted += 1
                conn.session.grant_lease(call.ref, answer.first, answer.last)
        except LocalProtocolError as exc:
            self._fail(conn, codes.INTERNAL, f"cannot answer lease {call.ref}: {exc.message}")

    def has_sync(self, cid: int) -> bool:
        """True when ``cid`` has a sync request waiting for ``next_sync``."""
        conn = self._conns.get(cid)
        return conn is not None and bool(conn.syncs)

    def next_sync(self, cid: int) -> Diff | None:
        """The store call answering ``cid``'s oldest sync request, or None
        (none waits, or the connection is no longer open). The driver asks
        when it has room to send (``sync_high_water_bytes``)."""
        conn = self._conns.get(cid)
        if conn is None or not conn.syncs:
            return None
        if conn.session.state is not SessionState.OPEN:
            conn.syncs.clear()
            return None
        req = conn.syncs.popleft()
        assert conn.dataset is not None
        return Diff(cid, conn.dataset, req.doc, req.state_vector)

    def answer_diff(self, call: Diff, answer: DiffAnswer) -> None:
        """Send the sync reply, or end the session when the store could not answer."""
        conn = self._conns.get(call.conn)
        if conn is None:
            return
        if answer.code:
            self._fail(conn, answer.code, answer.message)
            return
        try:
            conn.session.sync_reply(call.doc, answer.diff, answer.state_vector)
        except LocalProtocolError as exc:
            self._fail(conn, codes.LIMIT_EXCEEDED, f"cannot send {call.doc!r}: {exc.message}")
            return
        self.metrics.sync_requests += 1

    # -- group commit -------------------------------------------------------------

    def take_batch(self) -> Batch | None:
        """The next group commit (up to ``max_batch`` updates, in arrival
        order, one ``Append`` per dataset), or None when nothing waits.
        Updates of connections no longer open are dropped here. Batches
        must be settled in the order they were taken."""
        queue = self._queue
        items: list[_Pending] = []
        limit = self.limits.max_batch
        open_ = SessionState.OPEN
        while queue and len(items) < limit:
            p = queue.popleft()
            if p.conn.session.state is open_:
                items.append(p)
        if not items:
            return None
        by_dataset: dict[str, list[_Pending]] = {}
        for p in items:
            by_dataset.setdefault(p.dataset, []).append(p)
        batch = Batch(
            next(self._batch_ids), tuple(Append(ds, tuple(u)) for ds, u in by_dataset.items())
        )
        self._inflight[batch.id] = items
        self._taken = batch.id
        return batch

    def settle(self, batch: Batch, outcome: BatchOutcome) -> list[int]:
        """Act on the outcome of ``batch``'s commit: acknowledge what was
        kept, refuse or fail what was not, fan stored updates out. Returns
        the connections given frames (send them). A dataset whose commit
        failed ends its senders' sessions (``internal``: nothing was kept)."""
        items = self._inflight.pop(batch.id)
        for took in outcome.seconds:
            self.metrics.commit_seconds.observe(took)
        by_dataset: dict[str, list[_Pending]] = {}
        for p in items:
            by_dataset.setdefault(p.dataset, []).append(p)
        touched: dict[int, None] = {}
        for dataset, pending in by_dataset.items():
            result = outcome.results[dataset]
            if isinstance(result, BaseException):
                self.metrics.commit_failures += 1
                log.error(
                    "commit of %d updates of dataset %r failed: %s", len(pending), dataset, result
                )
                for conn in {p.conn.id: p.conn for p in pending}.values():
                    self._fail(
                        conn,
                        codes.INTERNAL,
                        "the relay could not store updates (nothing of them was kept); "
                        "reconnect later",
                    )
                    touched[conn.id] = None
                continue
            for cid in self._settle(dataset, pending, result):
                touched[cid] = None
        for f_dataset, followed in list(self._followed.items()):
            if followed.answered:
                touched |= dict.fromkeys(self._release(f_dataset, followed))
        return list(touched)

    def _settle(
        self, dataset: str, items: Sequence[_Pending], results: list[Appended]
    ) -> list[int]:
        self.metrics.batches_committed += 1
        acks: dict[_Conn, list[int]] = {}
        failed: dict[_Conn, tuple[str, str]] = {}
        # Updates of a locked period, that their sender may not publish, or
        # that the store cannot take (bad bytes, too large): refused one
        # document at a time, and the session goes on (the node's other
        # documents keep flowing).
        refused: dict[tuple[_Conn, str, str], tuple[list[int], str]] = {}
        stored: list[_Pending] = []
        updates_in = self.metrics.updates_in
        for p, result in zip(items, results, strict=True):
            updates_in[result.status] += 1
            if result.ok:
                acks.setdefault(p.conn, []).append(p.ref)
                if result.status == "stored":
                    stored.append(p)
            elif (code := refusal_code(result.error)) is not None:
                refused.setdefault((p.conn, p.doc, code), ([], str(result.error)))[0].append(p.ref)
            elif p.conn not in failed:
                failed[p.conn] = rejection(p.doc, result.error)
        for conn, refs in acks.items():
            try:
                conn.session.ack(refs)
            except LocalProtocolError as exc:  # a driver bug; keep the others going
                log.error("%s: cannot ack: %s", conn.label(), exc)
        for (conn, doc, code), (refs, why) in refused.items():
            log.info("%s: %d update(s) refused: %s", conn.label(), len(refs), why)
            self.metrics.updates_refused[code] += len(refs)
            try:
                conn.session.refuse(doc, refs, code, why)
            except LocalProtocolError as exc:  # a driver bug; keep the others going
                log.error("%s: cannot refuse: %s", conn.label(), exc)
        for conn, (code, message) in failed.items():
            log.info("%s: update refused (%s): %s", conn.label(), code, message)
            self._fail(conn, code, message)
        touched = {c.id: None for c in acks} | {c.id: None for c in failed}
        touched |= {conn.id: None for conn, _, _ in refused}
        peers = [
            c
            for c in self._datasets.get(dataset, {}).values()
            if c.session.state is SessionState.OPEN
        ]
        if stored and peers:
            self.metrics.updates_fanned_out += self.fan_out(stored, peers)
            touched |= {c.id: None for c in peers}
        followed = self._followed.get(dataset)
        if followed is not None:
            followed.own.extend(
                r.position
                for r in results
                if r.position is not None and r.position > followed.position
            )
            followed.skip_own()
            if len(followed.own) > self.limits.follow_lag:
                touched |= dict.fromkeys(self._resync(dataset, "fell behind the store"))
        return list(touched)

    def fan_out(self, stored: Sequence[_Pending], peers: Sequence[_Conn]) -> int:
        """Queue for each of ``peers`` the updates of ``stored`` it did not
        send, in commit order; returns how many were queued in all.

        Frames are encoded once and the same bytes go to every peer that can
        take them (``encode_updates`` / ``send_encoded``): packing the fan-out
        per subscriber was half of the relay's time. When the batch is made of
        long runs of consecutive updates from one connection (frames full
        enough), each run is encoded once and every peer gets the runs of the
        others. Otherwise peers that sent nothing in the batch share the
        frames of the whole batch and the senders get their share packed for
        them. A peer with a smaller max_frame, or updates that need chunking,
        take the per-session path."""
        max_frame = self.limits.protocol.max_frame
        senders = {p.conn for p in stored}
        runs: list[tuple[_Conn, list[tuple[str, bytes]]]] = []
        for p in stored:
            if not runs or runs[-1][0] is not p.conn:
                runs.append((p.conn, []))
            runs[-1][1].append((p.doc, p.data))
        queued = 0
        if len(stored) >= MIN_SHARED_RUN * len(runs):
            # Long runs: each encoded once; every peer gets the runs of others.
            run_frames: list[EncodedUpdates | None] | None = None
            for peer in peers:
                if peer.session.limits.max_frame < max_frame:
                    mine = [u for conn, run in runs if conn is not peer for u in run]
                    queued += _send_each(peer, mine)
                    continue
                if run_frames is None:
                    run_frames = [_encode(run, max_frame) for _, run in runs]
                for (conn, run), encoded in zip(runs, run_frames, strict=True):
                    if conn is peer:
                        continue
                    if encoded is not None:
                        peer.session.send_encoded(encoded)
                        queued += encoded.count
                    else:
                        queued += _send_each(peer, run)
            return queued
        # Short runs would make small frames: peers that sent nothing share
        # the frames of the whole batch, senders get their share packed.
        everything = [(p.doc, p.data) for p in stored]
        whole: EncodedUpdates | None = None
        for peer in peers:
            if peer in senders:
                mine = [u for conn, run in runs if conn is not peer for u in run]
                queued += _send_each(peer, mine)
                continue
            if whole is None and peer.session.limits.max_frame >= max_frame:
                whole = _encode(everything, max_frame)
            if whole is not None and peer.session.limits.max_frame >= max_frame:
                peer.session.send_encoded(whole)
                queued += whole.count
            else:
                queued += _send_each(peer, everything)
        return queued

    # -- other relays on the same store ------------------------------------------------

    def followed(self) -> list[str]:
        """Datasets whose commits by other relays this relay must read:
        those it has accepted connections of."""
        return list(self._followed)

    def follow(self, dataset: str) -> Follow | None:
        """The read of ``dataset``'s rows past the core's position, or None
        (not followed, or a read is out: one at a time per dataset). Run it
        on the store after every batch taken before it, before any taken after."""
        followed = self._followed.get(dataset)
        if followed is None or followed.asked is not None:
            return None
        followed.asked = Follow(dataset, followed.position, self.limits.follow_batch, self._taken)
        return followed.asked

    def behind(self, dataset: str) -> bool:
        """True when the last read of ``dataset`` was a full page: follow again."""
        followed = self._followed.get(dataset)
        return followed is not None and followed.behind and followed.asked is None

    def remote_committed(self, call: Follow, answer: FollowAnswer) -> list[int]:
        """Feed back the rows of ``call``: those committed by other relays are
        fanned out to every open connection of the dataset (same framing and
        slow-consumer rules as local fan-out), our own are skipped. When a
        batch taken before the call is not settled yet, the answer is held
        and acted on when it is (by ``settle``). None (rows compacted away)
        resyncs: the dataset's connections are closed with ``unavailable``
        and catch up by state vector when they reconnect. Returns the
        connections given frames (send them)."""
        followed = self._followed.get(call.dataset)
        if followed is None or followed.asked is not call:
            return []  # no longer followed (or followed again since): dropped
        followed.answered, followed.held = True, answer
        return self._release(call.dataset, followed)

    def _release(self, dataset: str, followed: _Followed) -> list[int]:
        """Act on the held answer once no batch taken before its call is unsettled."""
        call, answer = followed.asked, followed.held
        assert call is not None
        if any(batch_id <= call.barrier for batch_id in self._inflight):
            return []
        followed.asked, followed.answered, followed.held = None, False, None
        if answer is None:
            return self._resync(dataset, "its updates were compacted before this relay read them")
        fresh: list[tuple[str, bytes]] = []
        own = followed.own
        for row in answer:
            if row.position <= followed.position:
                continue
            while own and own[0] < row.position:
                own.popleft()  # not read back (cannot happen with gapless positions)
            if own and own[0] == row.position:
                own.popleft()
            else:
                fresh.append((row.doc, row.data))
            followed.position = row.position
        followed.skip_own()
        followed.behind = len(answer) >= call.limit
        peers = [
            c
            for c in self._datasets.get(dataset, {}).values()
            if c.session.state is SessionState.OPEN
        ]
        if not fresh or not peers:
            return []
        self.metrics.updates_followed += len(fresh)
        max_frame = self.limits.protocol.max_frame
        # Encoded once for every peer that can take the relay's frames (None:
        # an update needs chunking, each peer gets them packed for it).
        shared = _encode(fresh, max_frame)
        for peer in peers:
            if shared is not None and peer.session.limits.max_frame >= max_frame:
                peer.session.send_encoded(shared)
                self.metrics.updates_fanned_out += shared.count
            else:
                self.metrics.updates_fanned_out += _send_each(peer, fresh)
        return [c.id for c in peers]

    def _resync(self, dataset: str, why: str) -> list[int]:
        """The core lost its place in ``dataset``'s log: end its connections
        (``unavailable``, close code 1013) and stop following it; reconnected
        nodes sync by state vector and follow again from the head."""
        self._followed.pop(dataset, None)
        self.metrics.follow_resyncs += 1
        log.warning("dataset %r: %s; closing its connections to resync", dataset, why)
        out = []
        for conn in self._datasets.get(dataset, {}).values():
            if conn.session.state is SessionState.OPEN:
                conn.close_code, conn.close_reason = CLOSE_TRY_AGAIN, "resync"
                self._fail(
                    conn, codes.UNAVAILABLE, "the relay lost its place in the log; reconnect"
                )
                out.append(conn.id)
        return out

    # -- revocations and shutdown ----------------------------------------------------

    def grant(self, cid: int) -> NodeGrant | None:
        """The grant ``cid``'s hello was accepted with, if it was."""
        conn = self._conns.get(cid)
        return conn.grant if conn is not None else None

    def grants(self) -> list[tuple[int, NodeGrant]]:
        """(connection, grant) of every accepted connection, for a revocation check."""
        return [(cid, c.grant) for cid, c in self._conns.items() if c.grant is not None]

    def revoke(self, cid: int, why: str) -> bool:
        """The grant of ``cid`` no longer holds (``why``, one line): end it
        with ``auth_failed`` (close code 1008). False when it was not open."""
        conn = self._conns.get(cid)
        if conn is None or conn.session.state is not SessionState.OPEN:
            return False
        log.info("%s: %s; closing its connection", conn.label(), why)
        conn.close_code = CLOSE_POLICY
        self._fail(conn, codes.AUTH_FAILED, why)
        return True

    def shut_down(self) -> None:
        """From now on: new connections are refused and updates received are
        neither stored nor acknowledged (clients send them again). What is
        queued is still committed: take and settle batches until ``idle``,
        then ``close_all``."""
        self.stopping = True

    def close_all(self, code: str = codes.UNAVAILABLE, message: str = "") -> list[int]:
        """End every connection with an error frame (``unavailable``: the
        relay is shutting down) and close code 1001; returns their ids."""
        why = message or "the relay is shutting down; reconnect later"
        out = []
        for conn in list(self._conns.values()):
            conn.close_code, conn.close_reason = CLOSE_GOING_AWAY, "relay shutting down"
            self._fail(conn, code, why)
            out.append(conn.id)
        return out

    # -- internals ----------------------------------------------------------------

    def _fail(self, conn: _Conn, code: str, message: str) -> None:
        if conn.session.state in (SessionState.CLOSING, SessionState.CLOSED):
            return
        self.metrics.protocol_errors[code] += 1
        conn.session.fail(code, message)


def _encode(updates: list[tuple[str, bytes]], max_frame: int) -> EncodedUpdates | None:
    """The fan-out frames of ``updates`` for every peer, or None when they
    cannot be shared (an update needs chunking: peers get it per session)."""
    try:
        return encode_updates(updates, max_frame=max_frame)
    except LocalProtocolError:
        return None


def _send_each(conn: _Conn, updates: Iterable[tuple[str, bytes]]) -> int:
    """Queue ``updates`` for ``conn`` in order, packed into as few frames as
    its limits allow (one ``send_updates``); returns how many were queued.
    Should the batch be refused (an update over the subscriber's transfer
    limits), the updates go one by one and only the refused ones are left
    out, logged."""
    updates = list(updates)
    try:
        conn.session.send_updates(updates)
        return len(updates)
    except LocalProtocolError:
        pass  # nothing was queued: retry one by one to keep the good ones
    sent = 0
    for doc, data in updates:
        try:
            conn.session.send_update(doc, data)
        except LocalProtocolError as exc:
            log.error("%s: cannot fan out %r: %s", conn.label(), doc, exc)
            continue
        sent += 1
    return sent


def rejection(doc: str, error: BranchlineError | None) -> tuple[str, str]:
    """The error frame (code, message) for an update the store rejected in a
    way that ends the session (the others are refused: ``refusal_code``).
    The message names the document quoted (the client looks for it)."""
    message = f"update of {doc!r} not stored: {error}"
    if isinstance(error, ReadOnlyNode):
        return codes.READ_ONLY, message
    if isinstance(error, AuthError):  # not enrolled or revoked since the hello
        return codes.AUTH_FAILED, message
    if isinstance(error, RelayLimitError):
        return codes.LIMIT_EXCEEDED, message
    return codes.INTERNAL, message
