"""The asyncio edge of node sync (docs/sync.md): websockets connection, the
receive/tick/send loop around a ``SyncDriver``, reconnect with capped
exponential backoff and jitter, offline mode, and the run heartbeat that
``branchline status`` reads.

**Threads.** Every ``Node`` call of a sync (imports, exports, outbox reads,
acks, refresh, failures, run status) runs on one dedicated worker thread,
never on the event loop: a 100,000-record import takes seconds, and the loop
must keep answering heartbeats meanwhile. That thread opens its *own*
``Node`` on the home, so its SQLite connection is created and used by that
thread only (sqlite3's ``check_same_thread`` stays on; no lock to forget).
The caller's ``Node`` is never touched by the sync and stays usable on the
caller's thread: it sees the sync's commits like another process's (reads
come from SQLite, ``refresh`` catches up the in-memory documents). The
driver and its protocol session run on the worker too, one call at a time.
While a call runs longer than a heartbeat interval, the loop sends protocol
pings itself so the relay does not drop the link; frames that arrive in the
meantime wait in websockets' bounded queue and are handled in order after.

Time and randomness are injected (``monotonic_ms``, ``wall_ms``, ``rng``).
Everything is bounded: one frame received at a time (websockets' own buffer
limits backpressure the socket), live rows per poll (``MAX_LIVE_BATCH``), the
in-flight window of the session, the backoff delay (``Backoff.cap_s``) and
the one-shot sync (``timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from ..clock import system_random
from ..errors import AuthError, BranchlineError, DatasetMismatch, UpdatesRefused, UserError
from ..names import relay_urls
from ..node import Node
from ..protocol import (
    DEFAULT_HEARTBEAT_MS,
    TIMEOUT,
    ClientSession,
    Limits,
    SessionState,
    encode_message,
)
from ..protocol.messages import Ping
from ..sync import (
    ProgressCallback,
    RelayRefused,
    RelayUnreachable,
    SyncDriver,
    SyncTimeout,
    failure_counts,
)
from ..tls import certificate_error, client_context
from ..wslog import websockets_logger
from .runlog import ReachLog

log = logging.getLogger("branchline.sync")

POLL_S = 0.05  # look for other processes' writes this often (ships within ~100 ms)
OFFLINE_CHECK_S = 0.5  # re-read the offline flag this often
# After the relay refused the token, try again this seldom unless the token
# in the node's meta changes first (``branchline node config --token``).
TOKEN_RETRY_S = 300.0
STATUS_EVERY_S = 2.0  # write the run heartbeat this often
#: A run heartbeat older than this means no ``node run`` is connected.
STALE_AFTER_MS = 10_000
OPEN_TIMEOUT_S = 5.0
#: While the node thread is busy, the loop checks this often whether a ping is due.
KEEPALIVE_CHECK_S = 0.1
#: A one-shot sync reconnects at most this often after refusals that set
#: documents aside (each one holds at least one more document).
MAX_REFUSAL_ROUNDS = 100
MAX_FRAME_BYTES = Limits().max_frame  # websocket max_size follows the protocol limit
PING_FRAME = encode_message(Ping(), max_frame=MAX_FRAME_BYTES)

#: States of the loop that ReachLog reports (state changes log the others).
_REACH_STATES = frozenset({"connecting", "backing off", "online"})

META_OFFLINE = "offline"
META_RUN_STATE = "run_state"
META_RUN_HEARTBEAT = "run_heartbeat"
META_LAST_SYNC = "last_sync"
#: Wall ms when a session with the relay was last open (status "last reached").
META_LAST_REACHED = "last_reached"
#: "<wall ms> <message>": why the latest attempt to sync failed, since when;
#: cleared when a session opens.
META_LAST_ERROR = "last_sync_error"
MAX_ERROR_CHARS = 500


T = TypeVar("T")


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Backoff:
    """Capped exponential backoff with "equal jitter": attempt n waits a
    uniform delay in [d/2, d] with d = min(cap, base_s * 2**n), so a relay
    restart does not see every node come back at the same instant.

    The cap is ``cap_s`` after the relay answered and failed (it is up and
    busy or refusing: waiting longer spares it), and the smaller
    ``link_cap_s`` when nothing answered (connection refused, reset or
    timed out: such an attempt costs the relay nothing, and retrying soon is
    what makes a restored link carry the first change within a second)."""

    base_s: float = 0.2
    cap_s: float = 3.0
    link_cap_s: float = 0.5
    rng: random.Random = field(default_factory=system_random)

    def delay(self, attempt: int, *, link: bool = False) -> float:
        cap = min(self.cap_s, self.link_cap_s) if link else self.cap_s
        ceiling = min(cap, self.base_s * (2 ** min(attempt, 30)))
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
    """The URL without user info or query (never log credentials); each of
    a comma-separated list of them."""
    if "," in url:
        return ",".join(safe_url(one) for one in relay_urls(url))
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
        if state == "online":
            _reached(node, wall_ms)


def _reached(node: Node, wall_ms: int) -> None:
    """In a transaction: the relay was reached at ``wall_ms``; no error stands."""
    node.store.set_meta(META_LAST_REACHED, str(wall_ms))
    node.store.conn.execute("DELETE FROM meta WHERE key = ?", (META_LAST_ERROR,))


def note_reached(node: Node, wall_ms: int) -> None:
    """Record that a session with the relay was open at ``wall_ms``."""
    with node.store.transaction():
        _reached(node, wall_ms)


def note_sync_error(node: Node, message: str, wall_ms: int) -> None:
    """Record why syncing failed; the time stays that of the first failure
    with the same message (the error stands since then)."""
    message = " ".join(message.split())[:MAX_ERROR_CHARS]
    with node.store.transaction():
        row = node.store.conn.execute(
            "SELECT value FROM meta WHERE key = ?", (META_LAST_ERROR,)
        ).fetchone()
        if row is None or row[0].partition(" ")[2] != message:
            node.store.set_meta(META_LAST_ERROR, f"{wall_ms} {message}")


class _WallClock:
    """The injected ``wall_ms`` as the ``Clock`` the node thread's Node uses."""

    def __init__(self, wall_ms: Callable[[], int]) -> None:
        self._wall_ms = wall_ms

    def wall_ms(self) -> int:
        return self._wall_ms()


class NodeThread:
    """The one thread that owns a ``Node`` during a sync (see the module
    docstring). ``async with NodeThread(home, ...) as nt: await nt.run(f, ...)``
    runs ``f(nt.node, ...)`` on that thread; calls run one at a time, in the
    order they were made. Leaving the context closes the Node on its thread
    after the calls already queued (a call cannot be interrupted, so one
    still running when its caller was cancelled finishes first).

    Raises what ``Node.open`` raises (HomeNotFound, FormatVersionError,
    DatasetMismatch) on entry, and what each call raises from ``run``.
    """

    def __init__(self, home: Path, *, dataset: str, wall_ms: Callable[[], int]) -> None:
        self._home = home
        self._dataset = dataset
        self._clock = _WallClock(wall_ms)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="branchline-node")
        self._node: Node | None = None

    @property
    def node(self) -> Node:
        """The thread's Node: only pass it to functions given to ``run``."""
        if self._node is None:
            raise RuntimeError("NodeThread used outside its context")
        return self._node

    async def __aenter__(self) -> NodeThread:
        try:
            self._node = await self._call(
                functools.partial(Node.open, self._home, dataset=self._dataset, clock=self._clock)
            )
        except BaseException:
            self._pool.shutdown(wait=False)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        node, self._node = self._node, None
        try:
            if node is not None:
                await self._call(node.close)
        finally:
            self._pool.shutdown(wait=False)  # the queue is empty: the thread exits

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(node, *args)`` on the node thread."""
        return await self._call(functools.partial(fn, self.node, *args))

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)


def _posting(on_progress: ProgressCallback | None) -> ProgressCallback | None:
    """``on_progress`` called on the event loop (the driver runs on the node thread)."""
    if on_progress is None:
        return None
    loop = asyncio.get_running_loop()
    cb = on_progress

    def post(collection: str, done: int, total: int) -> None:
        loop.call_soon_threadsafe(cb, collection, done, total)

    return post


class _Connection:
    """One websocket connection driving one SyncDriver on the node thread."""

    def __init__(
        self,
        nt: NodeThread,
        ws: ClientConnection,
        token: str,
        *,
        heartbeat_ms: int,
        monotonic_ms: Callable[[], int],
        wall_ms: Callable[[], int],
        on_progress: ProgressCallback | None,
        on_apply: Callable[[float], None] | None = None,
    ) -> None:
        self.nt = nt
        self.on_apply = on_apply
        self.ws = ws
        self.monotonic_ms = monotonic_ms
        self.heartbeat_ms = heartbeat_ms
        session = ClientSession(
            dataset=nt.node.dataset, node=nt.node.node_id, token=token, heartbeat_ms=heartbeat_ms
        )
        # Built here but only ever called on the node thread (through ``call``).
        self.driver = SyncDriver(nt.node, session, wall_ms=wall_ms, on_progress=on_progress)
        self.open = False  # the session was OPEN after the latest call
        self.synced = False  # driver.synced after the latest call
        self.sent_ms = monotonic_ms()  # when the loop last sent a frame
        self.keepalives = 0  # pings the loop sent while the node thread was busy

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(node, *args)`` on the node thread. Meanwhile the loop keeps the
        link alive: a protocol ping whenever nothing was sent for a heartbeat
        interval (once the session is open; the relay answers with a pong)."""
        task = asyncio.ensure_future(self.nt.run(fn, *args))
        while True:
            done, _ = await asyncio.wait({task}, timeout=KEEPALIVE_CHECK_S)
            if done:
                return task.result()
            now = self.monotonic_ms()
            if self.open and now - self.sent_ms >= self.heartbeat_ms:
                await self.ws.send(PING_FRAME)
                self.sent_ms = now
                self.keepalives += 1

    async def flush(self, frames: list[bytes]) -> None:
        for frame in frames:
            await self.ws.send(frame)
        if frames:
            self.sent_ms = self.monotonic_ms()

    async def start(self) -> None:
        await self.flush(await self.call(self._first))

    def _first(self, _node: Node) -> list[bytes]:
        return self.driver.data_to_send()

    def _work(self, _node: Node, msg: bytes | None) -> tuple[list[bytes], bool]:
        """Node thread: handle ``msg``, tick, poll; the frames to send and
        whether the link is dead. Raises what the driver raises."""
        driver = self.driver
        try:
            if msg is not None:
                driver.receive(msg)
            # Read the clock after a (possibly long) import, not before.
            driver.tick(self.monotonic_ms())
            dead = False
        except RelayUnreachable:
            if driver.session.error is None or driver.session.error.code != TIMEOUT:
                raise
            dead = True
        if not dead:
            driver.poll()
        self.open = driver.session.state is SessionState.OPEN
        self.synced = driver.synced
        return driver.data_to_send(), dead

    async def step(self, wait_s: float) -> None:
        """Receive for up to ``wait_s``, then tick, poll and send (on the node
        thread). Raises what ``SyncDriver.receive``/``tick`` raise,
        RelayUnreachable when the connection closed or the link is dead."""
        try:
            msg = await asyncio.wait_for(self.ws.recv(), timeout=wait_s)
        except TimeoutError:
            msg = None
        except ConnectionClosed as exc:
            # A final error frame may have been read already; recv raises after it.
            raise RelayUnreachable(f"the relay closed the connection ({exc})") from None
        data = msg.encode() if isinstance(msg, str) else msg
        started = time.perf_counter()
        frames, dead = await self.call(self._work, data)
        if data is not None and self.on_apply is not None:
            self.on_apply(time.perf_counter() - started)
        if dead:
            # A dead link: the closing handshake would wait out close_timeout
            # (10 s) on a peer that no longer answers. Drop the socket now.
            self.ws.transport.abort()
            error = self.driver.session.error
            raise RelayUnreachable(f"{error.message if error else 'the link is dead'}")
        await self.flush(frames)


def relay_tls(node: Node) -> ssl.SSLContext | None:
    """The TLS context for the node's relay (engine.transport.tls)."""
    return client_context(node.store.meta())


def _nothing_answered(exc: BaseException) -> bool:
    """Whether a failed attempt got no answer from the relay: refused,
    reset or timed out, also when websockets wraps it (a handshake cut
    short); an HTTP status or a closing handshake is an answer."""
    seen: BaseException | None = exc
    for _ in range(4):  # a short chain of causes
        if seen is None or isinstance(seen, InvalidStatus | ConnectionClosed):
            return False
        if isinstance(seen, OSError | TimeoutError | EOFError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _classify(exc: BaseException, url: str) -> BranchlineError:
    if isinstance(exc, BranchlineError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        return certificate_error(exc, safe_url(url))
    if isinstance(exc, InvalidURI):
        return UserError(f"invalid relay URL {safe_url(url)!r}: {exc}")
    if isinstance(exc, OSError | InvalidHandshake | TimeoutError | ConnectionClosed):
        return RelayUnreachable(f"cannot reach the relay at {safe_url(url)}: {exc}")
    raise exc


async def _open(url: str, tls: ssl.SSLContext | None) -> ClientConnection:
    extra: dict[str, Any] = {"ssl": tls} if tls is not None and url.startswith("wss:") else {}
    return await connect(
        url,
        **extra,
        open_timeout=OPEN_TIMEOUT_S,
        ping_interval=None,  # liveness is the protocol's heartbeat
        max_size=MAX_FRAME_BYTES,
        max_queue=16,  # frames buffered before reading pauses the socket
        compression=None,  # Yjs updates are compact; deflate costs CPU per frame
        logger=websockets_logger("websockets.client"),  # frames without payloads (tokens)
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
    """One-shot sync of ``node``'s home: push every pending local change, pull
    everything the relay holds, and return (the driver, for its ``stats``,
    ``quarantined``, ``held`` and ``failures``) once the pass is complete,
    every update sent is acknowledged and the outbox holds nothing but
    documents set aside by sync failures.

    The sync runs on its own node thread (module docstring); ``node`` itself
    is only read here (relay URL and token) and stays usable. ``on_progress``
    is called on the event loop with record counts (``engine.sync.Progress``).

    An update the relay refuses (too large, invalid, unknown document, ...)
    does not fail the sync: its document is set aside as a sync failure
    (``engine.sync.failures``) and the sync reconnects and goes on with the
    rest. ``driver.failures`` then counts what waits for a person; callers
    that need all or nothing check it (``branchline sync`` exits 1).

    Raises RelayUnreachable (cannot connect, or the link broke), AuthError
    (token refused), DatasetMismatch (the relay serves another dataset; the
    message names both), RelayRefused (other refusal needing a person, such
    as a read-only node with local changes: raised once everything was
    downloaded), SyncTimeout (not done within ``timeout`` seconds),
    UserError (no relay configured, bad URL). No retry on a broken link:
    ``LiveSync`` retries.
    """
    if url is None or token is None:
        url, token = relay_of(node)
    urls = relay_urls(url) or [url]
    tls = relay_tls(node)
    progress = _posting(on_progress)
    try:
        async with asyncio.timeout(timeout):
            async with NodeThread(node.home, dataset=node.dataset, wall_ms=wall_ms) as nt:
                set_aside: list[str] = []  # documents held by refusals, all rounds
                rounds = 0
                while True:
                    try:
                        driver = await _sync_once(
                            nt, (urls[0], tls), token, progress, heartbeat_ms, monotonic_ms,
                            wall_ms, set_aside,
                        )  # fmt: skip
                    except RelayUnreachable as exc:
                        if len(urls) == 1:
                            # The last relay: the status shows why (as below).
                            with contextlib.suppress(BranchlineError):
                                await nt.run(note_sync_error, str(exc), wall_ms())
                            raise
                        urls = urls[1:]  # failover: the next relay of the store
                        continue
                    except UpdatesRefused as exc:
                        rounds += 1
                        if rounds >= MAX_REFUSAL_ROUNDS:
                            raise
                        log.info("%s", exc)
                        continue
                    except BranchlineError as exc:
                        with contextlib.suppress(BranchlineError):
                            await nt.run(note_sync_error, str(exc), wall_ms())
                        raise
                    await nt.run(note_reached, wall_ms())
                    driver.quarantined = set_aside
                    driver.failures = await nt.run(failure_counts)
                    return driver
    except TimeoutError:
        raise SyncTimeout(
            f"not fully synced with {safe_url(url)} after {timeout:g} s; "
            "try again, or give more time with --timeout"
        ) from None


async def _sync_once(
    nt: NodeThread,
    where: tuple[str, ssl.SSLContext | None],
    token: str,
    on_progress: ProgressCallback | None,
    heartbeat_ms: int,
    monotonic_ms: Callable[[], int],
    wall_ms: Callable[[], int],
    set_aside: list[str],
) -> SyncDriver:
    """One connection of ``node_sync``, until synced; the documents its
    driver set aside are added to ``set_aside`` however it ends."""
    url, tls = where
    try:
        ws = await _open(url, tls)
    except Exception as exc:  # classified, or re-raised
        raise _classify(exc, url) from None
    async with ws:
        conn = _Connection(
            nt,
            ws,
            token,
            heartbeat_ms=heartbeat_ms,
            monotonic_ms=monotonic_ms,
            wall_ms=wall_ms,
            on_progress=on_progress,
        )
        try:
            await conn.start()
            while not conn.synced:
                try:
                    await conn.step(POLL_S)
                except (OSError, ConnectionClosed) as exc:
                    raise _classify(exc, url) from None
        finally:
            set_aside.extend(conn.driver.quarantined)
            conn.driver.stats.extra["keepalives"] = conn.keepalives
        refused = conn.driver.upload_refused
        if refused is not None:
            raise RelayRefused(refused)  # downloaded all; uploads impossible
        return conn.driver


class LiveSync:
    """Keeps a node synced while the context is open: connects, syncs, ships
    local writes (this and other processes') live, reconnects with backoff,
    honours offline mode and writes the run heartbeat for ``status``.

    ``async with LiveSync(node) as live: ... await live.wait_synced()``.
    Every Node call runs on a node thread of its own (module docstring); the
    ``node`` given is only read here (relay URL, token, home) and stays
    usable by its owner, whose writes are shipped within about 100 ms.
    Errors never escape the loop: a refused token is logged once at ERROR
    (saying what to do) and tried again only when the node's token changes
    or after ``TOKEN_RETRY_S``; dataset and version refusals are logged at
    ERROR and retried at the backoff cap (a person may fix the relay side);
    a refused update sets its document aside (``branchline failures``) and
    the connection is opened again at once. With ``capture`` (the default)
    it also writes what captured tables queue (engine.transport.pump),
    connected or not.
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
        on_apply: Callable[[float], None] | None = None,
        on_synced: Callable[[float], None] | None = None,
        capture: bool = True,
    ) -> None:
        # Read again from the node's meta before each connection (``node
        # config`` may change them while it runs) unless given here.
        self._from_meta = url is None or token is None
        if url is None or token is None:
            url, token = relay_of(node)
        self._tls: ssl.SSLContext | None = None  # read before each connection
        self._on_apply = on_apply
        self._on_synced = on_synced
        self._capture = capture
        self.home = node.home
        self.dataset = node.dataset
        self._relays = url  # one URL, or several comma-separated (failover)
        self._at = 0  # which of them the next attempt uses
        self.url = (relay_urls(url) or [url])[0]
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
        #: The current connection's driver. It runs on the node thread: read
        #: its attributes for inspection only.
        self.driver: SyncDriver | None = None
        #: Pings the loop sent while the node thread was busy (all connections).
        self.keepalives = 0
        self._nt: NodeThread | None = None
        self._synced = asyncio.Event()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._status_at = 0
        self.reach = ReachLog(log, monotonic_ms)

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

    @property
    def synced(self) -> bool:
        """Connected, the pass complete and the outbox empty (but for
        documents set aside by sync failures)."""
        return self._synced.is_set()

    def sync_now(self) -> bool:
        """Sync again now: while waiting to reconnect, reconnect at once;
        while connected and synced, open a new connection, whose first pass
        compares every document with the relay. Returns False (and does
        nothing) in offline mode or while a pass is under way already."""
        if self.state in ("offline mode", "connecting") or (
            self.state == "online" and not self.synced
        ):
            return False
        self._wake.set()
        return True

    async def wait_synced(self, timeout: float | None = None) -> None:
        """Return once connected, the pass complete and the outbox empty
        (but for documents set aside by sync failures). Raises TimeoutError
        after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            await self._synced.wait()

    # -- internals -------------------------------------------------------------

    async def _set_state(self, state: str, detail: str = "") -> None:
        if state != self.state:
            # Reaching the relay or not is ReachLog's: once per change, not
            # once per attempt.
            level = logging.DEBUG if state in _REACH_STATES else logging.INFO
            log.log(level, "%s%s", state, f" ({detail})" if detail else "")
        self.state = state
        self.online = state == "online"
        if state != "online":
            self._synced.clear()
        await self._status(force=True)

    async def _status(self, force: bool = False) -> None:
        if not self._write_status or self._nt is None:
            return
        now = self._monotonic_ms()
        if force or now - self._status_at >= STATUS_EVERY_S * 1000:
            self._status_at = now
            await self._nt.run(_write_run_state, self.state, self._wall_ms())

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped or woken (``sync_now``); True when stopped."""
        stop = asyncio.ensure_future(self._stop.wait())
        wake = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({stop, wake}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            wake.cancel()
        self._wake.clear()
        return self._stop.is_set()

    async def _run(self) -> None:
        try:
            async with NodeThread(self.home, dataset=self.dataset, wall_ms=self._wall_ms) as nt:
                self._nt = nt
                try:
                    async with contextlib.AsyncExitStack() as stack:
                        if self._capture:
                            from .pump import CapturePump  # it builds on NodeThread, here

                            await stack.enter_async_context(CapturePump(nt))
                        await self._loop(nt)
                finally:
                    self.online = False
                    self.state = "stopped"
                    self._synced.clear()
                    if self._write_status:
                        with contextlib.suppress(BranchlineError):
                            await nt.run(_write_run_state, "stopped", self._wall_ms())
                    self._nt = None
        except BranchlineError as exc:  # the home cannot be opened
            self.last_error = exc
            log.error("%s", exc)
        log.info("stopped")

    async def _loop(self, nt: NodeThread) -> None:
        attempt = 0
        while not self._stop.is_set():
            if await nt.run(is_offline):
                await self._set_state("offline mode")
                await self._status()
                if await self._sleep(OFFLINE_CHECK_S):
                    break
                continue
            if self._from_meta:
                with contextlib.suppress(BranchlineError):
                    self._relays, self._token = await nt.run(relay_of)
            urls = relay_urls(self._relays) or [self._relays]
            self.url = urls[self._at % len(urls)]
            try:
                self._tls = await nt.run(relay_tls)
            except BranchlineError as exc:  # the CA file went away: say so, wait
                await self._failed(nt, exc, logging.ERROR)
                if await self._sleep(self.backoff.cap_s):
                    break
                continue
            await self._set_state("connecting", safe_url(self.url))
            began = self._monotonic_ms()
            link = False  # the attempt failed with nothing answering
            try:
                await self._connection(nt)
                attempt = 0  # a session that ended cleanly (offline mode, stop)
            except AuthError as exc:
                await self._failed(nt, exc, logging.ERROR)
                if await self._token_refused(nt):
                    break
                attempt = 0
                continue
            except (DatasetMismatch, RelayRefused) as exc:
                await self._failed(nt, exc, logging.ERROR)
                attempt = 30  # straight to the cap: a person must act
            except UpdatesRefused as exc:
                self.last_error = exc
                log.warning("%s", exc)
                attempt = 0  # the refused documents are held; the rest goes on at once
            except BranchlineError as exc:
                await self._failed(nt, exc)
            except (OSError, InvalidHandshake, TimeoutError, ConnectionClosed) as exc:
                error = _classify(exc, self.url)
                if isinstance(error, RelayRefused):  # a certificate: a person must act
                    await self._failed(nt, error, logging.ERROR)
                    attempt = 30
                else:
                    link = _nothing_answered(exc)
                    await self._failed(nt, error)
            if self._stop.is_set():
                break
            self._at += 1  # the attempt ended: failover to the next relay, if several
            if self.reach.due():
                self.reach.summary(await nt.run(Node.pending))
            if self.state == "online":
                attempt = 0  # it was up: start the backoff over
            # The time the failed attempt took (a stalled handshake, a session
            # that lived for hours) counts as waiting already done.
            spent = (self._monotonic_ms() - began) / 1000
            delay = max(0.0, self.backoff.delay(attempt, link=link) - spent)
            attempt = min(attempt + 1, 30)
            await self._set_state("backing off", f"{delay:.1f}s")
            if await self._sleep(delay):
                break

    async def _failed(
        self, nt: NodeThread, exc: BranchlineError, level: int = logging.WARNING
    ) -> None:
        """An attempt failed: logged as ReachLog says, kept for ``status``."""
        self.last_error = exc
        self.reach.failed(str(exc), level)
        if self._write_status:
            with contextlib.suppress(BranchlineError):
                await nt.run(note_sync_error, str(exc), self._wall_ms())

    async def _token_refused(self, nt: NodeThread) -> bool:
        """Wait, without connecting, until the node's token changes or
        ``TOKEN_RETRY_S`` pass; True when stopped meanwhile."""
        await self._set_state("token refused", "waiting for a new token: branchline node config")
        refused = self._token
        waited = 0.0
        while waited < TOKEN_RETRY_S:
            if await self._sleep(OFFLINE_CHECK_S):
                return True
            waited += OFFLINE_CHECK_S
            await self._status()
            with contextlib.suppress(BranchlineError):
                if self._from_meta and (await nt.run(relay_of))[1] != refused:
                    log.info("new token: connecting")
                    return False
        return False

    async def _connection(self, nt: NodeThread) -> None:
        ws = await _open(self.url, self._tls)
        async with ws:
            conn = _Connection(
                nt,
                ws,
                self._token,
                heartbeat_ms=self._heartbeat_ms,
                monotonic_ms=self._monotonic_ms,
                wall_ms=self._wall_ms,
                on_progress=_posting(self._on_progress),
                on_apply=self._on_apply,
            )
            self.driver = conn.driver
            self._wake.clear()
            started = time.perf_counter()
            await conn.start()
            checked = self._monotonic_ms()
            try:
                while not self._stop.is_set():
                    await conn.step(POLL_S)
                    if conn.open and self.state != "online":
                        await self._set_state("online", safe_url(self.url))
                        self.reach.online(safe_url(self.url))
                        refused = conn.driver.upload_refused
                        if refused is not None:
                            log.error("%s", refused)
                    if conn.synced:
                        if not self._synced.is_set() and self._on_synced is not None:
                            self._on_synced(time.perf_counter() - started)
                        self._synced.set()
                    else:
                        self._synced.clear()
                    if self._wake.is_set():
                        log.info("syncing again, as asked")
                        return  # _loop connects again at once
                    await self._status()
                    now = self._monotonic_ms()
                    if now - checked >= OFFLINE_CHECK_S * 1000:
                        checked = now
                        if await nt.run(is_offline):
                            return
            finally:
                self.keepalives += conn.keepalives


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
