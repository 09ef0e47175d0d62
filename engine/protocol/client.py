"""The client (node) side of a sync session. See docs/protocol.md.

Typical driver loop (asyncio transport)::

    s = ClientSession(dataset=..., node=..., token=...)
    send(s.data_to_send())                      # hello
    for each received message m: events = s.receive_frame(m); handle events; send(s.data_to_send())
    every ~interval/2: events = s.tick(now_ms); send(s.data_to_send())

    Opened          -> s.start_sync([(doc, state_vector), ...] in upload order,
                       including Opened.documents this node lacks, with EMPTY_STATE_VECTOR)
    DiffReceived    -> node.import_updates({doc: data})
    RemoteState     -> s.answer_state(doc, [(ref, node.export_updates({doc: sv})[doc])] or [])
    UpdateReceived  -> node.import_updates({doc: data})
    Acked           -> node.ack(outbox seqs behind those refs)
    SyncComplete    -> fully synced (for `branchline sync`)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from ..errors import LocalProtocolError, RemoteProtocolError
from ..names import DATASET_RE, NODE_RE
from . import codes
from .events import (
    Acked,
    DiffReceived,
    Event,
    LeaseDenied,
    LeaseGranted,
    Opened,
    RemoteState,
    SyncComplete,
    UpdateReceived,
    UpdateRefused,
)
from .limits import (
    DEFAULT_HEARTBEAT_MS,
    MAX_DOCUMENTS,
    MAX_LEASE_COUNT,
    MAX_REF,
    PROTOCOL_VERSIONS,
    Limits,
)
from .messages import (
    SERIES_RE,
    TOKEN_RE,
    Ack,
    Docs,
    Hello,
    Lease,
    LeaseDeny,
    LeaseGrant,
    Message,
    Refused,
    Sync1,
    Sync2,
    Synced,
    SyncEnd,
    Update,
    Updates,
    Welcome,
    is_doc_name,
)
from .session import Session, SessionState

#: The Yjs state vector of an empty document: "I hold nothing of it".
EMPTY_STATE_VECTOR = b"\x00"


def _check(ok: bool, code: str, message: str) -> None:
    if not ok:
        raise LocalProtocolError(code, message)


def _check_ref(ref: int, what: str) -> None:
    _check(
        type(ref) is int and 0 <= ref <= MAX_REF,
        codes.BAD_FRAME,
        f"{what} must be an integer in [0, {MAX_REF}]",
    )


class ClientSession(Session):
    """Sans-I/O client session: queues ``hello`` on creation.

    Raises LocalProtocolError for invalid arguments (bad names, token).
    """

    def __init__(
        self,
        *,
        dataset: str,
        node: str,
        token: str,
        versions: Sequence[int] = PROTOCOL_VERSIONS,
        limits: Limits | None = None,
        heartbeat_ms: int = DEFAULT_HEARTBEAT_MS,
    ) -> None:
        super().__init__(limits or Limits(), heartbeat_ms)
        _check(
            isinstance(dataset, str) and bool(DATASET_RE.fullmatch(dataset)),
            codes.BAD_FRAME,
            f"invalid dataset name {dataset!r}",
        )
        _check(
            isinstance(node, str) and bool(NODE_RE.fullmatch(node)),
            codes.BAD_FRAME,
            f"invalid node name {node!r}",
        )
        _check(
            isinstance(token, str) and bool(TOKEN_RE.fullmatch(token)),
            codes.BAD_FRAME,
            "the token must be 1-512 printable ASCII characters",
        )
        _check(1 <= len(versions) <= 16, codes.BAD_FRAME, "give 1 to 16 protocol versions")
        self.dataset = dataset
        self.node = node
        self._versions = tuple(versions)
        self.version: int | None = None
        self.read_only = False
        #: The relay takes other nodes' entries from this node (welcome ``carrier``).
        self.carrier = False
        self._documents: list[str] = []
        self.documents: tuple[str, ...] = ()  # the relay's, once OPEN
        self._welcomed = False
        # Updates sent and not yet acknowledged: ref -> document.
        self._unacked: dict[int, str] = {}
        self._leases: dict[int, tuple[str, int]] = {}  # ref -> (series, count)
        # The current sync pass.
        self._pass_id = 0
        self._queue: deque[tuple[str, bytes]] = deque()
        self._await_diff: set[str] = set()
        self._await_state: set[str] = set()
        self._await_answer: set[str] = set()
        self._end_sent = True  # no pass running yet
        self._pass_synced = False
        self._complete_sent = True
        self._send(Hello(self._versions, dataset, node, token, self._limits))

    # -- state ------------------------------------------------------------------

    @property
    def unacked(self) -> dict[int, str]:
        """Refs sent and not acknowledged (ref -> document): what to send again
        on the next connection. A copy."""
        return dict(self._unacked)

    @property
    def inflight_room(self) -> int:
        """How many more updates may be sent before acks must arrive."""
        return self._limits.max_inflight - len(self._unacked)

    @property
    def pass_id(self) -> int:
        """The id of the latest sync pass (0 before the first)."""
        return self._pass_id

    @property
    def syncing(self) -> bool:
        """A sync pass is running (started, relay's ``synced`` not yet received)."""
        return self._pass_id > 0 and not self._pass_synced

    @property
    def synced(self) -> bool:
        """The latest pass completed and every update sent is acknowledged."""
        return self._pass_id > 0 and self._pass_synced and not self._unacked

    # -- calls ------------------------------------------------------------------

    def start_sync(self, states: Iterable[tuple[str, bytes]]) -> int:
        """Start a sync pass over ``states``: (document, Yjs state vector) in
        upload order (catalogs before vouchers, then priority; documents this
        node lacks with ``EMPTY_STATE_VECTOR``). Returns the pass id.

        sync1 frames go out at most ``limits.max_syncs`` unanswered at a time;
        the rest follow as answers arrive. Raises LocalProtocolError when not
        OPEN, while another pass runs, or for a bad or repeated document name.
        """
        _check(
            self._state is SessionState.OPEN,
            codes.PROTOCOL_VIOLATION,
            "start_sync needs an OPEN session",
        )
        _check(
            not self.syncing,
            codes.PROTOCOL_VIOLATION,
            f"sync pass {self._pass_id} is still running",
        )
        items = list(states)
        seen: set[str] = set()
        for doc, sv in items:
            _check(
                is_doc_name(doc),
                codes.BAD_FRAME,
                f"invalid document name {doc!r}",
            )
            _check(doc not in seen, codes.BAD_FRAME, f"document {doc!r} listed twice")
            _check(isinstance(sv, bytes), codes.BAD_FRAME, f"state vector of {doc!r} is not bytes")
            seen.add(doc)
        self._pass_id += 1
        self._queue = deque(items)
        self._await_diff.clear()
        self._await_state.clear()
        self._await_answer.clear()
        self._end_sent = self._pass_synced = self._complete_sent = False
        self._pump()
        return self._pass_id

    def answer_state(self, doc: str, updates: Sequence[tuple[int, bytes]] = ()) -> None:
        """Answer the ``RemoteState`` of ``doc`` with what the relay lacks:
        (ref, Yjs update) pairs, possibly none. Each is sent as an update frame
        and acknowledged like ``send_update``. Raises LocalProtocolError when no
        RemoteState of ``doc`` awaits an answer, for updates on a read-only
        session, a ref already in flight, or more than ``inflight_room`` updates.
        Ignored when the session is closing or closed."""
        if not self._require_open("answer a state"):
            return
        _check(
            doc in self._await_answer,
            codes.PROTOCOL_VIOLATION,
            f"no relay state of {doc!r} awaits an answer",
        )
        self._check_updates(doc, updates)
        for ref, data in updates:
            self._send(Update(doc, data, ref))
            self._unacked[ref] = doc
        self._await_answer.discard(doc)
        self._pump()

    def send_update(self, doc: str, data: bytes, ref: int) -> None:
        """Send a local update of ``doc``; ``ref`` (chosen by the caller, e.g. the
        outbox seq, unique among unacked refs) comes back in ``Acked`` once the
        relay stored it durably. Re-sending an update under a new ref is
        harmless. Raises LocalProtocolError when not OPEN, read-only, for a ref
        in flight or when ``inflight_room`` is 0 (wait for acks). Ignored when
        the session is closing or closed."""
        if not self._require_open("send an update"):
            return
        _check(
            is_doc_name(doc),
            codes.BAD_FRAME,
            f"invalid document name {doc!r}",
        )
        self._check_updates(doc, [(ref, data)])
        self._send(Update(doc, data, ref))
        self._unacked[ref] = doc

    def send_updates(self, updates: Sequence[tuple[str, bytes, int]]) -> None:
        """Send several local updates, (doc, data, ref) each, in this order:
        packed into ``updates`` frames under ``max_frame`` (an update too big
        to share a frame goes alone as an ``update`` frame, chunked if need
        be). Each ref is acknowledged exactly as with ``send_update``, and
        every update counts against ``inflight_room``. All or nothing: raises
        LocalProtocolError, with nothing sent, when not OPEN, read-only, for a
        bad name, a ref in flight or repeated, more updates than
        ``inflight_room``, or one over the transfer limits. Ignored when the
        session is closing or closed; an empty list sends nothing."""
        if not self._require_open("send updates"):
            return
        items = list(updates)
        if not items:
            return
        _check(
            not self.read_only,
            codes.READ_ONLY,
            "this node is read-only on the relay; it cannot send updates",
        )
        _check(
            len(items) <= self.inflight_room,
            codes.LIMIT_EXCEEDED,
            f"{len(items)} updates with {len(self._unacked)} awaiting acks exceed the limit "
            f"of {self._limits.max_inflight}; wait for acks or combine updates",
        )
        refs: set[int] = set()
        for doc, data, ref in items:
            _check(
                is_doc_name(doc),
                codes.BAD_FRAME,
                f"invalid document name {doc!r}",
            )
            _check_ref(ref, "update ref")
            _check(
                ref not in self._unacked and ref not in refs,
                codes.PROTOCOL_VIOLATION,
                f"update ref {ref} is already in flight",
            )
            _check(isinstance(data, bytes), codes.BAD_FRAME, f"update of {doc!r} is not bytes")
            refs.add(ref)
        self._send_updates(items)
        for doc, _data, ref in items:
            self._unacked[ref] = doc

    def request_lease(self, series: str, count: int, ref: int) -> None:
        """Ask for ``count`` numbers of ``blocks`` series ``series``; the answer
        is ``LeaseGranted`` or ``LeaseDenied`` with this ``ref``. Raises
        LocalProtocolError when not OPEN, read-only, for a bad argument, a ref
        already pending or more than ``limits.max_leases`` pending."""
        if not self._require_open("request a lease"):
            return
        _check(not self.read_only, codes.READ_ONLY, "a read-only node cannot lease numbers")
        _check(
            isinstance(series, str) and bool(SERIES_RE.fullmatch(series)),
            codes.BAD_FRAME,
            f"invalid series name {series!r}",
        )
        _check(
            type(count) is int and 1 <= count <= MAX_LEASE_COUNT,
            codes.BAD_FRAME,
            f"lease count must be in [1, {MAX_LEASE_COUNT}]",
        )
        _check_ref(ref, "lease ref")
        _check(ref not in self._leases, codes.PROTOCOL_VIOLATION, f"lease ref {ref} is pending")
        _check(
            len(self._leases) < self._limits.max_leases,
            codes.LIMIT_EXCEEDED,
            f"{len(self._leases)} leases pending; wait for answers",
        )
        self._send(Lease(series, count, ref))
        self._leases[ref] = (series, count)

    # -- internals --------------------------------------------------------------

    def _check_updates(self, doc: str, updates: Sequence[tuple[int, bytes]]) -> None:
        if not updates:
            return
        _check(
            not self.read_only,
            codes.READ_ONLY,
            "this node is read-only on the relay; it cannot send updates",
        )
        _check(
            len(updates) <= self.inflight_room,
            codes.LIMIT_EXCEEDED,
            f"{len(self._unacked)} updates await acks (limit {self._limits.max_inflight}); "
            "wait for acks or combine updates",
        )
        refs = set()
        for ref, data in updates:
            _check_ref(ref, "update ref")
            _check(
                ref not in self._unacked and ref not in refs,
                codes.PROTOCOL_VIOLATION,
                f"update ref {ref} is already in flight",
            )
            _check(isinstance(data, bytes), codes.BAD_FRAME, f"update of {doc!r} is not bytes")
            refs.add(ref)

    def _pump(self) -> None:
        """Send queued sync1 frames within the window; sync_end when all done."""
        while self._queue and len(self._await_state) < self._limits.max_syncs:
            doc, sv = self._queue.popleft()
            self._send(Sync1(doc, sv))
            self._await_diff.add(doc)
            self._await_state.add(doc)
        if not (self._end_sent or self._queue or self._await_state or self._await_answer):
            self._end_sent = True
            self._send(SyncEnd(self._pass_id))

    def _maybe_complete(self) -> list[Event]:
        if self._pass_synced and not self._unacked and not self._complete_sent:
            self._complete_sent = True
            return [SyncComplete(self._pass_id)]
        return []

    def _handle(self, msg: Message) -> list[Event]:
        if self._state is SessionState.CONNECTING:
            return self._handshake(msg)
        if isinstance(msg, Sync2):
            if msg.doc not in self._await_diff:
                raise self._violation(msg, f"for {msg.doc!r}: no sync1 of it awaits a diff")
            self._await_diff.discard(msg.doc)
            return [DiffReceived(msg.doc, msg.payload)]
        if isinstance(msg, Sync1):
            if msg.doc not in self._await_state or msg.doc in self._await_diff:
                raise self._violation(msg, f"for {msg.doc!r}: not after its sync2")
            self._await_state.discard(msg.doc)
            self._await_answer.add(msg.doc)
            return [RemoteState(msg.doc, msg.payload)]
        if isinstance(msg, Synced):
            if not self._end_sent or self._pass_synced or msg.pass_id != self._pass_id:
                raise self._violation(msg, f"for pass {msg.pass_id}")
            self._pass_synced = True
            return self._maybe_complete()
        if isinstance(msg, Update):
            if msg.ref is not None:
                raise self._violation(msg, "with a ref (relay updates carry none)")
            return [UpdateReceived(msg.doc, msg.payload)]
        if isinstance(msg, Updates):
            if any(u.ref is not None for u in msg.items):
                raise self._violation(msg, "with a ref (relay updates carry none)")
            return [UpdateReceived(u.doc, u.payload) for u in msg.items]
        if isinstance(msg, Ack):
            unknown = [r for r in msg.refs if r not in self._unacked]
            if unknown:
                raise self._violation(msg, f"for refs never sent or already acked: {unknown[:5]}")
            for ref in msg.refs:
                del self._unacked[ref]
            return [Acked(msg.refs), *self._maybe_complete()]
        if isinstance(msg, Refused):
            # Any code is taken (a later relay may refuse for new reasons);
            # the refs must be ours, in flight, and of that document.
            wrong = [r for r in msg.refs if self._unacked.get(r) != msg.doc]
            if wrong:
                raise self._violation(msg, f"for refs not in flight for {msg.doc!r}: {wrong[:5]}")
            for ref in msg.refs:
                del self._unacked[ref]
            return [
                UpdateRefused(msg.doc, msg.refs, msg.code, msg.message),
                *self._maybe_complete(),
            ]
        if isinstance(msg, LeaseGrant | LeaseDeny):
            pending = self._leases.get(msg.ref)
            if pending is None or pending[0] != msg.series:
                raise self._violation(msg, f"for lease ref {msg.ref} of {msg.series!r}")
            del self._leases[msg.ref]
            if isinstance(msg, LeaseDeny):
                return [LeaseDenied(msg.ref, msg.series, msg.message)]
            if msg.last - msg.first + 1 > pending[1]:
                raise self._violation(msg, f"with more numbers than the {pending[1]} asked for")
            return [LeaseGranted(msg.ref, msg.series, msg.first, msg.last)]
        raise self._violation(msg, "from a relay")

    def _handshake(self, msg: Message) -> list[Event]:
        if isinstance(msg, Welcome) and not self._welcomed:
            if msg.version not in self._versions:
                raise RemoteProtocolError(
                    codes.UNSUPPORTED_VERSION,
                    f"relay selected version {msg.version}; "
                    f"this node speaks {list(self._versions)}",
                )
            if msg.dataset != self.dataset:
                raise RemoteProtocolError(
                    codes.WRONG_DATASET,
                    f"the relay serves dataset {msg.dataset!r} but this node belongs to "
                    f"{self.dataset!r}; check the relay address",
                )
            if msg.node != self.node:
                raise self._violation(msg, f"for node {msg.node!r} (this is {self.node!r})")
            if msg.limits.merge(self._limits) != msg.limits:
                raise self._violation(msg, "with limits above the ones this node offered")
            self._welcomed = True
            self.version = msg.version
            self.read_only = msg.read_only
            self.carrier = msg.carrier
            self._limits = msg.limits
            self._heartbeat_ms = msg.heartbeat_ms
            return []
        if isinstance(msg, Docs) and self._welcomed:
            if len(self._documents) + len(msg.names) > MAX_DOCUMENTS:
                raise RemoteProtocolError(
                    codes.LIMIT_EXCEEDED, f"relay lists more than {MAX_DOCUMENTS} documents"
                )
            self._documents.extend(msg.names)
            if not msg.final:
                return []
            self.documents = tuple(dict.fromkeys(self._documents))
            self._state = SessionState.OPEN
            assert self.version is not None
            return [
                Opened(
                    self.version,
                    self.dataset,
                    self.node,
                    self.read_only,
                    self._limits,
                    self._heartbeat_ms,
                    self.documents,
                    self.carrier,
                )
            ]
        raise self._violation(msg, "during the handshake")
