"""Events the sessions return from ``receive_frame`` and ``tick``.

Events are plain frozen dataclasses: the driver (asyncio transport, relay
server, test) matches on their type and performs the I/O they call for, then
calls back into the session (``accept``, ``ack``, ``sync_reply``,
``answer_state``...). See docs/protocol.md §6 for who must answer what.
"""

from __future__ import annotations

from dataclasses import dataclass

from .limits import Limits

# -- both sides ----------------------------------------------------------------


@dataclass(frozen=True)
class ErrorReceived:
    """The peer sent an error frame; the session is CLOSED. Close the connection."""

    code: str
    message: str


@dataclass(frozen=True)
class HeartbeatTimeout:
    """Nothing arrived for ``silent_ms`` (>= 3 heartbeat intervals, or the
    handshake took that long); the session is CLOSED. Drop the connection."""

    silent_ms: int


@dataclass(frozen=True)
class UpdateReceived:
    """A Yjs update of ``doc``. On the relay ``ref`` is the client's reference:
    commit durably, then call ``RelaySession.ack([ref])``. On the client (fan-out
    from other nodes) ``ref`` is None and no ack is due: just import it."""

    doc: str
    data: bytes
    ref: int | None = None


# -- relay side ----------------------------------------------------------------


@dataclass(frozen=True)
class HelloReceived:
    """A client introduced itself. Check the token (and that ``node`` belongs to
    ``dataset``), then call ``accept(read_only=..., documents=...)`` or
    ``reject(code, message)``. ``version`` is the version that will be used."""

    dataset: str
    node: str
    token: str
    versions: tuple[int, ...]
    version: int


@dataclass(frozen=True)
class SyncRequested:
    """The client sent its state vector of ``doc``. Answer with
    ``sync_reply(doc, diff, state_vector)``: the update the client lacks and the
    relay's own state vector of ``doc``."""

    doc: str
    state_vector: bytes


@dataclass(frozen=True)
class LeaseRequested:
    """The client asks for ``count`` numbers of ``blocks`` series ``series``.
    Answer with ``grant_lease(ref, first, last)`` or ``deny_lease(ref, message)``."""

    series: str
    count: int
    ref: int


# -- client side ---------------------------------------------------------------


@dataclass(frozen=True)
class Opened:
    """The handshake succeeded (the session is OPEN). ``documents`` are the
    relay's documents of the dataset: include the ones this node lacks (with
    an empty state vector) when calling ``start_sync``."""

    version: int
    dataset: str
    node: str
    read_only: bool
    limits: Limits
    heartbeat_ms: int
    documents: tuple[str, ...]
    carrier: bool = False  # the relay takes other nodes' entries from this node


@dataclass(frozen=True)
class DiffReceived:
    """The relay's answer to our sync1 of ``doc``: the update we lack (may be
    empty or the empty Yjs update ``00 00``). Import it."""

    doc: str
    data: bytes


@dataclass(frozen=True)
class RemoteState:
    """The relay's state vector of ``doc``. Answer with
    ``answer_state(doc, [(ref, update), ...])``: what the relay lacks (possibly
    nothing). The pass cannot complete before every RemoteState is answered."""

    doc: str
    state_vector: bytes


@dataclass(frozen=True)
class Acked:
    """The relay durably stored the updates with these refs: clear them from
    the outbox."""

    refs: tuple[int, ...]


@dataclass(frozen=True)
class UpdateRefused:
    """The relay refused our updates ``refs`` of ``doc`` (``code``, e.g.
    ``locked_period``; ``message`` says why): not stored, never acknowledged,
    no longer in flight. Keep them in the outbox and report the document
    (a sync failure); sending them again is refused again until a person acts."""

    doc: str
    refs: tuple[int, ...]
    code: str
    message: str


@dataclass(frozen=True)
class SyncComplete:
    """Sync pass ``pass_id`` is complete: every diff of the pass was received,
    every RemoteState answered and every update sent so far acknowledged."""

    pass_id: int


@dataclass(frozen=True)
class LeaseGranted:
    """Numbers ``first``..``last`` (inclusive) of ``series`` are ours
    (``Node.add_block``)."""

    ref: int
    series: str
    first: int
    last: int


@dataclass(frozen=True)
class LeaseDenied:
    """The relay refused lease ``ref``; ``message`` says why."""

    ref: int
    series: str
    message: str


Event = (
    ErrorReceived
    | HeartbeatTimeout
    | UpdateReceived
    | HelloReceived
    | SyncRequested
    | LeaseRequested
    | Opened
    | DiffReceived
    | RemoteState
    | Acked
    | UpdateRefused
    | SyncComplete
    | LeaseGranted
    | LeaseDenied
)
