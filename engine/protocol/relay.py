"""The relay side of a sync session. See docs/protocol.md.

The session never checks tokens or touches storage: it emits events and the
driver (the relay server) answers after doing the I/O::

    HelloReceived   -> check token/dataset in the store -> accept(read_only=..., documents=...)
                       or reject("auth_failed" | "wrong_dataset", message)
    SyncRequested   -> sync_reply(doc, diff the client lacks, relay's state vector)
    UpdateReceived  -> commit durably (deduplicate), then ack([ref]); fan out to
                       the dataset's other sessions with their send_updates([(doc, data), ...])
                       (a client's ``updates`` frame yields one event per item, in order)
    LeaseRequested  -> grant_lease(ref, first, last) or deny_lease(ref, message)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn, cast

from ..errors import LocalProtocolError, RemoteProtocolError
from . import codes
from .events import Event, HelloReceived, LeaseRequested, SyncRequested, UpdateReceived
from .limits import (
    DEFAULT_HEARTBEAT_MS,
    MAX_DOCS_PER_FRAME,
    MAX_DOCUMENTS,
    PROTOCOL_VERSIONS,
    Limits,
)
from .messages import (
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
    encode_message,
    is_doc_name,
)
from .session import Item, Session, SessionState, encode_batch, pack_updates


def _check(ok: bool, code: str, message: str) -> None:
    if not ok:
        raise LocalProtocolError(code, message)


def _check_doc(doc: object) -> None:
    """Raises LocalProtocolError (``bad_frame``) unless ``doc`` is a document name."""
    _check(is_doc_name(doc), codes.BAD_FRAME, f"invalid document name {doc!r}")


@dataclass(frozen=True)
class EncodedUpdates:
    """Relay -> client fan-out frames encoded once, for any number of
    sessions (``encode_updates``, then ``RelaySession.send_encoded``).
    ``count`` updates in ``nbytes`` bytes of ``frames``, each at most
    ``max_frame`` bytes."""

    frames: tuple[bytes, ...]
    count: int
    nbytes: int
    max_frame: int


def encode_updates(updates: Iterable[tuple[str, bytes]], *, max_frame: int) -> EncodedUpdates:
    """The frames fanning out ``updates`` ((doc, data) each, in order), packed
    as ``RelaySession.send_updates`` packs them, encoded once: the same bytes
    may then go to every session whose ``max_frame`` is at least
    ``max_frame``. Raises LocalProtocolError: ``bad_frame`` for a bad name or
    data that is not bytes, ``frame_too_large`` when an update needs chunking
    (chunk transfer ids belong to one session: send such updates with
    ``send_updates``)."""
    items = _fanout_items(updates)
    frames = [
        encode_batch(group, max_frame)
        if len(group) > 1
        else encode_message(Update(group[0][0], group[0][1]), max_frame=max_frame)
        for group in pack_updates(items, max_frame)
    ]
    return EncodedUpdates(tuple(frames), len(items), sum(map(len, frames)), max_frame)


def _fanout_items(updates: Iterable[tuple[str, bytes]]) -> list[Item]:
    """(doc, data, None) of each fan-out update; raises LocalProtocolError
    (``bad_frame``) for a bad name or data that is not bytes."""
    items: list[Item] = []
    for doc, data in updates:
        _check_doc(doc)
        _check(isinstance(data, bytes), codes.BAD_FRAME, f"update of {doc!r} is not bytes")
        items.append((doc, data, None))
    return items


class RelaySession(Session):
    """Sans-I/O relay session for one client connection. Waits for ``hello``."""

    def __init__(
        self,
        *,
        versions: Sequence[int] = PROTOCOL_VERSIONS,
        limits: Limits | None = None,
        heartbeat_ms: int = DEFAULT_HEARTBEAT_MS,
    ) -> None:
        super().__init__(limits or Limits(), heartbeat_ms)
        self._versions = tuple(versions)
        self.hello: Hello | None = None
        self.version: int | None = None
        self.read_only = False
        self._pending_refs: set[int] = set()  # client updates not acked yet
        self._pending_syncs: set[str] = set()  # sync1 not answered yet
        self._leases: dict[int, str] = {}  # lease ref -> series
        self._last_pass = -1
        self._end_pass: int | None = None  # sync_end received, synced not sent
        self._end_waits: set[int] = set()  # refs to ack before that synced

    # -- state ------------------------------------------------------------------

    @property
    def dataset(self) -> str | None:
        """The dataset named in hello (None before it)."""
        return self.hello.dataset if self.hello else None

    @property
    def node(self) -> str | None:
        return self.hello.node if self.hello else None

    @property
    def pending_refs(self) -> frozenset[int]:
        """Client updates emitted as events and not acked yet."""
        return frozenset(self._pending_refs)

    # -- handshake ----------------------------------------------------------------

    def accept(
        self, *, read_only: bool, documents: Iterable[str] = (), carrier: bool = False
    ) -> None:
        """Admit the client: queue ``welcome`` (with ``carrier``: the relay
        takes other nodes' entries from it) and the ``docs`` list (the
        dataset's document names); the session is OPEN. Raises
        LocalProtocolError unless a hello awaits an answer, or for bad names."""
        _check(
            self._state is SessionState.CONNECTING and self.hello is not None,
            codes.PROTOCOL_VIOLATION,
            "accept needs a hello awaiting an answer",
        )
        assert self.hello is not None and self.version is not None
        names = list(dict.fromkeys(documents))
        _check(
            len(names) <= MAX_DOCUMENTS,
            codes.LIMIT_EXCEEDED,
            f"more than {MAX_DOCUMENTS} documents",
        )
        for name in names:
            _check_doc(name)
        self.read_only = read_only
        hello = self.hello
        self._send(
            Welcome(
                self.version,
                hello.dataset,
                hello.node,
                read_only,
                self._limits,
                self._heartbeat_ms,
                carrier,
            )
        )
        for start in range(0, max(len(names), 1), MAX_DOCS_PER_FRAME):
            part = names[start : start + MAX_DOCS_PER_FRAME]
            self._send(Docs(tuple(part), final=start + MAX_DOCS_PER_FRAME >= len(names)))
        self._state = SessionState.OPEN

    def reject(self, code: str, message: str) -> None:
        """Refuse the client with an error frame (``auth_failed``,
        ``wrong_dataset``, ...): the session is CLOSING. Same as ``fail``."""
        self.fail(code, message)

    # -- answers ------------------------------------------------------------------

    def sync_reply(self, doc: str, diff: bytes, state_vector: bytes) -> None:
        """Answer ``SyncRequested(doc)``: queue ``sync2`` (``diff``, chunked when
        large) then ``sync1`` (the relay's ``state_vector``). Raises
        LocalProtocolError when no request for ``doc`` is pending or the diff
        exceeds the transfer limits. Ignored when closing or closed."""
        if not self._require_open("reply to a sync request"):
            return
        _check(
            doc in self._pending_syncs,
            codes.PROTOCOL_VIOLATION,
            f"no sync request for {doc!r} is pending",
        )
        frames_before = len(self._out)
        try:
            self._send(Sync2(doc, diff))
            self._send(Sync1(doc, state_vector))
        except LocalProtocolError:
            del self._out[frames_before:]  # never half an answer
            raise
        self._pending_syncs.discard(doc)

    def ack(self, refs: Iterable[int]) -> None:
        """Acknowledge client updates as durably stored (call only after the
        commit). Raises LocalProtocolError for a ref not pending. Ignored when
        closing or closed (the client will send them again)."""
        if not self._require_open("ack"):
            return
        refs = self._pending(refs)
        if refs:
            self._send(Ack(refs))
            self._answered(refs)

    def refuse(self, doc: str, refs: Iterable[int], code: str, message: str) -> None:
        """Refuse client updates ``refs`` of ``doc`` without ending the
        session (call only when nothing of them was stored): queue a
        ``refused`` frame; they are answered, like acked ones, and never acked.
        ``code`` must be one of ``codes.REFUSAL_CODES``; ``message`` names the
        document and says what to do. Raises LocalProtocolError for another
        code, a bad name, or a ref not pending. Ignored when closing or closed."""
        if not self._require_open("refuse updates"):
            return
        _check(
            code in codes.REFUSAL_CODES,
            codes.BAD_FRAME,
            f"{code!r} is not a refusal code; use fail() to end the session",
        )
        _check_doc(doc)
        refs = self._pending(refs)
        _check(bool(refs), codes.PROTOCOL_VIOLATION, "refuse needs at least one ref")
        self._send(Refused(doc, refs, code, message))
        self._answered(refs)

    def send_update(self, doc: str, data: bytes) -> None:
        """Fan an update of another node out to this client (no ack comes back).
        Raises LocalProtocolError for a bad name or an update over the transfer
        limits. Ignored when closing or closed."""
        if not self._require_open("send an update"):
            return
        _check_doc(doc)
        self._send(Update(doc, data))

    def send_updates(self, updates: Sequence[tuple[str, bytes]]) -> None:
        """Fan several updates of other nodes out to this client, (doc, data)
        each, in this order (no ack comes back): packed into ``updates`` frames
        under ``max_frame``, each frame encoded once; an update too big to
        share a frame goes alone as an ``update`` frame (chunked if need be).
        The client sees exactly what ``send_update`` of each, in order, would
        have produced. All or nothing: raises LocalProtocolError, with nothing
        queued, for a bad name, data that is not bytes, or an update over the
        transfer limits. Ignored when closing or closed."""
        if not self._require_open("send updates"):
            return
        self._send_updates(_fanout_items(updates))

    def send_encoded(self, encoded: EncodedUpdates) -> None:
        """Queue fan-out frames made once by ``encode_updates`` for several
        sessions: the client sees exactly what ``send_updates`` of the same
        updates would have shown it (frames may be cut differently). Raises
        LocalProtocolError (``frame_too_large``, nothing queued) when they were
        packed for a larger ``max_frame`` than this session's (use
        ``send_updates`` for it). Ignored when closing or closed."""
        if not self._require_open("send updates"):
            return
        _check(
            encoded.max_frame <= self._limits.max_frame,
            codes.FRAME_TOO_LARGE,
            f"frames packed for max_frame {encoded.max_frame} exceed this session's "
            f"{self._limits.max_frame}",
        )
        self._out.extend(encoded.frames)

    def grant_lease(self, ref: int, first: int, last: int) -> None:
        """Answer ``LeaseRequested(ref)`` with numbers ``first``..``last``.
        Raises LocalProtocolError for a ref not pending or a bad range."""
        if not self._require_open("grant a lease"):
            return
        _check(ref in self._leases, codes.PROTOCOL_VIOLATION, f"lease {ref} is not pending")
        _check(
            type(first) is int and type(last) is int and 1 <= first <= last < 2**63,
            codes.BAD_FRAME,
            f"bad lease range {first!r}..{last!r}",
        )
        self._send(LeaseGrant(ref, self._leases.pop(ref), first, last))

    def deny_lease(self, ref: int, message: str) -> None:
        """Answer ``LeaseRequested(ref)`` with a refusal; the session goes on."""
        if not self._require_open("deny a lease"):
            return
        _check(ref in self._leases, codes.PROTOCOL_VIOLATION, f"lease {ref} is not pending")
        self._send(LeaseDeny(ref, self._leases.pop(ref), message))

    # -- internals --------------------------------------------------------------

    def _pending(self, refs: Iterable[int]) -> tuple[int, ...]:
        """``refs`` without repeats; raises LocalProtocolError when one is not pending."""
        out = tuple(dict.fromkeys(refs))
        unknown = [r for r in out if r not in self._pending_refs]
        _check(not unknown, codes.PROTOCOL_VIOLATION, f"refs not pending: {unknown[:5]}")
        return out

    def _answered(self, refs: tuple[int, ...]) -> None:
        """Acked or refused: no longer pending, and synced no longer waits for them."""
        self._pending_refs.difference_update(refs)
        self._end_waits.difference_update(refs)
        self._maybe_synced()

    def _maybe_synced(self) -> None:
        if self._end_pass is not None and not self._end_waits:
            self._send(Synced(self._end_pass))
            self._end_pass = None

    def _handle(self, msg: Message) -> list[Event]:
        if self._state is SessionState.CONNECTING:
            return self._handshake(msg)
        limits = self._limits
        if isinstance(msg, Update | Updates):
            items = msg.items if isinstance(msg, Updates) else (msg,)
            # Every item is checked before any is taken: a bad batch yields no
            # event. Checked for the whole batch at once (this runs for every
            # update received); the slow path below only names the culprit.
            refs = [item.ref for item in items]
            fresh = set(refs)
            if (
                None in fresh
                or self.read_only
                or len(fresh) != len(refs)
                or not fresh.isdisjoint(self._pending_refs)
                or len(self._pending_refs) + len(refs) > limits.max_inflight
            ):
                self._refuse_batch(msg, items)
            self._pending_refs.update(cast(set[int], fresh))  # None was excluded above
            return [UpdateReceived(u.doc, u.payload, u.ref) for u in items]
        if isinstance(msg, Sync1):
            if msg.doc in self._pending_syncs:
                raise self._violation(msg, f"for {msg.doc!r} while one is pending")
            if self._end_pass is not None:
                raise self._violation(msg, "between sync_end and synced")
            if len(self._pending_syncs) >= limits.max_syncs:
                raise RemoteProtocolError(
                    codes.LIMIT_EXCEEDED, f"more than {limits.max_syncs} sync requests pending"
                )
            self._pending_syncs.add(msg.doc)
            return [SyncRequested(msg.doc, msg.payload)]
        if isinstance(msg, SyncEnd):
            if self._pending_syncs or self._end_pass is not None or msg.pass_id <= self._last_pass:
                raise self._violation(msg, f"for pass {msg.pass_id}")
            self._last_pass = self._end_pass = msg.pass_id
            # Updates received before sync_end belong to the pass: synced waits
            # for their acks, so the client sees them acked before "synced".
            self._end_waits = set(self._pending_refs)
            self._maybe_synced()
            return []
        if isinstance(msg, Lease):
            if self.read_only:
                raise RemoteProtocolError(
                    codes.READ_ONLY, f"node {self.node!r} is read-only; it cannot lease numbers"
                )
            if msg.ref in self._leases:
                raise self._violation(msg, f"reusing pending lease ref {msg.ref}")
            if len(self._leases) >= limits.max_leases:
                raise RemoteProtocolError(
                    codes.LIMIT_EXCEEDED, f"more than {limits.max_leases} leases pending"
                )
            self._leases[msg.ref] = msg.series
            return [LeaseRequested(msg.series, msg.count, msg.ref)]
        raise self._violation(msg, "from a client")

    def _refuse_batch(self, msg: Message, items: Sequence[Update]) -> NoReturn:
        """Raise the error for the first item of a refused batch, in item
        order: no ref, read-only node, ref in flight or repeated, too many
        updates awaiting acks."""
        limits = self._limits
        refs: set[int] = set()
        for item in items:
            if item.ref is None:
                raise self._violation(msg, "without a ref")
            if self.read_only:
                raise RemoteProtocolError(
                    codes.READ_ONLY,
                    f"node {self.node!r} is read-only; its update was not stored",
                )
            if item.ref in self._pending_refs or item.ref in refs:
                raise self._violation(msg, f"reusing ref {item.ref} that awaits its ack")
            if len(self._pending_refs) + len(refs) >= limits.max_inflight:
                raise RemoteProtocolError(
                    codes.LIMIT_EXCEEDED,
                    f"more than {limits.max_inflight} updates await acks; wait for acks",
                )
            refs.add(item.ref)
        raise AssertionError("_refuse_batch called for a batch it accepts")

    def _handshake(self, msg: Message) -> list[Event]:
        if not isinstance(msg, Hello) or self.hello is not None:
            raise self._violation(msg, "during the handshake")
        common = set(msg.versions) & set(self._versions)
        if not common:
            raise RemoteProtocolError(
                codes.UNSUPPORTED_VERSION,
                f"the client speaks protocol versions {list(msg.versions)}, this relay "
                f"{list(self._versions)}; upgrade the older side",
            )
        self.hello = msg
        self.version = max(common)
        self._limits = self._limits.merge(msg.limits)
        return [HelloReceived(msg.dataset, msg.node, msg.token, msg.versions, self.version)]
