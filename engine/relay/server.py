"""The relay server: websockets + asyncio around sans-I/O ``RelaySession``s.

One ``RelayServer`` serves every dataset of one ``RelayStore`` on one port:
websocket connections speaking docs/protocol.md, plus ``GET /healthz`` and
``GET /metrics`` (Prometheus text) on the same port.

Guarantees:

- **Durable acks.** An update is acknowledged only after ``append_updates``
  returned for the batch holding it: the store's contract makes it durable
  then. Updates of all connections are committed by one committer task in
  group commits (everything queued, up to ``ServerLimits.max_batch``).
- **Isolation.** A connection's dataset and node are those its hello
  authenticated; every store call and every fan-out of the connection uses
  them, never a name from a later frame. Stored updates are fanned out to the
  other open connections of the same dataset only, never to the sender.
- **The loop never blocks on the store.** Every store call runs in one
  dedicated thread (the SQLite store serializes on one connection anyway),
  so commits, diffs, leases and health probes queue there in order.
- **Bounded memory.** The commit queue, per-connection send queues, frame
  sizes, in-flight updates, sync requests and leases are all bounded. A
  client too slow to take its fan-out is disconnected (it catches up by
  state-vector sync when it reconnects) instead of growing a queue.
- **Faults stay local.** A garbage, oversized or text frame, a rate
  violation, a dead link or an abrupt disconnect ends that connection only.

The server does not own the store: the caller opens it before ``start`` and
closes it after ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ..errors import (
    AuthError,
    BranchlineError,
    LocalProtocolError,
    NodeRevoked,
    ReadOnlyNode,
    RelayLimitError,
    RemoteProtocolError,
    StoreError,
    UnknownDataset,
    UpdateError,
)
from ..protocol import (
    DEFAULT_HEARTBEAT_MS,
    EncodedUpdates,
    ErrorReceived,
    Event,
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
from ..wslog import websockets_logger
from .metrics import RelayMetrics
from .store import Appended, NodeGrant, RelayStore, UpdateIn, refusal_code

log = logging.getLogger("branchline.relay")

T = TypeVar("T")

#: Websocket close codes (RFC 6455).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013

#: Runs of consecutive updates from one connection are fanned out to the
#: batch's senders as frames shared by all of them only when they average at
#: least this many updates (shorter runs would make many small frames).
_MIN_SHARED_RUN = 16

#: How long a failed-auth lookup of "which dataset is this node in" may reuse
#: the node list it read from the store (bounds the cost of bad hellos).
_HOMES_TTL_S = 30.0


@dataclass(frozen=True)
class ServerLimits:
    """Bounds of one relay server (all per server unless named per connection).

    ``protocol``: the relay's side of the negotiated protocol limits.
    ``heartbeat_ms``: heartbeat interval announced in welcome; a peer silent
    for 3 intervals (or a handshake taking that long) is dropped.
    ``tick_ms``: how often sessions are ticked (default heartbeat / 4).
    ``max_connections``: open websocket connections; more are refused with
    ``unavailable``. ``commit_queue``: updates received and not yet committed;
    a full queue stops reading from the connections that add to it (TCP
    backpressure). ``max_batch``: updates per group commit.
    ``send_queue_bytes`` / ``send_queue_frames``: per connection, frames
    queued for sending beyond which a connection receiving fan-out is dropped.
    ``sync_high_water_bytes``: per connection, a sync reply is computed only
    when less than this is waiting to be sent (a big catch-up streams instead
    of piling up). ``rate_frames_per_s`` / ``rate_burst``: per-connection token
    bucket on received frames; exceeding it ends the connection with
    ``rate_limited``. ``close_timeout_s``: wait for the peer's close frame.
    ``shutdown_timeout_s``: how long ``stop`` waits for queued commits and
    sends before dropping what is left. ``revocation_poll_s``: how often the
    store's revocation counter is read; connections of a node revoked (or
    enrolled again) by an admin command are closed within about that long.
    """

    protocol: Limits = field(default_factory=Limits)
    heartbeat_ms: int = DEFAULT_HEARTBEAT_MS
    tick_ms: int | None = None
    max_connections: int = 10_000
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

    def __post_init__(self) -> None:
        positive = {
            "max_connections": self.max_connections,
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
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"ServerLimits.{name} must be positive, got {value!r}")
        if self.tick_ms is not None and self.tick_ms <= 0:
            raise ValueError(f"ServerLimits.tick_ms must be positive, got {self.tick_ms!r}")


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class _Connection:
    """Per-connection state owned by the event loop."""

    def __init__(
        self, cid: int, ws: ServerConnection, session: RelaySession, now_ms: int, burst: float
    ) -> None:
        self.id = cid
        self.ws = ws
        self.session = session
        self.peer = _peer(ws)
        self.dataset: str | None = None  # set from the authenticated hello only
        self.node: str | None = None
        self.grant: NodeGrant | None = None
        self.out: deque[bytes] = deque()
        self.out_bytes = 0
        self.wake = asyncio.Event()
        self.finishing = False  # the writer closes the websocket once drained
        self.close_code = CLOSE_NORMAL
        self.close_reason = ""
        self.syncs: deque[SyncRequested] = deque()  # bounded by limits.max_syncs
        self.sync_wake = asyncio.Event()
        self.drained = asyncio.Event()
        self.drained.set()
        self.tokens = burst
        self.refilled_ms = now_ms

    def label(self) -> str:
        who = f"node {self.node!r} of dataset {self.dataset!r}" if self.node else "unauthenticated"
        return f"connection {self.id} ({self.peer}, {who})"


@dataclass(slots=True)
class _Pending:
    """An update waiting for the group commit."""

    conn: _Connection
    dataset: str
    node: str
    doc: str
    data: bytes
    ref: int


#: Per dataset of a batch: its results, or why its commit failed; and the
#: seconds each successful commit took.
_Outcome = tuple[dict[str, list[Appended] | BaseException], list[float]]


@dataclass
class _HelloAnswer:
    grant: NodeGrant | None
    documents: list[str]
    code: str = ""
    message: str = ""


class RelayServer:
    """A relay serving ``store`` on ``host:port`` (see the module docstring).

    ``now_ms`` is the monotonic clock (milliseconds) fed to the sessions and the
    rate limiter; tests may inject their own. ``ssl_context`` turns on TLS
    (``wss://``).
    """

    def __init__(
        self,
        store: RelayStore,
        *,
        host: str = "127.0.0.1",
        port: int = 8765,
        ssl_context: ssl.SSLContext | None = None,
        now_ms: Callable[[], int] = _monotonic_ms,
        limits: ServerLimits | None = None,
    ) -> None:
        self.store = store
        self.host = host
        self._requested_port = port
        self.ssl_context = ssl_context
        self.limits = limits or ServerLimits()
        self._now_ms = now_ms
        self.metrics = RelayMetrics()
        self._server: Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._conns: set[_Connection] = set()
        self._datasets: dict[str, set[_Connection]] = {}
        self._ids = itertools.count(1)
        self._stopping = False
        self._stopped = asyncio.Event()
        self._port: int | None = None
        self._homes: dict[str, list[str]] = {}  # node name -> datasets (failed-auth lookup)
        self._homes_read = -_HOMES_TTL_S
        self._docs_in_memory: int | None = None

    # -- lifecycle --------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port listened on (the real one when started with port 0).
        Raises RuntimeError before ``start``."""
        if self._port is None:
            raise RuntimeError("the relay server is not started")
        return self._port

    @property
    def url(self) -> str:
        """``ws://host:port/`` (``wss://`` with TLS). Raises RuntimeError before ``start``."""
        scheme = "wss" if self.ssl_context else "ws"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/"

    async def start(self) -> None:
        """Listen and start the committer and heartbeat tasks. Raises OSError
        when the address cannot be bound, RuntimeError when already started."""
        if self._server is not None:
            raise RuntimeError("the relay server is already started")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-store")
        self._queue = asyncio.Queue(maxsize=self.limits.commit_queue)
        max_frame = self.limits.protocol.max_frame
        try:
            self._server = await serve(
                self._handle,
                self.host,
                self._requested_port,
                ssl=self.ssl_context,
                process_request=self._process_request,
                # A frame up to twice the limit is read and answered with a
                # frame_too_large error frame (a clear reason); beyond that
                # websockets closes with 1009 without buffering it.
                max_size=2 * max_frame,
                max_queue=16,  # received messages buffered per connection
                write_limit=max(64 << 10, max_frame),
                compression=None,  # Yjs updates compress poorly; spare the CPU
                ping_interval=None,  # the protocol has its own heartbeats
                close_timeout=self.limits.close_timeout_s,
                server_header="branchline-relay",
                logger=websockets_logger("websockets.server"),  # frames without payloads
            )
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        sock = next(iter(self._server.sockets))
        self._port = int(sock.getsockname()[1])
        self._tasks = [
            asyncio.create_task(self._committer(), name="relay-committer"),
            asyncio.create_task(self._ticker(), name="relay-ticker"),
            asyncio.create_task(self._revocation_watch(), name="relay-revocations"),
        ]
        log.info("relay listening on %s", self.url)

    async def stop(self) -> None:
        """Shut down cleanly: stop listening, commit and acknowledge every update
        already received, send each client an ``unavailable`` error frame and a
        going-away close, then stop the store thread. Updates arriving during
        the shutdown are neither stored nor acknowledged (clients resend them).
        Idempotent; bounded by ``ServerLimits.shutdown_timeout_s``."""
        if self._server is None or self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        log.info("relay shutting down (%d connections)", len(self._conns))
        deadline = self.limits.shutdown_timeout_s
        self._server.close(close_connections=False)
        assert self._queue is not None
        try:
            await asyncio.wait_for(self._queue.join(), deadline)
        except TimeoutError:
            log.warning("shutdown: commits still pending after %.1f s; not acknowledged", deadline)
        for conn in list(self._conns):
            conn.close_code = CLOSE_GOING_AWAY
            conn.close_reason = "relay shutting down"
            self._fail(conn, codes.UNAVAILABLE, "the relay is shutting down; reconnect later")
            self._flush(conn, bounded=False)
        try:
            await asyncio.wait_for(self._server.wait_closed(), deadline)
        except TimeoutError:
            for conn in list(self._conns):
                conn.ws.transport.abort()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._executor is not None:
            # Waits for a store call still running (its result is dropped).
            await asyncio.to_thread(self._executor.shutdown, wait=True)
        log.info("relay stopped")
        self._stopped.set()

    async def serve_forever(self) -> None:
        """Start (unless started) and serve until ``stop`` is called or this
        task is cancelled; a cancellation stops the server cleanly."""
        if self._server is None:
            await self.start()
        try:
            await self._stopped.wait()
        finally:
            await asyncio.shield(self.stop())

    # -- introspection ----------------------------------------------------------

    @property
    def connections(self) -> int:
        return len(self._conns)

    def datasets_connected(self) -> int:
        return sum(1 for conns in self._datasets.values() if conns)

    # -- store thread ---------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- connections ----------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        now = self._now_ms()
        session = RelaySession(limits=self.limits.protocol, heartbeat_ms=self.limits.heartbeat_ms)
        conn = _Connection(next(self._ids), ws, session, now, self.limits.rate_burst)
        session.tick(now)  # starts the handshake clock
        if self._stopping or len(self._conns) >= self.limits.max_connections:
            why = "shutting down" if self._stopping else "at its connection limit"
            conn.close_code = CLOSE_TRY_AGAIN
            self.metrics.connections_rejected[codes.UNAVAILABLE] += 1
            self._fail(conn, codes.UNAVAILABLE, f"the relay is {why}; reconnect later")
            with contextlib.suppress(ConnectionClosed):
                for frame in session.data_to_send():
                    await ws.send(frame)
                await ws.close(conn.close_code, "unavailable")
            return
        self._conns.add(conn)
        self.metrics.connections_total += 1
        log.info("%s opened", conn.label())
        writer = asyncio.create_task(self._writer(conn), name=f"relay-writer-{conn.id}")
        syncer = asyncio.create_task(self._syncer(conn), name=f"relay-syncer-{conn.id}")
        try:
            async for message in ws:
                if not await self._on_message(conn, message):
                    break
        except ConnectionClosed:
            pass
        except Exception:
            # A bug must not take down other connections: end this one.
            log.exception("%s: unexpected error", conn.label())
            self._fail(conn, codes.INTERNAL, "the relay failed internally; reconnect later")
            self._flush(conn, bounded=False)
        finally:
            self._forget(conn)
            if conn.session.state is not SessionState.CLOSED:
                conn.session.close()
            conn.finishing = True
            conn.wake.set()
            syncer.cancel()
            try:
                await asyncio.wait_for(writer, self.limits.close_timeout_s * 2)
            except (TimeoutError, asyncio.CancelledError):
                ws.transport.abort()
            with contextlib.suppress(asyncio.CancelledError):
                await syncer
            ended = conn.session.error
            log.info(
                "%s closed%s", conn.label(), f" ({ended.code}: {ended.message})" if ended else ""
            )
            if conn.grant is not None:
                await self._seen_at_close(conn.grant)

    async def _seen_at_close(self, grant: NodeGrant) -> None:
        with contextlib.suppress(RuntimeError):  # the store thread is gone: shutting down
            await self._run(self._note_seen, grant)

    def _forget(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        if conn.dataset is not None:
            peers = self._datasets.get(conn.dataset)
            if peers is not None:
                peers.discard(conn)
                if not peers:
                    del self._datasets[conn.dataset]

    async def _on_message(self, conn: _Connection, message: str | bytes) -> bool:
        """Handle one received websocket message; False when the session ended."""
        session = conn.session
        self.metrics.frames_in += 1
        self.metrics.bytes_in += len(message)
        if not self._take_token(conn):
            self._fail(
                conn,
                codes.RATE_LIMITED,
                f"more than {self.limits.rate_frames_per_s:g} frames/s; slow down and reconnect",
            )
        elif isinstance(message, str):
            self._fail(conn, codes.BAD_FRAME, "text message: frames are binary websocket messages")
        else:
            try:
                events = session.receive_frame(message)
            except RemoteProtocolError as exc:
                self.metrics.protocol_errors[exc.code] += 1
                log.info("%s: protocol error %s: %s", conn.label(), exc.code, exc.message)
                events = []
            for event in events:
                await self._on_event(conn, event)
        self._flush(conn)
        return session.state in (SessionState.CONNECTING, SessionState.OPEN)

    def _take_token(self, conn: _Connection) -> bool:
        now = self._now_ms()
        elapsed = max(0, now - conn.refilled_ms) / 1000
        conn.refilled_ms = now
        conn.tokens = min(
            self.limits.rate_burst, conn.tokens + elapsed * self.limits.rate_frames_per_s
        )
        if conn.tokens < 1:
            return False
        conn.tokens -= 1
        return True

    async def _on_event(self, conn: _Connection, event: Event) -> None:
        if isinstance(event, UpdateReceived):
            assert conn.dataset is not None and conn.node is not None and event.ref is not None
            if self._stopping:
                return  # not stored, not acked: the client sends it again
            assert self._queue is not None
            pending = _Pending(conn, conn.dataset, conn.node, event.doc, event.data, event.ref)
            try:
                # Most updates find room: skip the coroutine of put() for them
                # (a batch frame yields hundreds of events).
                self._queue.put_nowait(pending)
            except asyncio.QueueFull:
                await self._queue.put(pending)
        elif isinstance(event, SyncRequested):
            conn.syncs.append(event)  # the session bounds these by max_syncs
            conn.sync_wake.set()
        elif isinstance(event, HelloReceived):
            await self._on_hello(conn, event)
        elif isinstance(event, LeaseRequested):
            await self._on_lease(conn, event)
        elif isinstance(event, ErrorReceived):
            log.info("%s: peer sent error %s: %s", conn.label(), event.code, event.message)

    async def _on_hello(self, conn: _Connection, hello: HelloReceived) -> None:
        try:
            answer = await self._run(self._check_hello, hello.dataset, hello.node, hello.token)
        except Exception:
            log.exception("%s: authentication failed internally", conn.label())
            answer = _HelloAnswer(None, [], codes.INTERNAL, "the relay store failed; retry later")
        if answer.grant is None:
            self.metrics.connections_rejected[answer.code] += 1
            conn.close_code = CLOSE_POLICY
            log.info(
                "%s: refused node %r of dataset %r: %s",
                conn.label(),
                hello.node,
                hello.dataset,
                answer.code,
            )
            self._fail(conn, answer.code, answer.message)
            return
        grant = answer.grant
        if conn.session.state is not SessionState.CONNECTING:
            return  # timed out or failed while the store answered
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
        self._datasets.setdefault(grant.dataset, set()).add(conn)
        log.info(
            "%s accepted (%s, %d documents)",
            conn.label(),
            "read-only" if grant.read_only else "read-write",
            len(answer.documents),
        )

    def _check_hello(self, dataset: str, node: str, token: str) -> _HelloAnswer:
        """Store thread: authenticate a hello; the grant, or why not."""
        try:
            grant = self.store.authenticate(dataset, node, token)
            self._note_seen(grant)
            return _HelloAnswer(grant, self.store.documents(dataset))
        except NodeRevoked as exc:
            return _HelloAnswer(None, [], codes.AUTH_FAILED, str(exc))
        except AuthError as exc:
            home = self._home_of(dataset, node, token)
            if home is not None:
                # Safe to name it: the token proves the caller is that node.
                return _HelloAnswer(
                    None,
                    [],
                    codes.WRONG_DATASET,
                    f"node {node!r} is enrolled in dataset {home!r}, not {dataset!r}; "
                    "configure the node with its own dataset",
                )
            return _HelloAnswer(None, [], codes.AUTH_FAILED, str(exc))
        except UnknownDataset as exc:
            return _HelloAnswer(None, [], codes.WRONG_DATASET, str(exc))

    def _note_seen(self, grant: NodeGrant) -> None:
        """Store thread: the node's last-seen time for ``relay status``; a
        store that cannot write it does not stop the session."""
        try:
            self.store.note_seen(grant.dataset, grant.node, time.time_ns() // 1_000_000)
        except StoreError as exc:
            log.warning("cannot record when node %r was last seen: %s", grant.node, exc)

    def _home_of(self, dataset: str, node: str, token: str) -> str | None:
        """Store thread: the other dataset whose ``node`` this token opens, if any."""
        now = time.monotonic()
        if now - self._homes_read >= _HOMES_TTL_S:
            homes: dict[str, list[str]] = {}
            for info in self.store.status():
                for n in info.nodes:
                    homes.setdefault(n.name, []).append(info.name)
            self._homes, self._homes_read = homes, now
        for other in self._homes.get(node, [])[:64]:
            if other == dataset:
                continue
            with contextlib.suppress(AuthError, UnknownDataset):
                self.store.authenticate(other, node, token)
                return other
        return None

    async def _on_lease(self, conn: _Connection, req: LeaseRequested) -> None:
        assert conn.dataset is not None
        try:
            first, last = await self._run(
                self._lease, conn.dataset, req.series, req.count, conn.node
            )
        except BranchlineError as exc:
            self.metrics.leases_denied += 1
            conn.session.deny_lease(req.ref, str(exc))
            return
        except Exception:
            log.exception("%s: lease failed", conn.label())
            self.metrics.leases_denied += 1
            conn.session.deny_lease(req.ref, "the relay store failed; retry later")
            return
        self.metrics.leases_granted += 1
        conn.session.grant_lease(req.ref, first, last)

    def _lease(self, dataset: str, series: str, count: int, node: str | None) -> tuple[int, int]:
        return self.store.lease(dataset, series, count, node=node)

    async def _syncer(self, conn: _Connection) -> None:
        """Answers the connection's sync requests in order, one at a time, and
        only while its send queue is below the high-water mark."""
        while True:
            while not conn.syncs:
                conn.sync_wake.clear()
                await conn.sync_wake.wait()
            while conn.out_bytes >= self.limits.sync_high_water_bytes:
                conn.drained.clear()
                await conn.drained.wait()
            req = conn.syncs.popleft()
            if conn.session.state is not SessionState.OPEN:
                return
            assert conn.dataset is not None
            try:
                diff, sv = await self._run(self._sync, conn.dataset, req.doc, req.state_vector)
                conn.session.sync_reply(req.doc, diff, sv)
                self.metrics.sync_requests += 1
            except UpdateError as exc:
                self._fail(conn, codes.BAD_UPDATE, str(exc))
            except LocalProtocolError as exc:
                self._fail(conn, codes.LIMIT_EXCEEDED, f"cannot send {req.doc!r}: {exc.message}")
            except Exception:
                log.exception("%s: sync of %r failed", conn.label(), req.doc)
                self._fail(conn, codes.INTERNAL, "the relay store failed; reconnect later")
            self._flush(conn, bounded=False)

    def _sync(self, dataset: str, doc: str, state_vector: bytes) -> tuple[bytes, bytes]:
        # Diff first: the state vector read after it covers at least the diff,
        # so the client never asks for less than it was sent.
        diff = self.store.diff(dataset, doc, state_vector)
        return diff, self.store.state_vector(dataset, doc)

    # -- sending -------------------------------------------------------------------

    def _fail(self, conn: _Connection, code: str, message: str) -> None:
        if conn.session.state in (SessionState.CLOSING, SessionState.CLOSED):
            return
        self.metrics.protocol_errors[code] += 1
        conn.session.fail(code, message)

    def _flush(self, conn: _Connection, *, bounded: bool = True) -> None:
        """Move the session's outgoing frames to the connection's send queue.
        With ``bounded``, a queue over the limits drops the connection (a slow
        consumer); sync replies pass ``bounded=False`` (they are paced by the
        high-water mark instead)."""
        frames = conn.session.data_to_send()
        if frames:
            conn.out.extend(frames)
            conn.out_bytes += sum(len(f) for f in frames)
            conn.wake.set()
        if conn.session.state is SessionState.CLOSED:
            conn.finishing = True
            conn.wake.set()
        elif bounded and (
            conn.out_bytes > self.limits.send_queue_bytes
            or len(conn.out) > self.limits.send_queue_frames
        ):
            self.metrics.slow_consumers_dropped += 1
            log.warning(
                "%s: %d frames (%d bytes) waiting to be sent; dropping the slow consumer",
                conn.label(),
                len(conn.out),
                conn.out_bytes,
            )
            conn.session.close()
            conn.out.clear()
            conn.out_bytes = 0
            conn.drained.set()
            conn.finishing = True
            conn.ws.transport.abort()  # frees the buffers now; it reconnects and catches up

    async def _writer(self, conn: _Connection) -> None:
        ws = conn.ws
        try:
            while True:
                while conn.out:
                    frame = conn.out.popleft()
                    conn.out_bytes -= len(frame)
                    if conn.out_bytes < self.limits.sync_high_water_bytes:
                        conn.drained.set()
                    await ws.send(frame)
                    self.metrics.frames_out += 1
                    self.metrics.bytes_out += len(frame)
                if conn.finishing:
                    break
                conn.wake.clear()
                await conn.wake.wait()
            await ws.close(conn.close_code, conn.close_reason)
        except ConnectionClosed:
            pass

    # -- group commit ----------------------------------------------------------------

    async def _committer(self) -> None:
        """Group commit loop. The next batch's commit is handed to the store
        thread before the previous batch is settled (acks, fan-out), so the
        store and the event loop work at the same time; batches are still
        committed and settled in queue order, and acks still follow commits."""
        assert self._queue is not None
        queue = self._queue
        ahead: tuple[list[_Pending], asyncio.Future[_Outcome]] | None = None
        while True:
            if ahead is None:
                batch = [await queue.get(), *self._take(queue, self.limits.max_batch - 1)]
                ahead = (batch, self._start_commit(batch))
            batch, running = ahead
            ahead = None
            try:
                try:
                    outcome = await running
                finally:
                    rest = self._take(queue, self.limits.max_batch)
                    if rest:
                        ahead = (rest, self._start_commit(rest))
                self._settle_batch(batch, outcome)
            except Exception:
                log.exception("group commit of %d updates failed", len(batch))
            finally:
                for _ in batch:
                    queue.task_done()

    @staticmethod
    def _take(queue: asyncio.Queue[_Pending], limit: int) -> list[_Pending]:
        out: list[_Pending] = []
        while len(out) < limit:
            try:
                out.append(queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        return out

    def _start_commit(self, batch: list[_Pending]) -> asyncio.Future[_Outcome]:
        by_dataset: dict[str, list[_Pending]] = {}
        for p in batch:
            by_dataset.setdefault(p.dataset, []).append(p)
        return asyncio.ensure_future(self._run(self._append, by_dataset))

    def _settle_batch(self, batch: list[_Pending], result: _Outcome) -> None:
        outcomes, seconds = result
        by_dataset: dict[str, list[_Pending]] = {}
        for p in batch:
            by_dataset.setdefault(p.dataset, []).append(p)
        for took in seconds:
            self.metrics.commit_seconds.observe(took)
        for dataset, items in by_dataset.items():
            outcome = outcomes[dataset]
            if isinstance(outcome, BaseException):
                self.metrics.commit_failures += 1
                log.error(
                    "commit of %d updates of dataset %r failed: %s", len(items), dataset, outcome
                )
                for conn in {p.conn for p in items}:
                    self._fail(
                        conn,
                        codes.INTERNAL,
                        "the relay could not store updates (nothing of them was kept); "
                        "reconnect later",
                    )
                    self._flush(conn, bounded=False)
                continue
            self._settle(dataset, items, outcome)

    def _append(self, by_dataset: dict[str, list[_Pending]]) -> _Outcome:
        """Store thread: one ``append_updates`` per dataset of the batch; the
        outcome per dataset and the seconds each successful commit took."""
        out: dict[str, list[Appended] | BaseException] = {}
        seconds: list[float] = []
        for dataset, items in by_dataset.items():
            started = time.perf_counter()
            try:
                out[dataset] = self.store.append_updates(
                    dataset, [UpdateIn(p.doc, p.data, p.node) for p in items]
                )
            except Exception as exc:  # reported per dataset; others go on
                out[dataset] = exc
            else:
                seconds.append(time.perf_counter() - started)
        return out, seconds

    def _settle(self, dataset: str, items: Sequence[_Pending], results: list[Appended]) -> None:
        """Acknowledge what was kept, fail senders of rejected updates, fan out."""
        self.metrics.batches_committed += 1
        acks: dict[_Connection, list[int]] = {}
        failed: dict[_Connection, tuple[str, str]] = {}
        # Updates of a locked period, that their sender may not publish, or
        # that the store cannot take (bad bytes, too large): refused one
        # document at a time, and the session goes on (the node's other
        # documents keep flowing).
        refused: dict[tuple[_Connection, str, str], tuple[list[int], str]] = {}
        stored: list[_Pending] = []
        for p, result in zip(items, results, strict=True):
            self.metrics.updates_in[result.status] += 1
            if result.ok:
                acks.setdefault(p.conn, []).append(p.ref)
                if result.status == "stored":
                    stored.append(p)
            elif (code := refusal_code(result.error)) is not None:
                refused.setdefault((p.conn, p.doc, code), ([], str(result.error)))[0].append(p.ref)
            elif p.conn not in failed:
                failed[p.conn] = _rejection(p.doc, result.error)
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
        touched = set(acks) | set(failed) | {conn for conn, _, _ in refused}
        peers = [c for c in self._datasets.get(dataset, ()) if c.session.state is SessionState.OPEN]
        if stored and peers:
            self.metrics.updates_fanned_out += self._fan_out_batch(stored, peers)
            touched.update(peers)
        for conn in touched:
            self._flush(conn)

    def _fan_out_batch(self, stored: list[_Pending], peers: list[_Connection]) -> int:
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
        runs: list[tuple[_Connection, list[tuple[str, bytes]]]] = []
        for p in stored:
            if not runs or runs[-1][0] is not p.conn:
                runs.append((p.conn, []))
            runs[-1][1].append((p.doc, p.data))
        queued = 0
        if len(stored) >= _MIN_SHARED_RUN * len(runs):
            # Long runs: each encoded once; every peer gets the runs of others.
            run_frames: list[EncodedUpdates | None] | None = None
            for peer in peers:
                if peer.session.limits.max_frame < max_frame:
                    mine = [u for conn, run in runs if conn is not peer for u in run]
                    queued += self._fan_out(peer, mine)
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
                        queued += self._fan_out(peer, run)
            return queued
        # Short runs would make small frames: peers that sent nothing share
        # the frames of the whole batch, senders get their share packed.
        everything = [(p.doc, p.data) for p in stored]
        whole: EncodedUpdates | None = None
        for peer in peers:
            if peer in senders:
                mine = [u for conn, run in runs if conn is not peer for u in run]
                queued += self._fan_out(peer, mine)
                continue
            if whole is None and peer.session.limits.max_frame >= max_frame:
                whole = _encode(everything, max_frame)
            if whole is not None and peer.session.limits.max_frame >= max_frame:
                peer.session.send_encoded(whole)
                queued += whole.count
            else:
                queued += self._fan_out(peer, everything)
        return queued

    @staticmethod
    def _fan_out(conn: _Connection, updates: list[tuple[str, bytes]]) -> int:
        """Queue ``updates`` for ``conn`` in order, packed into as few frames as
        its limits allow (one ``send_updates``); returns how many were queued.
        Should the batch be refused (an update over the subscriber's transfer
        limits), the updates go one by one and only the refused ones are left
        out, logged, as before batching."""
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

    # -- heartbeats -------------------------------------------------------------------

    async def _ticker(self) -> None:
        period = (self.limits.tick_ms or max(25, self.limits.heartbeat_ms // 4)) / 1000
        while True:
            await asyncio.sleep(period)
            now = self._now_ms()
            for conn in list(self._conns):
                for event in conn.session.tick(now):
                    if isinstance(event, HeartbeatTimeout):
                        log.info(
                            "%s: nothing received for %d ms; dropping the dead link",
                            conn.label(),
                            event.silent_ms,
                        )
                self._flush(conn)

    # -- revocations --------------------------------------------------------------------

    async def _revocation_watch(self) -> None:
        """Closes the open connections of nodes revoked (or enrolled again) by
        another process, e.g. ``branchline relay revoke``, within about
        ``revocation_poll_s``: the store's revocation counter is one cheap
        read; only when it changed are the open grants checked."""
        seen: int | None = None
        while True:
            await asyncio.sleep(self.limits.revocation_poll_s)
            try:
                now = await self._run(self.store.revocations)
                if now == seen:
                    continue
                # The first poll checks too: a revoke may have landed between
                # a hello's authentication and the watch's first reading.
                granted = [(c, c.grant) for c in self._conns if c.grant is not None]
                lapsed = await self._run(self.store.lapsed, [g for _, g in granted])
            except Exception:
                log.exception("cannot check for revoked nodes; retrying")
                continue
            seen = now
            for conn, grant in granted:
                why = lapsed.get(grant)
                if why is None or conn.session.state is not SessionState.OPEN:
                    continue
                log.info("%s: %s; closing its connection", conn.label(), why)
                conn.close_code = CLOSE_POLICY
                self._fail(conn, codes.AUTH_FAILED, why)
                self._flush(conn, bounded=False)

    # -- HTTP ---------------------------------------------------------------------------

    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            problem = await self._health()
            if problem is None:
                return ws.respond(200, "ok\n")
            return ws.respond(503, problem + "\n")
        if path == "/metrics":
            response = ws.respond(200, await self._render_metrics())
            headers = Headers(response.headers)
            del headers["Content-Type"]
            headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
            response.headers = headers
            return response
        return None  # a websocket handshake (any other path)

    async def _health(self) -> str | None:
        """None when healthy; else what is wrong (one line)."""
        if self._stopping:
            return "shutting down"
        try:
            await asyncio.wait_for(self._run(self._probe), 5.0)
        except TimeoutError:
            return "store busy: no answer within 5 s"
        except Exception as exc:
            return f"store unavailable: {exc}"
        return None

    def _probe(self) -> None:
        # A read the store must answer; any dataset name does.
        with contextlib.suppress(UnknownDataset):
            self.store.documents("healthz")

    async def _render_metrics(self) -> str:
        loaded = getattr(self.store, "loaded_documents", None)
        if callable(loaded):
            with contextlib.suppress(Exception):
                self._docs_in_memory = int(await asyncio.wait_for(self._run(loaded), 2.0))
        return self.metrics.render(
            connections_open=len(self._conns),
            datasets_connected=self.datasets_connected(),
            documents_in_memory=self._docs_in_memory,
            commit_queue=self._queue.qsize() if self._queue is not None else 0,
        )


def _encode(updates: list[tuple[str, bytes]], max_frame: int) -> EncodedUpdates | None:
    """The fan-out frames of ``updates`` for every peer, or None when they
    cannot be shared (an update needs chunking: peers get it per session)."""
    try:
        return encode_updates(updates, max_frame=max_frame)
    except LocalProtocolError:
        return None


def _rejection(doc: str, error: BranchlineError | None) -> tuple[str, str]:
    """The error frame (code, message) for an update the store rejected in a
    way that ends the session (the others are refused: ``refusal_code``)."""
    message = f"update of {doc!r} not stored: {error}"
    if isinstance(error, ReadOnlyNode):
        return codes.READ_ONLY, message
    if isinstance(error, AuthError):  # not enrolled or revoked since the hello
        return codes.AUTH_FAILED, message
    if isinstance(error, RelayLimitError):
        return codes.LIMIT_EXCEEDED, message
    return codes.INTERNAL, message


def _peer(ws: ServerConnection) -> str:
    try:
        addr = ws.remote_address
    except Exception:  # the transport may already be gone
        return "?"
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


__all__ = ["RelayServer", "ServerLimits"]
