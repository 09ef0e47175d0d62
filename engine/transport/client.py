"""The asyncio edge of node sync (docs/sync.md): websockets connection, the
receive/tick/send loop around a ``SyncDriver``, reconnect with capped
exponential backoff and jitter, offline mode, and the run heartbeat that
``branchline status`` reads.

Time and randomness are injected (``monotonic_ms``, ``wall_ms``, ``rng``).
Everything is bounded: one frame received at a time (websockets' own buffer
limits backpressure the socket), live rows per poll (``MAX_LIVE_BATCH``), the
in-flight window of the session, the backoff delay (``Backoff.cap_s``) and
the one-shot sync (``timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from ..clock import system_random
from ..errors import AuthError, BranchlineError, DatasetMismatch, UserError
from ..node import Node
from ..protocol import DEFAULT_HEARTBEAT_MS, ClientSession, Limits
from ..sync import ProgressCallback, RelayRefused, RelayUnreachable, SyncDriver, SyncTimeout

log = logging.getLogger("branchline.sync")

POLL_S = 0.05  # look for other processes' writes this often (ships within ~100 ms)
OFFLINE_CHECK_S = 0.5  # re-read the offline flag this often
STATUS_EVERY_S = 2.0  # write the run heartbeat this often
#: A run heartbeat older than this means no ``node run`` is connected.
STALE_AFTER_MS = 10_000
OPEN_TIMEOUT_S = 5.0
MAX_FRAME_BYTES = Limits().max_frame  # websocket max_size follows the protocol limit

META_OFFLINE = "offline"
META_RUN_STATE = "run_state"
META_RUN_HEARTBEAT = "run_heartbeat"
META_LAST_SYNC = "last_sync"


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Backoff:
    """Capped exponential backoff with "equal jitter": attempt n waits a
    uniform delay in [d/2, d] with d = min(cap_s, base_s * 2**n), so a
    relay restart does not see every node come back at the same instant."""

    base_s: float = 0.2
    cap_s: float = 3.0
    rng: random.Random = field(default_factory=system_random)

    def delay(self, attempt: int) -> float:
        ceiling = min(self.cap_s, self.base_s * (2 ** min(attempt, 30)))
        return self.rng.uniform(ceiling / 2, ceiling)


def relay_of(node: Node) -> tuple[str, str]:
    """(relay URL, token) from the node's meta. Raises UserError when missing."""
    meta = node.store.meta()
    url, token = meta.get("relay"), meta.get("token")
    if not url or not token:
        raise UserError(
            f"node '{node.node_id}' has no relay configured; create the home with "
            "'branchline node init --relay URL --token T'"
        )
    return url, token


def safe_url(url: str) -> str:
    """The URL without user info or query (never log credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def set_offline(node: Node, offline: bool) -> None:
    """Explicit offline mode: a running ``node run`` stops connecting (and
    drops its connection) within about half a second."""
    with node.store.transaction():
        node.store.set_meta(META_OFFLINE, "1" if offline else "0")


def is_offline(node: Node) -> bool:
    row = node.store.conn.execute(
        "SELECT value FROM meta WHERE key = ?", (META_OFFLINE,)
    ).fetchone()
    return bool(row and row[0] == "1")


def _write_run_state(node: Node, state: str, wall_ms: int) -> None:
    with node.store.transaction():
        node.store.set_meta(META_RUN_STATE, state)
        node.store.set_meta(META_RUN_HEARTBEAT, str(wall_ms))


class _Connection:
    """One websocket connection driving one SyncDriver."""

    def __init__(
        self,
        node: Node,
        ws: ClientConnection,
        token: str,
        *,
        heartbeat_ms: int,
        monotonic_ms: Callable[[], int],
        wall_ms: Callable[[], int],
        on_progress: ProgressCallback | None,
    ) -> None:
        self.ws = ws
        self.monotonic_ms = monotonic_ms
        session = ClientSession(
            dataset=node.dataset, node=node.node_id, token=token, heartbeat_ms=heartbeat_ms
        )
        self.driver = SyncDriver(node, session, wall_ms=wall_ms, on_progress=on_progress)

    async def flush(self) -> None:
        for frame in self.driver.data_to_send():
            await self.ws.send(frame)

    async def step(self, wait_s: float) -> None:
        """Receive for up to ``wait_s``, then tick, poll and send. Raises what
        ``SyncDriver.receive``/``tick`` raise, RelayUnreachable when the
        connection closed."""
        try:
            msg = await asyncio.wait_for(self.ws.recv(), timeout=wait_s)
        except TimeoutError:
            msg = None
        except ConnectionClosed as exc:
            # A final error frame may have been read already; recv raises after it.
            raise RelayUnreachable(f"the relay closed the connection ({exc})") from None
        if msg is not None:
            self.driver.receive(msg if isinstance(msg, bytes) else msg.encode())
        try:
            self.driver.tick(self.monotonic_ms())
        except RelayUnreachable:
            # A dead link: the closing handshake would wait out close_timeout
            # (10 s) on a peer that no longer answers. Drop the socket now.
            self.ws.transport.abort()
            raise
        self.driver.poll()
        await self.flush()


def _classify(exc: BaseException, url: str) -> BranchlineError:
    if isinstance(exc, BranchlineError):
        return exc
    if isinstance(exc, InvalidURI):
        return UserError(f"invalid relay URL {safe_url(url)!r}: {exc}")
    if isinstance(exc, OSError | InvalidHandshake | TimeoutError | ConnectionClosed):
        return RelayUnreachable(f"cannot reach the relay at {safe_url(url)}: {exc}")
    raise exc


async def _open(url: str) -> ClientConnection:
    return await connect(
        url,
        open_timeout=OPEN_TIMEOUT_S,
        ping_interval=None,  # liveness is the protocol's heartbeat
        max_size=MAX_FRAME_BYTES,
        max_queue=16,  # frames buffered before reading pauses the socket
        compression=None,  # Yjs updates are compact; deflate costs CPU per frame
    )


async def node_sync(
    node: Node,
    *,
    timeout: float = 60.0,
    url: str | None = None,
    token: str | None = None,
    on_progress: ProgressCallback | None = None,
    heartbeat_ms: int = DEFAULT_HEARTBEAT_MS,
    monotonic_ms: Callable[[], int] = _monotonic_ms,
    wall_ms: Callable[[], int] = _wall_ms,
) -> SyncDriver:
    """One-shot sync: push every pending local change, pull everything the
    relay holds, and return (the driver, for its stats) once the pass is
    complete, every update is acknowledged and the outbox is empty.

    Raises RelayUnreachable (cannot connect, or the link broke), AuthError
    (token refused), DatasetMismatch (the relay serves another dataset; the
    message names both), RelayRefused (other refusal needing a person),
    SyncTimeout (not fully synced within ``timeout`` seconds), UserError (no
    relay configured, bad URL). No retry: ``LiveSync`` retries.
    """
    if url is None or token is None:
        url, token = relay_of(node)
    try:
        async with asyncio.timeout(timeout):
            try:
                ws = await _open(url)
            except Exception as exc:  # classified, or re-raised
                raise _classify(exc, url) from None
            async with ws:
                conn = _Connection(
                    node,
                    ws,
                    token,
                    heartbeat_ms=heartbeat_ms,
                    monotonic_ms=monotonic_ms,
                    wall_ms=wall_ms,
                    on_progress=on_progress,
                )
                await conn.flush()
                while not conn.driver.synced:
                    refused = conn.driver.upload_refused
                    if refused is not None and conn.driver.session.synced:
                        raise RelayRefused(refused)  # downloaded all; uploads impossible
                    try:
                        await conn.step(POLL_S)
                    except (OSError, ConnectionClosed) as exc:
                        raise _classify(exc, url) from None
                return conn.driver
    except TimeoutError:
        raise SyncTimeout(
            f"not fully synced with {safe_url(url)} after {timeout:g} s; "
            "try again, or give more time with --timeout"
        ) from None


class LiveSync:
    """Keeps a node synced while the context is open: connects, syncs, ships
    local writes (this and other processes') live, reconnects with backoff,
    honours offline mode and writes the run heartbeat for ``status``.

    ``async with LiveSync(node) as live: ... await live.wait_synced()``.
    Errors never escape the loop: auth and dataset refusals are logged at
    ERROR and retried at the backoff cap (a person may fix the relay side).
    """

    def __init__(
        self,
        node: Node,
        *,
        url: str | None = None,
        token: str | None = None,
        backoff: Backoff | None = None,
        on_progress: ProgressCallback | None = None,
        heartbeat_ms: int = DEFAULT_HEARTBEAT_MS,
        monotonic_ms: Callable[[], int] = _monotonic_ms,
        wall_ms: Callable[[], int] = _wall_ms,
        write_status: bool = True,
    ) -> None:
        if url is None or token is None:
            url, token = relay_of(node)
        self.node = node
        self.url = url
        self._token = token
        self.backoff = backoff or Backoff()
        self._on_progress = on_progress
        self._heartbeat_ms = heartbeat_ms
        self._monotonic_ms = monotonic_ms
        self._wall_ms = wall_ms
        self._write_status = write_status
        self.state = "stopped"
        self.online = False
        self.last_error: BranchlineError | None = None
        self.driver: SyncDriver | None = None
        self._synced = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._status_at = 0

    async def __aenter__(self) -> LiveSync:
        self._task = asyncio.create_task(self._run(), name="branchline-live-sync")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Close the connection and stop; idempotent."""
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait_synced(self, timeout: float | None = None) -> None:
        """Return once connected, the pass complete and the outbox empty.
        Raises TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            await self._synced.wait()

    # -- internals -------------------------------------------------------------

    def _set_state(self, state: str, detail: str = "") -> None:
        if state != self.state:
            log.info("%s%s", state, f" ({detail})" if detail else "")
        self.state = state
        self.online = state == "online"
        if state != "online":
            self._synced.clear()
        self._status(force=True)

    def _status(self, force: bool = False) -> None:
        if not self._write_status:
            return
        now = self._monotonic_ms()
        if force or now - self._status_at >= STATUS_EVERY_S * 1000:
            self._status_at = now
            _write_run_state(self.node, self.state, self._wall_ms())

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped; True when stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        return self._stop.is_set()

    async def _run(self) -> None:
        attempt = 0
        try:
            while not self._stop.is_set():
                if is_offline(self.node):
                    self._set_state("offline mode")
                    self._status()
                    if await self._sleep(OFFLINE_CHECK_S):
                        break
                    continue
                self._set_state("connecting", safe_url(self.url))
                try:
                    await self._connection()
                    attempt = 0  # a session that ended cleanly (offline mode, stop)
                except (AuthError, DatasetMismatch, RelayRefused) as exc:
                    self.last_error = exc
                    log.error("%s", exc)
                    attempt = 30  # straight to the cap: a person must act
                except BranchlineError as exc:
                    self.last_error = exc
                    log.info("offline (%s)", exc)
                except (OSError, InvalidHandshake, TimeoutError, ConnectionClosed) as exc:
                    self.last_error = _classify(exc, self.url)
                    log.info("offline (%s)", self.last_error)
                if self._stop.is_set():
                    break
                if self.state == "online":
                    attempt = 0  # it was up: start the backoff over
                delay = self.backoff.delay(attempt)
                attempt = min(attempt + 1, 30)
                self._set_state("backing off", f"{delay:.1f}s")
                if await self._sleep(delay):
                    break
        finally:
            self.online = False
            self.state = "stopped"
            self._synced.clear()
            if self._write_status:
                with contextlib.suppress(BranchlineError):
                    _write_run_state(self.node, "stopped", self._wall_ms())
            log.info("stopped")

    async def _connection(self) -> None:
        ws = await _open(self.url)
        async with ws:
            conn = _Connection(
                self.node,
                ws,
                self._token,
                heartbeat_ms=self._heartbeat_ms,
                monotonic_ms=self._monotonic_ms,
                wall_ms=self._wall_ms,
                on_progress=self._on_progress,
            )
            self.driver = conn.driver
            await conn.flush()
            checked = self._monotonic_ms()
            while not self._stop.is_set():
                await conn.step(POLL_S)
                if conn.driver.opened is not None and self.state != "online":
                    self._set_state("online", safe_url(self.url))
                    if conn.driver.upload_refused is not None:
                        log.error("%s", conn.driver.upload_refused)
                if conn.driver.synced:
                    self._synced.set()
                else:
                    self._synced.clear()
                self._status()
                now = self._monotonic_ms()
                if now - checked >= OFFLINE_CHECK_S * 1000:
                    checked = now
                    if is_offline(self.node):
                        return


def run_status(node: Node, now_ms: int) -> dict[str, Any]:
    """What ``branchline status`` shows about the running ``node run``:
    ``online`` is True only when its heartbeat is fresh and it is connected."""
    meta = node.store.meta()
    beat = int(meta.get(META_RUN_HEARTBEAT, "0") or 0)
    fresh = beat > 0 and now_ms - beat <= STALE_AFTER_MS
    state = meta.get(META_RUN_STATE, "stopped") if fresh else "not running"
    return {
        "online": fresh and state == "online",
        "state": state,
        "offline_mode": meta.get(META_OFFLINE) == "1",
        "heartbeat": beat or None,
    }
