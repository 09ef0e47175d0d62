"""The relay server: websockets + asyncio driving the sans-I/O relay core.

One ``RelayServer`` serves every dataset of one ``RelayStore`` on one port:
websocket connections speaking docs/protocol.md, plus ``GET /healthz`` and
``GET /metrics`` (Prometheus text) on the same port. Every decision (who is
admitted, what is acked, refused or fanned out, when a session ends) is the
core's, ``RelayHub`` (``hub.py``); this module only moves bytes, runs the
core's store calls in a thread (``StoreRunner``), keeps the timers and
serves the metrics.

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
- **Several relays, one store.** A follower thread waits on the store
  (``wait_changes``) and the event loop reads what other relays committed to
  the datasets this relay has connections of (``logged_after``, bounded
  pages, in the store thread), fanning it out like local commits.
- **Faults stay local.** A garbage, oversized or text frame, a rate
  violation, a dead link or an abrupt disconnect ends that connection only.

The server does not own the store: the caller opens it before ``start`` and
closes it after ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ..errors import StoreUnavailable, UnknownDataset
from ..protocol import SessionState, codes
from ..wslog import websockets_logger
from .calls import Batch, BatchOutcome
from .hub import HubLimits, RelayHub
from .metrics import RelayMetrics
from .runner import StoreRunner
from .store import NodeGrant, RelayStore

log = logging.getLogger("branchline.relay")

T = TypeVar("T")

#: The server's limits are the core's (one object for frames, queues and
#: subscribers); the old name stays for callers.
ServerLimits = HubLimits


#: How long one ``wait_changes`` blocks: also how soon ``stop`` ends the follower thread.
FOLLOW_WAIT_S = 0.25
#: Every this many empty waits, every followed dataset is read anyway (a
#: missed notification costs at most that long).
FOLLOW_SWEEP_WAITS = 8
#: Pause after the store failed a follower call, before trying again.
FOLLOW_RETRY_S = 0.5


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class _Connection:
    """Per-connection transport state owned by the event loop (the session
    itself lives in the core, under ``id``)."""

    def __init__(self, cid: int, ws: ServerConnection) -> None:
        self.id = cid
        self.ws = ws
        self.out: deque[bytes] = deque()
        self.out_bytes = 0
        self.wake = asyncio.Event()
        self.finishing = False  # the writer closes the websocket once drained
        self.sync_wake = asyncio.Event()
        self.drained = asyncio.Event()
        self.drained.set()
        self.close: tuple[int, str] = (1000, "")  # websocket close code and reason


class RelayServer:
    """A relay serving ``store`` on ``host:port`` (see the module docstring).

    ``now_ms`` is the monotonic clock (milliseconds) fed to the core (sessions
    and rate limiter); tests may inject their own. ``ssl_context`` turns on
    TLS (``wss://``).
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
        self.hub = RelayHub(self.limits, metrics=self.metrics)
        self.runner = StoreRunner(store)
        self._server: Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._conns: dict[int, _Connection] = {}
        self._work = asyncio.Event()  # updates were queued in the core
        self._room = asyncio.Event()  # the core's commit queue has room
        self._room.set()
        self._settled = asyncio.Event()  # a batch was settled
        self._stopping = False
        self._stopped = asyncio.Event()
        self._port: int | None = None
        self._docs_in_memory: int | None = None
        self._changed: set[str] = set()  # datasets whose head may have moved (follower)
        self._changes = asyncio.Event()
        self._sweep = False  # read every followed dataset, changed or not
        self._watching = threading.Event()  # cleared to stop the follower thread
        self._watcher: threading.Thread | None = None

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
            asyncio.create_task(self._follower(), name="relay-follower"),
        ]
        self._watching.set()
        self._watcher = threading.Thread(
            target=self._watch_store,
            args=(asyncio.get_running_loop(),),
            name="relay-follower",
            daemon=True,
        )
        self._watcher.start()
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
        self.hub.shut_down()
        try:
            await asyncio.wait_for(self._until_idle(), deadline)
        except TimeoutError:
            log.warning("shutdown: commits still pending after %.1f s; not acknowledged", deadline)
        for cid in self.hub.close_all():
            self._flush(cid, bounded=False)
        try:
            await asyncio.wait_for(self._server.wait_closed(), deadline)
        except TimeoutError:
            for conn in list(self._conns.values()):
                conn.ws.transport.abort()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watching.clear()
        if self._watcher is not None:
            await asyncio.to_thread(self._watcher.join, FOLLOW_WAIT_S * 4)
        if self._executor is not None:
            # Waits for a store call still running (its result is dropped).
            await asyncio.to_thread(self._executor.shutdown, wait=True)
        log.info("relay stopped")
        self._stopped.set()

    async def _until_idle(self) -> None:
        while not self.hub.idle:
            self._settled.clear()
            self._work.set()
            await self._settled.wait()

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
        return self.hub.datasets_connected()

    # -- store thread ---------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- connections ----------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        hub = self.hub
        cid = hub.connect(self._now_ms(), _peer(ws))
        if hub.session(cid).state is not SessionState.CONNECTING:
            # Refused at once (shutting down, or at the connection limit).
            code = hub.close_code(cid)
            with contextlib.suppress(ConnectionClosed):
                for frame in hub.data_to_send(cid):
                    await ws.send(frame)
                await ws.close(*code)
            hub.disconnect(cid)
            return
        conn = _Connection(cid, ws)
        self._conns[cid] = conn
        writer = asyncio.create_task(self._writer(conn), name=f"relay-writer-{cid}")
        syncer = asyncio.create_task(self._syncer(conn), name=f"relay-syncer-{cid}")
        try:
            async for message in ws:
                if not await self._on_message(conn, message):
                    break
        except ConnectionClosed:
            pass
        except Exception:
            # A bug must not take down other connections: end this one.
            log.exception("%s: unexpected error", hub.label(cid))
            hub.fail(cid, codes.INTERNAL, "the relay failed internally; reconnect later")
            self._flush(cid, bounded=False)
        finally:
            conn.close = hub.close_code(cid)
            grant = hub.grant(cid)
            hub.disconnect(cid)
            self._conns.pop(cid, None)
            conn.finishing = True
            conn.wake.set()
            syncer.cancel()
            try:
                await asyncio.wait_for(writer, self.limits.close_timeout_s * 2)
            except (TimeoutError, asyncio.CancelledError):
                ws.transport.abort()
            with contextlib.suppress(asyncio.CancelledError):
                await syncer
            if grant is not None:
                await self._seen_at_close(grant)

    async def _seen_at_close(self, grant: NodeGrant) -> None:
        with contextlib.suppress(RuntimeError):  # the store thread is gone: shutting down
            await self._run(self.runner.note_seen, grant)

    async def _on_message(self, conn: _Connection, message: str | bytes) -> bool:
        """Handle one received websocket message; False when the session ended."""
        hub, cid = self.hub, conn.id
        for call in hub.receive(cid, message, self._now_ms()):
            hub.answer(call, await self._run(self.runner.run, call))
        if hub.has_sync(cid):
            conn.sync_wake.set()
        queued = hub.queued
        if queued:
            self._work.set()
            if queued >= self.limits.commit_queue:
                # Backpressure: read no more from this connection until the
                # committer has taken a batch (TCP holds the rest).
                self._room.clear()
                await self._room.wait()
        self._flush(cid)
        return hub.session(cid).state in (SessionState.CONNECTING, SessionState.OPEN)

    async def _syncer(self, conn: _Connection) -> None:
        """Answers the connection's sync requests in order, one at a time, and
        only while its send queue is below the high-water mark."""
        hub, cid = self.hub, conn.id
        while True:
            while not hub.has_sync(cid):
                conn.sync_wake.clear()
                await conn.sync_wake.wait()
            while conn.out_bytes >= self.limits.sync_high_water_bytes:
                conn.drained.clear()
                await conn.drained.wait()
            call = hub.next_sync(cid)
            if call is None:
                return  # no longer open
            hub.answer(call, await self._run(self.runner.diff, call))
            self._flush(cid, bounded=False)

    # -- sending -------------------------------------------------------------------

    def _flush(self, cid: int, *, bounded: bool = True) -> None:
        """Move the core's outgoing frames of ``cid`` to its send queue. With
        ``bounded``, a queue over the limits drops the connection (a slow
        consumer); sync replies pass ``bounded=False`` (they are paced by the
        high-water mark instead)."""
        conn = self._conns.get(cid)
        if conn is None:
            return
        frames = self.hub.data_to_send(cid)
        if frames:
            conn.out.extend(frames)
            conn.out_bytes += sum(map(len, frames))
            conn.wake.set()
        if self.hub.closed(cid):
            conn.close = self.hub.close_code(cid)
            conn.finishing = True
            conn.wake.set()
        elif bounded and self.hub.slow(cid, len(conn.out), conn.out_bytes):
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
            await ws.close(*conn.close)
        except ConnectionClosed:
            pass

    # -- group commit ----------------------------------------------------------------

    async def _committer(self) -> None:
        """Group commit loop. The next batch's commit is handed to the store
        thread before the previous batch is settled (acks, fan-out), so the
        store and the event loop work at the same time; batches are still
        committed and settled in queue order, and acks still follow commits."""
        hub = self.hub
        ahead: tuple[Batch, asyncio.Future[BatchOutcome]] | None = None
        while True:
            if ahead is None:
                batch = hub.take_batch()
                while batch is None:
                    self._work.clear()
                    self._settled.set()
                    await self._work.wait()
                    batch = hub.take_batch()
                self._room.set()
                ahead = (batch, asyncio.ensure_future(self._run(self.runner.commit, batch)))
            batch, running = ahead
            ahead = None
            try:
                try:
                    outcome = await running
                finally:
                    rest = hub.take_batch()
                    if rest is not None:
                        self._room.set()
                        ahead = (rest, asyncio.ensure_future(self._run(self.runner.commit, rest)))
                for cid in hub.settle(batch, outcome):
                    self._flush(cid)
            except Exception:
                log.exception("group commit of batch %d failed", batch.id)
            finally:
                self._settled.set()

    # -- other relays on the same store --------------------------------------------------

    def _watch_store(self, loop: asyncio.AbstractEventLoop) -> None:
        """The follower thread: blocks in ``wait_changes`` and hands the
        datasets whose head moved to the loop; a sweep now and then, and
        after the store failed (it may have missed notifications meanwhile)."""
        empty = 0
        while self._watching.is_set():
            try:
                changed = self.store.wait_changes(FOLLOW_WAIT_S)
            except Exception as exc:
                log.warning("cannot wait for other relays' commits (%s); retrying", exc)
                time.sleep(FOLLOW_RETRY_S)
                changed, empty = set(), FOLLOW_SWEEP_WAITS
            sweep = False
            if not changed:
                empty += 1
                if empty < FOLLOW_SWEEP_WAITS:
                    continue
                sweep, empty = True, 0
            try:
                loop.call_soon_threadsafe(self._on_changes, changed, sweep)
            except RuntimeError:  # the loop is closed: the server is gone
                return

    def _on_changes(self, changed: set[str], sweep: bool) -> None:
        self._changed |= changed
        self._sweep = self._sweep or sweep
        self._changes.set()

    async def _follower(self) -> None:
        """Reads what other relays committed to the followed datasets and
        fans it out (``RelayHub.remote_committed``). Each read is taken and
        handed to the store thread in one step, so it runs after every batch
        taken before it (the core's rule)."""
        hub = self.hub
        pending: set[str] = set()
        while True:
            if not pending:
                await self._changes.wait()
            self._changes.clear()
            followed = set(hub.followed())
            if self._sweep:
                pending |= followed
                self._sweep = False
            pending = (pending | self._changed) & followed
            self._changed = set()
            again: set[str] = set()
            pause = 0.0
            for dataset in sorted(pending):
                call = hub.follow(dataset)
                if call is None:
                    again.add(dataset)  # its answer waits for an own batch
                    pause = max(pause, 0.001)
                    continue
                try:
                    answer = await self._run(self.runner.follow, call)
                except Exception as exc:
                    if not isinstance(exc, StoreUnavailable):  # an outage is logged once
                        log.warning(
                            "cannot read dataset %r's new updates (%s); retrying", dataset, exc
                        )
                    hub.remote_committed(call, [])  # nothing read; the position stays
                    again.add(dataset)
                    pause = FOLLOW_RETRY_S
                    continue
                for cid in hub.remote_committed(call, answer):
                    self._flush(cid)
                if hub.behind(dataset):
                    again.add(dataset)
            pending = again
            if pause:
                await asyncio.sleep(pause)

    # -- heartbeats -------------------------------------------------------------------

    async def _ticker(self) -> None:
        period = self.limits.tick_period_ms / 1000
        while True:
            await asyncio.sleep(period)
            self.hub.tick(self._now_ms())
            for cid in list(self._conns):
                self._flush(cid)

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
                granted = self.hub.grants()
                lapsed = await self._run(self.store.lapsed, [g for _, g in granted])
            except StoreUnavailable:
                continue  # the store logged the outage once
            except Exception:
                log.exception("cannot check for revoked nodes; retrying")
                continue
            seen = now
            for cid, grant in granted:
                why = lapsed.get(grant)
                if why is not None and self.hub.revoke(cid, why):
                    self._flush(cid, bounded=False)

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
            commit_queue=self.hub.queued,
        )


def _peer(ws: ServerConnection) -> str:
    try:
        addr = ws.remote_address
    except Exception:  # the transport may already be gone
        return "?"
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


__all__ = ["RelayServer", "ServerLimits"]
