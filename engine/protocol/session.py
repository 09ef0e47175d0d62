"""What client and relay sessions share: state, the outgoing queue, chunking
and reassembly, error frames and heartbeats.

A session never does I/O and never reads a clock: the driver feeds it each
received websocket message (``receive_frame``), the time (``tick``), and sends
what ``data_to_send`` returns, one websocket binary message per item.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import orjson

from ..errors import LocalProtocolError, PeerRejected, ProtocolError, RemoteProtocolError
from . import codes
from .events import ErrorReceived, Event, HeartbeatTimeout
from .frames import encode_frame
from .limits import (
    DEAD_AFTER_INTERVALS,
    DEFAULT_HEARTBEAT_MS,
    HEADER_LENGTH_BYTES,
    LIMIT_RANGES,
    MAX_BATCH_ITEMS,
    MAX_HEADER_BYTES,
    MAX_HEARTBEAT_MS,
    MAX_REF,
    MIN_HEARTBEAT_MS,
    Limits,
)
from .messages import (
    Chunk,
    ChunkableMessage,
    Error,
    Message,
    Ping,
    Pong,
    Sync1,
    Sync2,
    Update,
    batch_item,
    decode_message,
    encode_message,
    header_of,
)

#: Local reason code of a session ended by heartbeat silence (never on the wire).
TIMEOUT = "timeout"


class SessionState(enum.Enum):
    """CONNECTING: handshake under way. OPEN: sync and live updates.
    CLOSING: this side queued an error frame; send ``data_to_send()`` then close
    the connection (received frames are ignored). CLOSED: nothing more to send
    or receive; close the connection."""

    CONNECTING = "connecting"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass
class _Transfer:
    head: ChunkableMessage
    count: int
    size: int
    parts: list[bytes] = field(default_factory=list)
    received: int = 0


#: Bytes of an ``updates`` item entry around its values: {"doc":"","size":} and ,"ref":
_ENTRY_BYTES = len(orjson.dumps(batch_item("", 0, None))) - 1
_REF_BYTES = len(orjson.dumps(batch_item("", 0, 0))) - 1 - _ENTRY_BYTES - 1


#: One update to pack: (document, Yjs update, ref or None).
Item = tuple[str, bytes, int | None]
#: Bytes of a frame holding no item: length prefix + the header's JSON.
_EMPTY_BATCH = HEADER_LENGTH_BYTES + len(orjson.dumps({"t": "updates", "items": []}))


def _entry_bytes(item: Item) -> int:
    """Bytes one item adds to an ``updates`` header, its separating comma
    included. Exact for document names matching DOC_RE (ASCII, nothing to
    escape), which every sender checks first; computed, not encoded, as it
    runs once per update."""
    doc, payload, ref = item
    size = _ENTRY_BYTES + len(doc) + len(str(len(payload))) + 1
    if ref is not None:
        size += _REF_BYTES + len(str(ref))
    return size


def pack_updates(items: Sequence[Item], max_frame: int) -> Iterator[list[Item]]:
    """``items`` cut, in order, into groups that each fit one frame of
    ``max_frame`` bytes: a group of several goes as one ``updates`` frame
    (within the header limit and ``MAX_BATCH_ITEMS``), a group of one as a
    single ``update`` frame, chunked when it is too big for any frame.
    Callers validate names first (``_entry_bytes`` relies on them)."""
    batch: list[Item] = []
    header = size = 0  # the pending batch's item-header bytes and frame bytes
    for item in items:
        entry = _entry_bytes(item)
        payload = len(item[1])
        if _EMPTY_BATCH + entry + payload > max_frame:
            if batch:  # too big to share a frame: alone, in order
                yield batch
                batch, header, size = [], 0, 0
            yield [item]
            continue
        if (
            len(batch) >= MAX_BATCH_ITEMS
            or _EMPTY_BATCH + size + entry + payload > max_frame
            or _EMPTY_BATCH + header + entry > MAX_HEADER_BYTES + HEADER_LENGTH_BYTES
        ):
            yield batch
            batch, header, size = [], 0, 0
        batch.append(item)
        header += entry
        size += entry + payload
    if batch:
        yield batch


def encode_batch(items: Sequence[Item], max_frame: int) -> bytes:
    """The ``updates`` frame of a group from ``pack_updates`` (two or more
    items); built from the items directly, without message objects, as fan-out
    encodes one per commit batch. Raises LocalProtocolError when it does not
    fit ``max_frame`` (it does when ``pack_updates`` made the group)."""
    entries = [batch_item(doc, len(data), ref) for doc, data, ref in items]
    header = {"t": "updates", "items": entries}
    return encode_frame(header, b"".join([data for _, data, _ in items]), max_frame=max_frame)


class Session:
    """Base of ``ClientSession`` and ``RelaySession``; not used directly."""

    def __init__(self, limits: Limits, heartbeat_ms: int) -> None:
        if type(heartbeat_ms) is not int or not (
            MIN_HEARTBEAT_MS <= heartbeat_ms <= MAX_HEARTBEAT_MS
        ):
            raise LocalProtocolError(
                codes.BAD_FRAME,
                f"heartbeat_ms must be in [{MIN_HEARTBEAT_MS}, {MAX_HEARTBEAT_MS}]",
            )
        self._state = SessionState.CONNECTING
        self._limits = limits
        self._heartbeat_ms = heartbeat_ms
        self._out: list[bytes] = []
        self._incoming: dict[int, _Transfer] = {}
        self._next_transfer = 0
        self._last_rx_ms: int | None = None
        self._last_tx_ms: int | None = None
        self._rx_since_tick = False
        self._tx_since_tick = False
        #: Why the session ended (None while it has not, or on a clean close).
        self.error: ProtocolError | None = None

    # -- public, both sides ---------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def limits(self) -> Limits:
        """The limits in force: own limits before the handshake, negotiated after."""
        return self._limits

    @property
    def heartbeat_ms(self) -> int:
        return self._heartbeat_ms

    def receive_frame(self, data: bytes) -> list[Event]:
        """Handle one received websocket message; returns the events it causes.

        Frames arriving in CLOSING or CLOSED are ignored. Raises
        RemoteProtocolError when the frame is malformed, over a limit or not
        allowed now: the session has then queued an error frame with the same
        code and is CLOSING (send ``data_to_send()``, then close).
        """
        if self._state in (SessionState.CLOSING, SessionState.CLOSED):
            return []
        self._rx_since_tick = True
        try:
            msg: Message | None = decode_message(data, max_frame=self._limits.max_frame)
            if isinstance(msg, Chunk):
                msg = self._reassemble(msg)
            if msg is None:
                return []
            if isinstance(msg, Error):
                self._state = SessionState.CLOSED
                self.error = PeerRejected(msg.code, msg.message)
                self._out.clear()
                return [ErrorReceived(msg.code, msg.message)]
            if isinstance(msg, Ping | Pong):
                if self._state is not SessionState.OPEN:
                    raise self._violation(msg, "before the handshake completed")
                if isinstance(msg, Ping):
                    self._send(Pong())
                return []
            return self._handle(msg)
        except RemoteProtocolError as exc:
            self._close_with(exc.code, exc.message)
            self.error = exc
            raise

    def data_to_send(self) -> list[bytes]:
        """Frames to send, in order, one websocket binary message each; empties
        the queue. After the last frames of a CLOSING session the state is CLOSED."""
        out, self._out = self._out, []
        if out:
            self._tx_since_tick = True
        if self._state is SessionState.CLOSING:
            self._state = SessionState.CLOSED
        return out

    def tick(self, now_ms: int) -> list[Event]:
        """Advance time to ``now_ms`` (monotonic milliseconds). Queues a ping
        when this side has sent nothing for a heartbeat interval (OPEN only);
        returns ``[HeartbeatTimeout]`` and closes the session when nothing was
        received for ``DEAD_AFTER_INTERVALS`` intervals (in CONNECTING too, which
        bounds the handshake). Call it at least every interval / 2; receptions
        are dated by the next tick, so the precision is the tick period."""
        if self._state in (SessionState.CLOSING, SessionState.CLOSED):
            return []
        if self._last_rx_ms is None or self._rx_since_tick:
            self._last_rx_ms = now_ms
        if self._last_tx_ms is None or self._tx_since_tick or self._out:
            self._last_tx_ms = now_ms
        self._rx_since_tick = self._tx_since_tick = False
        silent = now_ms - self._last_rx_ms
        if silent >= DEAD_AFTER_INTERVALS * self._heartbeat_ms:
            self._state = SessionState.CLOSED
            self.error = RemoteProtocolError(
                TIMEOUT, f"nothing received from the peer for {silent} ms; the link is dead"
            )
            return [HeartbeatTimeout(silent)]
        if self._state is SessionState.OPEN and now_ms - self._last_tx_ms >= self._heartbeat_ms:
            self._send(Ping())
            self._last_tx_ms = now_ms
        return []

    def fail(self, code: str, message: str) -> None:
        """End the session with an error frame (e.g. ``bad_update`` when the
        CRDT layer refused a payload, ``internal`` when the store failed,
        ``unavailable`` on shutdown). The session is CLOSING: send
        ``data_to_send()``, then close. Ignored when already closing or closed."""
        if self._state in (SessionState.CLOSING, SessionState.CLOSED):
            return
        if code not in codes.CODES:
            raise LocalProtocolError(codes.BAD_FRAME, f"unknown error code {code!r}")
        self._close_with(code, message)
        self.error = LocalProtocolError(code, message)

    def close(self) -> None:
        """The connection is gone or being closed without an error (transport
        closed, peer disconnected): the session is CLOSED; queued frames are dropped."""
        self._state = SessionState.CLOSED
        self._out.clear()

    # -- for subclasses -------------------------------------------------------

    def _handle(self, msg: Message) -> list[Event]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _violation(self, msg: Message, why: str) -> RemoteProtocolError:
        name = header_of(msg)["t"]
        return RemoteProtocolError(codes.PROTOCOL_VIOLATION, f"unexpected {name!r} frame {why}")

    def _close_with(self, code: str, message: str) -> None:
        # An error frame is the last thing this side sends; anything queued
        # before it still goes out first (e.g. acks of committed updates).
        self._out.append(encode_message(Error(code, message), max_frame=self._limits.max_frame))
        self._state = SessionState.CLOSING

    def _require_open(self, what: str) -> bool:
        """True when OPEN; False when closing/closed (the call is a no-op, as
        asynchronous drivers race with the connection's end). Raises
        LocalProtocolError in CONNECTING."""
        if self._state is SessionState.OPEN:
            return True
        if self._state is SessionState.CONNECTING:
            raise LocalProtocolError(
                codes.PROTOCOL_VIOLATION, f"cannot {what} before the handshake completed"
            )
        return False

    def _send(self, msg: Message) -> None:
        """Queue ``msg``, split into chunks when its frame exceeds max_frame.
        Raises LocalProtocolError (nothing queued) when even chunks cannot carry it."""
        try:
            self._out.append(encode_message(msg, max_frame=self._limits.max_frame))
            return
        except LocalProtocolError as exc:
            if exc.code != codes.FRAME_TOO_LARGE or not isinstance(msg, Sync1 | Sync2 | Update):
                raise
        self._out.extend(self._chunks(msg))

    def _send_updates(self, updates: Sequence[Item]) -> None:
        """Queue ``updates`` in order, packed into as few ``updates`` frames as
        fit ``max_frame``, the header limit and ``MAX_BATCH_ITEMS``. A lone
        item, or one too big to share a frame, goes as a single ``update``
        frame (chunked when needed), between the batches around it. Raises
        LocalProtocolError with nothing queued when one exceeds the transfer
        limits; callers validate names, refs and types first."""
        max_frame = self._limits.max_frame
        frames_before = len(self._out)
        try:
            for group in pack_updates(updates, max_frame):
                if len(group) == 1:
                    self._send(Update(*group[0]))
                else:
                    self._out.append(encode_batch(group, max_frame))
        except LocalProtocolError:
            del self._out[frames_before:]  # all or nothing
            raise

    def _chunks(self, msg: ChunkableMessage) -> list[bytes]:
        limits = self._limits
        payload = msg.payload
        head = replace(msg, payload=b"")
        # The largest chunk header this transfer can have; parts are sized so
        # every frame fits max_frame whatever the digits of id/i/n/size.
        worst = {
            "t": "chunk",
            "id": MAX_REF,
            "i": LIMIT_RANGES["max_chunks"][1],
            "n": LIMIT_RANGES["max_chunks"][1],
            "m": header_of(head),
            "size": LIMIT_RANGES["max_transfer"][1],
        }
        part = limits.max_frame - HEADER_LENGTH_BYTES - len(orjson.dumps(worst))
        count = -(-len(payload) // part)
        if len(payload) > limits.max_transfer or count > limits.max_chunks:
            raise LocalProtocolError(
                codes.FRAME_TOO_LARGE,
                f"payload of {len(payload)} bytes for {msg.doc!r} exceeds the transfer limits "
                f"({limits.max_transfer} bytes, {limits.max_chunks} chunks); split the update",
            )
        transfer = self._next_transfer
        self._next_transfer += 1
        frames = []
        for index in range(count):
            piece = payload[index * part : (index + 1) * part]
            chunk = (
                Chunk(transfer, 0, count, piece, size=len(payload), head=head)
                if index == 0
                else Chunk(transfer, index, count, piece)
            )
            frames.append(encode_message(chunk, max_frame=limits.max_frame))
        return frames

    def _reassemble(self, chunk: Chunk) -> ChunkableMessage | None:
        """Add one chunk; the whole message once its last chunk arrived."""
        if self._state is not SessionState.OPEN:
            raise self._violation(chunk, "before the handshake completed")
        limits = self._limits
        if chunk.index == 0:
            assert chunk.head is not None and chunk.size is not None  # decode guarantees
            if chunk.transfer in self._incoming:
                raise RemoteProtocolError(
                    codes.PROTOCOL_VIOLATION, f"chunk transfer id {chunk.transfer} reused"
                )
            if len(self._incoming) >= limits.max_transfers:
                raise RemoteProtocolError(
                    codes.LIMIT_EXCEEDED,
                    f"more than {limits.max_transfers} chunked transfers at once",
                )
            if chunk.count > limits.max_chunks or chunk.size > limits.max_transfer:
                raise RemoteProtocolError(
                    codes.FRAME_TOO_LARGE,
                    f"transfer of {chunk.size} bytes in {chunk.count} chunks exceeds the limits "
                    f"({limits.max_transfer} bytes, {limits.max_chunks} chunks)",
                )
            transfer = _Transfer(chunk.head, chunk.count, chunk.size)
            self._incoming[chunk.transfer] = transfer
        else:
            found = self._incoming.get(chunk.transfer)
            if found is None:
                raise RemoteProtocolError(
                    codes.PROTOCOL_VIOLATION,
                    f"chunk {chunk.index} of transfer {chunk.transfer} without its first chunk",
                )
            transfer = found
            if chunk.count != transfer.count or chunk.index != len(transfer.parts):
                # Websocket messages arrive in order, so a gap means a broken peer.
                raise RemoteProtocolError(
                    codes.PROTOCOL_VIOLATION,
                    f"chunk {chunk.index}/{chunk.count} of transfer {chunk.transfer} out of "
                    f"order: expected {len(transfer.parts)}/{transfer.count}",
                )
        transfer.parts.append(chunk.payload)
        transfer.received += len(chunk.payload)
        if transfer.received > transfer.size:
            raise RemoteProtocolError(
                codes.BAD_FRAME,
                f"transfer {chunk.transfer} carries more than its announced {transfer.size} bytes",
            )
        if len(transfer.parts) < transfer.count:
            return None
        del self._incoming[chunk.transfer]
        if transfer.received != transfer.size:
            raise RemoteProtocolError(
                codes.BAD_FRAME,
                f"transfer {chunk.transfer} ended with {transfer.received} of "
                f"{transfer.size} announced bytes",
            )
        return replace(transfer.head, payload=b"".join(transfer.parts))


__all__ = ["DEFAULT_HEARTBEAT_MS", "TIMEOUT", "Session", "SessionState"]
